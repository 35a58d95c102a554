"""A post's body edited in place by the milter, over the real Postfix and Sendmail: a footer the
same for every member (the post stays one queue file: every member's copy is that file's), and
dmarc_mitigation: wrap_message (the post attached whole, byte for byte, under the list's From),
with listmilter's resolver pointed at the test DNS server (tests/bed/dns.py). The pure half:
tests/test_inplace_body.py."""

from __future__ import annotations

import re

import pytest

from tests.bed.dns import dns_server
from tests.bed.net import wait_until
from tests.conftest import Bed, SendmailBed, _clean, _finish

pytestmark = pytest.mark.mta

FOOTER = "The {list_address} list\nTo leave: {unsubscribe_url}\n{postal_address}"
POSTAL = "Example Org, 1 Main St & Co"


@pytest.fixture(scope="module")
def dns():
    with dns_server() as server:
        yield server


@pytest.fixture(scope="module")
def ibed(request, dns):
    b = Bed("sqlite", extra={"dns": {"nameservers": [dns.address]}})
    yield b
    _finish(b, keep_files=bool(request.session.testsfailed))


@pytest.fixture
def bed(ibed):
    yield from _clean(ibed)


def post(lst: str, subject: str, content_type: str, body: str, sender: str = "carol@example.net",
         extra: str = "") -> bytes:
    return (f"From: Carol <{sender}>\r\nTo: {lst}\r\nSubject: {subject}\r\nMessage-ID: <{subject}.{lst}>\r\n"
            "Date: Wed, 02 Dec 2026 21:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\n{extra}Content-Type: {content_type}\r\n\r\n{body}").encode()


TEXT = "Caf\u00e9 tonight.\r\n"
HTML = "<html><body><p>Caf\u00e9 tonight.</p></body></html>\r\n"


def queue_id(content: bytes) -> str:
    """The id the list's MTA gave the post (its Received line, the first one)."""
    return re.search(rb"\bid ([0-9A-Za-z]+)", content).group(1).decode()


def check_footer_posts(bed, lst: str, members: list[str]) -> None:
    """Text and HTML posts to a list with a shared footer: each member gets each post once,
    with the footer, all from one queue file per post; the log says so."""
    bed.smtp("carol@example.net", [lst], post(lst, "plain", "text/plain; charset=utf-8", TEXT))
    bed.smtp("carol@example.net", [lst], post(lst, "html", "text/html; charset=utf-8", HTML))
    bed.sink.wait_for_recipients(2 * len(members))
    bed.settle()
    got = bed.sink.by_recipient()
    assert sorted(got) == sorted(members), got
    ids: dict[str, set[str]] = {"plain": set(), "html": set()}
    for member in members:
        by_subject = {str(m.message["Subject"]): m for m in got[member]}
        assert sorted(by_subject) == ["html", "plain"] and len(got[member]) == 2
        plain = by_subject["plain"].message.get_content()
        assert plain == f"Café tonight.\r\n\r\nThe {lst} list\r\nTo leave: mailto:" \
                        f"{lst.replace('@', '-unsubscribe@')}\r\n{POSTAL}\r\n"
        html = by_subject["html"].message.get_content()
        assert html.startswith("<html><body><p>Café tonight.</p><div class=\"list-footer\"><hr>")
        assert "1 Main St &amp; Co" in html and html.endswith("</div>\r\n</body></html>\r\n")
        for subject, received in by_subject.items():
            ids[subject].add(queue_id(received.content))
            assert received.mail_from == lst.replace("@", "-bounces@")      # no per-member VERP sender
    # One queue file per post: every member's copy came from it.
    assert all(len(v) == 1 for v in ids.values()), ids
    log = bed.listmilter.log()
    assert log.count(f"list=<{lst}>, from=<carol@example.net>, client=") == 2
    assert f"status=expanded, members={len(members)}" in log and "personal copies" not in log
    assert f"list=<{lst}>, from=<carol@example.net>, status=footer added (text/plain)" in log
    assert f"list=<{lst}>, from=<carol@example.net>, status=footer added (text/html)" in log


def test_a_shared_footer_goes_in_place_in_one_queue_file(bed):
    members = ["fa@example.net", "fb@example.com", "fc@example.net"]
    lst = bed.new_list(members, posting="open", footer=FOOTER, postal_address=POSTAL)
    check_footer_posts(bed, lst, members)
    # Postfix's own record: two queue files from the list's bounces address (one per post), each
    # delivered to every member.
    maillog = bed.postfix.log()
    qids = {queue_id(m.content) for m in bed.sink.messages}
    assert sorted(re.findall(rf"(\w+): from=<{re.escape(lst.replace('@', '-bounces@'))}>, size=", maillog)) == \
        sorted(qids)
    for qid in qids:
        assert sorted(re.findall(rf"{qid}: to=<([^>]+)>, .*status=sent", maillog)) == sorted(members)


def test_signed_mail_keeps_its_body(bed):
    members = ["sa@example.net", "sb@example.com"]
    lst = bed.new_list(members, posting="open", footer=FOOTER, postal_address=POSTAL)
    signed = ("--SIG\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSigned words.\r\n--SIG\r\nContent-Type: "
              "application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n-----END PGP SIGNATURE-----\r\n"
              "--SIG--\r\n")
    bed.smtp("carol@example.net", [lst], post(lst, "signed", 'multipart/signed; protocol="application/pgp-signature";'
                                              ' boundary="SIG"', signed))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    for member in members:
        (got,) = bed.sink.for_recipient(member)
        assert got.content.partition(b"\r\n\r\n")[2] == signed.encode()
    assert f"list=<{lst}>, from=<carol@example.net>, status=no footer: multipart/signed (signed or encrypted " \
           "mail is left untouched)" in bed.listmilter.log()


