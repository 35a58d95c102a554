"""`listmilter deliver` hands its message to the running serve, and works alone when it cannot."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from listmilter import paths
from listmilter.core import envid
from listmilter.mta import handoff, netstring
from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.net import free_port, wait_until
from tests.bed.postfix import PIPE_USER, pipe_runtime
from tests.conftest import dsn_message, message


# -- the client's own decisions --------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["deliver", "a@b.c", ""], (None, "a@b.c", "")),
    (["deliver", "a@b.c"], (None, "a@b.c", None)),
    (["-c", "/etc/x.yaml", "deliver", "a@b.c", "s@b.c"], ("/etc/x.yaml", "a@b.c", "s@b.c")),
    (["--config", "x.yaml", "deliver", "a@b.c", ""], ("x.yaml", "a@b.c", "")),
    (["--config=x.yaml", "deliver", "a@b.c"], ("x.yaml", "a@b.c", None)),
    (["-cx.yaml", "deliver", "a@b.c"], ("x.yaml", "a@b.c", None)),
    # Everything else is argparse's: help, options, other commands, wrong counts.
    (["deliver", "--help"], None),
    (["deliver", "a@b.c", "-x"], None),
    (["deliver"], None),
    (["deliver", "a", "b", "c"], None),
    (["-c", "x.yaml", "serve"], None),
    (["-c"], None),
    ([], None),
])
def test_parse_argv(argv, expected):
    assert handoff.parse_argv(argv) == expected


@pytest.mark.parametrize("text, expected", [
    ("state_dir: /srv/lm\n", "/srv/lm"),
    ("store:\n  backend: sqlite\nstate_dir: '/srv/lm'   # quoted\n", "/srv/lm"),
    ('state_dir: "/srv/l m"\n', "/srv/l m"),
    ("store:\n  state_dir: /nested/is/not/it\n", paths.DEFAULT_STATE_DIR),
    ("state_dir:\n", paths.DEFAULT_STATE_DIR),
    ("log:\n  target: syslog\n", paths.DEFAULT_STATE_DIR),
])
def test_state_dir_is_read_without_yaml(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert handoff.state_dir_of(str(path)) == expected
    assert handoff.state_dir_of(str(tmp_path / "absent.yaml")) == paths.DEFAULT_STATE_DIR


def _deliver(config, recipient: str, sender: str | None, data: bytes, log, user: str | None = None):
    """`listmilter deliver` as Postfix runs it: a fresh process, the message on stdin."""
    argv = [sys.executable, "-m", "listmilter", "-c", str(config), "deliver", recipient]
    env = {"LISTMILTER_LOG": str(log), "PATH": "/usr/bin:/bin"}
    if user:     # the pipe user, from the world-readable copy of the package
        argv = ["runuser", "-u", user, "--", "/usr/bin/env", f"PYTHONPATH={pipe_runtime()}",
                *(f"{k}={v}" for k, v in env.items()), "/usr/bin/python3", *argv[1:]]
        env = dict(os.environ)
    if sender is not None:
        argv.append(sender)
    return subprocess.run(argv, input=data, capture_output=True, env=env, timeout=60)


def test_a_serve_that_goes_away_mid_message_means_retry(tmp_path):
    """serve said go, then closed without an answer: 75, never 0 and never a traceback."""
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "listmilter.yaml"
    config.write_text(f"state_dir: {state}\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(state / handoff.SOCKET_NAME))
    listener.listen(1)
    got: list[bytes] = []

    def half_a_serve():
        conn, _ = listener.accept()
        with conn:
            f = conn.makefile("rb")
            got.append(netstring.read(f, 10000))
            conn.sendall(netstring.encode(b"go"))
            got.append(netstring.read(f, 10000))
    thread = threading.Thread(target=half_a_serve, daemon=True)
    thread.start()
    try:
        proc = _deliver(config, "dev-bounces@example.org", "", b"Subject: x\n\nbody\n", tmp_path / "d.log")
    finally:
        thread.join(10)
        listener.close()
    assert proc.returncode == 75, proc.stderr
    assert b"listmilter serve did not answer" in proc.stderr and b"Traceback" not in proc.stderr
    assert got == [b"\0".join([handoff.MAGIC, str(config).encode(), b"dev-bounces@example.org", b""]),
                   b"Subject: x\n\nbody\n"]


@pytest.mark.parametrize("via_serve", [False, pytest.param(True, marks=pytest.mark.mta)], ids=["alone", "via-serve"])
def test_deliver_exit_codes(tmp_path, via_serve):
    # outgoing: where nothing listens, so a command that must be answered waits.
    lm = ListmilterServer(tmp_path / "lm", "sqlite", outgoing_port=free_port())
    lm.create_list("dev@example.org")
    log = tmp_path / "d.log"

    def run(recipient, sender=None, data=b"Subject: x\n\nbody\n"):
        return _deliver(lm.config_path, recipient, sender, data, log)

    if via_serve:
        lm.start()
    try:
        # A command from the null sender is ignored (0); one that must be
        # answered while outgoing: is unreachable waits: 75.
        assert run("dev-request@example.org", "").returncode == 0
        answered = run("dev-request@example.org", "a@example.net")
        assert answered.returncode == 75 and b"Traceback" not in answered.stderr
        nolist = run("nobody@example.org", "a@example.net")
        assert nolist.returncode == 67 and b"nobody@example.org: no such mailing list" in nolist.stderr
        # A post that reached the pipe without the milter is kept queued, never dropped.
        assert run("dev@example.org", "a@example.net").returncode == 75
        assert run("dev@example.org", "").returncode == 0
        # Sendmail aliases pass no sender: Return-Path is used.
        assert run("dev@example.org", data=b"Return-Path: <>\nSubject: x\n\nb\n").returncode == 0
        # A config that does not load: 75 (serve runs another file, so deliver works alone).
        broken = tmp_path / "broken.yaml"
        broken.write_text(f"state_dir: {lm.state_dir}\nstore: [\n")
        proc = _deliver(broken, "dev-bounces@example.org", "", b"x", log)
        assert proc.returncode == 75 and b"Traceback" not in proc.stderr
    finally:
        lm.stop()
    # Where the work was done: serve's log, or the pipe process's own.
    alone = log.read_text()
    if via_serve:
        assert "deliver: to=<nobody@example.org>" in lm.log() and "nobody@example.org" not in alone
        assert "to=<dev-bounces@example.org>" in alone      # the broken config's, done alone
        assert f"uses config {broken}, this serve runs {lm.config_path}" in lm.log()
        assert not (lm.state_dir / handoff.SOCKET_NAME).exists()     # removed at stop
    else:
        assert "deliver: to=<nobody@example.org>" in alone and "deliver:" not in lm.log()


# -- through the real Postfix ------------------------------------------------------
def _read(text: str, lst: str, member: str, verdict: str = "suspect (probe sent)") -> list[str]:
    """The lines of DSNs naming member, read with `verdict` (one bound only to the post's
    ENVID sends the member a probe)."""
    return [line for line in text.splitlines()
            if f"list=<{lst}>, role=bounces" in line and f"<{member}> 5.1.1 {verdict}" in line]


def test_postfix_dsns_are_handled_by_serve_and_alone_when_its_socket_is_gone(own_bed):
    bed = own_bed
    lst = bed.new_list(["ok@example.net", "dead1@example.net", "dead2@example.net"], posting="open",
                       bounce_action="notify", bounce_threshold=5)
    sock = bed.listmilter.state_dir / handoff.SOCKET_NAME
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o666     # any user the MTA picks
    bed.sink.post_replies["dead1@example.net"] = "550 5.1.1 <dead1@example.net>: no such user"
    bed.sink.let_probes_arrive()        # the probes are delivered: only the posts' DSNs come back
    bed.smtp("carol@example.net", [lst], message("one", "carol@example.net", lst))
    wait_until(lambda: _read(bed.listmilter.log(), lst, "dead1@example.net"), 60,
               what="serve to score the DSN Postfix wrote")
    assert "role=bounces" not in bed.postfix.pipe_log.read_text()
    # Without serve's socket (serve stopping, or unable to make it), the pipe
    # process does the same work itself.
    sock.unlink()
    bed.sink.post_replies["dead2@example.net"] = "550 5.1.1 <dead2@example.net>: no such user"
    bed.smtp("carol@example.net", [lst], message("two", "carol@example.net", lst))
    wait_until(lambda: _read(bed.postfix.pipe_log.read_text(), lst, "dead2@example.net"), 60,
               what="the pipe process to score the DSN itself")
    assert "listmilter/deliver[" in bed.postfix.pipe_log.read_text()
    report = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert f"probe in flight: {lst} dead1@example.net" in report and f"probe in flight: {lst} dead2@example.net" \
        in report


def test_a_deliver_for_another_config_is_not_taken_by_serve(own_bed):
    """Two configs sharing a state folder: serve answers only for its own file."""
    bed = own_bed
    lst = bed.new_list(["m@example.net"], posting="open", bounce_action="notify")
    other = bed.dir / "other.yaml"      # readable by the pipe user
    shutil.copy(bed.listmilter.config_path, other)
    secret = (bed.listmilter.state_dir / "secret").read_bytes()
    env = envid.make("Q1", lst, secret, time.time())
    bounces = lst.replace("@", "-bounces@")
    dsn = dsn_message(env, """
        Final-Recipient: rfc822; m@example.net
        Action: failed
        Status: 5.1.1
        """, to=bounces)
    proc = _deliver(other, bounces, "", dsn, bed.postfix.pipe_log, user=PIPE_USER)
    assert proc.returncode == 0, proc.stderr
    assert _read(bed.postfix.pipe_log.read_text(), lst, "m@example.net")
    assert f"uses config {other}, this serve runs {bed.listmilter.config_path}" in bed.listmilter.log()
    # The same DSN with serve's own config is serve's: the probe the first sent is in flight.
    proc = _deliver(bed.listmilter.config_path, bounces, "", dsn, bed.postfix.pipe_log, user=PIPE_USER)
    assert proc.returncode == 0, proc.stderr
    assert _read(bed.listmilter.log(), lst, "m@example.net", "suspect (a probe is in flight already)")
