"""Signed list mail over the real Postfix: posts signed by the poster's domain (dkimpy) pass
listmilter and then OpenDKIM (tests/bed/opendkim.py), which signs them for the list domain, as
docs/postfix.md ("Signing list mail with OpenDKIM") sets it up. At the sink each signature is
verified with dkimpy against the test DNS server (tests/bed/dns.py), which serves the DMARC
records and every DKIM key."""

from __future__ import annotations

import base64
import re

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.bed.dns import ZONES, dns_server
from tests.bed.net import wait_until
from tests.bed.opendkim import OpenDKIM
from tests.conftest import Bed, _clean, _finish, crlf

pytestmark = pytest.mark.mta

SELECTOR = "s1"
POSTER_DOMAINS = ("reject.test", "none.test")


def _key_pair() -> tuple[bytes, str]:
    """A poster domain's private key (PEM) and its DKIM TXT record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def world(request):
    """OpenDKIM, the DNS server with every key, and a Postfix bed with OpenDKIM after listmilter
    (also on the re-injection listener); everything stopped at the end, also after a failure."""
    signer = OpenDKIM()
    keys = {d: _key_pair() for d in POSTER_DOMAINS}
    zones = {**ZONES, signer.dns_name: [signer.dns_record],
             **{f"{SELECTOR}._domainkey.{d}.": [record] for d, (_, record) in keys.items()}}
    with dns_server(zones=zones) as server:
        signer.start()
        try:
            b = Bed("sqlite", extra={"dns": {"nameservers": [server.address]}}, signing_milter=signer.milter,
                    main_cf={"milter_macro_daemon_name": signer.mta})
            try:
                yield b, server, keys, signer
            finally:
                _finish(b, keep_files=bool(request.session.testsfailed))
        finally:
            signer.stop()
            if not request.session.testsfailed:
                signer.remove()


@pytest.fixture
def bed(world):
    b, server, keys, signer = world
    for clean in _clean(b):
        yield clean, server, keys, signer


def dnsfunc(server):
    """dkimpy's key lookup, asked of the test DNS server."""
    def lookup(name, timeout=5):
        query = dns.message.make_query(name.decode() if isinstance(name, bytes) else name, dns.rdatatype.TXT)
        reply = dns.query.udp(query, "127.0.0.1", timeout=timeout, port=server.port)
        for rrset in reply.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None
    return lookup


def signed_post(keys, domain: str, to: str, subject: str) -> bytes:
    poster = f"alice@{domain}"
    data = crlf((f"From: Alice Example <{poster}>\nTo: {to}\nSubject: {subject}\n"
                 f"Date: Wed, 02 Dec 2026 21:00:00 +0000\nMessage-ID: <{subject.replace(' ', '.')}@{domain}>\n"
                 "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
                 "A post signed by its author's domain.\n").encode())
    signature = dkim.sign(data, SELECTOR.encode(), domain.encode(), keys[domain][0],
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature + data


def signatures(raw: bytes, server) -> list[tuple[str, bool]]:
    """d= of each DKIM-Signature in the message, top (the newest) first, and whether it verifies."""
    checker = dkim.DKIM(raw)
    found = []
    headers = [v for n, v in checker.headers if n.lower() == b"dkim-signature"]
    for index, value in enumerate(headers):
        domain = re.search(rb"\bd=([^;\s]+)", value).group(1).decode()
        try:
            ok = checker.verify(idx=index, dnsfunc=dnsfunc(server))
        except dkim.ValidationError:        # dkimpy raises for some failures (a body hash mismatch)
            ok = False
        found.append((domain, ok))
    return found


def test_a_post_from_a_p_none_domain_keeps_its_signature_and_gets_the_list_domains(bed):
    b, server, keys, _ = bed
    member = "m-none@example.com"
    lst = b.new_list([member], posting="open", name="dev")
    b.smtp("alice@none.test", [lst], signed_post(keys, "none.test", lst, "untouched"))
    wait_until(lambda: b.sink.for_recipient(member), 60, what="the post")
    b.settle()
    [got] = b.sink.for_recipient(member)
    assert got.message["From"] == "Alice Example <alice@none.test>"         # untouched: it may be
    assert got.message["List-Id"]
    assert signatures(got.content, server) == [("example.org", True), ("none.test", True)]


def test_a_post_from_a_p_reject_domain_is_munged_and_signed_aligned_for_the_list_domain(bed):
    b, server, keys, _ = bed
    member = "m-reject@example.com"
    lst = b.new_list([member], posting="open", name="dev")
    b.smtp("alice@reject.test", [lst], signed_post(keys, "reject.test", lst, "munged"))
    wait_until(lambda: b.sink.for_recipient(member), 60, what="the post")
    b.settle()
    [got] = b.sink.for_recipient(member)
    # Munged where it must be: From is the list's, so the author's signature no longer verifies ...
    assert re.search(rf'^From: "Alice Example via dev\d*" <{re.escape(lst)}>\r?$', got.content.decode(), re.M)
    assert signatures(got.content, server) == [("example.org", True), ("reject.test", False)]
    # ... and the list domain's does, for the domain of the From: DMARC-aligned.
    assert lst.split("@")[1] == "example.org"


def test_personal_copies_from_the_fan_out_are_signed_on_the_re_injection_listener(bed):
    b, server, keys, _ = bed
    members = ["m-fan1@example.com", "m-fan2@example.com"]
    lst = b.new_list(members, posting="open", name="dev", footer="-- \nthe dev list, to {member}\n")
    b.smtp("alice@none.test", [lst], signed_post(keys, "none.test", lst, "fanned out"))
    wait_until(lambda: all(b.sink.for_recipient(m) for m in members), 60, what="the personal copies")
    b.settle()
    for m in members:
        [got] = b.sink.for_recipient(m)
        assert "the dev list" in got.message.get_body(("plain",)).get_content()
        # Newest first: the re-injection listener's signature covers the copy as sent (footer and
        # all); the list's first one, made when the post entered before the footer, and the
        # author's no longer verify. One passing signature is what a receiver needs (RFC 6376 6.1).
        assert signatures(got.content, server) == [("example.org", True), ("example.org", False),
                                                   ("none.test", False)], m
