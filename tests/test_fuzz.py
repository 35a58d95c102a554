"""Every parser at an edge, fed hostile input with hypothesis: no exception escapes, and
every input ends in a defined outcome. Pure: no MTA (the real-MTA half is
tests/test_hostile_mail.py).

Inputs are built to break mail software, not just random text: 8-bit and
non-UTF-8 bytes, folded and CR/LF-mixed lines, NULs, control characters,
surrogate-escaped values as pymilter and argv hand them over, huge values,
MIME nested past Python's recursion limit, and structurally valid skeletons
(a DSN, a command mail, the flufl.bounce sample bounces, a config file) with
fuzzed fields.

Bounded by the hypothesis profile (tests/conftest.py): "ci" by default,
HYPOTHESIS_PROFILE=nightly for many more examples.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import io
import ipaddress
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from listmilter import log
from listmilter.app import notices
from listmilter.core import addresses, bounces, commands, config, envid, headers, mailparse, plan, tokens
from listmilter.core.keys import keyring
from listmilter.core.model import Member
from listmilter.mta import deliver, netstring, socketmap
from listmilter.store import open_store

SECRET = b"f" * 32
LIST = "dev@example.org"
MEMBERS = ("bob@example.net", "carol@example.net")
FLUFL = Path(__file__).parent / "data" / "flufl-bounce"


def scaled(share: float) -> settings:
    """A share of the profile's examples, for the slower properties."""
    return settings(max_examples=max(5, int(settings().max_examples * share)))


# -- strategies ------------------------------------------------------------------
NASTY_CHARS = ["\r", "\n", "\r\n", "\r\n\t", "\n ", "\t", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85",
               "\u2028", "\u202e", "\ufeff", "\xa0", "é", "ü", "€", "😀", "\udcff", "\udcc3\udca9", "\ud800",
               ";", ":", "<", ">", "@", '"', "(", ")", ",", "\\", "=?utf-8?q?", "=?utf-8?b?", "?=",
               "=?x?q?", "rfc822;", "confirm ", "-", "+", ".", " "]
nasty_text = st.lists(st.one_of(st.sampled_from(NASTY_CHARS), st.text(max_size=6)), max_size=30).map("".join)
huge_text = st.builds(lambda unit, n: unit * n,
                      st.sampled_from(["a", "é", "\n ", "<x@y> ", "=?utf-8?q?=C3=A9?= ", "\x00", "\udcff"]),
                      st.integers(2_000, 60_000))
hostile_text = st.one_of(st.text(), nasty_text, nasty_text, huge_text)

NASTY_BYTES = [b"\r\n", b"\n", b"\r", b"\r\n ", b"\n\t", b"\x00", b"\xff", b"\xfe", b"\xc3\xa9", b"\xc3",
               b"\xe2\x80\xa8", b"\xc2\x85", b"\t", b" ", b"=?utf-8?b?w6k=?=", b"=?iso-8859-1?q?=E9?=",
               b"=?", b"?=", b"--", b"--B", b"--B--", b";", b":", b"<", b">", b"@", b"rfc822;",
               b"bob@example.net", b"<x@example.net>", b"Content-Type: ", b"boundary=", b'"']
word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=10).map(str.encode)
nasty_bytes = st.lists(st.one_of(st.sampled_from(NASTY_BYTES), st.binary(max_size=6), word),
                       max_size=30).map(b"".join)
huge_bytes = st.builds(lambda unit, n: unit * n,
                       st.sampled_from([b"a", b"\xff", b"\xc3\xa9", b"\r\n ", b"\n\t", b"x\x00"]),
                       st.integers(2_000, 60_000))
hostile_bytes = st.one_of(nasty_bytes, nasty_bytes, st.binary(max_size=300),
                          st.text().map(lambda s: s.encode("utf-8", "surrogatepass")), huge_bytes)


@st.composite
def folded(draw, values=hostile_bytes):
    """A header value over one or more lines, each fold CRLF or LF then a space or a tab."""
    parts = draw(st.lists(values, min_size=1, max_size=4))
    folds = [draw(st.sampled_from([b"\r\n ", b"\n\t", b"\r\n\t", b"\n "])) for _ in parts[1:]]
    return parts[0] + b"".join(f + p for f, p in zip(folds, parts[1:], strict=True))


HEADER_NAMES = [b"From", b"To", b"Subject", b"Message-ID", b"Return-Path", b"Auto-Submitted", b"Precedence",
                b"List-Id", b"X-Loop", b"Content-Type", b"MIME-Version", b"Content-Transfer-Encoding",
                b"In-Reply-To", b"Reply-To", b"Sender"]
header_name = st.one_of(st.sampled_from(HEADER_NAMES), word, st.binary(min_size=1, max_size=8))


def join_lines(lines: list[bytes], eols: list[bytes]) -> bytes:
    return b"".join(line + eols[i % len(eols)] for i, line in enumerate(lines))


