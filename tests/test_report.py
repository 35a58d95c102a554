"""Delivery reports: the pure report (core/report.py), its date parser and arithmetic under
hypothesis, the posts the milter records, `listmilter report` on a real SQLite store, and the
weekly mail's once-a-week rule. The real-Postfix run is tests/test_report_mta.py."""

from __future__ import annotations

import csv
import datetime
import io
import json
import re

import Milter
import pytest
from hypothesis import given
from hypothesis import strategies as st

from listmilter.app import outgoing, reports
from listmilter.core import config, report
from listmilter.core.bounces import Failure, Policy, Verdict
from listmilter.core.model import Event, Member
from listmilter.mta.milter import ListMilter
from listmilter.store import open_bounces, open_store
from tests.bed.listmilter import cli
from tests.test_milter import QUEUE_ID, Session, _world, post

LIST = "dev@example.org"
T0 = report.parse_date("2026-11-02")
DAY = report.DAY


# -- the date parser ------------------------------------------------------------------------
def test_dates_are_utc_days_and_anything_else_is_a_clear_error():
    assert report.parse_date("1970-01-01") == 0
    assert report.parse_date("2026-11-02") == 1793577600
    for bad, says in (("2026-13-01", "no such date: 2026-13-01"), ("2026-02-30", "no such date"),
                      ("yesterday", "expected a date as YYYY-MM-DD (got 'yesterday')"),
                      ("2026-1-1", "expected a date"), ("", "expected a date"), (" 2026-11-02", "expected a date"),
                      ("2026-11-02\n", "expected a date"), ("٢٠٢٦-١١-٠٢", "expected a date"),
                      ("1969-12-31", "dates start at 1970-01-01")):
        with pytest.raises(report.DateError, match=re.escape(says)):
            report.parse_date(bad)


@given(st.text(max_size=40))
def test_any_text_is_a_date_or_a_date_error(text):
    try:
        at = report.parse_date(text)
    except report.DateError as e:
        assert str(e) and "\n" not in str(e).replace(repr(text), "")
        return
    assert report.day_of(at) == text and at % DAY == 0


@given(st.dates(min_value=datetime.date(1970, 1, 1)))
def test_every_day_round_trips(day):
    at = report.parse_date(day.isoformat())
    assert report.day_of(at) == day.isoformat()
    assert report.day_of(at + DAY - 1) == day.isoformat()


def test_status_classes():
    assert [report.status_class(s) for s in ("5.1.1", "5.7.26", "4.4.7", " 5.2.2 ", "5.01.1", "2.0.0",
                                             "", "550", "5.1", "9.1.1", "5.1.1; x", "x" * 10_000)] == \
        ["5.1", "5.7", "4.4", "5.2", "5.1", "2.0", "unknown", "unknown", "unknown", "unknown", "unknown", "unknown"]


