"""DMARC-safe From over the real Postfix (and once over Sendmail): listmilter's resolver
points at a DNS server on 127.0.0.1 (tests/bed/dns.py) through `dns.nameservers`, and the
sink sees what members get. The pure half: tests/test_dmarc.py."""

from __future__ import annotations

import re
import time

import pytest

from tests.bed.dns import dns_server
from tests.bed.net import wait_until
from tests.conftest import Bed, SendmailBed, _clean, _finish, message

pytestmark = pytest.mark.mta


@pytest.fixture(scope="module")
def dns():
    with dns_server() as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", "yaml"])
def dmarc_bed(request, dns):
    # The exact lines docs/configuration.md shows, with the test server's port.
    b = Bed(request.param, extra={"dns": {"nameservers": [dns.address]}})
    yield b
    _finish(b, keep_files=bool(request.session.testsfailed))


@pytest.fixture
def bed(dmarc_bed):
    yield from _clean(dmarc_bed)


MUNGED = ["reject.test", "quarantine.test", "sub.parent.test", "timeout.test"]
UNTOUCHED = ["none.test", "norecord.test", "malformed.test"]


def post_from(bed, domain: str, list_address: str, member: str, extra: str = "") -> tuple[str, object]:
    poster = f"alice@{domain}"
    bed.smtp(poster, [list_address], message(f"from {domain}", f"Alice Example <{poster}>", list_address, extra))
    wait_until(lambda: bed.sink.for_recipient(member), 60, what=f"the post from {domain}")
    return poster, bed.sink.for_recipient(member)[-1]


@pytest.mark.parametrize("domain", MUNGED)
def test_a_post_from_a_strict_or_unknown_domain_goes_out_from_the_list(bed, domain):
    member = f"m-{domain}@example.com"
    dev = bed.new_list([member], posting="open", name="dev")
    poster, got = post_from(bed, domain, dev, member)
    raw = got.content.decode()
    assert re.search(rf'^From: "Alice Example via dev\d*" <{re.escape(dev)}>\r?$', raw, re.M), raw[:800]
    msg = got.message
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == [poster]
    assert msg["X-Original-From"] == f"Alice Example <{poster}>"
    assert len(msg.get_all("From")) == 1 and msg["Subject"] == f"from {domain}"
    log = bed.deliver_log()
    if domain == "timeout.test":
        assert f"list=<{dev}>" in log and "DMARC policy unknown (_dmarc.timeout.test: DNS lookup failed" in log
    else:
        assert re.search(rf"list=<{re.escape(dev)}>.*status=DMARC s?p=\w+ at _dmarc\.\S+; From rewritten", log)


@pytest.mark.parametrize("domain", UNTOUCHED)
def test_a_post_from_a_domain_without_a_strict_policy_keeps_its_from(bed, domain):
    member = f"u-{domain}@example.com"
    dev = bed.new_list([member], posting="open", name="dev")
    poster, got = post_from(bed, domain, dev, member)
    msg = got.message
    assert msg["From"] == f"Alice Example <{poster}>"
    assert msg["Reply-To"] is None and msg["X-Original-From"] is None


def test_an_existing_reply_to_gets_the_poster_added(bed):
    member = "r@example.com"
    dev = bed.new_list([member], posting="open", name="dev")
    poster, got = post_from(bed, "reject.test", dev, member, extra="Reply-To: team@elsewhere.test\r\n")
    assert [a.addr_spec for a in got.message["Reply-To"].addresses] == ["team@elsewhere.test", poster]


def test_a_list_with_mitigation_none_and_one_with_only_reject(bed):
    m1, m2 = "n1@example.com", "n2@example.com"
    off = bed.new_list([m1], posting="open", name="off", dmarc_mitigation="none")
    strict = bed.new_list([m2], posting="open", name="strict", dmarc_policies="reject")
    assert post_from(bed, "reject.test", off, m1)[1].message["From"] == "Alice Example <alice@reject.test>"
    assert post_from(bed, "quarantine.test", strict, m2)[1].message["From"] == \
        "Alice Example <alice@quarantine.test>"