eols = st.lists(st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\n", b"\r"]), min_size=1, max_size=4)


BODIES = st.one_of(hostile_bytes, st.just(b"subscribe\n"))


@st.composite
def messages(draw, body=BODIES):
    """A message: hostile headers (known names and others, folded, 8-bit), mixed line ends, a body."""
    heads = draw(st.lists(st.tuples(header_name, folded()), max_size=10))
    lines = [n + draw(st.sampled_from([b": ", b":", b":\t", b" : "])) + v for n, v in heads]
    return join_lines(lines, draw(eols)) + draw(st.sampled_from([b"\r\n", b"\n"])) + draw(body)


def deep_mime(depth: int) -> bytes:
    """MIME nested `depth` times: past ~1000, Python's parser hits the recursion limit."""
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(depth))
    return b"From: MAILER-DAEMON@x.example\nMIME-Version: 1.0\n" + head + b"Content-Type: text/plain\n\nhi\n"


def valid_envid(post: str = "Q1") -> str:
    return envid.make(post, LIST, SECRET, time.time())


def field(name: bytes, plausible: list[bytes]):
    return st.tuples(st.just(name), st.one_of(st.sampled_from(plausible), folded()))


PER_RECIPIENT = [
    field(b"Final-Recipient", [b"rfc822; bob@example.net", b"rfc822;<Carol@Example.NET>", b"rfc822; nobody@x",
                               b"utf-8; j\xc3\xbcrgen@example.net", b"x400; /c=de/", b"rfc822", b""]),
    field(b"Original-Recipient", [b"rfc822;bob@example.net", b"rfc822; carol@example.net", b"rfc822;\xff@x"]),
    field(b"Action", [b"failed", b"delayed", b"delivered", b"failure (permanent)", b"relayed", b"FAILED"]),
    field(b"Status", [b"5.1.1", b"4.2.2", b"5.1.1 (user unknown)", b"2.0.0", b"5.7.1\xff", b""]),
    field(b"Diagnostic-Code", [b"smtp; 550 5.1.1 user unknown", b"smtp; 550 Benutzer J\xc3\xbcrgen unbekannt",
                               b"smtp; 550 \xff\xfe\x00", b"smtp; 550 5.1.1\n <bob@example.net>:\n user unknown"]),
    field(b"Remote-MTA", [b"dns; mx.example.net", b"dns; \xc3\xa9"]),
]


@st.composite
def dsns(draw):
    """An RFC 3464 DSN skeleton (multipart/report, a text part, delivery-status, the original)
    with every field fuzzed: values, order, repeats, line ends, boundary, truncation."""
    boundary = draw(st.sampled_from([b"B", b"=_x", b"", b"\xff", b"B B"]))
    envid_value = draw(st.one_of(st.builds(lambda: valid_envid().encode()), folded(),
                                 st.sampled_from([b"Q\xc3\xbc.x.y", b"Q1.abc.def", b""])))
    status_type = draw(st.sampled_from([b"message/delivery-status", b"message/global-delivery-status",
                                        b"text/plain", b"message/delivery-status; charset=\xff",
                                        b"message/global-delivery-status; charset=idna",
                                        b"text/plain; charset=idna"]))
    blocks = []
    for _ in range(draw(st.integers(0, 4))):
        chosen = draw(st.lists(st.one_of(*PER_RECIPIENT), max_size=8))
        blocks.append(b"\n".join(n + b": " + v for n, v in chosen))
    per_message = b"Reporting-MTA: dns; mx.example.test\nOriginal-Envelope-Id: " + envid_value
    head = [b"From: " + draw(st.sampled_from([b"MAILER-DAEMON@mx.example.test (Mail Delivery System)",
                                               b"", b"\xff"])),
            b"To: dev-bounces@example.org",
            b"Subject: " + draw(st.sampled_from([b"Undelivered Mail", b"Unzustellbar: J\xc3\xbcrgen", b"\xff"])),
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/report; report-type=delivery-status; boundary="' + boundary + b'"']
    b = b"--" + boundary
    body = [b"", b, b"Content-Type: text/plain", b"", draw(nasty_bytes), b"", b,
            b"Content-Type: " + status_type, b"", per_message, b""]
    body += [block + b"\n" for block in blocks]
    body += [b, b"Content-Type: message/rfc822", b"", draw(st.one_of(messages(), nasty_bytes)), b + b"--"]
    data = join_lines(head + body, draw(eols))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))     # truncated MIME, now and then
    return data if cut is None else data[:cut]


def _flufl_samples() -> list[bytes]:
    return [p.read_bytes() for p in sorted(FLUFL.glob("*.txt"))]


@st.composite
def mutated_ndrs(draw):
    """A real-world bounce from flufl.bounce's sample corpus, with hostile bytes spliced in."""
    data = bytearray(draw(st.sampled_from(_flufl_samples())))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data[at:at] = draw(nasty_bytes)
        else:
            del data[at:at + draw(st.integers(1, 200))]
    return bytes(data)


# Deep nesting is slow to parse (~0.5 s at 500 levels): a few depths, the deepest past the limit.
bounce_like = st.one_of(dsns(), dsns(), mutated_ndrs(), messages(), hostile_bytes,
                        st.builds(deep_mime, st.sampled_from([20, 51, 60, 1100])))


# -- reading mail ------------------------------------------------------------------
def _assert_clean(value) -> None:
    assert type(value) is str
    assert "\r" not in value and "\n" not in value
    assert not re.search("[\ud800-\udfff]", value)
    value.encode("utf-8")


