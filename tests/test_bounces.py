"""Bounce processing: real DSNs from the private Postfix, through the real pipe transport.

The sink refuses chosen members (`post_replies`: list posts only, so notices
sent from <> still arrive), Postfix writes the DSN, routes it to
`listmilter deliver` as user nobody, and the tests look at the store, the
bounce database, the owner's mailbox and the next post.
"""

from __future__ import annotations

import email
import email.policy
import json
import multiprocessing
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from listmilter.core import bounces, envid, verp
from listmilter.core.bounces import Verdict
from listmilter.store import kept as kept_mail
from listmilter.store.bounce_records import BounceDB
from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.bed.postfix import PIPE_USER, pipe_runtime
from tests.conftest import dsn_message, message

DATA = Path(__file__).parent / "data" / "flufl-bounce"
POLICY = bounces.Policy("remove", 3, 7, 3, 7)
T0 = 1_800_000_000.0
DAY = bounces.DAY


# -- the pure core ----------------------------------------------------------------
def _read(data: bytes, null_sender: bool = True) -> bounces.Report:
    return bounces.read(email.message_from_bytes(data, policy=email.policy.compat32), null_sender)


def test_a_dsn_names_members_by_orcpt_and_tells_permanent_from_temporary():
    report = _read(dsn_message("Q1.abc.def", """
        Final-Recipient: rfc822; forwarded@elsewhere.example
        Original-Recipient: rfc822;Bob@example.net
        Action: failed
        Status: 5.1.1
        Diagnostic-Code: smtp; 550 5.1.1 <forwarded@elsewhere.example>:
          user unknown
        """, """
        Final-Recipient: rfc822; slow@example.net
        Action: delayed
        Status: 4.4.1
        """, """
        Final-Recipient: rfc822; fine@example.net
        Action: delivered
        Status: 2.0.0
        """))
    assert report.kind == bounces.DSN and report.envid == "Q1.abc.def"
    assert report.failures == (
        bounces.Failure("Bob@example.net", True, "5.1.1",
                        "smtp; 550 5.1.1 <forwarded@elsewhere.example>: user unknown"),
        bounces.Failure("slow@example.net", False, "4.4.1", ""))


def test_vacation_replies_are_not_bounces():
    vacation = (b"From: bob@example.net\nTo: dev-bounces@example.org\nSubject: Out of office\n"
                b"Auto-Submitted: auto-replied\n\nI am away until Monday; bob@example.net.\n")
    assert _read(vacation, null_sender=False).kind == bounces.AUTORESPONSE
    assert _read(vacation.replace(b"Auto-Submitted: auto-replied\n", b""), False).kind == bounces.AUTORESPONSE
    human = b"From: bob@example.net\nSubject: hi\n\nplease remove carol@example.com\n"
    assert _read(human, null_sender=False).kind == bounces.UNRECOGNISED   # no heuristics on people


def _corpus():
    for line in (DATA / "expected.tsv").read_text().splitlines():
        if not line.startswith("#"):
            name, kind, permanent, temporary = line.split("\t")
            yield pytest.param(name, kind, frozenset(permanent.split()), frozenset(temporary.split()), id=name)


@pytest.mark.parametrize("name,kind,permanent,temporary", list(_corpus()))
def test_flufl_bounce_sample_corpus(name, kind, permanent, temporary):
    """Exactly these addresses, each exactly as permanent or temporary: a delay read as a
    failure would remove members, an extra address would score someone else."""
    report = _read((DATA / name).read_bytes(), null_sender=True)
    assert report.kind == kind
    assert {f.address for f in report.failures if f.permanent} == permanent
    assert {f.address for f in report.failures if not f.permanent} == temporary


def test_scores_count_once_a_day_and_go_stale():
    s, counted = bounces.add_bounce(bounces.Score(), T0, POLICY)
    assert (s.score, counted) == (1, True)
    s, counted = bounces.add_bounce(s, T0 + 3600, POLICY)            # same day: not again
    assert (s.score, counted) == (1, False) and s.last_bounce == T0 + 3600
    s, counted = bounces.add_bounce(s, T0 + DAY, POLICY)
    assert (s.score, counted) == (2, True)
    s, counted = bounces.add_bounce(s, T0 + 10 * DAY, POLICY)       # 8 quiet days: stale, starts again
    assert (s.score, counted) == (1, True)
    assert bounces.next_step(1, T0 + DAY, T0, POLICY) is None
    assert bounces.next_step(1, T0 + DAY, T0 + DAY, POLICY) == "warn"
    assert bounces.next_step(3, T0 + DAY, T0 + DAY, POLICY) == "remove"
    assert bounces.was_recipient(T0 - 5, True, T0) and not bounces.was_recipient(T0 + 3600, True, T0)
    assert not bounces.was_recipient(T0 - 5, False, T0)


@pytest.mark.parametrize("permanent, member_added, active, kind, posted_days_ago, now_given, expected", [
    (False, 0.0, True, bounces.DSN, 1, True, Verdict.TEMPORARY),
    (True, None, True, bounces.DSN, 1, True, Verdict.NOT_MEMBER),
    (True, 0.0, True, bounces.HEURISTIC, 1, True, Verdict.UNVERIFIED),
    (True, 0.0, True, bounces.DSN, None, True, Verdict.UNVERIFIED),      # no ENVID of ours (or 0.1's)
    (True, 0.0, True, bounces.DSN, 1, True, Verdict.SCORED),
    (True, 0.0, True, bounces.DSN, 13.9, True, Verdict.SCORED),
    (True, 0.0, True, bounces.DSN, 14.1, True, Verdict.EXPIRED),         # a replayed old ENVID
    (True, 0.0, True, bounces.DSN, 20, False, Verdict.SCORED),           # VERP: its own age limit
    (True, 0.0, False, bounces.DSN, 1, True, Verdict.NOT_RECIPIENT),     # disabled
    (True, "after", True, bounces.DSN, 1, True, Verdict.NOT_RECIPIENT),  # joined after the post
])
def test_the_verdict(permanent, member_added, active, kind, posted_days_ago, now_given, expected):
    now = 1_800_000_000.0
    posted_at = None if posted_days_ago is None else now - posted_days_ago * DAY
    if member_added == "after":
        member_added = posted_at + 120
    failure = bounces.Failure("m@example.net", permanent, "5.1.1" if permanent else "4.2.2")
    assert bounces.verdict(failure, kind, posted_at, member_added, active, now if now_given else None) == expected


