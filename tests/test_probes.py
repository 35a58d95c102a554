"""core/probes.py: bounce probes, the decisions (no MTA), and their record in the bounce database."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listmilter.app import outgoing
from listmilter.app import probes as send_probes
from listmilter.core import addresses, bounces, config, probes
from listmilter.core.bounces import Failure, Verdict
from listmilter.core.keys import Keyring, keyring
from listmilter.core.model import MailingList
from listmilter.store.bounce_records import BounceDB
from tests import test_fuzz as fuzz
from tests.conftest import dsn_message
from tests.test_fuzz import hostile_text, pipe_site, records, scaled  # noqa: F401 (fixtures)

SECRET = b"p" * 32
LIST = "dev@example.org"
BOB, ANN = "bob@example.net", "ann@example.net"
T = 1_800_000_000.0
DAY = bounces.DAY


def _ext(address: str) -> str:
    return address.partition("@")[0].partition("+")[2]


def test_a_probe_address_names_its_member_and_time_for_this_list_and_key_only():
    sender = probes.make(LIST, BOB, T, SECRET)
    assert sender is not None and sender.startswith("dev-bounces+probe-") and sender.endswith("@example.org")
    assert len(sender.partition("@")[0]) <= 64
    ((key, role),) = [(k, r) for k, r in addresses.candidates(sender) if r is not None]
    assert key == LIST and role.role == "bounces" and probes.is_code(role.extension)
    for ext in (_ext(sender), _ext(sender).upper()):
        assert probes.find(ext, LIST, [ANN, BOB], SECRET) == probes.Bound(BOB, T)
    assert probes.find(_ext(sender), LIST, [ANN], SECRET) is None
    assert probes.find(_ext(sender), "ops@example.org", [BOB], SECRET) is None
    assert probes.find(_ext(sender), LIST, [BOB], b"w" * 32) is None
    # A rotated key still verifies the probes of the old one (in flight for days).
    assert probes.find(_ext(sender), LIST, [BOB], Keyring(((1, b"n" * 32), (0, SECRET)))) is not None
    # VERP codes and owner decisions are no probe codes, and a probe code is no VERP code.
    assert not probes.is_code("q1-tro8w0-aaaaaaaaaaaaa") and not probes.is_code("keep-0123456789abcdef0123")
    from listmilter.core import verp
    assert verp.parse(_ext(sender)) is None


def test_a_list_address_too_long_for_a_probe_address_gets_none():
    assert probes.make("a-very-long-list-name-for-announcements-of-the-board@example.org", BOB, T, SECRET) is None


@scaled(1.0)
@given(ext=hostile_text, candidates=st.lists(hostile_text, max_size=3))
@example(ext="probe-tro8w0-aaaaaaaaaaaaaaaa", candidates=[BOB])
@example(ext="PROBE-TRO8W0-" + "7" * 16, candidates=[BOB])
@example(ext="probe-" + "\udcff" * 60, candidates=["\udcff@x"])
def test_a_forged_or_garbled_probe_code_binds_nobody(ext, candidates):
    assert probes.find(ext, LIST, [*candidates, BOB, ANN], SECRET) is None


@scaled(0.5)
@given(member=st.from_regex(r"[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,10}\.[a-z]{2,5}", fullmatch=True),
       when=st.integers(0, 2**40), flip=st.integers(0, 200))
def test_every_probe_code_binds_its_member_only_and_any_changed_character_breaks_it(member, when, flip):
    ext = probes.code(LIST, member, when, keyring(SECRET))
    assert probes.find(ext, LIST, [member], SECRET) == probes.Bound(member, float(when))
    i = flip % len(ext)
    changed = ext[:i] + ("b" if ext[i] != "b" else "c") + ext[i + 1:]
    assert probes.find(changed, LIST, [member], SECRET) is None


def test_a_member_s_failure_at_the_plain_bounce_address_is_a_suspicion_in_any_format():
    dead = Failure(BOB, True, "5.1.1")
    joined = T - 10 * DAY
    # Bound to a post we sent them (our ENVID), or to nothing (no ENVID, or an NDR): a probe decides.
    assert bounces.suspicion(dead, T, joined, True, T + DAY) == Verdict.SUSPECT
    assert bounces.suspicion(dead, None, joined, True, T + DAY) == Verdict.SUSPECT
    # A replayed ENVID, a post from before they joined, a disabled member, a stranger, a delay: no probe.
    assert bounces.suspicion(dead, T, joined, True, T + 15 * DAY) == Verdict.EXPIRED
    assert bounces.suspicion(dead, joined - DAY, joined, True, T) == Verdict.NOT_RECIPIENT
    assert bounces.suspicion(dead, None, joined, False, T) == Verdict.UNVERIFIED
    assert bounces.suspicion(dead, T, None, False, T) == Verdict.NOT_MEMBER
    assert bounces.suspicion(Failure(BOB, False, "4.2.2"), T, joined, True, T) == Verdict.TEMPORARY


def test_one_probe_in_flight_per_member_until_it_expires():
    assert probes.should_probe(None, T, 7)
    assert not probes.should_probe(T, T + 7 * DAY, 7)
    assert probes.should_probe(T, T + 7 * DAY + 1, 7)
    assert not probes.expired(T, T + 7 * DAY, 7) and probes.expired(T, T + 7 * DAY + 1, 7)


def test_reports_from_other_hosts_send_at_most_the_list_s_probes_a_day():
    Start = probes.Start
    assert probes.start(None, T, 7, sent_last_day=99, per_day=100) == Start.PROBE
    assert probes.start(None, T, 7, sent_last_day=100, per_day=100) == Start.OVER_BUDGET
    assert probes.start(None, T, 7, sent_last_day=10**6, per_day=0) == Start.PROBE      # 0: no limit (our MTA's)
    # A probe in flight answers first: the member is waited for, not over any budget.
    assert probes.start(T, T + DAY, 7, sent_last_day=100, per_day=100) == Start.IN_FLIGHT
    assert Verdict.UNPROBED in bounces.FOR_OWNER          # kept for the owners, never dropped


def test_a_report_with_failures_at_several_receiving_domains_is_suspect():
    one = [Failure("a@x.example", True), Failure("B@X.EXAMPLE", True), Failure("c@y.example", False)]
    assert not probes.suspect_report(one)
    assert probes.suspect_report([*one, Failure("d@y.example", True)])
    assert not probes.suspect_report([])
    # The local MTA's own DSN (no SMTP client) names every failure of the post: no suspect.
    assert not probes.suspect_report([*one, Failure("d@y.example", True)], from_client=False)


def test_only_a_bounce_from_the_null_sender_to_the_probe_in_flight_says_dead():
    bound = probes.Bound(BOB, T)
    assert probes.on_bounce(T, bound, True, bounces.DSN) == probes.DEAD
    assert probes.on_bounce(T, bound, True, bounces.UNRECOGNISED) == probes.DEAD      # a bounce in words only
    assert probes.on_bounce(T, bound, True, bounces.AUTORESPONSE).startswith("ignored (an automatic reply")
    assert probes.on_bounce(T, bound, False, bounces.DSN).startswith("ignored (not from the null sender")
    assert probes.on_bounce(None, bound, True, bounces.DSN).startswith("ignored (no probe in flight")
    assert probes.on_bounce(T + DAY, bound, True, bounces.DSN).startswith("ignored (no probe in flight")


def test_explain_binds_a_bounce_to_a_probe_address_to_its_member():
    report = bounces.Report(bounces.HEURISTIC, "", (Failure("other@forward.example", True, "5.1.1"),))
    bound = probes.Bound(BOB, T)
    got = probes.explain(report, bound, T, True).as_json()
    assert got == {"kind": "heuristic", "failures": [
        {"address": BOB, "status": "5.1.1", "permanent": True, "binding": "probe", "verdict": "probe-bounced"}]}
    assert "probe" in bounces.BINDINGS
    # What deliver ignores (a reply from a person, no probe in flight) binds no failure either.
    assert probes.explain(report, bound, T, False).as_json() == {"kind": "heuristic", "failures": []}
    assert probes.explain(report, bound, None, True).as_json() == {"kind": "heuristic", "failures": []}


def test_the_bounce_database_keeps_one_probe_per_member(tmp_path):
    db = BounceDB(str(tmp_path))
    try:
        assert db.start_probe(LIST, BOB, T, 7, "5.1.1 no such user") == probes.Start.PROBE
        assert db.start_probe(LIST, BOB.upper(), T + DAY, 7) == probes.Start.IN_FLIGHT
        assert db.probe(LIST, BOB) == T and db.probe(LIST, ANN) is None
        assert db.probes(LIST) == [(LIST, BOB, T, "5.1.1 no such user")]
        assert db.start_probe(LIST, BOB, T + 8 * DAY, 7) == probes.Start.PROBE     # the old one expired: replaced
        assert not db.end_probe(LIST, BOB, T)                              # not the one in flight
        assert db.end_probe(LIST, BOB, T + 8 * DAY) and db.probes() == []
    finally:
        db.close()


def test_the_bounce_database_counts_a_list_s_probes_of_the_last_day(tmp_path):
    db = BounceDB(str(tmp_path))
    try:
        probe_budget_holds(db)
    finally:
        db.close()


def probe_budget_holds(db) -> None:
    """bounce_probes_per_day in a bounce database (also tests/test_postgresql.py's)."""
    members = [f"m{i}@example.net" for i in range(5)]
    assert db.start_probe(LIST, members[0], T - DAY - 1, 7, per_day=2) == "probe"     # more than a day ago
    assert db.start_probe(LIST, members[1], T, 7, per_day=2) == "probe"
    assert db.start_probe("other@example.org", members[2], T, 7, per_day=2) == "probe"  # another list's
    assert db.start_probe(LIST, members[2], T, 7, per_day=2) == "probe"
    assert db.start_probe(LIST, members[3], T, 7, per_day=2) == "over budget"
    assert db.start_probe(LIST, members[1], T, 7, per_day=2) == "in flight"
    assert db.start_probe(LIST, members[3], T, 7) == "probe"           # our MTA's report: no limit
    # Over the budget nothing is noted: the member stays unprobed.
    assert db.start_probe(LIST, members[4], T, 7, per_day=2) == "over budget" and db.probe(LIST, members[4]) is None
    assert [a for _, a, _, _ in db.probes(LIST)] == members[:4]


def test_a_batch_of_probes_the_mta_took_half_of_sends_each_member_one_probe_over_the_retry(tmp_path, records):  # noqa: F811
    """The MTA refuses the third probe of four (a full queue): the two it took stay in flight,
    the retry of the bounce sends the other two, and nobody gets a second one."""
    sent = tmp_path / "sent"
    # A stand-in for Postfix's sendmail: notes each recipient it takes; refuses m2@ once (EX_TEMPFAIL).
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"""#!/bin/sh
cat > /dev/null
for a; do last=$a; done
if [ "$last" = m2@example.net ] && [ ! -e {tmp_path}/refused ]; then
  touch {tmp_path}/refused; echo "queue file write error" >&2; exit 75
fi
echo "$last" >> {sent}
""")
    sendmail.chmod(0o755)
    (tmp_path / "listmilter.yaml").write_text(f"state_dir: {tmp_path}\noutgoing:\n  sendmail: {sendmail}\n")
    cfg = config.load(str(tmp_path / "listmilter.yaml"))
    mlist = MailingList(LIST)
    failures = [Failure(f"m{i}@example.net", True, "5.1.1") for i in range(4)]
    db = BounceDB(str(tmp_path))
    try:
        with pytest.raises(outgoing.OutgoingError, match="exited 75"):
            send_probes.probe(cfg, db, mlist, failures, SECRET, T, from_client=False)
        assert [a for _, a, _, _ in db.probes(LIST)] == ["m0@example.net", "m1@example.net"]
        assert send_probes.probe(cfg, db, mlist, failures, SECRET, T + 60) == [
            "suspect (a probe is in flight already)"] * 2 + ["suspect (probe sent)"] * 2
        assert sorted(sent.read_text().split()) == [f.address for f in failures]          # one each
        assert len(db.probes(LIST)) == 4
    finally:
        db.close()
    logged = [r.getMessage() for r in records.records if "action=probe sent" in r.getMessage()]
    assert len(logged) == 4 and all("queued_as=" in line for line in logged), logged