@scaled(0.4)
@given(bounce_like)
@example(deep_mime(1200))
def test_parse_never_raises_and_every_header_value_is_one_line_of_text(data):
    for msg in (mailparse.parse(data), mailparse.parse(data, headers_only=True)):
        for part in msg.walk():
            for _, value in part.items():
                _assert_clean(value)
            _assert_clean(part.get("Subject", ""))
            assert part.get_content_type()
    assert len(mailparse.body_text(data, 1000)) <= 1000


@given(st.one_of(hostile_text, st.binary().map(bytes), st.none()))
def test_text_and_message_id_of_anything(value):
    text = mailparse.text(value)
    _assert_clean(text)
    assert mailparse.text(text) == text
    msg_id = mailparse.message_id(value)
    assert msg_id == "" or re.fullmatch(r"<[^<>\s\x00-\x1f\x7f]+>", msg_id)


@given(st.one_of(hostile_text, st.binary().map(bytes), st.none()))
def test_one_line_of_anything_is_printable_with_single_spaces(value):
    """What notices and the DMARC From quote of a hostile message: nothing that could start a
    header or a line of its own, no runs of white space."""
    line = mailparse.one_line(value)
    _assert_clean(line)
    assert line.isprintable() and line == line.strip() and "  " not in line
    assert mailparse.one_line(line) == line


def test_message_id_reads_folded_and_8bit_ids():
    msg = mailparse.parse(b"Message-ID: <a@x>\r\n <b@y>\r\nIn-Reply-To: <J\xc3\xbcrgen@x>\r\n\r\n")
    assert mailparse.message_id(msg["Message-ID"]) == "<a@x>"
    assert mailparse.message_id(msg["In-Reply-To"]) == "<Jürgen@x>"


CHARSETS = [b"utf-8", b"iso-8859-1", b"utf-7", b"idna", b"punycode", b"rot13", b"base64", b"x-unknown",
            b"a\x00b", b"\xff", b"unicode_escape", b"utf-16", b'"utf-8"', b"*"]


@given(st.sampled_from(CHARSETS), st.sampled_from([b"7bit", b"8bit", b"base64", b"quoted-printable", b"x-uuencode",
                                                   b"binary", b"\xff"]), hostile_bytes, st.booleans())
def test_body_text_of_any_charset_and_encoding(charset, cte, body, multipart):
    part = b"Content-Type: text/plain; charset=" + charset + b"\nContent-Transfer-Encoding: " + cte + b"\n\n" + body
    data = (b"MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=x\n\n--x\n" + part + b"\n--x--\n"
            if multipart else part)
    assert isinstance(mailparse.body_text(data, 500), str)


KINDS = {bounces.DSN, bounces.HEURISTIC, bounces.AUTORESPONSE, bounces.UNRECOGNISED, bounces.FEEDBACK}


def _assert_report(report: bounces.Report) -> None:
    assert report.kind in KINDS
    assert len(report.envid) <= 100 and "\n" not in report.envid
    for f in report.failures:
        assert addresses.is_valid(f.address)
        for text in (f.status, f.diagnostic):
            assert "\n" not in text and "\r" not in text and len(text) <= 300
            text.encode("utf-8")


@scaled(0.5)
@given(bounce_like, st.booleans())
def test_bounce_reading_has_an_answer_for_everything(data, null_sender):
    """As deliver reads -bounces@ mail (DSN, then flufl.bounce's detectors), and as a caller with
    Python's own compat32 parse (Header objects for 8-bit) would: a Report, never an exception."""
    _assert_report(bounces.read_bytes(data, null_sender))        # as deliver reads it, bounded
    # Whole: up to HEURISTIC_LIMIT, read_bytes read it whole already (the same call, the same input),
    # and flufl.bounce's detectors cost ~0.5 s on a huge example.
    if len(data) > bounces.HEURISTIC_LIMIT:
        _assert_report(bounces.read(mailparse.parse(data), null_sender))
    if mailparse.readable(data):        # else Python's own parser gives up (RecursionError)
        _assert_report(bounces.read(email.message_from_bytes(data, policy=email.policy.compat32), null_sender))


@given(st.text(alphabet="éü€\udcff", min_size=1, max_size=20))
def test_an_8bit_diagnostic_is_read_not_refused(words):
    raw = words.encode("utf-8", "surrogateescape")
    data = (b"From: MAILER-DAEMON@x\nMIME-Version: 1.0\nContent-Type: multipart/report; boundary=B\n\n"
            b"--B\nContent-Type: message/delivery-status\n\nOriginal-Envelope-Id: " + valid_envid().encode() +
            b"\n\nFinal-Recipient: rfc822; bob@example.net\nAction: failed\nStatus: 5.1.1\n"
            b"Diagnostic-Code: smtp; 550 " + raw + b"\n\n--B--\n")
    report = bounces.read(mailparse.parse(data), True)
    assert report.kind == bounces.DSN and report.failures[0].address == "bob@example.net"
    assert envid.parse(report.envid, LIST, SECRET) is not None
    assert report.failures[0].diagnostic.startswith("smtp; 550 ")


# -- commands ------------------------------------------------------------------------
ROLES = ["request", "subscribe", "unsubscribe", "confirm"]


