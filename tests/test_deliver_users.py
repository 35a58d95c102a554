"""`listmilter deliver` run as whatever user the MTA picks, not the state folder's owner.

Sendmail runs an aliases-file program (`"|listmilter deliver ..."`) as its
DefaultUser. Such a `deliver` hands its message to serve through
deliver.sock (0666, in a state folder others may enter but not list); when
serve is down it cannot read the store or the secret, and exits 75 saying so.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from listmilter.core import envid
from listmilter.mta import handoff
from tests.bed.listmilter import ListmilterServer
from tests.bed.net import wait_until
from tests.bed.sendmail import available
from tests.conftest import SendmailBed, dsn_message, message
from tests.test_handoff import _deliver

# Starts private MTAs and listmilter serve (the mta tier, docs/testing.md).
pytestmark = pytest.mark.mta


OTHER_USER = "daemon"      # neither root nor the state folder's owner (tests/bed: nobody)


def _dsn(lm, lst: str, member: str) -> bytes:
    secret = (lm.state_dir / "secret").read_bytes()
    return dsn_message(envid.make("Q1", lst, secret, time.time()), f"""
        Final-Recipient: rfc822; {member}
        Action: failed
        Status: 5.1.1
        """, to=lst.replace("@", "-bounces@"))


@pytest.fixture
def world_dir():
    d = Path(tempfile.mkdtemp(prefix="lm-users-"))
    d.chmod(0o755)          # the other user must reach the config and its log
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_deliver_as_another_user_goes_through_serve_and_waits_with_a_reason_without_it(world_dir):
    lm = ListmilterServer(world_dir / "lm", "sqlite")
    lst = "users@example.org"
    # The DSNs name no member: kept for the owners (no probe to send: this test has no MTA).
    lm.create_list(lst, ["m1@example.net", "m2@example.net"], bounce_action="notify")
    log = world_dir / "deliver.log"
    log.touch()
    shutil.chown(log, OTHER_USER)
    bounces = lst.replace("@", "-bounces@")
    lm.start()
    try:
        sock = lm.state_dir / handoff.SOCKET_NAME
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666
        assert stat.S_IMODE(lm.state_dir.stat().st_mode) == 0o751
        proc = _deliver(lm.config_path, bounces, "", _dsn(lm, lst, "gone1@example.net"), log, user=OTHER_USER)
        assert proc.returncode == 0, proc.stderr
        assert "<gone1@example.net> 5.1.1 not-member" in lm.log()        # serve did it
        assert log.read_text() == ""                                  # not the process alone
    finally:
        lm.stop()
    # Without serve, that user can read neither the store nor the secret: 75, and why.
    proc = _deliver(lm.config_path, bounces, "", _dsn(lm, lst, "gone2@example.net"), log, user=OTHER_USER)
    assert proc.returncode == 75, proc.stderr
    err = proc.stderr.decode()
    assert err.startswith(f"listmilter: cannot work without listmilter serve as user {OTHER_USER}: "), err
    assert str(lm.state_dir / "listmilter.sqlite") in err and "unable to open database file" in err, err
    assert err.rstrip().endswith(f"(listmilter serve did not take it: {lm.state_dir / handoff.SOCKET_NAME}: "
                                 "No such file or directory)"), err
    assert "Traceback" not in err and "Traceback" not in log.read_text()
    assert "gone2@example.net" not in lm.log()
    # As the state folder's owner it works alone, as before.
    shutil.chown(log, "nobody")
    proc = _deliver(lm.config_path, bounces, "", _dsn(lm, lst, "gone2@example.net"), log, user="nobody")
    assert proc.returncode == 0, proc.stderr
    assert "<gone2@example.net> 5.1.1 not-member" in log.read_text()


@pytest.fixture
def aliases_bed():
    if not available():
        pytest.fail("no Sendmail unpacked: run ./bootstrap")
    bed = SendmailBed("sqlite", aliases={"aliased": "aliased@example.org",
                                         "aliased-bounces": "aliased-bounces@example.org"},
                      default_user=f"{OTHER_USER}:{OTHER_USER}")
    try:
        yield bed
    finally:
        bed.stop()
        bed.remove()


def test_a_sendmail_dsn_through_an_aliases_program_run_as_defaultuser_is_read(aliases_bed):
    bed = aliases_bed
    lst = "aliased@example.org"
    bed.listmilter.create_list(lst, ["ok@example.net", "dead@example.net", "dead2@example.net"], posting="open",
                               bounce_action="notify", bounce_threshold=5)
    aliases = (bed.sendmail.dir / "aliases").read_text()
    assert f'aliased-bounces: "|{bed.sendmail.dir}/listmilter deliver aliased-bounces@example.org"' in aliases
    bed.sink.post_replies["dead@example.net"] = "550 5.1.1 no such user here"
    bed.sink.let_probes_arrive()        # each DSN sends a probe, delivered: the DSNs are all that come back
    bed.smtp("carol@example.net", [lst], message("first", "carol@example.net", lst))
    wait_until(lambda: "<dead@example.net> 5.1.1 suspect (probe sent)" in bed.listmilter.log(), 60,
               what="serve to read the DSN Sendmail sent through the alias")
    line = [x for x in bed.listmilter.log().splitlines() if "role=bounces" in x][-1]
    assert f"to=<{lst.replace('@', '-bounces@')}>, from=<>" in line
    assert bed.sendmail.pipe_log.read_text() == ""      # the alias program handed it to serve
    # serve down: a DSN already in Sendmail's queue (the command line queues it; SMTP would get
    # F=T's 451 now) reaches the program, which as DefaultUser cannot do the work alone: 75,
    # Sendmail keeps it queued...
    bed.listmilter.stop()
    bounces = lst.replace("@", "-bounces@")
    queued = bed.sendmail.sendmail_cmd("-f", "<>", "-odq", bounces, input=_dsn(bed.listmilter, lst,
                                                                              "dead2@example.net"))
    assert queued.returncode == 0, queued.stderr
    wait_until(lambda: "deferred (" in bed.sendmail.pipe_log.read_text(), 60,
               what="the alias program to defer the DSN")
    alone = bed.sendmail.pipe_log.read_text()
    assert f"to=<{bounces}>" in alone and f"cannot work without listmilter serve as user {OTHER_USER}" in alone
    assert "Traceback" not in alone
    assert not bed.sendmail.queue_empty()
    # ...and its next queue run hands it to serve, once serve runs again.
    bed.listmilter.start()
    wait_until(lambda: "<dead2@example.net> 5.1.1 suspect (probe sent)" in bed.listmilter.log(), 60,
               what="the queued DSN to be read by serve")
    bed.sendmail.wait_queue_empty()
    # The members who took the first post, once each; the DSNs went nowhere else; one probe each.
    got = sorted((r, str(m.message["Subject"])) for r, m in bed.sink.deliveries())
    assert got == [("dead2@example.net", f"Checking your address for {lst}"), ("dead2@example.net", "first"),
                   ("dead@example.net", f"Checking your address for {lst}"), ("ok@example.net", "first")], got
