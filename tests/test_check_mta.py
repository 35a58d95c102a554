"""`listmilter check` reads the Postfix instance MAIL_CONFIG names, through postconf:
a Postfix wired as docs/postfix.md says gets no complaint, each miswiring its own line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.postfix import Postfix, backdate


@pytest.fixture(scope="module")
def wired(tmp_path_factory):
    """A listmilter config and a Postfix config wired to it, as the test bed runs them."""
    d = tmp_path_factory.mktemp("check-mta")
    lm = ListmilterServer(d / "listmilter")
    pf = Postfix(milter=lm.milter_spec, sink_port=2525, config_path=lm.config_path,
                 socketmap=lm.socketmap_spec, workdir=d / "postfix").configure()
    cli(lm.config_path, "list", "create", "dev@example.org", "--owner", "o@example.org")
    return lm, pf


def _variant(wired, tmp_path, *edits: tuple[str, ...]) -> str:
    """A copy of the good Postfix config with `postconf -c DIR ARGS...` edits applied."""
    _, pf = wired
    d = tmp_path / "pf"
    d.mkdir()
    for name in ("main.cf", "master.cf"):
        shutil.copy(pf.dir / name, d / name)
    backdate(d)
    for args in edits:
        if args[0] == "pipe":   # rewrite the pipe service line: ("pipe", old, new)
            line = subprocess.run(["postconf", "-c", str(d), "-M", "listmilter/unix"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            assert args[1] in line
            args = ("-Me", "listmilter/unix = " + line.replace(args[1], args[2]))
        subprocess.run(["postconf", "-c", str(d), *args], check=True, capture_output=True)
        backdate(d)
    return str(d)


def _check(wired, mail_config: str) -> subprocess.CompletedProcess:
    lm, _ = wired
    return cli(lm.config_path, "check", env={"MAIL_CONFIG": mail_config}, check=False)


def test_postfix_wired_as_documented_gets_no_complaint(wired):
    proc = _check(wired, str(wired[1].dir))
    assert proc.returncode == 0, proc.stderr
    assert "postfix" not in proc.stderr, proc.stderr


CASES = {
    "smtpd_milters missing": ([("-X", "smtpd_milters")], "error",
                              "postfix: smtpd_milters does not name listmilter's milter (inet:{mport}@127.0.0.1): "
                              "set smtpd_milters = inet:127.0.0.1:{mport}"),
    "non_smtpd_milters elsewhere": ([("-e", "non_smtpd_milters = inet:127.0.0.1:1")], "error",
                                    "postfix: non_smtpd_milters does not name listmilter's milter"),
    "per-milter tempfail": ([("-e", "smtpd_milters = { inet:127.0.0.1:{mport}, default_action = tempfail }")],
                            "warning", "postfix: smtpd_milters gives inet:127.0.0.1:{mport} default_action=tempfail: "
                                       "while listmilter is down, every message waits, not only list mail; "
                                       "drop default_action from smtpd_milters"),
    "default action tempfail": ([("-e", "milter_default_action = tempfail")], "warning",
                                "postfix: milter_default_action = tempfail: while listmilter is down, every message "
                                "waits, not only list mail; set milter_default_action = accept"),
    "default action reject": ([("-e", "milter_default_action = reject")], "warning",
                              "postfix: milter_default_action = reject: while listmilter is down, every message is "
                              "refused"),
    "no route to the pipe": ([("-X", "fallback_transport")], "error",
                             "postfix: nothing routes list and role addresses to the listmilter pipe transport: "
                             "set fallback_transport = listmilter"),
    "route by transport_maps": ([("-X", "fallback_transport"),
                                 ("-e", "transport_maps = socketmap:inet:127.0.0.1:{sport}:transport")], "warning",
                                "postfix: transport_maps uses listmilter's socketmap: Postfix looks up every address "
                                "there, so while listmilter is down all mail gets 451; remove it and set "
                                "fallback_transport = listmilter"),
    "fallback without local(8)": ([("-e", "local_transport = lmtp:unix:private/dovecot-lmtp")], "error",
                                  "postfix: fallback_transport = listmilter works only with local(8)"),
    "local concurrency default": ([("-X", "local_destination_concurrency_limit")], "warning",
                                  "postfix: local_destination_concurrency_limit = 2: local(8) hands a list's DSNs "
                                  "(all to one -bounces@ address) to listmilter 2 at a time"),
    "socketmap asked first": ([("-e", "local_recipient_maps = socketmap:inet:127.0.0.1:{sport}:recipients "
                                      "$alias_maps")], "warning",
                              "postfix: local_recipient_maps asks listmilter's socketmap before other tables"),
    "no recipient map": ([("-e", "local_recipient_maps = hash:/etc/postfix/none")], "error",
                         "postfix: no recipient map uses listmilter's socketmap"),
    "recipient map empty": ([("-e", "local_recipient_maps =")], "warning",
                            "(local_recipient_maps is empty: every local address is accepted)"),
    "no pipe service": ([("-MX", "listmilter/unix")], "error",
                        "postfix: master.cf has no listmilter/unix service for socketmap.transport; add: listmilter "
                        "unix - n n - - pipe flags=Rq user=listmilter"),
    "pipe as root": ([("pipe", "user=nobody", "user=root")], "error",
                     "postfix: master.cf service listmilter/unix needs a user= that is not root"),
    "pipe user unknown": ([("pipe", "user=nobody", "user=nosuchuser4711")], "error",
                          "runs as user nosuchuser4711, which does not exist"),
    "pipe runs something else": ([("pipe", "argv=", "argv=/bin/cat ")], "error",
                                 "postfix: master.cf service listmilter/unix does not run `listmilter deliver`"),
    "recipient limit": ([("-e", "listmilter_destination_recipient_limit = 50")], "error",
                        "set listmilter_destination_recipient_limit = 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_miswiring_is_one_line_saying_what_to_set(wired, tmp_path, case):
    lm, _ = wired
    ports = {"mport": lm.milter_port, "sport": lm.socketmap_port}
    edits, level, expected = CASES[case]
    edits = [tuple(a.replace("{mport}", str(lm.milter_port)).replace("{sport}", str(lm.socketmap_port))
                   for a in e) for e in edits]
    proc = _check(wired, _variant(wired, tmp_path, *edits))
    lines = [line for line in proc.stderr.splitlines() if "postfix" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("warning: ") == (level == "warning"), lines[0]
    assert expected.format(**ports) in lines[0], lines[0]
    assert proc.returncode == (1 if level == "error" else 0), proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_postfix_config_is_an_error(wired, tmp_path):
    proc = _check(wired, str(tmp_path / "nothing-here"))
    assert proc.returncode == 1
    assert "postfix: postconf cannot read the Postfix config (postconf: fatal: open " in proc.stderr
    assert "set MAIL_CONFIG to the instance's config folder" in proc.stderr


def test_without_postconf_the_postfix_checks_are_skipped_with_one_line(wired, tmp_path):
    lm, _ = wired
    empty = tmp_path / "empty"
    empty.mkdir()
    # Hide postconf for real: a private mount namespace with empty sbin folders.
    script = ("mount --bind {e} /usr/sbin && mount --bind {e} /sbin 2>/dev/null; "
              "exec {py} -m listmilter -c {cfg} check").format(e=empty, py=sys.executable, cfg=lm.config_path)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {empty} /usr/sbin"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot hide postconf here (unshare -m: {probe.stderr.strip()})")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("postfix") == 1 and "postfix: postconf not found; Postfix checks skipped" in proc.stdout
    assert "postfix" not in proc.stderr