def test_bounce_database_scores_reach_the_threshold_once_and_duplicates_do_not_count(state):
    db = state.bounces()
    fail = bounces.Failure("dead@example.net", True, "5.1.1", "gone")
    verdicts = [db.record("dev@example.org", fail, bounces.Verdict.SCORED, f"P{day}.x", f"P{day}", POLICY,
                          T0 + day * DAY) for day in range(3)]
    assert [v for v, _ in verdicts] == [bounces.Verdict.SCORED] * 3
    assert verdicts[-1][1].score == 3 and verdicts[-1][1].pending == "remove"
    again = db.record("dev@example.org", fail, bounces.Verdict.SCORED, "P2.x", "P2", POLICY, T0 + 2 * DAY + 60)
    assert again == (bounces.Verdict.DUPLICATE, None)
    db.mark_reported("dev@example.org", "dead@example.net", T0)
    verdict, row = db.record("dev@example.org", fail, bounces.Verdict.SCORED, "P3.x", "P3", POLICY, T0 + 3 * DAY)
    assert row.score == 4 and row.pending == ""                       # acted on already: not again
    db.close()


def _record_many(state, worker: int, count: int) -> None:
    db = state.bounces()
    for i in range(count):
        db.record("dev@example.org", bounces.Failure(f"m{i}@example.net", True, "5.1.1"), bounces.Verdict.SCORED,
                  f"W{worker}.x", f"W{worker}", POLICY, T0 + worker * DAY)
    db.close()


def test_a_lowered_threshold_acts_at_the_next_bounce_even_one_counted_today(state):
    db = state.bounces()
    try:
        fail = bounces.Failure("dead@example.net", True, "5.1.1")
        assert db.record("dev@example.org", fail, bounces.Verdict.SCORED, "", "P1", POLICY, T0)[1].pending == ""
        lowered = bounces.Policy("remove", 1, 7, 3, 7)
        verdict, row = db.record("dev@example.org", fail, bounces.Verdict.SCORED, "", "P2", lowered, T0 + 60)
        assert verdict == bounces.Verdict.COUNTED_TODAY and (row.score, row.pending) == (1, "remove")
        # A stale score does not count, whatever the threshold.
        assert not bounces.due(bounces.Score(1, T0, T0), T0 + 8 * DAY, lowered)
        assert bounces.due(bounces.Score(1, T0, T0), T0 + 6 * DAY, lowered)
    finally:
        db.close()


def test_concurrent_deliveries_lose_no_update(state):
    state.bounces().close()
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_record_many, args=(state, w, 200)) for w in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    db = state.bounces()
    rows = db.rows("dev@example.org")
    assert len(rows) == 200
    # Each worker is a different post on a different day: every one of them scored.
    assert {r.score for r in rows} == {6}
    assert len(db.records("dev@example.org")) == 1200
    db.close()


# -- through the real Postfix ----------------------------------------------------
def _members(bed, lst) -> list[str]:
    # Every member, disabled ones too (plain `members ls` shows who receives posts).
    return sorted(line.split("\t")[0] for line in
                  cli(bed.listmilter.config_path, "members", "ls", lst, "--all").stdout.splitlines())


def _bounce_lines(bed, lst) -> list[str]:
    return [line for line in bed.deliver_log().splitlines()
            if f"list=<{lst}>, role=bounces" in line]


def _wait_bounce(bed, lst, count: int = 1, timeout: float = 90) -> list[str]:
    return wait_until(lambda: (lines := _bounce_lines(bed, lst)) and len(lines) >= count and lines,
                      timeout, interval=0.2, what=f"{count} bounce deliveries for {lst}")


