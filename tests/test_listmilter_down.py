"""Only list mail waits when listmilter is down (docs/postfix.md, "While listmilter is down").

The real Postfix bed runs the documented lines: the socketmap validates list
addresses at RCPT (451 while it is down), milter_default_action = accept
lets other mail through, and a post that reaches the pipe transport without
the milter having seen it is re-submitted through the milter once serve runs.
Every delivery is counted: each member must get exactly one copy.
"""

from __future__ import annotations

import collections
import signal
import smtplib
import subprocess
import threading

import pytest

from tests.bed.net import free_port, wait_until
from tests.conftest import Bed, message

# Starts private MTAs and listmilter serve (the mta tier, docs/testing.md).
pytestmark = pytest.mark.mta



@pytest.fixture
def own_bed():
    b = Bed("sqlite")
    try:
        yield b
    finally:
        b.stop()


def _counts(bed) -> collections.Counter:
    return collections.Counter(r.lower() for r in bed.sink.recipients())


def _open_session(bed, sender: str, rcpt: str, port: int | None = None) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port or bed.postfix.port, timeout=60)
    s.ehlo("client.example.net")
    assert s.mail(sender)[0] == 250
    assert s.rcpt(rcpt)[0] == 250
    return s


def test_other_mail_flows_list_mail_gets_451_then_is_expanded_once_on_retry(own_bed):
    bed = own_bed
    lst = bed.new_list(["d1@example.net", "d2@example.net"], posting="open")
    bed.listmilter.stop()
    # Mail for another domain and for a local alias of the list domain is taken and delivered.
    bed.smtp("carol@example.net", ["x@example.net"], message("relayed", "carol@example.net", "x@example.net"))
    bed.smtp("carol@example.net", ["postmaster@example.org"],
             message("local", "carol@example.net", "postmaster@example.org"))
    bed.sink.wait_for_recipients(2)
    assert _counts(bed) == {"x@example.net": 1, "postmaster@example.net": 1}
    # The list post is refused for now at RCPT, by the socketmap lookup.
    post = message("while down", "carol@example.net", lst)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        bed.smtp("carol@example.net", [lst], post)
    code, text = info.value.recipients[lst]
    assert (code, text) == (451, f"4.3.0 <{lst}>: Temporary lookup failure".encode())
    bed.settle()
    assert _counts(bed) == {"x@example.net": 1, "postmaster@example.net": 1}
    # The client retries the same message once listmilter runs again.
    bed.sink.clear()
    bed.listmilter.start()
    bed.smtp("carol@example.net", [lst], post)
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert _counts(bed) == {"d1@example.net": 1, "d2@example.net": 1}
    assert {m.message["Subject"] for m in bed.sink.messages} == {"while down"}


def test_listmilter_gone_between_rcpt_and_data_the_post_waits_queued_then_is_expanded_once(own_bed):
    bed = own_bed
    lst = bed.new_list(["w1@example.net", "w2@example.net", "w3@example.net"], posting="open")
    s = _open_session(bed, "carol@example.net", lst)       # the socketmap said yes
    bed.listmilter.proc.send_signal(signal.SIGKILL)         # a crash: no drain, nothing cleaned up
    bed.listmilter.proc.wait()
    code, reply = s.data(message("crash window", "carol@example.net", lst))
    s.quit()
    # milter_default_action = accept: Postfix takes it without the milter...
    assert code == 250, reply
    # ...and the pipe transport keeps it queued: nothing reaches a member unexpanded.
    wait_until(lambda: "listmilter serve is not running" in bed.postfix.log(), 30,
               what="the pipe transport to defer the unexpanded post")
    assert "status=deferred" in bed.postfix.log() and bed.sink.deliveries() == []
    assert not bed.postfix.queue_empty()
    bed.listmilter.start()
    subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-f"], check=True)
    bed.sink.wait_for_recipients(3)
    bed.settle()
    assert _counts(bed) == {"w1@example.net": 1, "w2@example.net": 1, "w3@example.net": 1}
    got = bed.sink.messages[0].message
    assert got["Subject"] == "crash window" and got["List-Id"] == f"<{lst.replace('@', '.')}>"
    assert got["X-Listmilter-Resubmitted"] is None       # the milter removes its marker
    assert bed.sink.messages[0].mail_from == lst.replace("@", "-bounces@")
    log = bed.listmilter.log()
    assert f"to=<{lst}>, from=<carol@example.net>" in log and "status=re-submitted (the milter did not see it)" in log
    assert log.count("status=re-submitted") == 1


