"""Mail that once made Postfix retry for days, through the real Postfix and pipe transport.

8-bit and folded header fields, DSNs in the remote server's language, and
bounce-address mail that cannot be read at all: each is handled once (scored,
answered, or kept for the owner), Postfix's pipe delivery says `status=sent`,
and nothing stays in the queue (docs/design.md, "Mail that cannot be
understood"). The property-based half is tests/test_fuzz.py.
"""

from __future__ import annotations

import re
import smtplib
import time

import pytest

from listmilter.core import envid
from listmilter.core.bounces import Verdict
from listmilter.store.bounce_records import BounceDB
from tests.bed.listmilter import cli
from tests.bed.net import wait_until


def _send(bed, sender: str, recipient: str, data: bytes) -> str:
    """Submit over SMTP; the Postfix queue id from the 250 reply to DATA."""
    with smtplib.SMTP("127.0.0.1", bed.postfix.port, timeout=60) as s:
        s.ehlo()
        s.mail(sender)
        code, reply = s.rcpt(recipient)
        assert code == 250, reply
        code, reply = s.data(data)
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def _pipe_delivered(bed, queue_id: str, recipient: str) -> None:
    """Wait for the pipe transport's `status=sent` for this message; it was never deferred."""
    wanted = re.compile(rf"{queue_id}: to=<{re.escape(recipient)}>, relay=listmilter,.* status=sent ")
    wait_until(lambda: wanted.search(bed.postfix.log()), 90, interval=0.2,
               what=f"{queue_id} delivered by the pipe transport")
    assert not re.search(rf"{queue_id}: .*status=deferred", bed.postfix.log()), bed.postfix.log()


def _deliver_line(bed, queue_id_free_text: str) -> str:
    return wait_until(lambda: next((line for line in bed.deliver_log().splitlines()
                                    if queue_id_free_text in line), None), 60, interval=0.2,
                      what=f"a deliver line with {queue_id_free_text!r}")


def _queue_empty(bed) -> None:
    wait_until(bed.postfix.queue_empty, 60, interval=0.2, what="Postfix's queue to be empty")
    assert "status=deferred" not in bed.postfix.log()


UTF8_DSN = """\
From: MAILER-DAEMON@mx.example.test (Mail Delivery System)
To: {to}
Subject: Unzustellbar: Nachricht an J\u00fcrgen
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain; charset=utf-8

Die Nachricht an J\u00fcrgen M\u00fcller konnte nicht zugestellt werden.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.ex\u00e4mple.test
Original-Envelope-Id: {envid}

Final-Recipient: utf-8; j\u00fcrgen@ex\u00e4mple.net
Original-Recipient: rfc822;{member}
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.ex\u00e4mple.net
Diagnostic-Code: smtp; 550 5.1.1 Benutzer unbekannt: J\u00fcrgen M\u00fcller
 (Postfach gel\u00f6scht)

--B--
"""


def test_a_dsn_in_the_remote_servers_language_is_scored_not_deferred(clean_bed):
    bed = clean_bed
    member = "juergen@example.net"
    lst = bed.new_list([member], posting="open", owners=("boss@example.com",), bounce_threshold=3)
    bounces_addr = lst.replace("@", "-bounces@")
    secret = (bed.listmilter.state_dir / "secret").read_bytes()
    dsn = UTF8_DSN.format(to=bounces_addr, envid=envid.make("UTF8DSN", lst, secret, time.time()),
                          member=member).encode("utf-8")
    queue_id = _send(bed, "", bounces_addr, dsn)
    _pipe_delivered(bed, queue_id, bounces_addr)
    line = _deliver_line(bed, f"list=<{lst}>, role=bounces")
    # Bound only by its ENVID: a suspicion, read in full and recorded; a probe decides (bounces.md "Probes").
    assert f"status=dsn: <{member}> 5.1.1 suspect (probe sent), envid=UTF8DSN." in line
    db = BounceDB(str(bed.listmilter.state_dir))
    try:
        (record,) = db.records(lst, member)
    finally:
        db.close()
    assert record[6] == Verdict.SUSPECT
    assert record[4] == "smtp; 550 5.1.1 Benutzer unbekannt: Jürgen Müller (Postfach gelöscht)"
    _queue_empty(bed)


def test_command_mails_with_8bit_or_folded_message_ids_are_answered(clean_bed):
    bed = clean_bed
    lst = bed.new_list([], subscribe_policy="confirm")
    request = lst.replace("@", "-request@")
    ids = {"anna@example.net": b"Message-ID: <J\xc3\xbcrgen.\xff@example.net>\r\n",
           "bert@example.net": b"Message-ID: <first@example.net>\r\n <second@example.net>\r\n"}
    queue_ids = {}
    for who, msgid in ids.items():
        queue_ids[who] = _send(bed, who, request, (f"From: {who}\r\nTo: {request}\r\nSubject: subscribe\r\n"
                                                   ).encode() + msgid + b"\r\nPlease add me.\r\n")
    for who in ids:
        _pipe_delivered(bed, queue_ids[who], request)
        replies = wait_until(lambda who=who: bed.sink.for_recipient(who), 60, what=f"the confirmation to {who}")
        assert replies[0].message["Subject"].startswith(f"Please confirm: join {lst} (confirm ")
    # The folded header's first msg-id is the one replied to; an 8-bit one is not copied.
    assert bed.sink.for_recipient("bert@example.net")[0].message["In-Reply-To"] == "<first@example.net>"
    assert bed.sink.for_recipient("anna@example.net")[0].message["In-Reply-To"] is None
    _queue_empty(bed)