@given(st.sampled_from(ROLES), hostile_text, hostile_text, st.one_of(st.none(), hostile_text),
       st.one_of(st.none(), hostile_text), hostile_text, hostile_text)
@example("confirm", "é" * 24, "a@example.net", None, None, "", "")
@example("request", "", "a@example.net", None, "confirm " + "K" * 24, "", "")     # Kelvin sign, IGNORECASE
def test_commands_parse_anything(role, extension, sender, from_header, subject, body, message_id):
    cmd = commands.parse(role, extension, sender, from_header, subject, body, message_id)
    assert cmd.kind in (commands.SUBSCRIBE, commands.UNSUBSCRIBE, commands.CONFIRM, commands.HELP)
    assert isinstance(cmd.address, str) and isinstance(cmd.name, str)
    assert cmd.token == "" or tokens.TOKEN_RE.fullmatch(cmd.token)


@given(st.one_of(messages(), hostile_bytes, st.builds(
    lambda head, rest: b"Received: " + head + b"\r\n" + rest, folded(st.one_of(hostile_bytes, st.sampled_from(
        [b"from x (y [192.0.2.1])", b"from x ([IPv6:2001:db8::1])", b"from [999.1.1.1]", b"by mx", b"[\xff]"]))),
    messages())))
def test_received_client_of_any_message(data):
    client = commands.received_client(data)
    assert client == "" or ipaddress.ip_address(client)


@given(hostile_text, st.dictionaries(st.sampled_from(["auto-submitted", "precedence", "list-id", "x-loop"]),
                                     st.lists(hostile_text, max_size=3)))
def test_ignore_reason_of_anything(sender, heads):
    reason = commands.ignore_reason(sender, heads, "dev.example.org")
    assert reason is None or isinstance(reason, str)


@given(hostile_text)
def test_tokens_in_any_text(text):
    """Confirmation tokens found in a Subject or body line (one-click links: tests/test_tokens.py)."""
    token = tokens.find_token(text)
    assert token is None or tokens.TOKEN_RE.fullmatch(token)
    assert tokens.read_unsubscribe_token(keyring(SECRET), text) is None


# -- ENVIDs ----------------------------------------------------------------------------
@given(hostile_text)
@example("Qü.x.y")
@example("Q1." + "é" * 16)
def test_any_envid_is_ours_or_not_and_never_raises(text):
    assert envid.parse(text, LIST, SECRET) is None


@given(st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=1, max_size=12), hostile_text,
       st.integers(0, 3))
def test_envids_round_trip_and_changed_ones_are_refused(post_id, noise, where):
    made = envid.make(post_id, LIST, SECRET, time.time())
    assert envid.parse(made, LIST, SECRET).post_id == post_id
    assert envid.parse(made, "other@example.org", SECRET) is None
    changed = [noise + made, made + noise, made[:-1] + noise, made.replace(".", noise, 1)][where]
    post = envid.parse(changed, LIST, SECRET)
    assert post is None or post.post_id == post_id


# -- addresses and the list lookup ------------------------------------------------------------
# Not named `site`: conftest.MTA_FIXTURES marks every user of a fixture of that name mta (test_web's
# `site` starts `listmilter web` and nginx), which put these in-process properties in the slow tier.
@pytest.fixture(scope="module")
def pipe_site():
    """A real state folder, SQLite store and config for the in-process pipe transport."""
    root = Path(tempfile.mkdtemp(prefix="lmfuzz-"))
    sendmail = root / "sendmail"
    sendmail.write_text("#!/bin/sh\ncat > /dev/null\n")      # the MTA takes every notice
    sendmail.chmod(0o755)
    (root / "listmilter.yaml").write_text(f"state_dir: {root / 'state'}\noutgoing:\n  sendmail: {sendmail}\n"
                                          f"site:\n  admin: postmaster@example.org\n")
    (root / "state").mkdir()
    cfg = config.load(str(root / "listmilter.yaml"))
    store = open_store(cfg)
    store.create_list(LIST, {"posting": "open", "owners": ("boss@example.com",), "bounce_threshold": 1,
                             "bounce_action": "notify", "confirm_limit_per_list": 1_000_000})
    store.add_members(LIST, [Member(a) for a in MEMBERS])
    (root / "state" / "secret").write_bytes(SECRET)
    (root / "state" / "secret").chmod(0o600)
    yield cfg, store
    store.close()
    shutil.rmtree(root, ignore_errors=True)


@given(hostile_text)
@example("a\udcff@example.org")
@example("dev-confirm+\udcff@example.org")
def test_any_address_checks_and_looks_up_without_raising(pipe_site, text):
    _, store = pipe_site
    try:
        assert addresses.check(text) == text
    except addresses.AddressError:
        pass
    for key, _ in addresses.candidates(text):
        assert isinstance(key, str)
    found, _ = plan.find_list(text, store.get_list)
    assert found is None or found.address == LIST


# -- headers, as the milter gets them from pymilter (str, undecodable bytes surrogate-escaped) -------
pymilter_value = st.one_of(hostile_bytes, hostile_text.map(lambda t: t.encode("utf-8", "surrogatepass"))).map(
    lambda raw: raw.decode("utf-8", "surrogateescape"))      # what pymilter's header callback gets
