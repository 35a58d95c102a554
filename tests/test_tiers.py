"""The test tiers themselves (tests/conftest.py, docs/testing.md): a test not marked
mta cannot start a server, and with CI=true a skip fails unless its reason is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [
    ["postfix", "-c", "/nonexistent", "start"],
    [sys.executable, "-m", "listmilter", "-c", "/nonexistent", "serve"],
    ["/opt/listmilter-test/sendmail/usr/libexec/sendmail/sendmail", "-C", "/nonexistent", "-bD"],
    ["smtp-sink", "127.0.0.1:1", "10"],
    ["/usr/sbin/nginx", "-p", "/nonexistent", "-c", "/nonexistent/nginx.conf"],
    ["/usr/lib/postgresql/15/bin/pg_ctl", "-D", "/nonexistent", "start"],
])
def test_an_unmarked_test_cannot_start_a_server(_server_guard, argv):
    with pytest.raises(RuntimeError, match="is not marked mta but starts a server"):
        subprocess.Popen(argv)
    assert len(_server_guard) == 1
    _server_guard.clear()       # this one was on purpose


def test_an_unmarked_test_cannot_start_the_sink(_server_guard):
    from tests.bed.sink import Sink
    with pytest.raises(RuntimeError, match="Sink.start"):
        Sink().start()
    _server_guard.clear()


def _inner_pytest(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    """pytest on two skipping tests, with this project's conftest as a plugin."""
    (tmp_path / "test_skips.py").write_text(textwrap.dedent("""\
        import pytest

        def test_allowed():
            pytest.skip("cannot hide postconf here (unshare -m: Operation not permitted)")

        def test_not_allowed():
            pytest.skip("groff not installed")
        """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true" if ci else ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_in_ci_a_skip_fails_unless_its_reason_is_allowed(tmp_path):
    proc = _inner_pytest(tmp_path, ci=True)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 skipped" in proc.stdout, proc.stdout
    assert "skipped in CI, and the reason is not in conftest.ALLOWED_SKIPS: groff not installed" in proc.stdout


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_outside_ci_a_skip_stays_a_skip(ci, monkeypatch):
    monkeypatch.setenv("CI", ci)
    from tests.conftest import _ci
    assert not _ci()