# -- the report's arithmetic ----------------------------------------------------------------
def test_one_week_counted_by_post_status_class_and_channel():
    ev = lambda at, who, action, how, detail="": Event(at, LIST, who, action, how, "", detail)  # noqa: E731
    events = [ev(T0 - 10 * DAY, "a@x.org", "subscribed", "cli"), ev(T0 - 10 * DAY, "b@x.org", "subscribed", "cli"),
              ev(T0 - 10 * DAY, "c@x.org", "subscribed", "cli"), ev(T0 - 10 * DAY, "d@x.org", "subscribed", "cli"),
              ev(T0 + 1 * DAY, "e@x.org", "subscribed", "mail"),
              ev(T0 + 1 * DAY + 5, "f@x.org", "subscribed", "web", "confirmed by link"),
              ev(T0 + 2 * DAY, "a@x.org", "unsubscribed", "web", "one-click unsubscribe"),
              ev(T0 + 3 * DAY, "b@x.org", "disabled", "bounce", "score 5"),
              ev(T0 + 4 * DAY, "c@x.org", "unsubscribed", "bounce", "score 5"),
              ev(T0 + 4 * DAY + 1, "d@x.org", "unsubscribed", "mail"),
              ev(T0 + 5 * DAY, "g@x.org", "subscribed", "owner", "approved with the CLI")]
    # Out of order on purpose: the report lists them oldest first.
    posts = [report.Post("P2", T0 + 3.5 * DAY, 4, 1), report.Post("P1", T0 + 0.5 * DAY, 4),
             report.Post("OLD", T0 - DAY, 4)]
    failures = [report.Failure(T0 + 0.6 * DAY, "P1", "b@x.org", True, "5.1.1"),
                report.Failure(T0 + 0.6 * DAY, "P1", "c@x.org", False, "4.4.7"),
                report.Failure(T0 + 3.6 * DAY, "p2", "c@x.org", True, "5.2.2"),     # a VERP code's, lower-cased
                report.Failure(T0 + 3.7 * DAY, "OLD", "c@x.org", True, "5.1.1"),     # an older post
                report.Failure(T0 + 3.8 * DAY, "", "z@x.org", False, ""),             # no post named
                report.Failure(T0 - 0.5 * DAY, "OLD", "b@x.org", True, "5.1.1")]      # before the period
    # Now: b (disabled), e, f, g are members; e, f, g receive posts.
    r = report.build(LIST, T0, T0 + 6.5 * DAY, posts, failures, events, 4, 3)
    assert [(p.post_id, p.recipients, p.refused, p.permanent, p.temporary, p.classes) for p in r.posts] == [
        ("P1", 4, 0, 1, 1, {"5.1": 1, "4.4": 1}), ("P2", 4, 1, 1, 0, {"5.2": 1})]
    assert (r.recipients, r.permanent, r.temporary, r.other_permanent, r.other_temporary) == (8, 2, 1, 1, 1)
    assert r.classes == {"5.1": 2, "4.4": 1, "5.2": 1, "unknown": 1}
    assert r.joined == {"mail": 1, "web": 1, "admin": 1, "other": 0}
    assert r.left == {"mail": 1, "one-click": 1, "web": 0, "admin": 0, "bounce": 1, "other": 0}
    assert (r.disabled_by_bounces, r.removed_by_bounces, r.enabled) == (1, 1, 0)
    assert (r.members_start, r.active_start, r.members_end, r.active_end) == (4, 4, 4, 3)
    assert [(d.date, d.members, d.active, d.posts, d.joined, d.left) for d in r.days] == [
        ("2026-11-02", 4, 4, 1, 0, 0), ("2026-11-03", 6, 6, 0, 2, 0), ("2026-11-04", 5, 5, 0, 0, 1),
        ("2026-11-05", 5, 4, 1, 0, 0), ("2026-11-06", 3, 2, 0, 0, 2), ("2026-11-07", 4, 3, 0, 1, 0),
        ("2026-11-08", 4, 3, 0, 0, 0)]
    data = r.as_json()
    assert data["totals"] == {"posts": 2, "recipients": 8, "permanent": 2, "temporary": 1, "permanent_rate": 0.25,
                              "temporary_rate": 0.125, "other_permanent": 1, "other_temporary": 1,
                              "classes": {"4.4": 1, "5.1": 2, "5.2": 1, "unknown": 1}}
    assert json.loads(json.dumps(data)) == data
    text = report.text(r)
    assert "Posts: 2; recipients: 8; permanent failures: 2 (25.0%); temporary failures: 1 (12.5%)" in text
    assert "Left: mail 1, one-click 1, web 0, admin 0, bounce 1, other 0" in text
    assert "By bounces: disabled 1, removed 1; enabled again: 0" in text
    rows = list(csv.DictReader(io.StringIO(report.csv_text(r))))
    assert [(x["record"], x["post_id"], x["permanent"], x["status_classes"]) for x in rows[:2]] == [
        ("post", "P1", "1", "4.4:1 5.1:1"), ("post", "P2", "1", "5.2:1")]
    assert [(x["date"], x["members"]) for x in rows[2:]] == [(d.date, str(d.members)) for d in r.days]