prefixes = st.text(max_size=12).filter(lambda p: "\r" not in p and "\n" not in p)


@given(pymilter_value, prefixes)
@example("Caf\udce9", "[dev] ")
def test_subject_prefix_of_any_subject_can_be_given_to_the_mta(raw, prefix):
    assert isinstance(headers.decode(raw), str)
    new = headers.prefixed_subject(raw, prefix)
    if new is not None:
        new.encode("utf-8")          # what pymilter's chgheader does with it


@given(st.lists(st.tuples(st.sampled_from(["Subject", "List-Id", "Precedence", "From", "X-Other"]),
                          pymilter_value), max_size=8), prefixes)
def test_list_expansion_of_any_headers(message_headers, prefix):
    ls = plan.ListSettings(LIST, "open", prefix, "Dev talk", "dev.example.org")
    edits = plan.expand_list(ls, ["<dev@example.org>"], list(MEMBERS), message_headers, "Q1", SECRET, time.time())
    for _, _, value in edits.change_headers:
        value.encode("utf-8")
    for _, value in edits.add_headers:
        value.encode("utf-8")
    assert plan.loop_reason("a@example.net", message_headers, ls) in (
        None, "mail loop: the message already carries this list's List-Id")
    copies = plan.personal_copies(ls, list(MEMBERS), message_headers, b"body\r\n", "Q1", SECRET,
                                  lambda m: f"https://lists.example.org/u/{m}", time.time())
    assert [c[0] for c in copies.copies] == list(MEMBERS)


@given(st.lists(st.tuples(st.sampled_from(["From", "To", "Subject", "Message-ID"]), pymilter_value),
                max_size=6))
def test_refusal_notice_quotes_any_headers(message_headers):
    out = notices.refusal(LIST, "a@example.net", "only members may post", message_headers)
    assert email.message_from_bytes(out, policy=email.policy.default)["To"] == "a@example.net"


@scaled(0.5)
@given(bounce_like, hostile_text.map(mailparse.text))       # why: text read from the bounce
def test_unrecognised_bounce_notice_attaches_any_message_as_it_arrived(data, why):
    out = notices.unrecognised_bounce(LIST, ("boss@example.com",), why, data)
    attached = list(email.message_from_bytes(out, policy=email.policy.default).iter_attachments())
    assert len(attached) == 1
    part = attached[0]
    if part.get_content_type() == "application/octet-stream":
        assert part.get_content() == data
    else:
        assert part.get_content_type() == "message/rfc822" and data.isascii() and mailparse.readable(data)


@given(st.lists(st.tuples(st.floats(0, 4e9), hostile_text.map(mailparse.text),
                          hostile_text.map(mailparse.text)), max_size=5),
       st.sampled_from(["remove", "disable", "notify"]))
def test_bounce_notice_quotes_any_status_and_diagnostic(evidence, what):
    """The owner's notice quotes what remote servers said (status and diagnostic, read with mailparse)."""
    out = notices.bounce_owner(LIST, ("boss@example.com",), "bob@example.net", what, 3, evidence,
                               "dev-bounces+keep-x@example.org", "dev-bounces+remove-x@example.org")
    assert email.message_from_bytes(out, policy=email.policy.default)["To"] == "boss@example.com"


# No header reaches listmilter longer than the MTA allows one (Postfix: header_size_limit, 102400
# bytes by default; Sendmail's MaxHeadersLength is 32 KB). The stdlib's RFC 2047 decoding is
# quadratic in the number of encoded words: 0.07 s for 100 KB of them, 5 s for huge_text's 1 MB.
HEADER_SIZE_LIMIT = 102400


@scaled(0.5)
@given(st.one_of(st.just(""), st.builds(mailparse.message_id, hostile_text), st.just("<Jürgen@x>")),
       # a display name, as commands read it from a From: the MTA let through
       st.builds(lambda raw: headers.decode(raw[:HEADER_SIZE_LIMIT]), hostile_text))
def test_command_reply_to_any_message_id_and_name(in_reply_to, name):
    subject, text = notices.render("Subject: Welcome to $list\n\nHello $name\n",
                                   {"name": name, "list": LIST})
    out = notices.command_reply("dev-request@example.org", "a@example.net", subject, text, None, in_reply_to)
    assert email.message_from_bytes(out, policy=email.policy.default)["From"] == "dev-request@example.org"


# -- the pipe transport, in process, on a real state folder ----------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def records():
    handler = _Records()
    logger = logging.getLogger("listmilter")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


role_recipients = st.one_of(
    st.sampled_from(["dev-bounces@example.org", "dev-request@example.org", "dev-subscribe@example.org",
                     "dev-unsubscribe@example.org", "dev-confirm+abcdefghijklmnopqrstuvwx@example.org",
                     "dev-bounces+keep-0123456789abcdef0123@example.org", "dev-bounces+remove-x@example.org"]),
    st.builds(lambda role, ext: f"dev-{role}+{ext}@example.org",
              st.sampled_from(["confirm", "bounces", "request"]), nasty_text.filter(lambda t: "@" not in t)))
