"""core/verp.py: the VERP sender of a personal copy, and what a bounce to it says about its member."""

from __future__ import annotations

import email
import email.policy
import re
import time

from hypothesis import example, given
from hypothesis import strategies as st

from listmilter.core import addresses, bounces, plan, verp
from listmilter.core.keys import Keyring, keyring
from tests import test_fuzz as fuzz
from tests.conftest import dsn_message
from tests.test_fuzz import hostile_text, pipe_site, records, scaled  # noqa: F401 (fixtures)

SECRET = b"v" * 32
LIST = "dev@example.org"
BOB, ANN = "bob@example.net", "ann@example.net"
T = 1_800_000_000.0


def _ext(address: str) -> str:
    return address.partition("@")[0].partition("+")[2]


def test_the_code_names_member_and_post_and_survives_lower_and_upper_case():
    sender = verp.make(LIST, BOB, "4Fx2Q1Z0D3", T, SECRET)
    assert sender is not None and sender.startswith("dev-bounces+4fx2q1z0d3-") and sender.endswith("@example.org")
    local = sender.partition("@")[0]
    assert len(local) <= 64 and all(c.islower() or c.isdigit() or c in "-+" for c in local)
    for ext in (_ext(sender), _ext(sender).upper()):
        assert verp.find(ext, LIST, [ANN, BOB.upper()], SECRET) == verp.Bound(BOB.upper(), "4fx2q1z0d3", T)
    # The role-address reading of Postfix's lookups (and deliver's) finds the list and the code.
    ((key, role),) = [(k, r) for k, r in addresses.candidates(sender.upper()) if r is not None]
    assert key == LIST and role.role == "bounces" and verp.parse(role.extension) is not None
    # Another member, list or key does not verify it; the decision codes are no VERP code.
    assert verp.find(_ext(sender), LIST, [ANN], SECRET) is None
    assert verp.find(_ext(sender), "ops@example.org", [BOB], SECRET) is None
    assert verp.find(_ext(sender), LIST, [BOB], b"w" * 32) is None
    assert verp.parse("keep-0123456789abcdef0123") is None and verp.parse("remove-0123456789abcdef0123") is None


def test_a_rotated_key_still_verifies_codes_of_the_old_one():
    old = verp.make(LIST, BOB, "Q1", T, keyring(SECRET))
    assert old is not None
    rotated = Keyring(((1, b"n" * 32), (0, SECRET)))
    assert verp.find(_ext(old), LIST, [BOB], rotated) is not None
    new = verp.make(LIST, BOB, "Q1", T, rotated)
    assert new != old and verp.find(_ext(new), LIST, [BOB], keyring(SECRET)) is None
    assert verp.find(_ext(new), LIST, [BOB], Keyring(((1, b"n" * 32),))) is not None


def test_too_long_for_a_local_part_falls_back_to_the_plain_bounce_address_and_says_so():
    long_list = "a-very-long-list-name-for-announcements-of-the-board@example.org"
    assert verp.make(long_list, BOB, "4Fx2Q1Z0D3", T, SECRET) is None
    ls = plan.ListSettings(long_list, "open", "", "", "x.example.org")
    copies = plan.personal_copies(ls, [BOB], [("Subject", "s")], b"b\r\n", "Q1", SECRET, lambda m: "", T)
    assert copies.senders == {}
    assert copies.sender == "a-very-long-list-name-for-announcements-of-the-board-bounces@example.org"
    assert "1 copies go from the plain bounces address" in copies.notes[-1]
    ls = plan.ListSettings(LIST, "open", "", "", "dev.example.org")
    copies = plan.personal_copies(ls, [BOB, ANN], [("Subject", "s")], b"b\r\n", "Q1", SECRET, lambda m: "", T)
    assert [verp.find(_ext(copies.senders[m]), LIST, [m], SECRET).member for m in (BOB, ANN)] == [BOB, ANN]
    assert copies.notes == ()


@scaled(1.0)
@given(ext=hostile_text, candidates=st.lists(hostile_text, max_size=3))
@example(ext="q1-tro8w0-aaaaaaaaaaaaa", candidates=[BOB])
@example(ext="Q1-TRO8W0-" + "7" * 13, candidates=[BOB])
@example(ext="\udcff" * 70, candidates=["\udcff@x"])
def test_hostile_or_forged_codes_read_as_none(ext, candidates):
    assert verp.find(ext, LIST, [*candidates, BOB, ANN], SECRET) is None
    parsed = verp.parse(ext)
    assert parsed is None or parsed.mac.isalnum()


@scaled(0.5)
@given(member=st.from_regex(r"[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,10}\.[a-z]{2,5}", fullmatch=True),
       post_id=st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True), when=st.integers(0, 2**40),
       flip=st.integers(0, 200))
def test_every_code_verifies_for_its_member_only_and_any_changed_character_breaks_it(member, post_id, when, flip):
    sender = verp.make(LIST, member, post_id, when, SECRET)
    if sender is None:
        return
    ext = _ext(sender)
    assert verp.find(ext, LIST, [member], SECRET) == verp.Bound(member, post_id.lower(), float(when))
    i = flip % len(ext)
    changed = ext[:i] + ("b" if ext[i] != "b" else "c") + ext[i + 1:]
    assert verp.find(changed, LIST, [member], SECRET) is None


def _block(address: str, action: str, status: str) -> str:
    return (f"Final-Recipient: rfc822; {address}\nAction: {action}\nStatus: {status}\n"
            f"Diagnostic-Code: smtp; {status} x\n")


def _report(data: bytes, null_sender: bool) -> bounces.Report:
    return bounces.read(email.message_from_bytes(data, policy=email.policy.compat32), null_sender)