# -- the pipe transport, in process (tests/test_fuzz.py's pipe_site: dev@example.org, notify at 1) -------------

probe_recipients = st.one_of(
    st.builds(lambda member, when: probes.make(fuzz.LIST, member, when, fuzz.SECRET),
              st.sampled_from(fuzz.MEMBERS + ("gone@example.net",)), st.integers(1_700_000_000, 1_900_000_000)),
    st.from_regex(r"dev-bounces\+probe-[0-9a-z]{1,8}-[a-z2-7]{16}@example\.org", fullmatch=True))


@scaled(0.5)
@given(probe_recipients, fuzz.senders, st.one_of(fuzz.bounce_like, fuzz.messages()))
@example("dev-bounces+probe-tpf715-aaaaaaaaaaaaaaaa@example.org", "", b"Subject: x\n\nbounced\n")
def test_mail_to_a_probe_address_with_no_probe_in_flight_acts_on_nobody(pipe_site, records, recipient, sender,  # noqa: F811
                                                                       data):
    code, text = fuzz._check_run(pipe_site, records, recipient, sender, data)
    assert (code, text) == (0, "")
    (line,) = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()]
    # No probe in flight for that code (none was sent at that time): the plain bounce path.
    assert "probe=not verified" in line and "probe-bounced" not in line, line