SIGNATURE = ("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=reject.test; s=s1;\r\n"
             "\th=from:to:subject:date:message-id; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
             "\tb=QUJDREVGR0g=\r\nSender: bounces@reject.test\r\n")


def check_wrapped(bed, lst: str, member: str, footer: bool) -> None:
    data = post(lst, "wrapped", "text/plain; charset=utf-8", "Gr\u00fc\u00dfe, list.\r\n",
                sender="alice@reject.test", extra=SIGNATURE)
    bed.smtp("alice@reject.test", [lst], data)
    bed.sink.wait_for_recipients(1)
    bed.settle()
    (got,) = bed.sink.for_recipient(member)
    msg = got.message
    head = got.content.partition(b"\r\n\r\n")[0].decode()
    assert re.search(rf'^From: "Carol via dev\d*" <{re.escape(lst)}>\r?$', head, re.M), head
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["alice@reject.test"]
    assert msg["Subject"] == "wrapped" and msg["Message-ID"] == f"<wrapped.{lst}>"
    assert "\nDKIM-Signature:" not in head and "\nSender:" not in head and msg["List-Id"]
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["message/rfc822"] + (["text/plain"] if footer else [])
    # The post as it came, byte for byte: the poster's DKIM signature verifies as before.
    assert data in got.content, got.content.decode(errors="replace")
    inner = parts[0].get_content()
    assert inner["From"] == "Carol <alice@reject.test>" and inner["DKIM-Signature"].startswith("v=1;")
    if footer:
        assert f"To leave: mailto:{lst.replace('@', '-unsubscribe@')}" in parts[1].get_content()
    assert f"list=<{lst}>, from=<alice@reject.test>, status=DMARC p=reject at _dmarc.reject.test; post wrapped" \
        in bed.listmilter.log()


def test_wrap_message_sends_the_post_attached_whole(bed):
    member = "wa@example.net"
    lst = bed.new_list([member], posting="open", name="dev", dmarc_mitigation="wrap_message")
    check_wrapped(bed, lst, member, footer=False)


def test_wrap_message_and_a_shared_footer(bed):
    member = "wb@example.net"
    lst = bed.new_list([member], posting="open", name="dev", dmarc_mitigation="wrap_message", footer=FOOTER)
    check_wrapped(bed, lst, member, footer=True)


def test_a_post_from_a_relaxed_domain_is_not_wrapped(bed):
    member = "wc@example.net"
    lst = bed.new_list([member], posting="open", name="dev", dmarc_mitigation="wrap_message")
    data = post(lst, "as is", "text/plain", "Hi.\r\n", sender="alice@none.test")
    bed.smtp("alice@none.test", [lst], data)
    bed.sink.wait_for_recipients(1)
    bed.settle()
    (got,) = bed.sink.for_recipient(member)
    assert got.message["From"] == "Carol <alice@none.test>" and got.content.endswith(b"\r\n\r\nHi.\r\n")


def test_sendmail_replaces_the_body_the_same_way(dns):
    b = SendmailBed("sqlite", extra={"dns": {"nameservers": [dns.address]}})
    passed = False
    try:
        members = ["sm1@example.net", "sm2@example.com"]
        lst = b.new_list(members, posting="open", footer=FOOTER, postal_address=POSTAL)
        check_footer_posts(b, lst, members)
        b.sink.clear()
        member = "sm3@example.net"
        dev = b.new_list([member], posting="open", name="dev", dmarc_mitigation="wrap_message", footer=FOOTER)
        check_wrapped(b, dev, member, footer=True)
        passed = True
    finally:
        _finish(b, keep_files=not passed)


def test_personal_copies_from_the_fan_out_are_wrapped_too(bed):
    """With one-click links the copies are made by serve's fan-out from Postfix's queue: each
    is wrapped around the post as it came, with its member's own link and footer after it."""
    mark = len(bed.listmilter.log())
    bed.listmilter.extra["web"] = {"base_url": "https://lists.example.org"}
    bed.listmilter.write_config()
    try:
        wait_until(lambda: "config reloaded from" in bed.listmilter.log()[mark:], 10, what="the config reload")
        members = ["wp1@example.net", "wp2@example.com"]
        lst = bed.new_list(members, posting="open", name="dev", dmarc_mitigation="wrap_message",
                           footer="Sent to {member}; leave: {unsubscribe_url}")
        data = post(lst, "fanned", "text/plain; charset=utf-8", "Gr\u00fc\u00dfe, list.\r\n",
                    sender="alice@reject.test", extra=SIGNATURE)
        bed.smtp("alice@reject.test", [lst], data)
        bed.sink.wait_for_recipients(2)
        bed.settle()
        for member in members:
            (got,) = bed.sink.for_recipient(member)
            msg = got.message
            assert msg["From"].addresses[0].addr_spec == lst and msg["List-Unsubscribe"].startswith("<https://")
            assert data in got.content
            inner, own = msg.iter_parts()
            assert inner.get_content_type() == "message/rfc822"
            assert own.get_content().strip().startswith(f"Sent to {member}; leave: https://lists.example.org/u/")
        assert "fanned out (personal copies)" in bed.deliver_log()
    finally:
        mark = len(bed.listmilter.log())
        bed.listmilter.extra.pop("web")
        bed.listmilter.write_config()
        wait_until(lambda: "config reloaded from" in bed.listmilter.log()[mark:], 10, what="the config reload")