def test_any_failure_to_the_verp_address_is_the_members_and_a_bare_null_sender_bounce_too():
    # A DSN naming a forwarded address: the failure is bob's, as the VERP address says.
    dsn = dsn_message("", _block("bob@forwarded.example", "failed", "5.1.1"))
    failure = verp.failure_of(_report(dsn, True), BOB, True)
    assert failure == bounces.Failure(BOB, True, "5.1.1", failure.diagnostic)
    # A delay only: a temporary failure of bob's.
    delay = dsn_message("", _block(BOB, "delayed", "4.4.1"))
    assert verp.failure_of(_report(delay, True), BOB, True).permanent is False
    # A bounce in words only, from the null sender: a permanent failure all the same.
    words = b"From: MAILER-DAEMON@mx.example.net\r\nSubject: Undeliverable\r\n\r\nSorry, that did not work.\r\n"
    assert verp.failure_of(_report(words, True), BOB, True) == bounces.Failure(BOB, True, "", verp.NON_DSN)
    # The same words from a person, a vacation reply, a DSN that says delivered: no failure.
    assert verp.failure_of(_report(words, False), BOB, False) is None
    vacation = b"From: bob@example.net\r\nAuto-Submitted: auto-replied\r\nSubject: Away\r\n\r\nback monday\r\n"
    assert verp.failure_of(_report(vacation, True), BOB, True) is None
    delivered = dsn_message("", _block(BOB, "delivered", "2.0.0"))
    assert verp.failure_of(_report(delivered, True), BOB, True) is None


# -- the pipe transport, in process (tests/test_fuzz.py's pipe_site: dev@example.org, bob and carol) ------
verp_recipients = st.one_of(
    st.builds(lambda member, post, when: verp.make(fuzz.LIST, member, post, when, fuzz.SECRET),
              st.sampled_from(fuzz.MEMBERS + ("gone@example.net",)), st.sampled_from(["Q1", "4Fx2Q1Z0D3"]),
              st.integers(1_700_000_000, 1_900_000_000)),
    st.from_regex(r"dev-bounces\+[0-9a-z]{1,20}-[0-9a-z]{1,8}-[a-z2-7]{13}@example\.org", fullmatch=True))


@scaled(0.5)
@given(verp_recipients, fuzz.senders, st.one_of(fuzz.bounce_like, fuzz.messages()))
@example("dev-bounces+q1-tpf715-aaaaaaaaaaaaa@example.org", "", b"Subject: x\n\nbounced\n")
def test_mail_to_a_verp_address_real_or_forged_is_answered_with_exit_0(pipe_site, records,  # noqa: F811
                                                                     recipient, sender, data):
    from listmilter.app import verp_bounces
    verp_bounces.member_scans = verp_bounces._ScanBudget(verp_bounces.MEMBER_SCANS_PER_HOUR)  # each example its own
    code, text = fuzz._check_run(pipe_site, records, recipient, sender, data)
    assert (code, text) == (0, "")
    (line,) = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()]
    ext = recipient.partition("@")[0].partition("+")[2]
    genuine = verp.find(ext, fuzz.LIST, fuzz.MEMBERS, fuzz.SECRET)
    if genuine is not None and not verp.fresh(verp.parse(ext), time.time()):
        genuine = None          # dated too far back or ahead: no copy of ours
    if genuine is None:
        # Forged, stale, or made for someone who is no member: never scored as anyone's VERP bounce.
        assert "status=verp " not in line or "scored" not in line, line
    else:
        assert "verp=not verified" not in line
        assert "scored" not in line or f"<{genuine.member}>" in line, line


def test_a_bare_bounce_to_a_members_verp_address_scores_that_member_in_process(pipe_site, records):  # noqa: F811
    to = verp.make(fuzz.LIST, "carol@example.net", "Q7", time.time(), fuzz.SECRET)
    words = b"From: MAILER-DAEMON@mx.example.net\nSubject: failure notice\n\nSorry, it did not work out.\n"
    assert fuzz._check_run(pipe_site, records, to, "", words) == (0, "")
    (line,) = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()]
    assert re.search(r"status=verp unrecognised: <carol@example.net> - (scored|counted-today)", line), line
    # From a person, the same words are no bounce: kept for the owner, nobody scored.
    assert fuzz._check_run(pipe_site, records, to, "carol@example.net", words) == (0, "")
    (line,) = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()]
    assert "status=verp unrecognised, kept " in line and "scored" not in line, line


def test_codes_too_old_or_dated_in_the_future_are_not_fresh():
    code = verp.parse(_ext(verp.make(LIST, BOB, "Q1", T, SECRET)))
    assert code is not None
    assert verp.fresh(code, T) and verp.fresh(code, T + verp.MAX_AGE) and verp.fresh(code, T - verp.MAX_SKEW)
    assert not verp.fresh(code, T + verp.MAX_AGE + 1) and not verp.fresh(code, T - verp.MAX_SKEW - 1)


def test_member_scans_are_budgeted_per_list_and_hour():
    """A bounce that names no member costs a scan of the list: anyone can send those, so each
    list gets MEMBER_SCANS_PER_HOUR of them; the hour slides."""
    from listmilter.app.verp_bounces import _ScanBudget
    budget = _ScanBudget(3)
    assert [budget.take(LIST, T + i) for i in range(4)] == [True, True, True, False]
    assert budget.take("ops@example.org", T + 5)             # another list has its own
    assert not budget.take(LIST, T + 3599)
    assert budget.take(LIST, T + 3600.5)                      # the first scan left the hour