# A list's life, simulated forward as the stores record it: members the record never saw
# (a yaml file's), then subscribe, leave, disable and enable, each recorded only when it
# changes something, as the stores do.
ACTIONS = st.lists(st.tuples(st.sampled_from(["subscribed", "unsubscribed", "disabled", "enabled"]),
                             st.integers(0, 7), st.sampled_from(["mail", "web", "cli", "owner", "bounce", "config"]),
                             st.floats(0, 3 * DAY, allow_nan=False)), max_size=40)


@given(st.sets(st.integers(0, 7), max_size=5), ACTIONS, st.integers(0, 4), st.floats(0, 5 * DAY),
       st.lists(st.tuples(st.integers(0, 9), st.booleans(), st.sampled_from(["5.1.1", "4.4.1", "", "x"]),
                          st.floats(0, 12 * DAY)), max_size=30))
def test_sizes_worked_back_from_now_match_the_list_lived_forward(unseen, actions, since_days, gap, bounced):
    status = {f"m{i}@x.org": "active" for i in unseen}
    at = T0
    events, sizes = [], []         # sizes: (time, members, active) after each event
    for action, who, how, step in actions:
        at += step
        address = f"m{who}@x.org"
        current = status.get(address)
        if action == "subscribed" and current is None:
            status[address] = "active"
        elif action == "unsubscribed" and current is not None:
            del status[address]
        elif action == "disabled" and current == "active":
            status[address] = "disabled"
        elif action == "enabled" and current == "disabled":
            status[address] = "active"
        else:
            continue
        events.append(Event(at, LIST, address, action, how))
        sizes.append((at, len(status), sum(1 for s in status.values() if s == "active")))
    now = at + gap
    since = T0 + since_days * DAY
    posts = [report.Post(f"P{i}", T0 + i * DAY + 100, 10 + i) for i in range(10)]
    failures = [report.Failure(T0 + fat, f"P{p}", "m1@x.org", perm, status_) for p, perm, status_, fat in bounced]
    members, active = len(status), sum(1 for s in status.values() if s == "active")
    r = report.build(LIST, since, now, posts, failures, events, members, active)

    def lived(t):
        """(members, active) just before t."""
        before = [s for s in sizes if s[0] < t]
        if before:
            return before[-1][1:]
        return len(unseen), len(unseen)
    assert (r.members_end, r.active_end) == (members, active)
    assert (r.members_start, r.active_start) == lived(min(since, now))
    for d in r.days:
        end = report.parse_date(d.date) + DAY
        assert (d.members, d.active) == (lived(end) if end <= now else (members, active))
    in_period = [e for e in events if min(since, now) <= e.at <= now]
    assert sum(r.joined.values()) == sum(1 for e in in_period if e.action == "subscribed")
    assert sum(r.left.values()) == sum(1 for e in in_period if e.action == "unsubscribed")
    assert r.members_start + sum(r.joined.values()) - sum(r.left.values()) == r.members_end
    counted = [f for f in failures if min(since, now) <= f.at <= now]
    assert r.permanent + r.temporary + r.other_permanent + r.other_temporary == len(counted)
    assert sum(r.classes.values()) == len(counted)
    assert all(sum(p.classes.values()) == p.permanent + p.temporary for p in r.posts)
    assert sum(d.posts for d in r.days) == len(r.posts) and sum(d.recipients for d in r.days) == r.recipients
    assert sum(d.joined for d in r.days) == sum(r.joined.values())
    assert 0 <= r.as_json()["totals"]["permanent_rate"]
    report.text(r), report.csv_text(r)


def test_weekly_due():
    assert report.weekly_due(None, T0)
    assert not report.weekly_due(T0, T0 + 7 * DAY - 1)
    assert report.weekly_due(T0, T0 + 7 * DAY)


