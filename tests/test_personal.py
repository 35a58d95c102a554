"""What a personal copy carries, through the real Postfix and a real `listmilter web` (both stores):
its member's own footer with a working one-click URL, its own VERP envelope sender, and the
bounces that come back to that sender scored for that member (a real Postfix DSN, a non-DSN
bounce), while a forged code scores nobody."""

from __future__ import annotations

import re

from listmilter.core import verp
from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.test_subscriptions import ONE_CLICK, http, one_click_url, sbed, web  # noqa: F401 (fixtures)

FOOTER = "To leave {list_address}: {unsubscribe_url}\nSent to {member}.\n{postal_address}"
POSTAL = "Example Org, 1 Main St & Co, Springfield"


def _secret(bed) -> bytes:
    return (bed.listmilter.state_dir / "secret").read_bytes()


def _code(address: str) -> str:
    return address.partition("@")[0].partition("+")[2]


def _alternative(lst: str, subject: str) -> bytes:
    return (f"From: carol@example.net\r\nTo: {lst}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/alternative; boundary=\"ALT\"\r\n\r\n"
            "--ALT\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            "Caf=C3=A9 tonight.\r\n"
            "--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            "<html><body><p>Caf\xe9 tonight.</p></body></html>\r\n--ALT--\r\n").encode("utf-8")


def _bounce_lines(bed, lst: str) -> list[str]:
    return [line for line in bed.deliver_log().splitlines() if f"list=<{lst}>, role=bounces" in line]


def _wait_bounces(bed, lst: str, count: int) -> list[str]:
    return wait_until(lambda: len(lines := _bounce_lines(bed, lst)) >= count and lines, 90, interval=0.2,
                      what=f"{count} deliveries to {lst}'s bounce addresses")


def test_each_copy_has_its_own_footer_link_and_verp_sender_and_bounces_to_it_score_its_member(sbed, owner):  # noqa: F811 (the fixture)
    bed = sbed
    live, other, dead = "fa@example.net", "fb@example.com", "fdead@example.net"
    lst = bed.new_list([live, other, dead], posting="open", owners=(owner,), footer=FOOTER, postal_address=POSTAL)
    bed.sink.post_replies[dead] = f"550 5.1.1 <{dead}>: no such user"
    bed.smtp("carol@example.net", [lst], _alternative(lst, "with a footer"))
    bed.sink.wait_for_recipients(2)
    # Postfix's real DSN for the dead member goes to that copy's VERP sender.
    (line,) = _wait_bounces(bed, lst, 1)
    bed.settle()
    secret = _secret(bed)

    got = bed.sink.by_recipient()
    assert sorted(got) == [live, other] and all(len(v) == 1 for v in got.values())
    urls = {}
    for member, (copy,) in got.items():
        # Its own envelope sender: <list>-bounces+CODE@, the code verifying for this member only.
        local, _, domain = copy.mail_from.partition("@")
        assert domain == "example.org" and local.startswith(lst.partition("@")[0] + "-bounces+")
        bound = verp.find(_code(copy.mail_from), lst, [live, other, dead], secret)
        assert bound is not None and bound.member == member
        # Its own footer, in both alternatives, with its own one-click URL (the header's).
        url = one_click_url(copy)
        plain, html = [p.get_content() for p in copy.message.walk() if p.get_content_maintype() == "text"]
        assert plain.startswith("Café tonight.\r\n") and f"To leave {lst}: {url}\r\n" in plain
        assert f"Sent to {member}." in plain and POSTAL in plain
        assert f'<a href="{url}">{url}</a>' in html and f"Sent to {member}." in html
        assert "1 Main St &amp; Co" in html and html.rstrip().endswith("</div>\r\n</body></html>")
        urls[member] = url
    assert urls[live] != urls[other]
    assert "footer added (multipart/alternative)" in bed.deliver_log()

    # The DSN came to the dead member's VERP address and scored that member.
    to = re.search(r"deliver: to=<([^>]+)>", line).group(1)
    assert verp.find(_code(to), lst, [live, other, dead], secret).member == dead
    assert "status=verp dsn: <fdead@example.net> 5.1.1 scored" in line

    # A bounce in words only, from the null sender, to the other member's VERP address: that member's.
    words = (f"From: MAILER-DAEMON@mx.elsewhere.example\r\nTo: {got[other][0].mail_from}\r\n"
             "Subject: Returned mail\r\n\r\nThe mailbox is full and will stay so.\r\n").encode()
    bed.smtp("", [got[other][0].mail_from], words)
    # A forged code is no VERP address: handled as plain bounce mail, where the member it names
    # is only a suspect (a probe decides): nobody scored.
    forged = lst.replace("@", "-bounces+q1-tpf715-aaaaaaaaaaaaa@")
    bed.smtp("", [forged], words.replace(b"The mailbox", f"Dear {live}, the mailbox".encode()))
    lines = _wait_bounces(bed, lst, 3)
    bed.settle()
    assert any(f"status=verp unrecognised: <{other}> - scored" in x for x in lines), lines
    (forged_line,) = [x for x in lines if "verp=not verified" in x]
    assert "scored" not in forged_line and f"<{live}> - suspect (probe sent)" in forged_line
    listing = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert dead in listing and other in listing
    assert [x for x in listing.splitlines() if live in x] == [x for x in listing.splitlines()
                                                             if x.startswith(f"probe in flight: {lst} {live} ")]

    # The footer's link works: one click, and the member is gone.
    status, body = http(urls[live], ONE_CLICK)
    assert status == 200 and "unsubscribed" in body
    assert live not in cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split()


SIGNED = ("Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; micalg=pgp-sha256; "
          "boundary=\"SIG\"\r\n\r\n--SIG\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSigned words.\r\n"
          "--SIG\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n"
          "iQEzBAEBCAAdFiEE\r\n-----END PGP SIGNATURE-----\r\n--SIG--\r\n")
ATTACHED = ("Content-Type: multipart/mixed; boundary=\"MIX\"\r\n\r\n--MIX\r\nContent-Type: text/plain; "
            "charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\nSGVyZSBpcyB0aGUgcmVwb3J0Lg==\r\n"
            "--MIX\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Disposition: attachment; filename=r.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK/wA=\r\n--MIX--\r\n")


def test_signed_mail_goes_without_a_footer_and_an_attachment_keeps_its_bytes(sbed):  # noqa: F811 (the fixture)
    bed = sbed
    lst = bed.new_list(["sa@example.net", "sb@example.com"], posting="open", footer=FOOTER, postal_address=POSTAL)
    for subject, mime in (("signed", SIGNED), ("attached", ATTACHED)):
        data = (f"From: carol@example.net\r\nTo: {lst}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n" + mime).encode()
        bed.smtp("carol@example.net", [lst], data)
    bed.sink.wait_for_recipients(4)
    bed.settle()
    for member, copies in bed.sink.by_recipient().items():
        by_subject = {str(c.message["Subject"]): c for c in copies}
        signed = by_subject["signed"]
        # Byte for byte the signed body as posted: the signature still verifies.
        assert signed.content.replace(b"\r\n", b"\n").endswith(SIGNED.partition("\r\n\r\n")[2].replace("\r\n", "\n")
                                                               .encode())
        assert member.encode() not in signed.content.partition(b"\r\n\r\n")[2]
        attached = by_subject["attached"].message
        text, pdf = [p for p in attached.walk() if not p.is_multipart()]
        assert text.get_content().startswith("Here is the report.\r\n\r\nTo leave ") and f"Sent to {member}." in \
            text.get_content()
        assert pdf.get_content() == b"%PDF-1.4\n\xff\x00" and pdf.get_filename() == "r.pdf"
    assert f"list=<{lst}>, from=<carol@example.net>, status=no footer: multipart/signed (signed or encrypted " \
           "mail is left untouched)" in bed.deliver_log()
