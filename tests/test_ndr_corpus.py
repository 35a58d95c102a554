"""Real bounces of many MTAs and providers (tests/data/sisimai, labelled as its README
says), read as listmilter reads mail to <list>-bounces@: issue 14's three figures as
floors, every file that reads as labelled held to it, and listmilter's own detectors
(core/ndr.py) on a list's own bounces and on hostile input. No MTA.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bench import ndr_corpus as corpus
from listmilter.core import addresses, bounces, mailparse, ndr
from tests.test_fuzz import hostile_bytes, hostile_text, nasty_text, scaled

# The corpus's reading and figures are bench/ndr_corpus.py's, which prints them.
EXPECTED = dict(corpus.expected())
DATA = corpus.DATA


# Files that do not read exactly as labelled, and why (each still counts in the figures).
KNOWN = {
    # Anonymised: the sender and the failed recipient are one address (xxxx@xxxx.fr), the
    # bounce's own To, which is never read as a failed member; flufl.bounce finds the .com.
    "lhost-einsundeins-03.eml",
    # The failed address and, beside it, the address it was expanded from (an alias).
    "rhost-franceptt-03.eml",
}


def test_the_corpus_is_whole():
    files = {p.name for p in DATA.glob("*.eml")}
    assert files == set(EXPECTED) and len(files) >= 150
    assert sum(p.stat().st_size for p in DATA.glob("*.eml")) < 3 * 1024 * 1024


def test_issue_14_figures():
    """At least 95% of hard bounces read as a permanent failure of the right address, 90% of
    all failed addresses found, and no auto-reply or ARF report read as a permanent failure."""
    f = corpus.figures()
    assert f.hard >= 90 and f.failed >= 190
    assert f.hard_ok / f.hard >= 0.95, f"{f.hard_ok}/{f.hard}"
    assert f.found / f.failed >= 0.90, f"{f.found}/{f.failed}"
    assert f.quiet_bad == 0


def _as_labelled(name: str) -> str:
    """'' if `name` reads as labelled, else what differs."""
    report = corpus.read(name)
    rows = EXPECTED[name]
    if rows[0][0] == "autoreply":
        ok = report.kind == bounces.AUTORESPONSE and not report.failures
        return "" if ok else f"an auto-reply read as {report.kind} with {corpus.got(report)}"
    if rows[0][0] == "feedback":
        ok = report.kind in (bounces.FEEDBACK, bounces.UNRECOGNISED) and not report.failures
        return "" if ok else f"an ARF report read as {report.kind} with {corpus.got(report)}"
    want = {address: permanent == "yes" for _kind, address, permanent, *_ in rows}
    got = corpus.got(report)
    return "" if got == want else f"read {got}, labelled {want}"


def test_each_file_reads_as_labelled():
    """Every labelled address, each permanent or temporary as labelled, and no other; an
    auto-reply or ARF report with no failure at all. (One test for the ~200 files: the
    fast tier pays per test; a failure names every file that differs.)"""
    wrong = {name: why for name in sorted(set(EXPECTED) - KNOWN) if (why := _as_labelled(name))}
    assert wrong == {}


# -- a list's own bounces ----------------------------------------------------------
LIST = "dev@example.org"


def _bounce(report: str, to: str = "dev-bounces@example.org", head: str = "", returned: str = "") -> bytes:
    post = returned or ("From: Alice <alice@example.com>\nTo: dev@example.org\nSubject: [dev] hello\n"
                        "List-Id: <dev.example.org>\nList-Post: <mailto:dev@example.org>\n"
                        "Message-ID: <post.1@example.org>\n\nhello\n")
    return (f"From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\nTo: {to}\n"
            f"Subject: Mail delivery failed\n{head}MIME-Version: 1.0\n"
            "Content-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: text/plain\n\n"
            f"{report}\n--B\nContent-Type: message/rfc822\n\n{post}\n--B--\n").encode()


@pytest.mark.parametrize("to", ["dev-bounces@example.org", "dev-bounces+bob=example.net@example.org",
                                "dev-bounces+probe-k2x9q7m4n8v3c5b1@example.org"])
def test_the_list_the_bounce_address_and_the_author_are_never_failed_members(to):
    text = ("Your message to dev@example.org from alice@example.com (sent through " + to + ")\n"
            "could not be delivered to one or more recipients:\n\n  bob@example.net\n"
            "  550 5.1.1 <bob@example.net>: user unknown\n\n"
            "For assistance, please contact postmaster@example.net or help@example.net.\n")
    report = bounces.read_bytes(_bounce(text, to), null_sender=True)
    assert report.kind == bounces.HEURISTIC
    assert [(f.address, f.permanent) for f in report.failures] == [("bob@example.net", True)]


def test_a_report_naming_nobody_but_the_list_reads_nothing():
    text = "Your message to <dev@example.org> could not be delivered.\nReason: 550 rejected\n"
    report = bounces.read_bytes(_bounce(text, head="X-Original-To: dev-bounces@example.org\n"), True)
    assert not report.failures


def test_a_list_posts_to_is_not_taken_for_the_failed_recipient():
    """The returned To is read only when the report names nobody and the message returned
    is not a list post (whose To is the list)."""
    text = "This message could not be delivered.\n"
    assert not bounces.read_bytes(_bounce(text), True).failures
    personal = "From: dev-bounces@example.org\nTo: carol@example.net\nSubject: probe\n\nhi\n"
    report = bounces.read_bytes(_bounce(text, returned=personal), True)
    assert [(f.address, f.permanent) for f in report.failures] == [("carol@example.net", True)]


@pytest.mark.parametrize("marker", ["--- Below this line is a copy of the message.", "------ Original message ------",
                                    "Received: from mx.example.org by mx.example.net", "Message text follows:"])
def test_addresses_in_the_returned_post_are_not_failures(marker):
    """A post returned inline (no message/rfc822 part) quotes whoever its author names."""
    text = ("I could not deliver your message to bob@example.net: 550 user unknown.\n\n" + marker +
            "\n\nAsk carol@example.net or dave@example.com, they know.\n")
    report = bounces.read_bytes(_bounce(text), True)
    assert [f.address for f in report.failures] == ["bob@example.net"]


def test_a_text_attachment_is_not_the_report():
    data = (b"From: MAILER-DAEMON@mx.example.net\nTo: dev-bounces@example.org\nSubject: Undeliverable\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: text/plain\n\n"
            b"Delivery to bob@example.net failed: 550 5.1.1 no such user.\n\n--B\nContent-Type: text/plain\n"
            b"Content-Disposition: attachment; filename=notes.txt\n\nSee carol@example.net.\n--B--\n")
    assert [f.address for f in bounces.read_bytes(data, True).failures] == ["bob@example.net"]


def test_a_delay_warning_is_temporary_and_a_report_that_gave_up_permanent():
    delayed = ("A message is delayed for more than 10 minutes for the following recipients:\n"
               "bob@example.net: Network error on destination MXs\n"
               "This is only a temporary failure report; it will retry.\n")
    assert [f.permanent for f in bounces.read_bytes(_bounce(delayed), True).failures] == [False]
    gave_up = ("----- Transcript of session follows -----\n"
               "421 <bob@example.net>... Deferred: Connection timed out\n"
               "Message could not be delivered for 5 days: giving up.\n")
    assert [f.permanent for f in bounces.read_bytes(_bounce(gave_up), True).failures] == [True]


VACATION = (b"From: Bob <bob@example.net>\nTo: dev-bounces@example.org\nSubject: Out of office: [dev] hello\n"
            b"Auto-Submitted: auto-replied\n\nI am away and could not be reached; mail to carol@example.net "
            b"is rejected, undeliverable, user unknown 550 5.1.1.\n")


@pytest.mark.parametrize("sender", [b"Bob <bob@example.net>", b"MAILER-DAEMON@example.net"])
def test_an_auto_reply_never_reads_as_a_failure(sender):
    data = VACATION.replace(b"Bob <bob@example.net>", sender, 1)
    report = bounces.read_bytes(data, null_sender=True)
    assert report.kind == bounces.AUTORESPONSE and not report.failures


def test_an_ndr_marked_auto_replied_is_read():
    """Exchange and Postfix mark some of their NDRs Auto-Submitted: auto-replied."""
    text = "Delivery has failed to these recipients:\n\nbob@example.net\n550 5.1.1 RESOLVER.ADR.RecipNotFound\n"
    report = bounces.read_bytes(_bounce(text, head="Auto-Submitted: auto-replied\n"), True)
    assert [(f.address, f.permanent) for f in report.failures] == [("bob@example.net", True)]


def test_dsn_fields_written_as_text_name_only_their_recipients():
    text = ("An error occurred while trying to deliver the mail to the following recipients:\n"
            "bob@example.net\n\nTechnical report:\n\nReporting-MTA: dsn; mx.example.net\n\nAction: failed\n"
            "Final-Recipient: rfc822; bob@example.net\n"
            "Diagnostic-Code: smtp; 550 5.1.1 <other@example.net>... User Unknown\nStatus: 5.1.1\n")
    report = bounces.read_bytes(_bounce(text), True)
    assert [(f.address, f.permanent) for f in report.failures] == [("bob@example.net", True)]


# -- hostile input -------------------------------------------------------------------
def _message(body: bytes, multipart: bool) -> bytes:
    head = b"From: MAILER-DAEMON@mx.example.net\nTo: dev-bounces@example.org\nSubject: Undelivered Mail\n"
    if not multipart:
        return head + b"\n" + body
    return (head + b"MIME-Version: 1.0\nContent-Type: multipart/report; boundary=B\n\n--B\n"
            b"Content-Type: text/plain; charset=utf-8\n\n" + body + b"\n--B\nContent-Type: message/rfc822\n\n"
            b"From: a@example.com\nTo: " + body[:200] + b"\n\n" + body + b"\n--B--\n")


_PIECES = st.sampled_from([
    "bob@example.net", "<bob@example.net>", "Final-Recipient: rfc822; ", "Original-Recipient: rfc822;",
    "Action: failed", "Action: delayed", "Status: 5.1.1", "Status: 4.4.1", "550 ", "421-", "5.1.1 ",
    "user unknown", "could not be delivered", "----- Original message -----", "Received: from x",
    "From MAILER-DAEMON  Thu Apr 29 23:34:45 2015", '\\"notificationType\\":\\"Bounce\\"',
    '"bouncedRecipients":[{"emailAddress":"bob@example.net"', "please contact ", "a" * 70 + "@",
    "@" + "b." * 40, "x" * 200, "\n", "\n\n", " ", "\t", "é", "\udcff", "連絡"])
report_text = st.one_of(hostile_text, nasty_text, st.lists(st.one_of(_PIECES, nasty_text), max_size=60).map("".join))


def _assert_found(found: object) -> None:
    assert isinstance(found, list) and len(found) <= ndr.MAX_FAILURES
    for address, permanent in found:
        assert addresses.is_valid(address) and isinstance(permanent, bool)


@scaled(0.5)
@given(report_text, st.booleans())
@example("Final-Recipient: rfc822; bob@example.net\n" * 300, True)
@example(("a" * 64 + ".") * 5000 + "@", False)
def test_the_detectors_never_raise_and_stay_bounded(text, multipart):
    msg = mailparse.parse(_message(text.encode("utf-8", "surrogatepass"), multipart))
    _assert_found(ndr.failures(msg))
    structured = ndr.structured(msg)
    assert structured is None or _assert_found(structured) is None
    assert all(isinstance(a, str) for a in ndr.not_members(msg))
    lines = ndr._lines(text)
    _assert_found(ndr.report_addresses(lines, set()))
    _assert_found(ndr.inline_dsn(lines) or [])
    _assert_found(ndr.ses_notification(lines) or [])


@scaled(0.3)
@given(hostile_bytes, st.booleans())
def test_the_detectors_read_any_bytes(body, multipart):
    msg = mailparse.parse(_message(body, multipart))
    _assert_found(ndr.failures(msg))
    _assert_report = bounces.read_bytes(_message(body, multipart), True)
    assert all(addresses.is_valid(f.address) for f in _assert_report.failures)


@pytest.mark.parametrize("unit", ["a" * 63 + ".", "a@", "a@b", "@b.", "b.", "a-", "<a@b.c" * 3, "= "])
def test_no_input_makes_a_detector_crawl(unit):
    """The largest text the detectors read, made of what a backtracking pattern chokes on."""
    text = unit * (ndr.TEXT_LIMIT // len(unit))
    data = _message(text.encode(), True)
    start = time.monotonic()
    report = bounces.read_bytes(data, True)
    assert time.monotonic() - start < 5
    assert len(report.failures) <= ndr.MAX_FAILURES + 100