# -- what the milter records -------------------------------------------------------------------
def test_the_milter_records_each_post_it_expands(tmp_path, monkeypatch):
    w = _world(tmp_path, monkeypatch)
    try:
        w.new_list(LIST, ["m1@example.net", "m2@example.com", "m3@example.com"], posting="open")
        assert Session().send("carol@example.net", [LIST], post()) == Milter.ACCEPT
        [(post_id, at, recipients, refused)] = w.store.posts(LIST)
        assert (post_id, recipients, refused) == (QUEUE_ID, 3, 0)
    finally:
        w.store.close()


def test_the_milter_records_personal_copies_as_the_mta_took_them(tmp_path, monkeypatch):
    w = _world(tmp_path, monkeypatch, web=True)
    try:
        w.new_list(LIST, ["p1@example.net", "p2@example.com"], posting="open")
        assert Session().send("carol@example.net", [LIST], post()) == Milter.DISCARD
        assert len(w.submissions()) == 2
        assert [(p, n, refused) for p, _, n, refused in w.store.posts(LIST)] == [(QUEUE_ID, 2, 0)]
    finally:
        w.store.close()


def test_a_post_that_cannot_be_recorded_still_goes(tmp_path, monkeypatch, caplog):
    w = _world(tmp_path, monkeypatch)
    try:
        w.new_list(LIST, ["m1@example.net"], posting="open")

        def broken(*args, **kw):
            from listmilter.store import StoreError
            raise StoreError("disk full")
        monkeypatch.setattr(type(w.store), "record_post", broken)
        s = Session()
        assert s.send("carol@example.net", [LIST], post()) == Milter.ACCEPT
        assert ("addrcpt", "<m1@example.net>", "NOTIFY=FAILURE ORCPT=rfc822;m1@example.net") in s.ctx.edits
        assert "not recorded for the delivery report (StoreError: disk full); the post went out" in caplog.text
    finally:
        w.store.close()


# -- the CLI on a real SQLite store ------------------------------------------------------------
@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\n")
    return path


def test_report_cli_on_a_real_store(cfg):
    cli(cfg, "list", "create", LIST, "--owner", "owner@example.org")
    cli(cfg, "members", "add", LIST, "a@x.org", "b@x.org", "c@x.org")
    c = config.load(str(cfg))
    store, bounce_db = open_store(c), open_bounces(c)
    try:
        import time
        now = time.time()
        store.record_post(LIST, "POST1", now - 60, 3)
        bounce_db.record(LIST, Failure("b@x.org", True, "5.1.1"), Verdict.SCORED, "e", "POST1",
                         Policy("disable", 5), now - 30)
        bounce_db.record(LIST, Failure("c@x.org", False, "4.2.2"), Verdict.TEMPORARY, "e", "POST1", now=now - 30)
        assert store.unsubscribe(LIST, "a@x.org", "web", "192.0.2.1", "one-click unsubscribe")
        assert store.subscribe(LIST, Member("d@x.org"), "mail", "<m@x.org>")
    finally:
        store.close()
        bounce_db.close()
    data = json.loads(cli(cfg, "report", LIST, "--json").stdout)
    assert data["posts"][0]["post_id"] == "POST1"
    assert {k: data["posts"][0][k] for k in ("recipients", "permanent", "temporary", "classes")} == \
        {"recipients": 3, "permanent": 1, "temporary": 1, "classes": {"4.2": 1, "5.1": 1}}
    assert data["members"]["joined"] == {"mail": 1, "web": 0, "admin": 3, "other": 0}
    assert data["members"]["left"]["one-click"] == 1
    assert (data["members"]["start"], data["members"]["end"]) == (0, 3)
    assert len(data["days"]) == 30
    text = cli(cfg, "report", LIST).stdout
    assert text.startswith(f"Delivery report for {LIST}, ") and "POST1" in text
    rows = list(csv.DictReader(io.StringIO(cli(cfg, "report", LIST, "--csv", "--since", "2026-01-01").stdout)))
    assert rows[0]["record"] == "post" and rows[0]["recipients"] == "3" and rows[-1]["members"] == "3"
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    assert json.loads(cli(cfg, "report", LIST, "--json", "--since", today).stdout)["days"][0]["date"] == today

    for since, says in (("2026-02-30", "listmilter: --since: no such date: 2026-02-30"),
                        ("last week", "listmilter: --since: expected a date as YYYY-MM-DD (got 'last week')")):
        bad = cli(cfg, "report", LIST, "--since", since, check=False)
        assert (bad.returncode, bad.stdout, bad.stderr) == (64, "", says + "\n")
    missing = cli(cfg, "report", "nope@example.org", check=False)
    assert (missing.returncode, missing.stderr) == (66, "listmilter: no such list: nope@example.org\n")
    both = cli(cfg, "report", LIST, "--json", "--csv", check=False)
    assert both.returncode == 2 and "not allowed with" in both.stderr