def _bypass_listener(bed) -> int:
    """A second smtpd without milters: the path a misconfigured outgoing: would take."""
    port = free_port()
    bed.postfix.postconf("-Me", f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd "
                                "-o smtpd_milters= -o non_smtpd_milters=")
    bed.postfix.reload()
    wait_until(lambda: _listening(port), 15, what="the second smtpd")
    return port


def _listening(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_resubmitted_post_that_comes_back_unexpanded_is_deferred_not_looped(own_bed):
    bed = own_bed
    lst = bed.new_list(["l1@example.net"], posting="open")
    port = _bypass_listener(bed)
    # listmilter re-submits to the listener without the milter: the post comes straight back.
    bed.listmilter.outgoing_port = port
    bed.listmilter.write_config()
    bed.listmilter.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: "config reloaded" in bed.listmilter.log(), 15, what="listmilter to reload")
    bed.smtp("carol@example.net", [lst], message("bypass", "carol@example.net", lst))
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.sendmail("carol@example.net", [lst], message("bypass", "carol@example.net", lst))
    # The first (through the milter) is expanded; the one without it is re-submitted once, comes
    # back with the marker, and is deferred on every retry from then on (several: Postfix retries
    # every few seconds in the bed).
    wait_until(lambda: bed.listmilter.log().count("came back unexpanded") >= 3, 60,
               what="three deferrals of the post that came back")
    log = bed.listmilter.log()
    assert log.count("status=re-submitted") == 1
    assert "outgoing: must reach an smtpd with listmilter's milter" in log
    assert _counts(bed) == {"l1@example.net": 1}
    assert "in 1 Request." in bed.postfix.queue()      # the one that came back, and only it


def test_a_post_the_milter_would_have_refused_is_bounced_once_after_resubmission(own_bed):
    bed = own_bed
    lst = bed.new_list(["m1@example.net"], posting="members", nonmember_action="reject")
    port = _bypass_listener(bed)
    # A path without the milter skips the posting policy; the re-submission through the milter applies it.
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.sendmail("outsider@example.net", [lst], message("not a member", "outsider@example.net", lst))
    bed.sink.wait_for_recipients(1)
    bed.settle()
    (rcpt, dsn), = bed.sink.deliveries()
    assert rcpt == "outsider@example.net" and dsn.mail_from == "<>"
    assert b"only members of" in dsn.content
    assert "bounced (re-submitted and refused: 550 5.7.1 only members" in bed.listmilter.log()


def test_serve_killed_in_the_middle_of_end_of_message_loses_nobody(own_bed):
    """Postfix keeps the edits made before the milter died (milter_default_action = accept);
    plan.edit_steps adds every member before removing the list address, so the pipe transport
    re-submits the rest: each member gets the post, at most twice."""
    bed = own_bed
    members = [f"k{i:05d}@example.net" for i in range(30000)]
    lst = bed.new_list(members, posting="open")
    incoming = bed.postfix.dir / "queue" / "incoming"
    result: list = []
    sender = threading.Thread(target=lambda: result.append(
        bed.smtp("carol@example.net", [lst], message("killed", "carol@example.net", lst))))
    sender.start()
    # Kill serve once Postfix's queue file grows with the recipients the milter adds.
    wait_until(lambda: any(f.stat().st_size > 100_000 for f in incoming.iterdir() if f.is_file()), 60,
               interval=0.002, what="the milter to be adding recipients")
    bed.listmilter.proc.send_signal(signal.SIGKILL)
    bed.listmilter.proc.wait()
    sender.join(60)
    assert result == [{}]                      # accepted: the client is done with it
    bed.listmilter.start()
    subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-f"], check=True)
    wait_until(lambda: len(_counts(bed)) >= len(members), 120, interval=0.5, what="every member")
    bed.settle()
    counts = _counts(bed)
    assert set(counts) == set(members)
    resubmitted = bed.listmilter.log().count("status=re-submitted")
    if f"to=<{lst}>, relay=listmilter" in bed.postfix.log():
        # The kill left the list address in place: some may have got a first copy before it
        # (Postfix kept those edits); the one re-submission reached everyone.
        assert resubmitted == 1
        assert max(counts.values()) <= 2
    else:
        # The milter had made every edit (list address removed) before the kill: nothing to redo.
        assert resubmitted == 0
        assert set(counts.values()) == {1}