def test_a_probe_is_sent_once_and_its_bounce_reports_the_member_in_process(pipe_site, records):  # noqa: F811
    import time

    from listmilter.core import envid
    cfg, store = pipe_site
    member = fuzz.MEMBERS[0]
    # Posted now: the members joined when pipe_site was made, perhaps within this same second, and
    # a post's ENVID keeps whole seconds (one a minute older could predate them: not-recipient).
    dsn = dsn_message(envid.make("PQ1", fuzz.LIST, fuzz.SECRET, time.time()),
                      f"Final-Recipient: rfc822; {member}\nAction: failed\nStatus: 5.1.1\n")
    assert fuzz._check_run(pipe_site, records, "dev-bounces@example.org", "", dsn) == (0, "")
    line = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()][-1]
    assert f"<{member}> 5.1.1 suspect (probe sent)" in line, line
    db = BounceDB(str(cfg.state_dir))
    try:
        ((_, address, sent_at, _),) = db.probes(fuzz.LIST)
        assert address == member and db.row(fuzz.LIST, member) is None      # nothing scored
    finally:
        db.close()
    # A reply from a person to the probe address changes nothing; the bounce acts (notify at 1).
    to = probes.make(fuzz.LIST, member, sent_at, fuzz.SECRET)
    assert fuzz._check_run(pipe_site, records, to, member, b"Subject: Re: x\n\nthanks\n") == (0, "")
    line = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()][-1]
    assert "ignored (not from the null sender" in line, line
    assert fuzz._check_run(pipe_site, records, to, "", b"From: MAILER-DAEMON@x\nSubject: failure\n\nno.\n") == (0, "")
    line = [r.getMessage() for r in records.records if "role=bounces" in r.getMessage()][-1]
    assert f"status=probe unrecognised: <{member}> - probe-bounced" in line, line
    db = BounceDB(str(cfg.state_dir))
    try:
        assert db.probes(fuzz.LIST) == [] and db.row(fuzz.LIST, member).acted > 0     # reported to the owner
        db.forget(fuzz.LIST, member)
    finally:
        db.close()