senders = st.one_of(st.sampled_from(["", "<>", "MAILER-DAEMON", "bob@example.net", "Ann@Example.NET"]), nasty_text)


def _check_run(pipe_site, records, recipient, sender, data, can_resubmit=None) -> tuple[int, str]:
    cfg, store = pipe_site
    records.records.clear()
    code, text = deliver.run(lambda: (cfg, store), recipient, sender, data, can_resubmit)
    formatter = log.Formatter("%(message)s")
    for r in records.records:
        assert r.exc_info is None, formatter.format(r)       # no internal error
        line = formatter.format(r)
        assert "\n" not in line and "\r" not in line and line.isprintable()
    return code, text


@scaled(0.6)
@given(role_recipients, senders, st.one_of(bounce_like, messages()))
@example("dev-bounces@example.org", "", deep_mime(1200))
@example("dev-request@example.org", "ann@example.net",
         b"From: ann@example.net\nSubject: subscribe\nMessage-ID: <a@x>\n <b@y>\n\nhi\n")
@example("dev-request@example.org", "ann@example.net",
         b"From: ann@example.net\nSubject: subscribe\nMessage-ID: <J\xc3\xbcrgen@x>\n\nhi\n")
@example("dev-bounces+keep-\u00e9abc@example.org", "boss@example.com", b"Subject: x\n\nkeep\n")
@example("dev-request@example.org", "ann@example.net",
         b"From: ann@example.net\nSubject: help\nAuto-Submitted: yes\n\tstatus=subscribed (confirmed)\n\nhi\n")
def test_the_pipe_transport_answers_every_message_to_a_role_address_with_exit_0(pipe_site, records, recipient,
                                                                                 sender, data):
    code, text = _check_run(pipe_site, records, recipient, sender, data)
    assert (code, text) == (0, "")
    assert records.records, "every delivery logs what it did"


@scaled(0.3)
@given(senders, st.one_of(bounce_like, messages()))
def test_the_list_address_itself_is_discarded_or_deferred_for_the_milter(pipe_site, records, sender, data):
    code, text = _check_run(pipe_site, records, LIST, sender, data)
    # 75 only while the post waits for serve to put it through the milter (plan.unexpanded_at_pipe:
    # serve not running, or a re-submitted copy that came back unexpanded), else 0.
    assert code == 0 or (code == 75 and ("listmilter serve is not running" in text
                                         or "came back unexpanded" in text)), text


@pytest.mark.mta      # starts the SMTP sink
@pytest.mark.parametrize("smtputf8", [True, False])
def test_a_post_from_an_8bit_sender_is_resubmitted_over_smtputf8_or_refused_once(pipe_site, records, smtputf8):
    # smtplib raised UnicodeEncodeError for the 8-bit MAIL FROM: exit 75, retried for days.
    from tests.bed.sink import Sink
    cfg, store = pipe_site
    with Sink(smtputf8) as sink:
        smtp = dataclasses.replace(cfg, outgoing=config.Outgoing(smtp_host="127.0.0.1", smtp_port=sink.port))
        for sender, data in (("jos\u00e9@example.net", b"Subject: hi\n\nhello\n"),
                             (None, b"Return-Path: <jos\xc3\xa9@example.net>\nSubject: hi\n\nhello\n")):
            code, text = _check_run((smtp, store), records, LIST, sender, data, can_resubmit=lambda: True)
            if smtputf8:
                assert (code, text) == (0, "")
                assert sink.messages[-1].mail_from == "jos\u00e9@example.net"
                assert "SMTPUTF8" in sink.messages[-1].mail_options
            else:
                assert code == os.EX_NOPERM and "does not offer SMTPUTF8" in text, text
                assert not sink.messages


def test_a_post_whose_return_path_holds_a_nul_is_refused_once(pipe_site, records):
    # Sendmail's aliases route passes no sender: the message's own Return-Path is it. A NUL
    # made subprocess raise ValueError: exit 75, retried for days.
    code, text = _check_run(pipe_site, records, LIST, None, b"Return-Path: <a\x00b@example.net>\n\nhi\n",
                            can_resubmit=lambda: True)
    assert code == os.EX_NOPERM and "NUL" in text, text


def _mta_down_until_unlinked(pipe_site, tmp_path):
    """pipe_site with a sendmail stand-in that exits 75 while tmp_path/down exists, then
    appends each message it takes to tmp_path/sent."""
    cfg, store = pipe_site
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"#!/bin/sh\n[ -e {tmp_path}/down ] && exit 75\ncat >> {tmp_path}/sent\n")
    sendmail.chmod(0o755)
    (tmp_path / "down").touch()
    return dataclasses.replace(cfg, outgoing=config.Outgoing(sendmail=str(sendmail))), store