def test_one_lookup_for_a_post_to_two_lists(bed, dns):
    a = bed.new_list(["t1@example.com"], posting="open", name="alpha")
    b = bed.new_list(["t2@example.com"], posting="open", name="beta")
    before = dns.queries.count("_dmarc.twolists.test.")
    dns.zones["_dmarc.twolists.test."] = ["v=DMARC1; p=reject"]
    bed.smtp("x@twolists.test", [a, b], message("two", "X <x@twolists.test>", a))
    bed.sink.wait_for_recipients(2)
    for member, list_address in (("t1@example.com", a), ("t2@example.com", b)):
        assert bed.sink.for_recipient(member)[0].message["From"].addresses[0].addr_spec == list_address
    # The split-off copy came back through the milter: the cache answered it.
    assert dns.queries.count("_dmarc.twolists.test.") == before + 1


def test_personal_copies_are_munged_too(bed):
    mark = len(bed.listmilter.log())
    bed.listmilter.extra["web"] = {"base_url": "https://lists.example.org"}
    bed.listmilter.write_config()
    try:
        wait_until(lambda: "config reloaded from" in bed.listmilter.log()[mark:], 10, what="the config reload")
        members = ["p1@example.com", "p2@example.com"]
        dev = bed.new_list(members, posting="open", name="dev")
        bed.smtp("alice@reject.test", [dev], message("personal", "Alice <alice@reject.test>", dev))
        bed.sink.wait_for_recipients(2)
        for member in members:
            msg = bed.sink.for_recipient(member)[0].message
            assert msg["From"].addresses[0].addr_spec == dev and msg["List-Unsubscribe"].startswith("<https://")
            assert msg["X-Original-From"] == "Alice <alice@reject.test>"
    finally:
        mark = len(bed.listmilter.log())
        bed.listmilter.extra.pop("web")
        bed.listmilter.write_config()
        wait_until(lambda: "config reloaded from" in bed.listmilter.log()[mark:], 10, what="the config reload")


def test_hostile_from_headers_are_mitigated_and_delivered(bed):
    member = "h@example.com"
    dev = bed.new_list([member], posting="open", name="dev")
    two_froms = (f"From: a@reject.test\r\nFrom: b@none.test\r\nTo: {dev}\r\nSubject: two\r\n"
                 f"Message-ID: <two.{time.time()}@x.test>\r\n\r\nhi\r\n").encode()
    bed.smtp("a@reject.test", [dev], two_froms)
    eight_bit = (f"From: J\xc3\xb6rg <j@\xc3\xa9.test>\r\nTo: {dev}\r\nSubject: eight\r\n"
                 f"Message-ID: <eight.{time.time()}@x.test>\r\n\r\nhi\r\n").encode("latin-1")
    bed.smtp("j@none.test", [dev], eight_bit)
    bed.sink.wait_for_recipients(2)
    for got in bed.sink.for_recipient(member):
        froms = [line for line in got.content.split(b"\r\n") if line.lower().startswith(b"from:")]
        assert len(froms) == 1 and froms[0].endswith(f"<{dev}>".encode()), got.content[:500]
    log = bed.deliver_log()
    assert "DMARC policy unknown (2 From headers)" in log and "DMARC policy unknown (From has no usable domain)" in log


def test_sendmail_rewrites_the_same_way(dns):
    b = SendmailBed("sqlite", extra={"dns": {"nameservers": [dns.address]}})
    passed = False
    try:
        member = "s@example.com"
        dev = b.new_list([member], posting="open", name="dev")
        poster, got = post_from(b, "reject.test", dev, member)
        assert re.search(rf'^From: "Alice Example via dev\d*" <{re.escape(dev)}>\r?$', got.content.decode(), re.M)
        assert got.message["X-Original-From"] == f"Alice Example <{poster}>"
        assert [a.addr_spec for a in got.message["Reply-To"].addresses] == [poster]
        b.sink.clear()
        poster, got = post_from(b, "none.test", dev, member)
        assert got.message["From"] == f"Alice Example <{poster}>" and got.message["X-Original-From"] is None
        passed = True
    finally:
        _finish(b, keep_files=not passed)       # its logs stay after a failure
