"""The package's shape, enforced: layers (import-linter), the settings view, lint and types."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from listmilter.core import settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_hold():
    """core < store < app < mta | web < cli, a pure core, and leaves (pyproject's [tool.importlinter])."""
    proc = _run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout


def test_a_wrong_import_is_caught(tmp_path):
    """The contract is live: a core module importing the store breaks it."""
    bad = ROOT / "listmilter" / "core" / "_layering_probe.py"
    bad.write_text("from listmilter.store import sqlite  # noqa: F401\n")
    try:
        proc = _run(str(BIN / "lint-imports"), "--no-cache")
    finally:
        bad.unlink()
    assert proc.returncode != 0
    assert "listmilter.core._layering_probe -> listmilter.store" in proc.stdout


def test_the_settings_view_has_one_field_per_setting():
    assert [f.name for f in dataclasses.fields(settings.ListSettings)] == list(settings.SETTINGS)
    assert settings.resolve_all({}, {}) == settings.ListSettings(
        **{name: s.default for name, s in settings.SETTINGS.items()})


def test_ruff_finds_nothing():
    """pyflakes, pycodestyle, import order and bugbear (pyproject's [tool.ruff.lint])."""
    proc = _run(str(BIN / "ruff"), "check", "--no-cache", "listmilter", "tests", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing():
    """Types hold everywhere, strictly in core/ (pyproject's [tool.mypy])."""
    # Incremental: mypy re-checks what changed since its cache (.mypy_cache, ignored by git by
    # mypy itself), and what depends on it; a cold run takes ~2 s, a warm one ~0.2 s.
    proc = _run(str(BIN / "mypy"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("Success: no issues found"), proc.stdout