def test_a_subscription_whose_welcome_the_mta_did_not_take_is_made_again_by_the_retry(pipe_site, records,
                                                                                     tmp_path):
    # The membership stood after the failed attempt: the retry answered "already a member",
    # and the welcome and the owners' notice never went.
    site = _mta_down_until_unlinked(pipe_site, tmp_path)
    store = site[1]
    store.create_list("open@example.org", {"subscribe_policy": "open", "owners": ("boss@example.com",),
                                           "owner_notices": True})
    try:
        data = b"From: ann@example.net\nSubject: subscribe\n\nsubscribe\n"
        code, _ = _check_run(site, records, "open-subscribe@example.org", "ann@example.net", data)
        assert code == 75 and store.member("open@example.org", "ann@example.net") is None
        (tmp_path / "down").unlink()
        assert _check_run(site, records, "open-subscribe@example.org", "ann@example.net", data) == (0, "")
        sent = (tmp_path / "sent").read_text()
        assert "Subject: Welcome to open@example.org" in sent and "already" not in sent
        assert sent.count("Subject:") == 2       # and the owners' notice
    finally:
        store.delete_list("open@example.org")


def test_a_direct_unsubscribe_whose_goodbye_the_mta_did_not_take_is_made_by_the_retry(pipe_site, records,
                                                                                     tmp_path):
    # The member was removed before the goodbye was sent: the retry answered "not a member",
    # and the goodbye and the owners' notice never went.
    site = _mta_down_until_unlinked(pipe_site, tmp_path)
    store = site[1]
    store.create_list("leave@example.org", {"unsubscribe_confirm": False, "owners": ("boss@example.com",),
                                            "owner_notices": True})
    store.add_members("leave@example.org", [Member("ann@example.net")])
    try:
        data = b"From: ann@example.net\nSubject: unsubscribe\n\nunsubscribe\n"
        code, _ = _check_run(site, records, "leave-unsubscribe@example.org", "ann@example.net", data)
        assert code == 75 and store.member("leave@example.org", "ann@example.net") is not None
        (tmp_path / "down").unlink()
        assert _check_run(site, records, "leave-unsubscribe@example.org", "ann@example.net", data) == (0, "")
        assert store.member("leave@example.org", "ann@example.net") is None
        sent = (tmp_path / "sent").read_text()
        assert "Subject: You have left leave@example.org" in sent and "not a member" not in sent.lower()
        assert sent.count("Subject:") == 2       # and the owners' notice
    finally:
        store.delete_list("leave@example.org")


# -- netstrings and the socketmap -----------------------------------------------------------
@given(st.one_of(hostile_bytes, st.builds(netstring.encode, hostile_bytes),
                 st.builds(lambda a, b: netstring.encode(a) + b, hostile_bytes, nasty_bytes)),
       st.sampled_from([10, 10000]))
@example(b"99999999999:x,", 10000)
@example(b"00000000000000000000001:x,", 10000)
def test_netstring_read_returns_data_or_says_malformed(data, limit):
    f = io.BytesIO(data)
    try:
        while (got := netstring.read(f, limit)) is not None:
            assert len(got) <= limit
    except netstring.Malformed:
        pass


@given(hostile_bytes)
def test_netstrings_round_trip(data):
    assert netstring.read(io.BytesIO(netstring.encode(data)), len(data)) == data


socketmap_request = st.one_of(      # bytes, as Postfix sends them
    hostile_bytes,
    st.builds(lambda name, key: name + b" " + key, st.sampled_from([b"recipients", b"transport", b"x"]),
              st.one_of(hostile_bytes, st.sampled_from([LIST.encode(), b"DEV-confirm+x@example.org",
                                                        b"dev@\xc3\xa9.org", b"a\xff@example.org"]))))


@given(socketmap_request)
@example(b"recipients a\xff@example.org")
def test_socketmap_answers_any_request(pipe_site, request):
    cfg, store = pipe_site
    try:
        decoded = socketmap.read_netstring(io.BytesIO(netstring.encode(request)))
    except netstring.Malformed:         # the server closes the connection
        assert len(request) > socketmap.MAX_REQUEST
        return
    reply = socketmap.answer(decoded, store.get_list, "listmilter")
    assert reply.split(" ", 1)[0] in ("OK", "NOTFOUND", "PERM")      # TEMP only when the store is down
    assert netstring.read(io.BytesIO(socketmap.netstring(reply)), 100000) is not None


class _Runtime:
    def __init__(self, cfg, store):
        self.cfg, self.store = cfg, store

    def current(self):
        return self.cfg, self.store


def _exchange(path: str, data: bytes) -> bytes:
    """Send `data`, then read until the server closes; a reset is a close too (the server
    may close with our bytes still unread, after a malformed request)."""
    out = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return out


@pytest.fixture(scope="module")
def socketmap_server(pipe_site):
    cfg, store = pipe_site
    folder = tempfile.mkdtemp(prefix="lmsm-")
    server = socketmap.start(_Runtime(cfg, store), f"unix:{folder}/sm")
    yield f"{folder}/sm"
    socketmap.stop(server)
    shutil.rmtree(folder, ignore_errors=True)


@scaled(0.5)
@given(st.one_of(hostile_bytes, st.lists(socketmap_request, max_size=4).map(
    lambda reqs: b"".join(netstring.encode(r) for r in reqs))))
def test_the_socketmap_server_survives_any_byte_stream(socketmap_server, data):
    replies = io.BytesIO(_exchange(socketmap_server, data))
    try:
        while (reply := netstring.read(replies, 100000)) is not None:
            assert reply.split(b" ", 1)[0] in (b"OK", b"NOTFOUND", b"PERM")
    except netstring.Malformed:
        pytest.fail(f"a reply that is no netstring: {replies.getvalue()[:200]!r}")
    ok = _exchange(socketmap_server, socketmap.netstring(f"recipients {LIST}"))
    assert ok == socketmap.netstring(f"OK {LIST}")