# -- the weekly mail ---------------------------------------------------------------------------
def test_the_weekly_report_goes_to_the_owners_once_a_week(cfg, monkeypatch):
    cli(cfg, "list", "create", LIST, "--owner", "owner@example.org")
    cli(cfg, "list", "create", "quiet@example.org", "--owner", "owner@example.org")
    cli(cfg, "list", "set", LIST, "report_weekly", "true")
    cli(cfg, "members", "add", LIST, "a@x.org")
    sent: list[tuple[str, list[str], bytes]] = []
    fail = []

    def send(out, sender, recipients, message):
        if fail:
            raise outgoing.OutgoingError("connection refused")
        sent.append((sender, recipients, message))
    monkeypatch.setattr(outgoing, "send", send)
    c = config.load(str(cfg))
    store, bounce_db = open_store(c), open_bounces(c)
    try:
        now = T0 + 100 * DAY
        fail.append(1)
        assert [line for line in reports.periodic(c, store, bounce_db, now)] == [
            f"list=<{LIST}>, status=weekly report not sent, tried again later (connection refused)"]
        assert store.report_sent(LIST) is None
        fail.clear()
        assert list(reports.periodic(c, store, bounce_db, now)) == [
            f"list=<{LIST}>, status=weekly report sent, to=<owner@example.org>, posts=0"]
        [(sender, to, message)] = sent
        assert (sender, to) == ("", ["owner@example.org"])
        text = message.decode()
        assert f"Subject: Delivery report for {LIST}, " in text and "Joined: mail 0" in text
        assert list(reports.periodic(c, store, bounce_db, now + 7 * DAY - 1)) == []
        fail.append(1)      # a failure later leaves the last time as it was
        assert len(list(reports.periodic(c, store, bounce_db, now + 7 * DAY))) == 1
        assert store.report_sent(LIST) == now
        fail.clear()
        assert len(list(reports.periodic(c, store, bounce_db, now + 7 * DAY))) == 1 and len(sent) == 2
        assert store.report_sent("quiet@example.org") is None
    finally:
        store.close()
        bounce_db.close()


def test_a_held_post_counts_as_held_and_leaves_the_report_if_never_sent(tmp_path, monkeypatch):
    w = _world(tmp_path, monkeypatch)
    try:
        w.new_list(LIST, ["m1@example.net", "m2@example.net"], posting="open", moderated=True,
                   owners=["boss@example.org"])
        quarantined = []
        monkeypatch.setattr(ListMilter, "quarantine", lambda self, reason: quarantined.append(reason))  # not in TestCtx
        assert Session().send("carol@example.net", [LIST], post()) == Milter.ACCEPT
        assert quarantined and [(p, n) for p, _, n, _ in w.store.posts(LIST)] == [(QUEUE_ID, 2)]
        w.store.forget_post(LIST, QUEUE_ID)         # what app/held.py does for a rejected one
        assert w.store.posts(LIST) == []
    finally:
        w.store.close()
