"""DMARC-safe From: the pure core (record parsing, policy choice, the From rewrite), the
lookup against a real DNS server on 127.0.0.1 (tests/bed/dns.py), and the plan's edits.
The same over the real Postfix: tests/test_dmarc_mta.py."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listmilter.app.dmarc_lookup import Lookup, organizational_domain
from listmilter.core import config, dmarc, plan, settings
from tests.bed.dns import dns_server

LIST = "dev@example.org"


# -- records -----------------------------------------------------------------------------
@pytest.mark.parametrize("txt, p, sp", [
    ("v=DMARC1; p=reject", "reject", None),
    ("v=DMARC1;p=quarantine;sp=none", "quarantine", "none"),
    ("v=DMARC1; p=none; sp=reject; rua=mailto:x@example.org", "none", "reject"),
    ("v=DMARC1; P=REJECT", "reject", None),             # tag names and values are case-insensitive
    ("v=DMARC1; p=reject; sp=bogus", "reject", None),   # a bad sp= falls back to p=
    ("v=DMARC1; p=reject;", "reject", None),
])
def test_a_record_parses(txt, p, sp):
    assert dmarc.parse_record(txt) == (dmarc.Record(p, sp), "")


@pytest.mark.parametrize("txt, why", [
    ("v=DMARC1; p=bogus", "p='bogus'"),
    ("v=DMARC1; rua=mailto:x@example.org", "p='(missing)'"),
    ("p=reject; v=DMARC1", "v=DMARC1 must come first"),
    ("v=DMARC2; p=reject", "v=DMARC1 must come first"),
    ("v=DMARC1; p reject", "has no '='"),
    ("", "v=DMARC1 must come first"),
])
def test_a_record_that_does_not_parse_is_no_policy_and_says_why(txt, why):
    record, reason = dmarc.parse_record(txt)
    assert record is None and why in reason


def test_exactly_one_dmarc_record_counts():
    assert dmarc.select_record(["spf1 stuff", "v=DMARC1; p=reject"])[0] == dmarc.Record("reject", None)
    assert dmarc.select_record([])[1] == "no DMARC record"
    record, why = dmarc.select_record(["v=DMARC1; p=reject", "v=DMARC1; p=none"])
    assert record is None and "2 DMARC records" in why


def test_the_domain_record_comes_first_then_the_organizational_sp():
    assert dmarc.choose("a.example.com", "example.com", ["v=DMARC1; p=none"],
                        ["v=DMARC1; p=reject"]).policy == "none"
    assert dmarc.choose("a.example.com", "example.com", [], ["v=DMARC1; p=none; sp=reject"]) == \
        dmarc.Verdict("reject", "sp=reject at _dmarc.example.com")
    assert dmarc.choose("a.example.com", "example.com", [], ["v=DMARC1; p=quarantine"]).policy == "quarantine"
    # sp= is for subdomains only: the organizational domain itself uses p=
    assert dmarc.choose("example.com", "example.com", ["v=DMARC1; p=none; sp=reject"], []).policy == "none"
    none = dmarc.choose("a.example.com", "example.com", ["spf"], ["v=DMARC1; p=x"])
    assert none.policy == dmarc.NO_POLICY and "p='x'" in none.reason and "_dmarc.example.com" in none.reason
    # A DMARC record at the domain itself that does not parse, or two of them, end the search there.
    for own in (["v=DMARC1; p=x"], ["v=DMARC1; p=none", "v=DMARC1; p=quarantine"]):
        v = dmarc.choose("a.example.com", "example.com", own, ["v=DMARC1; p=reject"])
        assert v.policy == dmarc.NO_POLICY and "_dmarc.example.com" not in v.reason


@pytest.mark.parametrize("policy, mitigation, policies, expected", [
    ("reject", "munge_from", ("reject", "quarantine"), True),
    ("quarantine", "munge_from", ("reject", "quarantine"), True),
    ("quarantine", "munge_from", ("reject",), False),
    ("none", "munge_from", ("reject", "quarantine"), False),
    ("", "munge_from", ("reject", "quarantine", "none"), False),
    (dmarc.UNKNOWN, "munge_from", ("reject",), True),      # the safe side
    ("reject", "none", ("reject",), False),
    (dmarc.UNKNOWN, "none", ("reject",), False),
])
def test_when_to_mitigate(policy, mitigation, policies, expected):
    assert dmarc.mitigate(dmarc.Verdict(policy, ""), mitigation, policies) is expected


# -- the From field --------------------------------------------------------------------------
@pytest.mark.parametrize("froms, domain, reason", [
    (["Alice <alice@Example.NET>"], "example.net", ""),
    (["alice@example.net."], "example.net", ""),
    ([], None, "no From header"),
    (["a@example.net", "b@example.net"], None, "2 From headers"),
    (["a@example.net, b@example.org"], None, "From names 2 addresses"),
    (["no address here"], None, "From names 0 addresses"),
    (["a@localhost"], None, "no usable domain"),
    (["a@bad_domain.example"], None, "no usable domain"),
    (["a@b\udcc3\udca9.example"], None, "no usable domain"),      # 8-bit, as pymilter hands it over
    (["x" * 5000 + "@example.net"], None, "From header of 5012 characters"),
])
def test_the_poster_and_the_domain_to_look_up(froms, domain, reason):
    who = dmarc.poster([("From", f) for f in froms] + [("Subject", "hi")])
    assert who.domain == domain
    assert reason in who.reason


def parsed(headers: list[tuple[str, str]]) -> email.message.EmailMessage:
    text = "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\nbody\r\n"
    return email.message_from_bytes(text.encode("utf-8", "surrogateescape"), policy=email.policy.default)


def munged_headers(headers: list[tuple[str, str]], name: str = "") -> list[tuple[str, str]]:
    m = dmarc.munge_from(headers, LIST, name)
    edits = plan.Edits(del_headers=list(m.delete), change_headers=list(m.change), add_headers=list(m.add))
    return plan.apply_header_edits(headers, edits)


def test_munge_from_names_the_poster_and_keeps_the_original():
    out = parsed(munged_headers([("From", "Alice Example <alice@reject.test>"), ("Subject", "hi")]))
    assert out["From"].addresses[0].display_name == "Alice Example via dev"
    assert out["From"].addresses[0].addr_spec == LIST
    assert out["Reply-To"].addresses[0].addr_spec == "alice@reject.test"
    assert out["X-Original-From"] == "Alice Example <alice@reject.test>"


def test_munge_from_uses_the_local_part_and_the_list_description():
    out = munged_headers([("From", "alice@reject.test")], "Developers")
    assert ("From", '"alice via Developers" <dev@example.org>') in out
    # A display name that is itself an address keeps only its local part (never two domains in From).
    out = parsed(munged_headers([("From", '"bob@other.test" <bob@reject.test>')]))
    assert out["From"].addresses[0].display_name == "bob via dev"


def test_munge_from_encodes_a_non_ascii_name():
    headers = [("From", "=?utf-8?q?J=C3=B6rg?= <jorg@reject.test>")]
    out = munged_headers(headers)
    raw_from = [v for n, v in out if n == "From"][0]
    assert raw_from.isascii() and "=?utf-8?" in raw_from
    assert parsed(out)["From"].addresses[0].display_name == "Jörg via dev"


def test_an_existing_reply_to_gets_the_poster_added_as_mailman_3_does():
    headers = [("From", "Alice <alice@reject.test>"), ("Reply-To", "team@elsewhere.test")]
    out = parsed(munged_headers(headers))
    assert [a.addr_spec for a in out["Reply-To"].addresses] == ["team@elsewhere.test", "alice@reject.test"]
    assert len(out.get_all("Reply-To")) == 1
    # Already there: left alone.
    headers = [("From", "Alice <alice@reject.test>"), ("Reply-To", "Alice <ALICE@reject.test>")]
    assert dmarc.munge_from(headers, LIST, "").change == (("From", 1, '"Alice via dev" <dev@example.org>'),)


def test_several_from_headers_leave_one_from_the_list_and_every_original_kept():
    headers = [("From", "a@reject.test"), ("Subject", "x"), ("from", "b@reject.test")]
    out = munged_headers(headers)
    assert [v for n, v in out if n.lower() == "from"] == ['"someone via dev" <dev@example.org>']
    assert [v for n, v in out if n == "X-Original-From"] == ["a@reject.test", "b@reject.test"]
    assert not [n for n, _ in out if n == "Reply-To"]       # nobody to reply to


def test_no_from_at_all_gets_one():
    out = munged_headers([("Subject", "x")])
    assert ("From", '"someone via dev" <dev@example.org>') in out


header_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300) | st.sampled_from([
    "Alice <alice@reject.test>", "=?utf-8?b?invalid?= <a@b.test>", "=?x-unknown?q?a?= <a@b.test>",
    '"unterminated <a@b.test>', "<>", "a@b.test (comment", "\udcc3\udca9 <\udcff@b.test>", "@@@", "a@[127.0.0.1]",
    "group: a@b.test, c@d.test;", "x" * 10_000,
])


@given(st.lists(st.tuples(st.sampled_from(["From", "from", "Reply-To", "Subject", "To"]), header_text),
                max_size=6), st.text(max_size=80))
@example([("From", "\udcc3\udca9 <a@b.test>")], "")
@example([("From", "Ünï <ü@b.test>"), ("Reply-To", "\udcff")], "Ü list")
def test_hostile_headers_never_raise_and_always_end_from_the_list(headers, name):
    who = dmarc.poster(headers)
    assert who.domain is None or who.domain.isascii()
    if who.domain is None:
        assert who.reason
    out = munged_headers(headers, name)
    froms = [v for n, v in out if n.lower() == "from"]
    assert len(froms) == 1 and froms[0].endswith(f"<{LIST}>")
    assert "\n" not in froms[0] and "\r" not in froms[0]
    assert [v for n, v in out if n == "X-Original-From"] == [v for n, v in headers if n.lower() == "from"]


@given(st.text(max_size=200))
@example("v=DMARC1; p=reject; sp=\udcff")
def test_hostile_records_never_raise(txt):
    record, reason = dmarc.parse_record(txt)
    assert (record is None) != (reason == "")
    assert record is None or record.p in dmarc.POLICIES


# -- the lookup, against a DNS server on 127.0.0.1 ----------------------------------------------
@pytest.fixture(scope="module")
def dns():
    with dns_server() as server:
        yield server


def lookup_for(server, **kw) -> Lookup:
    return Lookup((("127.0.0.1", server.port),), **kw)


def verdict(lookup: Lookup, from_: str) -> dmarc.Verdict:
    return lookup.verdict(dmarc.poster([("From", from_)]))


@pytest.mark.parametrize("domain, policy", [
    ("reject.test", "reject"), ("quarantine.test", "quarantine"), ("none.test", "none"),
    ("norecord.test", dmarc.NO_POLICY), ("sub.parent.test", "reject"), ("malformed.test", dmarc.NO_POLICY),
    ("other.test", dmarc.NO_POLICY), ("deep.down.reject.test", "reject"), ("bad.parent.test", dmarc.NO_POLICY),
])
def test_lookup_policies(dns, domain, policy):
    assert verdict(lookup_for(dns), f"a@{domain}").policy == policy


def test_a_malformed_record_says_so(dns):
    assert "malformed DMARC record" in verdict(lookup_for(dns), "a@malformed.test").reason


def test_a_name_never_answered_is_the_safe_side_within_the_timeout(dns):
    lookup = lookup_for(dns, timeout=0.5)
    v = verdict(lookup, "a@timeout.test")
    assert v.policy == dmarc.UNKNOWN and "DNS lookup failed" in v.reason
    # The failure is remembered briefly: the next post does not wait again.
    asked = lookup.queries
    assert verdict(lookup, "b@timeout.test").policy == dmarc.UNKNOWN
    assert lookup.queries == asked


def test_servfail_is_the_safe_side():
    with dns_server(servfail={"_dmarc.broken.test."}) as server:
        assert verdict(lookup_for(server), "a@broken.test").policy == dmarc.UNKNOWN


def test_answers_are_cached_for_their_ttl_and_the_cache_is_bounded(dns):
    now = [1000.0]
    lookup = lookup_for(dns, clock=lambda: now[0], cache_size=3)
    verdict(lookup, "a@reject.test")
    verdict(lookup, "b@reject.test")
    assert lookup.queries == 1
    verdict(lookup, "a@norecord.test")          # negative answer, cached by the SOA's minimum (60 s)
    verdict(lookup, "a@norecord.test")
    assert lookup.queries == 2
    now[0] += 61                                # past the negative TTL, within the record's 300 s
    verdict(lookup, "a@norecord.test")
    verdict(lookup, "a@reject.test")
    assert lookup.queries == 3
    for d in ("none.test", "quarantine.test", "other.test"):
        verdict(lookup, f"a@{d}")
    assert len(lookup._cache) == 3


def test_a_from_without_a_domain_is_not_looked_up_and_mitigated(dns):
    lookup = lookup_for(dns)
    v = lookup.verdict(dmarc.poster([("From", "a@x.test"), ("From", "b@y.test")]))
    assert v == dmarc.Verdict(dmarc.UNKNOWN, "2 From headers") and lookup.queries == 0


def test_organizational_domain_by_the_public_suffix_list():
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.example.com") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"


# -- the plan ---------------------------------------------------------------------------------------
def expanded(verdict_: dmarc.Verdict | None, **kw) -> list[tuple[str, str]]:
    ls = plan.ListSettings(LIST, "open", "[dev] ", "", "dev.example.org", **kw)
    headers = [("From", "Alice <alice@reject.test>"), ("Subject", "hi")]
    edits = plan.expand_list(ls, ["<dev@example.org>"], ["bob@example.com"], headers, "Q1", b"k" * 32,
                             1_700_000_000.0, verdict_)
    return plan.apply_header_edits(headers, edits)


def test_the_post_s_edits_include_the_rewrite_only_when_the_policy_says_so():
    munged = dict(expanded(dmarc.Verdict("reject", "")))
    assert munged["From"] == '"Alice via dev" <dev@example.org>' and munged["Subject"] == "[dev] hi"
    assert munged["X-Original-From"] == "Alice <alice@reject.test>"
    assert dict(expanded(dmarc.Verdict("none", "")))["From"] == "Alice <alice@reject.test>"
    assert dict(expanded(None))["From"] == "Alice <alice@reject.test>"
    assert dict(expanded(dmarc.Verdict("reject", ""), dmarc_mitigation="none"))["From"] == \
        "Alice <alice@reject.test>"
    assert dict(expanded(dmarc.Verdict("quarantine", ""), dmarc_policies=("reject",)))["From"] == \
        "Alice <alice@reject.test>"


def test_personal_copies_carry_the_rewrite():
    ls = plan.ListSettings(LIST, "open", "", "", "dev.example.org")
    copies = plan.personal_copies(ls, ["bob@example.com"], [("From", "alice@reject.test")], b"hi\r\n", "Q1",
                                  b"k" * 32, lambda m: "https://x/u/t", 1_700_000_000.0,
                                  dmarc.Verdict("reject", ""))
    assert copies.copies[0][2].startswith(b'From: "alice via dev" <dev@example.org>\r\n')
    msg = email.message_from_bytes(copies.copies[0][2], policy=email.policy.default)
    assert msg["X-Original-From"] == "alice@reject.test"


# -- settings and config ---------------------------------------------------------------------------
def test_settings_parse_and_refuse():
    assert settings.parse("dmarc_mitigation", "none") == "none"
    assert settings.parse("dmarc_policies", "reject, quarantine") == ("reject", "quarantine")
    assert settings.parse("dmarc_policies", ["reject"]) == ("reject",)
    for name, bad in (("dmarc_mitigation", "wrap"), ("dmarc_policies", "reject, maybe"), ("dmarc_policies", 3)):
        with pytest.raises(settings.SettingError):
            settings.parse(name, bad)


def test_config_dns_nameservers():
    cfg = config.parse('dns:\n  nameservers: [127.0.0.1, "127.0.0.1:5353", "[::1]:5300", "::1"]\n')
    assert cfg.dns_nameservers == (("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 5300), ("::1", 53))
    assert config.parse("").dns_nameservers == ()


@pytest.mark.parametrize("text, message", [
    ("dns:\n  nameservers: [ns.example.org]\n", "x.yaml:2: dns.nameservers: 'ns.example.org' is not an IP"),
    ("dns:\n  nameservers:\n    - 127.0.0.1\n    - 127.0.0.1:70000\n", "x.yaml:4: dns.nameservers: port out"),
    ("dns:\n  nameservers: 127.0.0.1\n", "x.yaml:2: dns.nameservers must be a list"),
    ("dns:\n  resolver: 1\n", "x.yaml:2: unknown key 'resolver' in dns"),
    ("defaults:\n  dmarc_mitigation: wrap\n", "x.yaml:2: defaults.dmarc_mitigation: must be one of"),
])
def test_config_errors_name_file_and_line(text, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "x.yaml")
    assert str(e.value).startswith(message)


def test_the_documented_lines_parse():
    """docs/configuration.md's DMARC example and the shipped file's commented lines, uncommented."""
    cfg = config.parse("dns:\n  nameservers: [\"127.0.0.1:5353\"]\ndefaults:\n  dmarc_mitigation: munge_from\n"
                       "  dmarc_policies: [reject, quarantine]\n")
    assert cfg.dns_nameservers == (("127.0.0.1", 5353),)
    eff = cfg.list_settings({})
    assert (eff.dmarc_mitigation, eff.dmarc_policies) == ("munge_from", ("reject", "quarantine"))
    shipped = (Path(__file__).parent.parent / "conf" / "listmilter.yaml").read_text()
    block = "\n".join(line[2:] for line in shipped.splitlines()
                      if line.startswith(("# dns:", "#   nameservers:")))
    assert config.parse(block).dns_nameservers == (("192.0.2.53", 53), ("192.0.2.54", 5353))


def test_the_log_says_why_a_from_was_rewritten_and_nothing_when_it_was_not():
    reject = dmarc.Verdict("reject", "p=reject for example.com")
    none = dmarc.Verdict("none", "p=none for example.com")
    failed = dmarc.Verdict(dmarc.UNKNOWN, "DMARC lookup failed (Timeout: 2 s)")
    policies = ("reject", "quarantine")
    assert dmarc.log_status(reject, "munge_from", policies) == "DMARC p=reject for example.com; From rewritten"
    assert dmarc.log_status(none, "munge_from", policies) is None
    assert dmarc.log_status(reject, "none", policies) is None
    assert dmarc.log_status(failed, "munge_from", policies) == \
        "DMARC policy unknown (DMARC lookup failed (Timeout: 2 s)); From rewritten to be safe"