# -- config files ------------------------------------------------------------------------
TOP_KEYS = sorted(config._Builder.TOP) + ["bogus"]
TAGGED = ["!!binary xyz", "!!binary", "!!timestamp 2001-13-45", "!!int 0x", "!!float x", "!!python/object:os.system",
          "!!set {a}", "!!omap [a]", "!!str", "!foo bar", "&a x", "*a", "*nope", "~", "null", "yes", "0o777", "1e9999",
          "'unterminated", '"\\xZZ"', "[", "{", "|", ">-", "%YAML 1.1", "---", "...", "@", "`", "\x00", "\ufeff",
          "\t", "\x85", "\udcff", "- a", "? a", ": b", "<<: *a", "inet:99999@127.0.0.1", "/x/../y", "a@b"]
yaml_leaf = st.one_of(st.sampled_from(TAGGED), st.text(max_size=20), st.integers(), st.booleans(), st.none(),
                      st.floats(allow_nan=True))


yaml_keys = st.one_of(st.sampled_from(TOP_KEYS + ["socket", "backend", "path", "members", "owners", "posting",
                                                  "admin", "base_url", LIST]), st.text(max_size=8))
yaml_values = st.recursive(yaml_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(yaml_keys, inner, max_size=4)), max_leaves=20)


@st.composite
def config_texts(draw):
    """A config file: random text, or a YAML document of listmilter's keys with hostile values,
    then spliced with YAML's own troublemakers (tags, anchors, tabs, NULs, deep nesting)."""
    kind = draw(st.sampled_from(["random", "doc", "doc", "deep"]))
    if kind == "random":
        return draw(hostile_text)
    if kind == "deep":
        n = draw(st.integers(50, 5000))
        return draw(st.sampled_from(["[" * n, "{a: " * n, "- " * n + "x",
                                     "a:\n" + "".join(" " * i + "b:\n" for i in range(n))]))
    doc = draw(st.dictionaries(st.sampled_from(TOP_KEYS), yaml_values, max_size=6))
    text = yaml.safe_dump(doc, allow_unicode=True, default_flow_style=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(TAGGED + [" ", "\n", ": "])) + text[at:]
    return text


@given(config_texts())
@example("milter:\n  socket: !!binary xyz\n")
@example("defaults:\n  confirm_days: !!timestamp 2001-01-01\n")
@example("a: \x00")
@example("[" * 3000)
@example("\r\r\t")
def test_a_config_file_loads_or_says_file_and_line(text):
    folder = tempfile.mkdtemp(prefix="lmcfg-")
    path = os.path.join(folder, "listmilter.yaml")
    try:
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            loaded = config.load(path)
        except config.ConfigError as e:
            # YAML's lines end at CR, LF, CRLF, NEL, LS and PS.
            lines = len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text))
            assert e.path == path and e.line is not None and 1 <= e.line <= lines + 1, str(e)
            assert str(e).startswith(f"{path}:{e.line}: ")
        else:
            assert loaded.path == path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- log lines ---------------------------------------------------------------------------
@given(st.dictionaries(st.sampled_from(["to", "from", "status", "list", "envid"]), hostile_text, max_size=5))
def test_no_log_field_can_start_a_line(values):
    line = log.fields(**values)
    assert line.isprintable()
    assert log.escape(line) == line


@given(hostile_text, hostile_text)
def test_no_log_message_can_start_a_line(message, argument):
    formatter = log.Formatter("%(asctime)s listmilter: %(message)s")
    try:
        raise ValueError(argument)
    except ValueError:
        record = logging.LogRecord("listmilter", logging.ERROR, __file__, 1, message + " " + argument, (),
                                   sys.exc_info())
    first, *rest = formatter.format(record).split("\n")
    assert first.isprintable() and first.endswith(log.escape(message + " " + argument))
    assert all(line.startswith("    ") and line.isprintable() for line in rest)


def test_escapes_are_visible_and_named():
    assert log.fields(status="ignored (auto-submitted: yes\n\tstatus=subscribed (confirmed))") == \
        "status=ignored (auto-submitted: yes\\n\\tstatus=subscribed (confirmed))"
    assert log.escape("a\rb\x00c\x1bd\x85e\u202ef\udcff") == "a\\rb\\x00c\\x1bd\\x85e\\u202ef\\udcff"
    assert log.escape("Jürgen <j@example.net>") == "Jürgen <j@example.net>"     # printable text stays


def test_the_log_file_gets_one_line_per_event(tmp_path):
    logger = logging.getLogger("listmilter")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    path = tmp_path / "listmilter.log"
    try:
        log.setup(str(path))
        logger.info("deliver: %s", log.fields(to="<a@example.org>", status="x\nDec 02 forged: status=sent"))
        logger.info("socketmap: %s -> %s", "recipients a\r\nb@example.org", "NOTFOUND ")
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("status=x\\nDec 02 forged: status=sent")
    assert lines[1].endswith("socketmap: recipients a\\r\\nb@example.org -> NOTFOUND ")
