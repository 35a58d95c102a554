"""Choices an admin makes in listmilter.yaml and the environment, seen where they take
effect: through the real Postfix (`outgoing.sendmail`, `$LISTMILTER_CONFIG` for serve
and the pipe transport) and in the mail log (`log.target: syslog`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

from listmilter.core import verp
from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import message


def _reloaded(lm, mark: int, lst: str) -> None:
    wait_until(lambda: lm.knows(lst) and "config reloaded" in lm.log()[mark:], 15, interval=0.2,
               what="serve to read its config again")


def test_outgoing_sendmail_carries_split_copies_and_personal_copies(own_bed):
    """outgoing: {sendmail: COMMAND}: what listmilter sends itself goes through the
    MTA's sendmail command (here a wrapper naming the bed's Postfix: -C DIR)."""
    bed = own_bed
    lm = bed.listmilter
    wrapper = bed.dir / "sendmail"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/sbin/sendmail -C {bed.postfix.dir} "$@"\n')
    wrapper.chmod(0o755)
    a = bed.new_list(["a1@example.net"], posting="open", name="alpha")
    b = bed.new_list(["b1@example.net", "b2@example.net"], posting="open", name="beta")
    mark = len(lm.log())
    lm.extra["outgoing"] = {"sendmail": str(wrapper)}
    lm.extra["web"] = {"base_url": "https://lists.example.org"}     # b's post: one copy per member
    lm.write_config()
    _reloaded(lm, mark, a)
    data = message("through the command", "carol@example.net", f"{a}, {b}")
    assert bed.submit("carol@example.net", [a, b], data).code == 250
    bed.sink.wait_for_recipients(3)
    bed.settle()
    got = bed.sink.by_recipient()
    assert {r: len(v) for r, v in got.items()} == {"a1@example.net": 1, "b1@example.net": 1, "b2@example.net": 1}
    # The split copy for beta went through pickup (non_smtpd_milters) and was expanded there.
    assert f"list=<{b}>, from=<carol@example.net>, status=split (re-submitted" in lm.log()
    assert f"list=<{b}>, from=<carol@example.net>, client=localhost[127.0.0.1], status=expanded (personal " \
           "copies), members=2" in lm.log()
    for member in ("b1@example.net", "b2@example.net"):
        (copy,) = got[member]
        # sendmail -N failure -R hdrs -V ENVID: Postfix passes them on (ORCPT it cannot take).
        # Each from its member's own VERP sender (sendmail -f), <list>-bounces+CODE@.
        local, _, domain = copy.mail_from.partition("@")
        assert domain == "example.org" and local.startswith(b.partition("@")[0] + "-bounces+")
        secret = (lm.state_dir / "secret").read_bytes()
        assert verp.find(local.partition("+")[2], b, ["b1@example.net", "b2@example.net"], secret).member == member
        assert "RET=HDRS" in copy.mail_options and any(o.startswith("ENVID=") for o in copy.mail_options)
        assert "NOTIFY=FAILURE" in copy.rcpt_options[0]
        assert copy.message["List-Unsubscribe"].startswith("<https://lists.example.org/u/")
    assert "pickup" in bed.postfix.log()


def test_listmilter_config_in_the_environment_serves_and_delivers(own_bed):
    """$LISTMILTER_CONFIG instead of -c: for `serve`, the CLI and the pipe transport."""
    bed = own_bed
    lm = bed.listmilter
    lm.stop()
    lm.config_by_env = True
    lm.start()
    bed.postfix.config_by_env = True        # master.cf: argv=/usr/bin/env LISTMILTER_CONFIG=... listmilter deliver
    bed.postfix.stop()
    bed.postfix.start()
    assert f"config={lm.config_path}, store=sqlite" in lm.log().split("stopping listmilter")[-1]
    lst = bed.new_list(["e1@example.net", "dead@example.net"], posting="open", bounce_threshold=5)
    listed = cli(lm.config_path, "list", "ls")      # with -c, and without it the environment:
    env = {**os.environ, "LISTMILTER_CONFIG": str(lm.config_path)}
    by_env = subprocess.run([sys.executable, "-m", "listmilter", "list", "ls"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert by_env.returncode == 0 and by_env.stdout == listed.stdout and lst in by_env.stdout
    bed.sink.post_replies["dead@example.net"] = "550 5.1.1 no such user"
    bed.sink.let_probes_arrive()
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    # The DSN reached the pipe, which found serve through the config named in its environment
    # (bound only by its ENVID, it sends dead@ a probe, which arrives here).
    wait_until(lambda: "<dead@example.net> 5.1.1 suspect (probe sent)" in lm.log(), 60,
               what="the DSN handed to serve")
    bed.settle()
    assert "role=bounces" not in bed.postfix.pipe_log.read_text()
    assert sorted(bed.sink.recipients()) == ["dead@example.net", "e1@example.net"]      # the post, the probe
    assert [m.message["Subject"] for m in bed.sink.for_recipient("dead@example.net")] == \
        [f"Checking your address for {lst}"]


def _syslog_receiver(path):
    """A datagram socket standing in for /dev/log; returns it and the lines it got."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    path.chmod(0o666)
    got: list[str] = []

    def read():
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            got.append(data.decode(errors="replace"))
    threading.Thread(target=read, daemon=True).start()
    return sock, got


def test_log_target_syslog_writes_to_dev_log_as_the_mail_facility(own_bed, tmp_path):
    bed = own_bed
    lm = bed.listmilter
    lst = bed.new_list(["s1@example.net"], posting="open")
    sock, got = _syslog_receiver(tmp_path / "log")
    lm.stop()
    lm.extra["log"] = {"target": "syslog", "facility": "mail"}
    lm.write_config()
    # serve in a mount namespace of its own, where /dev is a fresh tmpfs whose
    # /dev/null is the real one and whose /dev/log is this test's socket: the
    # machine's /dev (and its syslog, if any) is not touched.
    real = tmp_path / "realdev"
    real.mkdir()
    lm.prefix = ["unshare", "-m", "sh", "-ec",
                 f"mount --bind /dev {real}; mount -t tmpfs tmpfs /dev; "
                 f"touch /dev/null /dev/urandom /dev/log; mount --bind {real}/null /dev/null; "
                 f"mount --bind {real}/urandom /dev/urandom; mount --bind {tmp_path / 'log'} /dev/log; "
                 'exec "$@"', "sh"]
    try:
        lm.start()
        bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
        bed.sink.wait_for_recipients(1)
        pid = lm.proc.pid
        line = wait_until(lambda: next((x for x in got if f"list=<{lst}>" in x), None), 15,
                          what="the expansion's line at /dev/log")
        # <22>: facility mail (2) * 8 + severity info (6); then Postfix's style of line.
        assert line.startswith(f"<22>listmilter[{pid}]: ") and "status=expanded, members=1" in line
        assert any(x.startswith(f"<22>listmilter[{pid}]: starting listmilter") for x in got)
        assert f"list=<{lst}>" not in lm.log()          # not in the file any more
    finally:
        lm.stop()
        lm.prefix = []
        sock.close()
    assert any("stopping listmilter" in x for x in got)