def test_a_folded_header_cannot_write_a_line_of_its_own_into_the_log(clean_bed):
    bed = clean_bed
    lst = bed.new_list([])
    request = lst.replace("@", "-request@")
    forged = "status=subscribed (confirmed)"
    queue_id = _send(bed, "eve@example.net", request,
                     (f"From: eve@example.net\r\nSubject: subscribe\r\nAuto-Submitted: yes\r\n"
                      f"\t{forged}\r\n\r\nhi\r\n").encode())
    _pipe_delivered(bed, queue_id, request)
    line = _deliver_line(bed, f"to=<{request}>")
    assert f"status=ignored (auto-submitted: yes\\t{forged})" in line
    # The forged text appears only inside that line, escaped, never as a line of its own.
    assert all(f"auto-submitted: yes\\t{forged}" in x for x in bed.deliver_log().splitlines() if forged in x)
    assert bed.sink.for_recipient("eve@example.net") == []


def _deep_mime(depth: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                    for i in range(depth))
    return b"From: MAILER-DAEMON@mx.example.test\r\nMIME-Version: 1.0\r\n" + head + \
        b"Content-Type: text/plain\r\n\r\nnested\r\n"


UNREADABLE = {
    # Random-looking bytes: NULs, 8-bit, bare CRs, no header at all.
    "garbage": bytes(range(256)) * 8 + b"\r\n\x00\x00\xff\r\r\n" * 20,
    # A DSN cut off inside its delivery-status part.
    "truncated": b"From: MAILER-DAEMON@mx.example.test\r\nMIME-Version: 1.0\r\n"
                 b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
                 b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
                 b"Final-Recipient: rfc822; vic",
    # Deeper than Python's parser can recurse.
    "nested": _deep_mime(1200),
}


def test_bounce_mail_that_cannot_be_read_is_kept_and_leaves_the_queue(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["victim@example.net"], posting="open", owners=("boss@example.com",),
                       bounce_unrecognised="forward")
    bounces_addr = lst.replace("@", "-bounces@")
    for data in UNREADABLE.values():
        queue_id = _send(bed, "", bounces_addr, data)
        _pipe_delivered(bed, queue_id, bounces_addr)
    lines = wait_until(lambda: len(got := [x for x in bed.deliver_log().splitlines()
                                            if f"list=<{lst}>, role=bounces" in x]) >= len(UNREADABLE) and got,
                       60, interval=0.2, what="a deliver line for each message")
    assert all(", kept " in line for line in lines), lines
    kept = cli(bed.listmilter.config_path, "bounces", lst, "--kept").stdout
    assert kept.count(".eml") == len(UNREADABLE)
    forwarded = wait_until(lambda: len(got := bed.sink.for_recipient("boss@example.com")) >= len(UNREADABLE)
                           and got, 60, what="the owner's copies")
    assert {m.message["Subject"] for m in forwarded} == {f"Unrecognised bounce for {lst}"}
    assert "internal error" not in bed.deliver_log()
    assert cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split() == ["victim@example.net"]
    _queue_empty(bed)


def test_a_post_with_a_latin1_subject_is_expanded_and_keeps_its_subject(clean_bed):
    """pymilter hands the milter undecodable bytes surrogate-escaped, and cannot give them back
    in a changed header: the post goes out with its Subject as it came, not 451 for days."""
    bed = clean_bed
    lst = bed.new_list(["m1@example.net"], posting="open", subject_prefix="[dev] ")
    queue_id = _send(bed, "carol@example.net", lst,
                     f"From: carol@example.net\r\nTo: {lst}\r\n".encode() +
                     b"Subject: Caf\xe9 cr\xe8me\r\n\r\nBonjour.\r\n")
    wait_until(lambda: bed.sink.for_recipient("m1@example.net"), 60, what="the post at the member")
    post = bed.sink.for_recipient("m1@example.net")[0].content
    assert re.search(rb"\nSubject: Caf\xe9 cr\xe8me\r?\n", post), post[:500]
    assert f"{queue_id}: list=<{lst}>" in bed.listmilter.log()
    _queue_empty(bed)


# Postfix's default since compatibility level 1 (the beds turn it off, to keep their mail 7-bit).
@pytest.mark.parametrize("own_bed", [{"main_cf": {"smtputf8_enable": "yes"}}], indirect=True)
def test_a_post_from_an_8bit_smtputf8_sender_to_two_lists_reaches_both(own_bed):
    """A post to two lists: one is expanded in place, the other re-submitted through the MTA as a
    message of its own, from the poster's envelope sender. An 8-bit one (SMTPUTF8) made smtplib
    raise at MAIL FROM: the poster got 451 for days. It goes on with SMTPUTF8, as it came."""
    bed = own_bed
    first = bed.new_list(["u1@example.net"], name="utfa", posting="open")
    second = bed.new_list(["u2@example.net"], name="utfb", posting="open")
    poster = "jos\u00e9@example.net"
    data = (f"From: {poster}\r\nTo: {first}, {second}\r\nSubject: two lists\r\n"
            f"Message-ID: <utf8.two@example.net>\r\n\r\nHola.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", bed.postfix.port, timeout=60) as s:
        assert s.sendmail(poster, [first, second], data, mail_options=["SMTPUTF8"]) == {}
    for member in ("u1@example.net", "u2@example.net"):
        wait_until(lambda member=member: bed.sink.for_recipient(member), 60, what=f"the post at {member}")
    assert "split (re-submitted as a message of its own)" in bed.listmilter.log()
    _queue_empty(bed)
