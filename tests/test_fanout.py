"""Personal posts fanned out from Postfix's queue (core/fanout.py, app/fanout.py), through the real
Postfix with its re-injection listener (docs/postfix.md) and a sink: the poster's 250 comes at
once, every member gets exactly one copy of their own, the fan-out address cannot be used from
outside, and nothing is lost when the listener says 4xx or serve is killed half-way."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from listmilter.app.fanout import BATCH
from listmilter.core import verp
from listmilter.store import fanout_records
from tests.bed.listmilter import cli
from tests.bed.net import wait_until

pytestmark = pytest.mark.mta

FOOTER = "Leave {list_address}: {unsubscribe_url}\nSent to {member}."


def _members(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}@example.net" for i in range(n)]


def _post(lst: str, subject: str) -> bytes:
    return (f"From: carol@example.net\r\nTo: {lst}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}"
            f"@example.net>\r\n\r\nWords for everyone.\r\n.leading dot kept\r\n").encode()


def _queue_id(reply_text: str) -> str:
    return re.search(r"queued as ([0-9A-Za-z]+)", reply_text).group(1)


def _posts(bed, lst: str) -> list[list[str]]:
    out = cli(bed.listmilter.config_path, "posts", lst).stdout.splitlines()
    return [line.split() for line in out[1:]]


def test_the_poster_is_answered_at_once_and_each_member_gets_one_copy_of_their_own(clean_bed):
    bed = clean_bed
    who = _members("fo", 300)
    lst = bed.new_list(who, posting="open", footer=FOOTER)
    reply = bed.submit("carol@example.net", [lst], _post(lst, "fan out one"))
    assert reply.code == 250, reply
    queue_id = _queue_id(reply.text)
    got = bed.sink.wait_for_recipients(len(who), timeout=120)
    bed.settle(f"{queue_id}: list=<{lst}>, from=<carol@example.net>, status=fanned out (personal copies), "
               f"members={len(who)}, refused=0")
    by = bed.sink.by_recipient()
    assert sorted(by) == who and all(len(v) == 1 for v in by.values()), len(got)
    secret = (bed.listmilter.state_dir / "secret").read_bytes()
    senders = set()
    for member, (copy,) in by.items():
        # Its own footer and VERP sender; the fan-out address and listmilter's marker never show.
        text = copy.message.get_content()
        assert f"Sent to {member}." in text and "\r\n.leading dot kept\r\n" in text
        assert verp.find(copy.mail_from.partition("@")[0].partition("+")[2], lst, [member], secret) is not None
        assert "fanout" not in copy.content.decode() and "X-Listmilter" not in copy.content.decode()
        assert copy.message["List-Id"] and copy.message["Subject"] == "fan out one"
        senders.add(copy.mail_from)
    assert len(senders) == len(who)
    # Everything the fan-out needs is installed where `deliver` runs (the DMARC lookup's PSL too).
    assert "DMARC lookup failed" not in bed.deliver_log() and "Traceback" not in bed.deliver_log()
    log = bed.deliver_log()
    # The milter queued it for the fan-out under the queue id the poster was given; the copies' queue ids follow.
    assert f"{queue_id}: list=<{lst}>, from=<carol@example.net>, client=" in log
    assert "status=queued for fan-out (personal copies)" in log
    assert f"{queue_id}: list=<{lst}>, copies=300, part=1/3, queued_as=" in log
    (row,) = _posts(bed, lst)
    assert row[0] == queue_id and row[3:8] == ["done", "300", "0", "0", "1"], row


def test_the_fan_out_address_cannot_be_used_from_outside(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["fx1@example.net"], posting="open", footer=FOOTER)
    forged = lst.replace("@", "-fanout+q1-tpf715-aaaaaaaaaaaaa@")
    reply = bed.submit("mallory@example.net", [forged], _post(lst, "forged"))
    # 550 from the milter ("for listmilter's own use"), or from Postfix when its smtpd still
    # remembers the address as unknown from before the list existed (smtpd_resolve.c's cache).
    assert reply.stage == f"RCPT {forged}" and reply.code == 550, reply
    # The sendmail command cannot be refused at RCPT: the address is dropped and the sender told.
    proc = bed.postfix.sendmail(_post(lst, "forged local"), "mallory@example.net", [forged])
    assert proc.returncode == 0
    bed.settle()
    assert bed.sink.for_recipient("fx1@example.net") == []
    assert all(r != "fx1@example.net" for r, _ in bed.sink.deliveries())


def test_a_post_waits_in_the_queue_while_the_listener_says_4xx_and_then_every_member_gets_it(clean_bed):
    bed = clean_bed
    who = _members("fw", 6)
    lst = bed.new_list(who, posting="open", footer=FOOTER)
    # The re-injection listener refuses one member for now: the fan-out is deferred, the post kept.
    port = bed.postfix.reinject_port
    bed.postfix.postconf("-e", f"fanout_test_restrictions = check_recipient_access "
                               f"inline:{{{{ {who[2]} = 450 4.2.1 try later }}}}, permit_mynetworks, reject")
    bed.postfix.postconf("-P", f"127.0.0.1:{port}/inet/smtpd_recipient_restrictions=$fanout_test_restrictions")
    bed.postfix.reload()
    try:
        reply = bed.submit("carol@example.net", [lst], _post(lst, "deferred fan out"))
        assert reply.code == 250
        queue_id = _queue_id(reply.text)
        wait_until(lambda: "fan-out deferred" in bed.deliver_log(), 60, what="the fan-out to be deferred")
        assert queue_id in bed.postfix.queue()
        (row,) = _posts(bed, lst)
        assert row[3] == "fan-out", row
    finally:
        bed.postfix.postconf("-P", f"127.0.0.1:{port}/inet/smtpd_recipient_restrictions="
                                   "permit_mynetworks,reject")
        bed.postfix.reload()
    bed.sink.wait_for_recipients(len(who) + 1, timeout=120)
    bed.settle(f"{queue_id}: list=<{lst}>, from=<carol@example.net>, status=fanned out (personal copies)")
    by = bed.sink.by_recipient()
    # Everyone has it; duplicates only among the one batch in flight when the 450 came.
    assert sorted(by) == who and len(by[who[2]]) == 1
    assert sum(len(v) - 1 for v in by.values()) <= min(BATCH, len(who))
    (row,) = _posts(bed, lst)
    assert row[3] == "done" and int(row[7]) >= 2, row


def test_a_member_refused_for_good_is_logged_and_skipped(clean_bed):
    bed = clean_bed
    gone = "no-such-user@example.org"        # the list domain: Postfix refuses it at RCPT, 550
    who = ["fr1@example.net", gone, "fr2@example.net"]
    lst = bed.new_list(who, posting="open", footer=FOOTER)
    reply = bed.submit("carol@example.net", [lst], _post(lst, "one refused"))
    assert reply.code == 250
    queue_id = _queue_id(reply.text)
    bed.settle(f"{queue_id}: list=<{lst}>, from=<carol@example.net>, status=fanned out (personal copies), "
               "members=2, refused=1")
    assert sorted(bed.sink.by_recipient()) == ["fr1@example.net", "fr2@example.net"]
    assert re.search(rf"{queue_id}: list=<{lst}>, from=<carol@example.net>, status=member refused \(550 5\.1\.1 "
                     rf".*\), to=<{gone}>", bed.deliver_log())


KILLED = 20000


def _fan_out_processes(bed) -> list[int]:
    """The `listmilter deliver <list>-fanout+CODE@...` processes of this bed's pipe transport
    (by the log file its master.cf line gives them: other tests may run beside this one)."""
    mark = b"LISTMILTER_LOG=" + os.fsencode(bed.postfix.pipe_log)
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if b"deliver" in argv and mark in environ and any(b"-fanout+" in a for a in argv) \
                and not argv[0].endswith(b"pipe"):
            out.append(int(pid))
    return out


def test_serve_killed_half_way_through_a_20000_member_fan_out_loses_nobody(own_bed):
    """design.md: the post stays queued until its fan-out is done; killed (the fan-out's own
    process and serve), the retry goes on from the progress record; duplicates are at most
    one batch (BATCH copies)."""
    bed = own_bed
    who = _members("fk", KILLED)
    lst = bed.new_list(who, posting="open", footer=FOOTER)
    reply = bed.submit("carol@example.net", [lst], _post(lst, "killed half way"))
    assert reply.code == 250
    queue_id = _queue_id(reply.text)
    # The fan-out runs in the pipe's `deliver` process: once its progress record says some
    # batches went (not the sink's count: the MTA takes copies faster than it delivers them, so
    # the fan-out can be over before a third reach the sink), kill it, and serve with it.
    def fanning_part_way():
        running = _fan_out_processes(bed)
        records = fanout_records.every(str(bed.listmilter.state_dir))
        sent = records[0][1].sent if records else 0
        return len(running) == 1 and 2 * BATCH <= sent < KILLED - 2 * BATCH and running
    (fanning,) = wait_until(fanning_part_way, 300, interval=0.05, what="the fan-out part way")
    os.kill(fanning, signal.SIGKILL)
    bed.listmilter.proc.send_signal(signal.SIGKILL)
    bed.listmilter.proc.wait()
    sent_before = len(bed.sink.deliveries())
    assert sent_before < KILLED
    time.sleep(1)
    bed.listmilter.start()
    bed.sink.wait_for_recipients(KILLED, timeout=600)
    bed.settle(f"{queue_id}: list=<{lst}>, from=<carol@example.net>, status=fanned out (personal copies)",
               timeout=600)
    by = bed.sink.by_recipient()
    assert len(by) == KILLED and set(by) == set(who)
    twice = sum(len(v) - 1 for v in by.values())
    assert max(len(v) for v in by.values()) <= 2 and twice <= BATCH, twice
    assert "fan-out resumed" in bed.deliver_log()
    (row,) = _posts(bed, lst)
    assert row[3] == "done" and int(row[4]) + int(row[5]) >= KILLED - BATCH, row


def test_check_names_a_missing_listener_and_says_when_the_poster_would_wait(clean_bed):
    bed = clean_bed
    lm = bed.listmilter
    bed.new_list(["fc1@example.net"], posting="open", footer=FOOTER)
    env = {"MAIL_CONFIG": str(bed.postfix.dir)}
    proc = cli(lm.config_path, "check", env=env, check=False)
    assert "reinject" not in proc.stderr and "outgoing" not in proc.stderr, proc.stderr
    good = lm.reinject_port
    try:
        lm.reinject_port = good + 1 if good < 65535 else good - 1
        lm.write_config()
        proc = cli(lm.config_path, "check", env=env, check=False)
        assert proc.returncode != 0
        assert f"no master.cf service listens on outgoing.reinject 127.0.0.1:{lm.reinject_port}" in proc.stderr
        lm.reinject_port = None
        lm.write_config()
        proc = cli(lm.config_path, "check", env=env, check=False)
        assert "send one copy per member and outgoing.reinject is not set: the poster waits" in proc.stderr
    finally:
        mark = len(lm.log())
        lm.reinject_port = good
        lm.write_config()
        wait_until(lambda: "config reloaded" in lm.log()[mark:], 15, what="serve to reload its config")


@pytest.mark.parametrize("own_smbed", [{"reinject": True}], indirect=True)
def test_sendmail_fans_out_through_its_listener_without_the_milter(own_smbed):
    bed = own_smbed
    who = _members("fs", 40)
    lst = bed.new_list(who, posting="open", footer=FOOTER)
    reply = bed.submit("carol@example.net", [lst], _post(lst, "sendmail fan out"))
    assert reply.code == 250, reply
    bed.sink.wait_for_recipients(len(who), timeout=120)
    bed.settle(f"list=<{lst}>, from=<carol@example.net>, status=fanned out (personal copies), members=40")
    by = bed.sink.by_recipient()
    assert sorted(by) == who and all(len(v) == 1 for v in by.values())
    for member, (copy,) in by.items():
        assert f"Sent to {member}." in copy.message.get_content()
        assert copy.mail_from.startswith(lst.partition("@")[0] + "-bounces+")