def _as_pipe_user(bed, code: str) -> str:
    """Run Python as the pipe transport's user, with the bed's config (for the periodic run's clock)."""
    script = ("from listmilter.core import config\nfrom listmilter.app import bounce_processing\n"
              "from listmilter.store import open_store\n"
              f"cfg = config.load({str(bed.listmilter.config_path)!r})\nstore = open_store(cfg)\n" + code)
    proc = subprocess.run(["runuser", "-u", PIPE_USER, "--", "/usr/bin/env", f"PYTHONPATH={pipe_runtime()}",
                           f"LISTMILTER_LOG={bed.postfix.pipe_log}", "/usr/bin/python3", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _post(bed, lst, subject="post"):
    bed.smtp("carol@example.net", [lst], message(subject, "carol@example.net", lst))


def _mails(bed, to: str, count: int, timeout: float = 60):
    """Wait for `count` messages to `to` at the sink; every one of them."""
    return wait_until(lambda: len(got := bed.sink.for_recipient(to)) >= count and got,
                      timeout, what=f"{count} mails to {to}")


def _history(bed, lst, address) -> list[str]:
    return cli(bed.listmilter.config_path, "members", "history", lst, address).stdout.splitlines()


def _dsn(bed, lst, post_id: str, *members: str, posted_at: float | None = None, status: str = "5.1.1") -> bytes:
    """A DSN for post `post_id` of `lst`, naming `members`, with an ENVID made with the site secret."""
    bounces_addr = lst.replace("@", "-bounces@")
    made = envid.make(post_id, lst, _secret(bed), time.time() if posted_at is None else posted_at)
    blocks = [f"""
        Original-Recipient: rfc822;{m}
        Final-Recipient: rfc822; {m}
        Action: failed
        Status: {status}
        """ for m in members]
    return dsn_message(made, *blocks, to=bounces_addr)


def _send_dsn(bed, lst, dsn: bytes) -> None:
    bed.smtp("", [lst.replace("@", "-bounces@")], dsn)


_VERP_TIMES: dict[str, float] = {}


def _send_verp_dsn(bed, lst, post_id: str, member: str) -> None:
    """A DSN for `member`'s personal copy of post `post_id`, to that copy's VERP sender."""
    posted_at = _VERP_TIMES.setdefault(post_id, time.time())
    to = verp.make(lst, member, post_id, posted_at, _secret(bed))
    assert to is not None
    bed.smtp("", [to], _dsn(bed, lst, post_id, member, posted_at=posted_at))


def _db(bed, sql: str, *args) -> list[tuple]:
    db = sqlite3.connect(bed.listmilter.state_dir / "bounces.sqlite", timeout=10)
    try:
        with db:
            return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_remove_a_dead_member_after_a_real_dsn_and_tell_the_owner(clean_bed, owner):
    bed = clean_bed
    lst = bed.new_list(["ok@example.net", "dead@example.net"], posting="open", owners=(owner,),
                       bounce_action="remove", bounce_threshold=1)
    bed.sink.post_replies["dead@example.net"] = "550 5.1.1 <dead@example.net>: no such user here"
    _post(bed, lst)
    # The post's DSN (bound only by its ENVID) sends a probe; the probe's DSN removes.
    line, probed = _wait_bounce(bed, lst, 2)
    assert "from=<>" in line and "<dead@example.net> 5.1.1 suspect (probe sent)" in line
    assert f"to=<{lst.split('@')[0]}-bounces+probe-" in probed and "from=<>" in probed
    assert "status=probe dsn: <dead@example.net> 5.1.1 probe-bounced" in probed
    queue_id = line.split("envid=")[1].split(".")[0]
    assert f"{queue_id}: list=<{lst}>" in bed.listmilter.log()      # the ENVID names the post's queue id
    notice = _mails(bed, owner, 1)[0].message
    bed.settle()
    assert len(bed.sink.for_recipient(owner)) == 1
    assert notice["Subject"] == f"dead@example.net removed from {lst} (bounces)"
    assert "no such user here" in notice.get_content()
    assert _members(bed, lst) == ["ok@example.net"]
    history = _history(bed, lst, "dead@example.net")
    assert sum("dead@example.net unsubscribed by bounce: bounce score 1, last 5.1.1" in x for x in history) == 1

    bed.sink.clear()
    _post(bed, lst, "second")
    bed.sink.wait_for_recipients(1)
    bed.settle()
    assert bed.sink.recipients() == ["ok@example.net"]


def test_disable_warns_the_member_then_removes_after_the_last_warning(clean_bed, owner):
    bed = clean_bed
    lst = bed.new_list(["ok@example.net", "gone@example.net"], posting="open", owners=(owner,),
                       bounce_threshold=1, bounce_warnings=2, bounce_warning_interval_days=3)
    bed.sink.post_replies["gone@example.net"] = "550 5.2.1 mailbox disabled"
    _post(bed, lst)
    _wait_bounce(bed, lst)
    warning = _mails(bed, "gone@example.net", 1)[0]
    assert warning.mail_from == "<>" and "(warning 1 of 2)" in warning.message.get_content()
    assert _mails(bed, owner, 1)[0].message["Subject"] == f"gone@example.net disabled on {lst} (bounces)"
    assert _members(bed, lst) == ["gone@example.net", "ok@example.net"]       # still a member...
    listing = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert "gone@example.net" in listing and "disabled" in listing and "5.2.1" in listing

    bed.settle()
    bed.sink.clear()
    bed.sink.post_replies["gone@example.net"] = "550 5.2.1 mailbox disabled"
    _post(bed, lst, "while disabled")
    bed.sink.wait_for_recipients(1)
    bed.settle()
    assert bed.sink.recipients() == ["ok@example.net"]                     # ...who gets no posts

    now = time.time()
    assert _as_pipe_user(bed, f"print(bounce_processing.periodic(cfg, store, now={now + 1}))") == "[]\n"
    out = _as_pipe_user(bed, f"print(bounce_processing.periodic(cfg, store, now={now + 3 * DAY + 60}))")
    assert "warned gone@example.net" in out and "2/2" in out
    (second,) = _mails(bed, "gone@example.net", 1)
    assert "(warning 2 of 2)" in second.message.get_content()
    out = _as_pipe_user(bed, f"print(bounce_processing.periodic(cfg, store, now={now + 6 * DAY + 120}))")
    assert "removed gone@example.net" in out
    assert _members(bed, lst) == ["ok@example.net"]
    bed.settle()
    assert [m.message["Subject"] for m in bed.sink.for_recipient(owner)] == \
        [f"gone@example.net removed from {lst} (bounces)"]


def test_notify_reports_to_the_owner_who_decides_by_command_or_by_reply(clean_bed, owner):
    bed = clean_bed
    lst = bed.new_list(["ok@example.net", "iffy@example.net"], posting="open", owners=(owner,),
                       bounce_action="notify", bounce_threshold=1)
    bed.sink.post_replies["iffy@example.net"] = "550 5.7.1 rejected by policy"
    _post(bed, lst)
    report = _mails(bed, owner, 1)[0].message
    text = report.get_content()
    assert report["Subject"] == f"iffy@example.net is bouncing on {lst}"
    assert "rejected by policy" in text and f"listmilter members enable {lst} iffy@example.net" in text
    keep_address = report["Reply-To"]
    remove_address = next(w for w in text.split() if w.startswith(lst.split("@")[0] + "-bounces+remove-"))
    assert keep_address.startswith(lst.split("@")[0] + "-bounces+keep-") and "iffy" not in keep_address
    assert _members(bed, lst) == ["iffy@example.net", "ok@example.net"]        # notify changes nothing

    # A made-up token (of the right form: base32) is refused and changes nothing.
    tail = "aaaa" if not remove_address.endswith("aaaa@example.org") else "bbbb"
    forged = remove_address[:-len("@example.org") - 4] + tail + "@example.org"
    bed.smtp("mallory@example.com", [forged], message("remove", "mallory@example.com", forged))
    wait_until(lambda: any("refused (no bouncing member" in line for line in _bounce_lines(bed, lst)), 60,
               what="the refusal")
    assert _members(bed, lst) == ["iffy@example.net", "ok@example.net"]

    # The owner keeps the member with the command...
    out = cli(bed.listmilter.config_path, "members", "enable", lst, "iffy@example.net").stdout
    assert "iffy@example.net enabled" in out
    assert "iffy@example.net" not in cli(bed.listmilter.config_path, "bounces", lst).stdout

    # ...and, after the next bounce and report, removes them by mail.
    _post(bed, lst, "again")
    second = _mails(bed, owner, 2)[-1].message.get_content()
    remove_address = next(w for w in second.split() if "-bounces+remove-" in w)
    bed.smtp(owner, [remove_address], message("remove", owner, remove_address))
    wait_until(lambda: any("removed <iffy@example.net> (owner's reply)" in line for line in _bounce_lines(bed, lst)),
               60, what="the removal")
    assert _members(bed, lst) == ["ok@example.net"]
    history = cli(bed.listmilter.config_path, "members", "history", lst, "iffy@example.net").stdout
    assert f"iffy@example.net unsubscribed by owner ({owner}, <" in history
    bed.settle()
    assert len(bed.sink.for_recipient(owner)) == 2


def test_a_lowered_threshold_applies_to_scores_members_already_have(clean_bed, owner):
    bed = clean_bed
    lst = bed.new_list(["ok@example.net", "low@example.net"], posting="open", owners=(owner,),
                       bounce_action="remove")
    # A score built from a bounce bound to the member (to its VERP address; a probe's bounce
    # would act at once, whatever the threshold).
    _send_verp_dsn(bed, lst, "LOW1", "low@example.net")
    assert "verp dsn: <low@example.net> 5.1.1 scored" in _wait_bounce(bed, lst)[-1]
    # Score 1 of the default threshold 5: nothing happens, and the hourly run says so.
    run = cli(bed.listmilter.config_path, "bounces", "--run").stdout
    assert run.startswith("nothing to do")
    assert _members(bed, lst) == ["low@example.net", "ok@example.net"]
    if bed.listmilter.backend == "sqlite":
        cli(bed.listmilter.config_path, "list", "set", lst, "bounce_threshold", "1")
    else:
        bed.listmilter.lists[lst]["bounce_threshold"] = 1
        bed.listmilter.write_config()
    run = cli(bed.listmilter.config_path, "bounces", "--run").stdout
    assert f"remove low@example.net ({lst}): bounce score 1 reached bounce_threshold 1" in run
    assert _members(bed, lst) == ["ok@example.net"]
    notice = _mails(bed, owner, 1)
    assert notice[0].message["Subject"] == f"low@example.net removed from {lst} (bounces)"
    assert cli(bed.listmilter.config_path, "bounces", "--run").stdout.startswith("nothing to do")


def test_the_owner_keeps_a_disabled_member_by_replying(clean_bed, owner):
    bed = clean_bed
    lst = bed.new_list(["back@example.net"], posting="open", owners=(owner,), bounce_threshold=1)
    bed.sink.post_replies["back@example.net"] = "452 4.2.2 mailbox full"   # 4xx: Postfix retries...
    bed.postfix.postconf("-e", "maximal_queue_lifetime=0", "bounce_queue_lifetime=0")  # ...not here: fails now
    bed.postfix.reload()
    try:
        _post(bed, lst)
        notice = _mails(bed, owner, 1)[0].message
    finally:
        bed.postfix.postconf("-e", "maximal_queue_lifetime=5d", "bounce_queue_lifetime=5d")
        bed.postfix.reload()
    assert notice["Subject"] == f"back@example.net disabled on {lst} (bounces)"
    bed.settle()
    bed.sink.clear()
    bed.smtp(owner, [notice["Reply-To"]], message("Re: " + notice["Subject"], owner, notice["Reply-To"]))
    wait_until(lambda: any("kept <back@example.net>" in line for line in _bounce_lines(bed, lst)), 60,
               what="the owner's reply")
    _post(bed, lst, "welcome back")
    bed.sink.wait_for_recipients(1)
    bed.settle()
    assert bed.sink.recipients() == ["back@example.net"]
    history = cli(bed.listmilter.config_path, "members", "history", lst, "back@example.net").stdout
    assert f"back@example.net enabled by owner ({owner}" in history


def test_a_probe_decides_the_dead_member_goes_and_a_forged_dsn_disables_no_live_one(clean_bed, owner):
    """Issue 14: a failure bound only to a post's ENVID is a suspicion. The real DSN of a post
    for a dead member sends a probe, Postfix's DSN of the probe removes them; a forged DSN
    (a genuine ENVID, as any recipient of a post sees it) for live members sends each a probe,
    delivered, and the periodic run after bounce_probe_days clears them: never disabled."""
    bed = clean_bed
    live, far, dead, gone = "live@example.net", "far@example.com", "dead@example.net", "gone@example.com"
    lst = bed.new_list([live, far, dead, gone], posting="open", owners=(owner,), bounce_action="remove",
                       bounce_threshold=1, bounce_probe_days=2)
    local = lst.split("@")[0]
    for address in (dead, gone):
        bed.sink.post_replies[address] = f"550 5.1.1 <{address}>: no such user here"
    _post(bed, lst)
    post_dsn, *probe_dsns = _wait_bounce(bed, lst, 3)
    # Our own Postfix names both failures, at two domains, in one DSN: that is no suspect report.
    assert f"to=<{local}-bounces@" in post_dsn
    assert f"<{dead}> 5.1.1 suspect (probe sent)" in post_dsn and f"<{gone}> 5.1.1 suspect (probe sent)" in post_dsn
    assert "suspect report" not in bed.listmilter.log() + bed.deliver_log()
    for probe_dsn in probe_dsns:
        assert f"to=<{local}-bounces+probe-" in probe_dsn and "from=<>" in probe_dsn
    assert sorted(line.split("status=probe dsn: <")[1].split(">")[0] for line in probe_dsns) == [dead, gone]
    assert all("5.1.1 probe-bounced" in line for line in probe_dsns)
    assert sorted(m.message["Subject"] for m in _mails(bed, owner, 2)) == \
        [f"{dead} removed from {lst} (bounces)", f"{gone} removed from {lst} (bounces)"]
    assert _members(bed, lst) == [far, live]

    # A DSN from an SMTP client naming failures at two domains: a remote MTA only ever got
    # the recipients of its own domain, so this is logged as suspect.
    _send_dsn(bed, lst, _dsn(bed, lst, "FORGED1", live, far))
    forged = _wait_bounce(bed, lst, 4)[-1]
    assert f"<{live}> 5.1.1 suspect (probe sent)" in forged and f"<{far}> 5.1.1 suspect (probe sent)" in forged
    assert "suspect report: failures at several receiving domains" in bed.listmilter.log() + bed.deliver_log()
    for member in (live, far):
        probe = wait_until(lambda m=member: [x for x in bed.sink.for_recipient(m)
                                             if x.message["Subject"] == f"Checking your address for {lst}"],
                           60, what=f"the probe to {member}")[0]
        assert probe.mail_from.startswith(f"{local}-bounces+probe-")
    bed.settle()
    assert len(_bounce_lines(bed, lst)) == 4              # the probes arrived: nothing came back
    assert _members(bed, lst) == [far, live]
    listing = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert f"probe in flight: {lst} {live} sent" in listing and "no bouncing members" in listing
    # Not before bounce_probe_days; after them the suspicions are cleared.
    now = time.time()
    assert "probe" not in _as_pipe_user(bed, f"print(bounce_processing.periodic(cfg, store, now={now + DAY}))")
    out = _as_pipe_user(bed, f"print(bounce_processing.periodic(cfg, store, now={now + 2 * DAY + 60}))")
    assert f"probe to {live} ({lst}) did not bounce in 2 days: suspicion cleared" in out and far in out
    assert _db(bed, "SELECT count(*) FROM probes WHERE list=?", lst) == [(0,)]
    assert _db(bed, "SELECT count(*) FROM scores WHERE list=?", lst) == [(0,)]
    assert _members(bed, lst) == [far, live]
    if bed.listmilter.backend == "sqlite":      # (members written in the yaml file have no history)
        assert not any("bounce" in line for line in _history(bed, lst, live))
    bed.settle()
    assert len(bed.sink.for_recipient(owner)) == 2        # the owners heard of the dead members only


def _secret(bed) -> bytes:
    return (bed.listmilter.state_dir / "secret").read_bytes()


def test_forged_and_unprovable_bounces_score_nobody_and_replays_go_to_the_owner(clean_bed, owner):
    """A forged ENVID or none binds the failure to nothing: the member gets one probe
    (delivered: nobody scored). A genuine ENVID replayed too late, or of a post from before
    the member joined, goes to the owners (bounce_unrecognised: forward: each as it comes)."""
    bed = clean_bed
    lst = bed.new_list(["victim@example.net"], posting="open", owners=(owner,),
                       bounce_action="remove", bounce_threshold=1, bounce_unrecognised="forward")
    bounces_addr = lst.replace("@", "-bounces@")
    block = """
        Final-Recipient: rfc822; victim@example.net
        Action: failed
        Status: 5.1.1
        """
    forged = envid.make("FAKE1", lst, b"not the site secret" * 2, time.time())
    envids = [forged, ""]
    if bed.listmilter.backend == "sqlite":
        # A genuine ENVID of a post made before the victim joined. (Members written
        # in the yaml file have no join time, so this check needs the sqlite store.)
        envids.append(envid.make("OLD1", lst, _secret(bed), time.time() - 10 * DAY))
    # A genuine ENVID of a post older than bounces.ENVID_MAX_AGE (14 days): a replay, whoever the member.
    envids.append(envid.make("OLD2", lst, _secret(bed), time.time() - 20 * DAY))
    recipient_checks = len(envids) - 3
    for text in envids:
        bed.smtp("", [bounces_addr], dsn_message(text, block, to=bounces_addr))
    lines = _wait_bounce(bed, lst, len(envids))
    assert all("scored" not in line for line in lines)
    assert sum("5.1.1 suspect (probe sent)" in line for line in lines) == 1
    assert sum("5.1.1 suspect (a probe is in flight already)" in line for line in lines) == 1
    assert sum("5.1.1 expired" in line for line in lines) == 1
    assert sum("not-recipient" in line for line in lines) == recipient_checks
    assert _members(bed, lst) == ["victim@example.net"]
    listing = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert f"probe in flight: {lst} victim@example.net" in listing and "no bouncing members" in listing
    kept_count = len(envids) - 2
    forwarded = _mails(bed, owner, kept_count)
    bed.settle()
    assert len(bed.sink.for_recipient(owner)) == kept_count
    assert [m.message["Subject"] for m in bed.sink.for_recipient("victim@example.net")] == \
        [f"Checking your address for {lst}"]
    assert {m.message["Subject"] for m in forwarded} == {f"Unrecognised bounce for {lst}"}
    # From the list's own address (SPF at the owners' provider), never the null or original sender.
    assert {m.mail_from for m in forwarded} == {lst.replace("@", "-owner@")}
    kept = cli(bed.listmilter.config_path, "bounces", lst, "--kept").stdout
    assert kept.count(".eml") == kept_count
    # Each kept file, as Postfix delivered it, through `bounces --explain`: the same verdicts.
    explained = []
    for path in Path(kept_mail.folder(str(bed.listmilter.state_dir), lst)).glob("*.eml"):
        got = json.loads(cli(bed.listmilter.config_path, "bounces", lst, "--explain", str(path), "--json").stdout)
        assert got["kind"] == "dsn"
        assert [(f["address"], f["status"], f["permanent"]) for f in got["failures"]] == \
            [("victim@example.net", "5.1.1", True)]
        explained.append((got["failures"][0]["binding"], got["failures"][0]["verdict"]))
    assert sorted(explained) == sorted([("envid", "expired")] + [("envid", "not-recipient")] * recipient_checks)


def test_by_default_the_owners_get_one_digest_a_day_of_what_scored_nobody(clean_bed, owner):
    """bounce_unrecognised: digest (the default): serve's periodic run (every second in this
    bed) mails the owners one list of the messages kept since the last digest, and no more that
    day, however many come after; each stays listed by `bounces --kept`."""
    bed = clean_bed
    lst = bed.new_list(["victim@example.net"], posting="open", owners=(owner,))
    bounces_addr = lst.replace("@", "-bounces@")
    # Naming no member (a member named would only get a probe): kept for the owners.
    block = """
        Final-Recipient: rfc822; stranger@example.net
        Action: failed
        Status: 5.1.1
        """
    for n in range(3):
        forged = envid.make(f"FAKE{n}", lst, b"not the site secret" * 2, time.time())
        bed.smtp("", [bounces_addr], dsn_message(forged, block, to=bounces_addr))
    _wait_bounce(bed, lst, 3)
    (digest,) = _mails(bed, owner, 1)
    assert digest.mail_from == lst.replace("@", "-owner@")
    subject = str(digest.message["Subject"])
    count = int(subject.removeprefix(f"Unrecognised bounces for {lst}: "))
    text = digest.message.get_content()
    assert 1 <= count <= 3 and text.count(".eml") == count, text
    assert f"listmilter bounces {lst} --kept" in text
    wait_until(lambda: "status=unrecognised bounces digest sent" in bed.listmilter.log(), 15,
               what="the periodic run's log line")
    time.sleep(4)           # four more periodic runs: the next digest is due in a day
    bed.settle()
    assert len(bed.sink.for_recipient(owner)) == 1
    assert cli(bed.listmilter.config_path, "bounces", lst, "--kept").stdout.count(".eml") == 3


def test_verdicts_not_member_counted_today_not_recipient_and_unrecognised_keep(clean_bed, owner):
    """The verdicts bounces.md lists, each from a DSN Postfix delivers; with
    bounce_unrecognised: keep what scored nobody is kept and not forwarded."""
    bed = clean_bed
    lst = bed.new_list(["m@example.net", "off@example.net"], posting="open", owners=(owner,),
                       bounce_unrecognised="keep", bounce_threshold=5)
    cli(bed.listmilter.config_path, "members", "disable", lst, "off@example.net")
    _send_dsn(bed, lst, _dsn(bed, lst, "P1", "m@example.net"))
    _wait_bounce(bed, lst, 1)
    _send_dsn(bed, lst, _dsn(bed, lst, "P2", "m@example.net"))          # another post, the same day
    _wait_bounce(bed, lst, 2)
    _send_dsn(bed, lst, _dsn(bed, lst, "P3", "stranger@example.net"))
    _wait_bounce(bed, lst, 3)
    _send_dsn(bed, lst, _dsn(bed, lst, "P4", "off@example.net"))        # disabled: got no post
    lines = _wait_bounce(bed, lst, 4)
    bed.settle()
    verdicts = [line.split("status=")[1].split(", envid=")[0] for line in lines]
    kept = [v.split(", kept ")[1] if ", kept " in v else "" for v in verdicts]
    assert [v.split(", kept ")[0] for v in verdicts] == [
        "dsn: <m@example.net> 5.1.1 suspect (probe sent)",
        "dsn: <m@example.net> 5.1.1 suspect (a probe is in flight already)",
        "dsn: <stranger@example.net> 5.1.1 not-member", "dsn: <off@example.net> 5.1.1 not-recipient"]
    folder = bed.listmilter.state_dir / "bounces" / lst
    assert kept[:2] == ["", ""] and sorted(kept[2:]) == sorted(str(p) for p in folder.glob("*.eml"))
    assert bed.sink.for_recipient(owner) == []                           # keep: nothing forwarded
    kept = cli(bed.listmilter.config_path, "bounces", lst, "--kept").stdout
    assert kept.count(".eml") == 2 and "not a member of the list" in kept and "not a recipient" in kept
    # One probe for the two suspicions, delivered (m@ works): nothing scored.
    (probe,) = _mails(bed, "m@example.net", 1)
    assert f"{lst.split('@')[0]}-bounces+probe-" in probe.mail_from
    assert probe.message["Subject"] == f"Checking your address for {lst}"
    listing = cli(bed.listmilter.config_path, "bounces", lst).stdout
    assert f"probe in flight: {lst} m@example.net sent" in listing and "no bouncing members" in listing


@pytest.mark.parametrize("stale_days, expected", [(3, 1), (10, 2)])
def test_a_score_older_than_bounce_stale_days_starts_again(clean_bed, stale_days, expected):
    bed = clean_bed
    lst = bed.new_list(["m@example.net"], posting="open", bounce_threshold=5, bounce_stale_days=stale_days)
    _send_verp_dsn(bed, lst, "S1", "m@example.net")
    _wait_bounce(bed, lst, 1)
    # Four days pass (the score's times moved back; the store keeps them in bounces.sqlite).
    _db(bed, "UPDATE scores SET last_scored = last_scored - ?, last_bounce = last_bounce - ? WHERE list = ?",
        4 * DAY, 4 * DAY, lst)
    _send_verp_dsn(bed, lst, "S2", "m@example.net")
    assert "verp dsn: <m@example.net> 5.1.1 scored" in _wait_bounce(bed, lst, 2)[-1]
    assert _db(bed, "SELECT score FROM scores WHERE list = ?", lst) == [(expected,)]


def test_a_dsn_delivered_twice_scores_once_and_vacation_replies_are_ignored(clean_bed, owner):
    bed = clean_bed
    lst = bed.new_list(["twice@example.net"], posting="open", owners=(owner,))
    bounces_addr = lst.replace("@", "-bounces@")
    # To the member's VERP address (bound to the member: scored; to the plain address it would be a probe).
    _send_verp_dsn(bed, lst, "TWICE1", "twice@example.net")
    _send_verp_dsn(bed, lst, "TWICE1", "twice@example.net")
    bed.smtp("twice@example.net", [bounces_addr],
             b"From: twice@example.net\r\nSubject: Automatic reply: post\r\nAuto-Submitted: auto-replied\r\n\r\n"
             b"I am on holiday.\r\n")
    lines = _wait_bounce(bed, lst, 3)
    assert sum("scored" in line for line in lines) == 1
    assert sum("duplicate" in line for line in lines) == 1
    assert sum("status=autoresponse" in line for line in lines) == 1
    listing = [line for line in cli(bed.listmilter.config_path, "bounces", lst).stdout.splitlines()
               if "twice@example.net" in line]
    assert len(listing) == 1 and " 1  " in listing[0]
    bed.settle()
    assert bed.sink.for_recipient(owner) == []        # nothing for the owner


def test_a_temporary_failure_is_recorded_not_scored(clean_bed):
    # Members get NOTIFY=FAILURE, so Postfix itself sends no delay DSNs; some
    # remote MTAs do anyway. This one is written by hand, sent through Postfix.
    bed = clean_bed
    lst = bed.new_list(["slow@example.net"], posting="open")
    bounces_addr = lst.replace("@", "-bounces@")
    bed.smtp("", [bounces_addr], dsn_message(envid.make("SLOW1", lst, _secret(bed), time.time()), """
        Final-Recipient: rfc822; slow@example.net
        Action: delayed
        Status: 4.2.2
        Diagnostic-Code: smtp; 452 4.2.2 mailbox full
        """, to=bounces_addr))
    line = _wait_bounce(bed, lst)[-1]
    assert "<slow@example.net> 4.2.2 temporary" in line
    assert "slow@example.net" not in cli(bed.listmilter.config_path, "bounces", lst).stdout
    db = BounceDB(str(bed.listmilter.state_dir))
    try:
        assert [r[6] for r in db.records(lst, "slow@example.net")] == [bounces.Verdict.TEMPORARY]
    finally:
        db.close()


def test_storm_ten_thousand_members_ten_percent_bounce(clean_bed):
    bed = clean_bed
    members = [f"m{i:05d}@example.net" for i in range(10_000)]
    dead = set(members[::10])
    lst = bed.new_list(members, posting="open")
    for address in dead:
        bed.sink.post_replies[address] = "550 5.1.1 no such user"
    bed.sink.let_probes_arrive()
    _post(bed, lst, "storm")
    # One DSN (Postfix lists every failed member of the post in one report), bound only by
    # its ENVID: 1,000 suspicions, one probe each, nothing scored.
    line = _wait_bounce(bed, lst, 1, timeout=300)[0]
    probes_got = wait_until(lambda: len(got := [m for m in bed.sink.messages if "+probe-" in m.mail_from]) >= 1000
                            and got, 300, what="1000 probes")
    bed.settle()
    assert line.count(" suspect (probe sent)") == 1000 and len(_bounce_lines(bed, lst)) == 1
    assert sorted(r for m in probes_got for r in m.rcpt_tos) == sorted(dead)
    db = BounceDB(str(bed.listmilter.state_dir))
    try:
        assert db.rows(lst) == [] and {p[1] for p in db.probes(lst)} == dead
        records = db.records(lst)
        assert len(records) == 1000 and {r[6] for r in records} == {bounces.Verdict.SUSPECT}
    finally:
        db.close()
    # Every member that does not bounce got the post exactly once.
    got = {r: [m for m in copies if m.message["Subject"] == "storm"] for r, copies in bed.sink.by_recipient().items()}
    got = {r: copies for r, copies in got.items() if copies}
    assert len(got) == 9000 and set(got) == set(members) - dead
    assert all(len(copies) == 1 for copies in got.values())


# -- a pending action (the notice failed after the change) is finished ---------------------
def _refuse_owner_mail(bed, owner: str) -> None:
    """Postfix answers 450 to mail for `owner`: listmilter's notice cannot be sent."""
    bed.postfix.postconf("-e", f"smtpd_recipient_restrictions = check_recipient_access "
                               f"inline:{{ {{ {owner} = 450 4.2.1 owner mailbox busy }} }}, "
                               "permit_mynetworks, reject_unauth_destination")
    bed.postfix.reload()


def _accept_owner_mail(bed) -> None:
    bed.postfix.postconf("-X", "smtpd_recipient_restrictions")
    bed.postfix.reload()


def _deferred_dsn(bed, lst):
    """Wait until the DSN of lst's probe was handled up to the failing notice and the pipe said 75."""
    probe_addr = lst.split("@")[0] + "-bounces+probe-"
    wait_until(lambda: f"deliver: to=<{probe_addr}" in bed.listmilter.log()
               and ", status=deferred (smtp: 127.0.0.1:" in bed.listmilter.log()
               and "owner mailbox busy" in bed.listmilter.log(), 90, what="the notice to fail")
    wait_until(lambda: f"to=<{probe_addr}" in bed.postfix.log() and "status=deferred" in bed.postfix.log(),
               30, what="Postfix to defer the DSN")


def test_a_pending_bounce_action_is_finished_by_the_retry_exactly_once(own_bed, owner):
    bed = own_bed
    lst = bed.new_list(["ok@example.net", "dead@example.net"], posting="open", owners=(owner,),
                       bounce_action="remove", bounce_threshold=1)
    _refuse_owner_mail(bed, owner)
    bed.sink.post_replies["dead@example.net"] = "550 5.1.1 <dead@example.net>: no such user"
    _post(bed, lst)
    _deferred_dsn(bed, lst)
    # Removed already (the change comes first); the notice is what is pending.
    assert _members(bed, lst) == ["ok@example.net"]
    assert [r[0] for r in _db(bed, "SELECT pending FROM scores WHERE list = ?", lst)] == ["remove"]
    assert bed.sink.for_recipient(owner) == []
    _accept_owner_mail(bed)
    subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-f"], check=True, capture_output=True)
    _mails(bed, owner, 1)
    bed.settle()
    notices = bed.sink.for_recipient(owner)
    assert [m.message["Subject"] for m in notices] == [f"dead@example.net removed from {lst} (bounces)"]
    # The post's DSN sent a probe; the probe's DSN scored (and exited 75 on the notice); its
    # retry found the probe still in flight and finished.
    assert [v for (v,) in _db(bed, "SELECT verdict FROM bounces WHERE list = ? ORDER BY id", lst)] == \
        ["suspect", "scored"]
    suspect, probed = _bounce_lines(bed, lst)
    assert "<dead@example.net> 5.1.1 suspect (probe sent)" in suspect
    assert "probe dsn: <dead@example.net> 5.1.1 probe-bounced" in probed
    assert _db(bed, "SELECT count(*) FROM probes WHERE list = ?", lst) == [(0,)]
    assert _db(bed, "SELECT count(*) FROM scores WHERE list = ?", lst) == [(0,)]  # done and forgotten
    history = _history(bed, lst, "dead@example.net")
    assert sum("unsubscribed by bounce" in x for x in history) == 1


def test_serves_hourly_run_finishes_a_pending_action_and_sends_due_warnings(own_bed, owner):
    bed = own_bed
    lm = bed.listmilter
    lm.env["LISTMILTER_PERIODIC_INTERVAL"] = "1"      # "hourly": every second here (docs/testing.md)
    lm.stop()
    lm.start()
    lst = bed.new_list(["ok@example.net", "dead@example.net"], posting="open", owners=(owner,),
                       bounce_action="remove", bounce_threshold=1)
    warned = bed.new_list(["gone@example.net"], posting="open", owners=(owner,), bounce_threshold=1,
                          bounce_warnings=2, bounce_warning_interval_days=3)
    _refuse_owner_mail(bed, owner)
    bed.sink.post_replies["dead@example.net"] = "550 5.1.1 <dead@example.net>: no such user"
    _post(bed, lst)
    _deferred_dsn(bed, lst)
    # The DSN is never retried (lost, expired): only serve's periodic run can finish the action.
    subprocess.run(["postsuper", "-c", str(bed.postfix.dir), "-d", "ALL"], check=True, capture_output=True)
    bed.mta_drained()
    _accept_owner_mail(bed)
    lm.forgive()         # its runs failed while the owner's mail was refused: on purpose
    wait_until(lambda: f"bounce: periodic: remove dead@example.net ({lst})" in lm.log(), 30,
               what="the periodic run to finish the removal")
    assert [m.message["Subject"] for m in _mails(bed, owner, 1)] == \
        [f"dead@example.net removed from {lst} (bounces)"]
    # A disabled member whose next warning is due gets it from the same run.
    bed.sink.post_replies["gone@example.net"] = "550 5.2.1 mailbox disabled"
    _post(bed, warned)
    assert "(warning 1 of 2)" in _mails(bed, "gone@example.net", 1)[0].message.get_content()
    _db(bed, "UPDATE scores SET next_warning = ? WHERE list = ?", time.time() - 60, warned)
    second = _mails(bed, "gone@example.net", 2)[1]
    assert "(warning 2 of 2)" in second.message.get_content()
    assert f"bounce: periodic: warned gone@example.net ({warned}, 2/2)" in lm.log()
    bed.settle()
    assert len(bed.sink.for_recipient("gone@example.net")) == 2
    assert [m.message["Subject"] for m in bed.sink.for_recipient(owner)] == [
        f"dead@example.net removed from {lst} (bounces)", f"gone@example.net disabled on {warned} (bounces)"]
