"""Delivery reports (`listmilter report`, the weekly mail to the owners): pure arithmetic over rows.

Everything counted here is what listmilter recorded when it happened, never
the mail log read back:

- posts: one row per post sent to the list (the `posts` table of the list
  store, written by the milter or the fan-out when the MTA took the copies):
  its post id (the Postfix queue id in the ENVID and VERP codes), when, and
  how many recipients the MTA took;
- failures: the bounce records (bounces.sqlite or PostgreSQL's `bounces`),
  each naming the post its ENVID or VERP code named, at most once per post,
  member and permanence;
- events: the consent record (subscribed, unsubscribed, disabled, enabled,
  with `how`: mail, web, cli, owner, config, bounce).

The list's size over time is worked back from its size now: each event
after a moment is undone, so the sizes are right for as far back as the
consent record goes, also for members it never saw join (a yaml list's file).
Times are seconds since the epoch; days are UTC days.
"""

from __future__ import annotations

import bisect
import csv
import datetime
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from listmilter.core.errors import PermanentError
from listmilter.core.model import Event

DAY = 86400.0
JOIN_CHANNELS = ("mail", "web", "admin", "other")
LEAVE_CHANNELS = ("mail", "one-click", "web", "admin", "bounce", "other")
UNKNOWN_CLASS = "unknown"
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.[0-9]{1,3}")


class DateError(PermanentError, ValueError):
    """A date the admin typed that is not YYYY-MM-DD."""


def parse_date(text: str) -> float:
    """YYYY-MM-DD (a UTC day, from 1970-01-01) as the epoch seconds of its start."""
    if not isinstance(text, str) or not _DATE.fullmatch(text):
        raise DateError(f"expected a date as YYYY-MM-DD (got {text!r})")
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise DateError(f"no such date: {text}") from None
    if day.year < 1970:
        raise DateError(f"dates start at 1970-01-01 (got {text})")
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def day_of(at: float) -> str:
    """The UTC day of a time, YYYY-MM-DD."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")


def fmt_time(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def status_class(status: str) -> str:
    """An RFC 3463 status's class and subject ("5.1" for 5.1.1: a bad mailbox address), or "unknown"."""
    m = _STATUS.fullmatch(status.strip()) if isinstance(status, str) else None
    return f"{m.group(1)}.{int(m.group(2))}" if m else UNKNOWN_CLASS


def channel(how: str, detail: str = "") -> str:
    """How a membership changed, as the report groups it."""
    if how == "mail":
        return "mail"
    if how == "web":
        return "one-click" if detail.startswith("one-click") else "web"
    if how in ("cli", "owner", "config"):
        return "admin"
    if how == "bounce":
        return "bounce"
    return "other"


@dataclass(frozen=True)
class Post:
    """A post sent to the list (the `posts` table)."""
    post_id: str
    at: float
    recipients: int
    refused: int = 0        # copies the MTA refused at once (personal copies only)


@dataclass(frozen=True)
class Failure:
    """One bounce record: a failed delivery of a post to an address."""
    at: float
    post_id: str
    address: str
    permanent: bool
    status: str = ""


@dataclass(frozen=True)
class PostLine:
    post_id: str
    at: float
    recipients: int
    refused: int
    permanent: int
    temporary: int
    classes: dict[str, int]


@dataclass(frozen=True)
class Day:
    date: str
    members: int            # at the end of the day (or now, for today)
    active: int
    posts: int
    recipients: int
    permanent: int
    temporary: int
    joined: int
    left: int


@dataclass(frozen=True)
class Report:
    list: str
    since: float
    until: float
    posts: tuple[PostLine, ...]
    other_permanent: int        # failures received in the period for no post of it (older, or none named)
    other_temporary: int
    classes: dict[str, int]     # every failure of the period by status class
    joined: dict[str, int]
    left: dict[str, int]
    disabled_by_bounces: int
    removed_by_bounces: int
    enabled: int
    members_start: int
    active_start: int
    members_end: int
    active_end: int
    days: tuple[Day, ...] = field(default=())

    @property
    def recipients(self) -> int:
        return sum(p.recipients for p in self.posts)

    @property
    def permanent(self) -> int:
        return sum(p.permanent for p in self.posts)

    @property
    def temporary(self) -> int:
        return sum(p.temporary for p in self.posts)

    def as_json(self) -> dict[str, Any]:
        return {
            "list": self.list, "since": day_of(self.since), "until": fmt_time(self.until),
            "totals": {"posts": len(self.posts), "recipients": self.recipients, "permanent": self.permanent,
                       "temporary": self.temporary, "permanent_rate": rate(self.permanent, self.recipients),
                       "temporary_rate": rate(self.temporary, self.recipients),
                       "other_permanent": self.other_permanent, "other_temporary": self.other_temporary,
                       "classes": dict(sorted(self.classes.items()))},
            "posts": [{"post_id": p.post_id, "sent": fmt_time(p.at), "recipients": p.recipients,
                       "refused": p.refused, "permanent": p.permanent, "temporary": p.temporary,
                       "classes": dict(sorted(p.classes.items()))} for p in self.posts],
            "members": {"start": self.members_start, "end": self.members_end,
                        "active_start": self.active_start, "active_end": self.active_end,
                        "joined": self.joined, "left": self.left,
                        "disabled_by_bounces": self.disabled_by_bounces,
                        "removed_by_bounces": self.removed_by_bounces, "enabled": self.enabled},
            "days": [{"date": d.date, "members": d.members, "active": d.active, "posts": d.posts,
                      "recipients": d.recipients, "permanent": d.permanent, "temporary": d.temporary,
                      "joined": d.joined, "left": d.left} for d in self.days],
        }


def rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _delta(event: Event, before: str | None) -> tuple[int, int]:
    """(members, active) an event added; `before` is the member's status just before it."""
    if event.action == "subscribed":
        return (1, 1) if before is None else (0, 0)
    if event.action == "unsubscribed":
        return (0, 0) if before is None else (-1, -1 if before == "active" else 0)
    if event.action == "disabled":
        return (0, -1) if before == "active" else (0, 0)
    if event.action == "enabled":
        return (0, 1) if before == "disabled" else (0, 0)
    return 0, 0


def _deltas(events: Sequence[Event]) -> list[tuple[float, int, int]]:
    """(at, members, active) of each event, oldest first. A member the record never saw join
    (before the record, or in a yaml list's file) counts as an active member until it says otherwise."""
    status: dict[str, str | None] = {}
    out = []
    for e in sorted(events, key=lambda e: e.at):
        key = e.address.lower()
        before = status.get(key, None if e.action == "subscribed" else "active")
        out.append((e.at, *_delta(e, before)))
        if e.action == "subscribed":
            status[key] = "active" if before is None else before
        elif e.action == "unsubscribed":
            status[key] = None
        elif e.action in ("disabled", "enabled") and before is not None:
            status[key] = "disabled" if e.action == "disabled" else "active"
    return out


def build(list_address: str, since: float, now: float, posts: Iterable[Post], failures: Iterable[Failure],
          events: Iterable[Event], members_now: int, active_now: int) -> Report:
    """The report of [since, now]. `failures` and `events` may hold rows outside it (ignored);
    `events` should be the list's whole consent record, for the sizes."""
    since = min(since, now)
    period_posts = sorted((p for p in posts if since <= p.at <= now), key=lambda p: (p.at, p.post_id))
    by_id: dict[str, dict[str, Any]] = {}
    for p in period_posts:
        by_id.setdefault(p.post_id, {"post": p, "permanent": 0, "temporary": 0, "classes": {}})
    # A bounce bound by a VERP code alone names the post lower-cased (core/verp.py); queue ids
    # that differ only in case are not worth telling apart here.
    by_lower: dict[str, dict[str, Any]] = {}
    for pid, v in by_id.items():
        by_lower.setdefault(pid.lower(), v)
    other_permanent = other_temporary = 0
    classes: dict[str, int] = {}
    for f in failures:
        if not since <= f.at <= now:
            continue
        cls = status_class(f.status)
        classes[cls] = classes.get(cls, 0) + 1
        line = (by_id.get(f.post_id) or by_lower.get(f.post_id.lower())) if f.post_id else None
        if line is None:
            if f.permanent:
                other_permanent += 1
            else:
                other_temporary += 1
            continue
        line["permanent" if f.permanent else "temporary"] += 1
        line["classes"][cls] = line["classes"].get(cls, 0) + 1
    lines = tuple(PostLine(v["post"].post_id, v["post"].at, v["post"].recipients, v["post"].refused,
                           v["permanent"], v["temporary"], v["classes"]) for v in by_id.values())

    all_events = list(events)
    joined = dict.fromkeys(JOIN_CHANNELS, 0)
    left = dict.fromkeys(LEAVE_CHANNELS, 0)
    disabled = removed = enabled = 0
    for e in all_events:
        if not since <= e.at <= now:
            continue
        ch = channel(e.how, e.detail)
        if e.action == "subscribed":
            joined[ch if ch in joined else "other"] += 1
        elif e.action == "unsubscribed":
            left[ch] += 1
            removed += ch == "bounce"
        elif e.action == "disabled":
            disabled += ch == "bounce"
        elif e.action == "enabled":
            enabled += 1

    # Suffix sums over the changes up to now: the size before any time is one bisect away.
    deltas = [d for d in _deltas(all_events) if d[0] <= now]
    ats = [at for at, _, _ in deltas]
    after_members, after_active = [0] * (len(deltas) + 1), [0] * (len(deltas) + 1)
    for i in range(len(deltas) - 1, -1, -1):
        after_members[i] = after_members[i + 1] + deltas[i][1]
        after_active[i] = after_active[i + 1] + deltas[i][2]

    def size_before(t: float) -> tuple[int, int]:
        """(members, active) just before time t: now's, with every change from t on undone."""
        i = bisect.bisect_left(ats, t)
        return members_now - after_members[i], active_now - after_active[i]

    first = parse_date(day_of(since))
    per_day: dict[int, list[int]] = {}      # day number -> [posts, recipients, permanent, temporary, joined, left]
    for ln in lines:
        row = per_day.setdefault(int((ln.at - first) // DAY), [0] * 6)
        row[0] += 1
        row[1] += ln.recipients
        row[2] += ln.permanent
        row[3] += ln.temporary
    for e in all_events:
        if since <= e.at <= now and e.action in ("subscribed", "unsubscribed"):
            per_day.setdefault(int((e.at - first) // DAY), [0] * 6)[4 if e.action == "subscribed" else 5] += 1
    days = []
    n = 0
    while first + n * DAY <= now:
        start = first + n * DAY
        # At the day's end (before the next day's first change), or now for today.
        members, active = size_before(start + DAY) if start + DAY <= now else (members_now, active_now)
        days.append(Day(day_of(start), members, active, *per_day.get(n, [0] * 6)))
        n += 1
    members_start, active_start = size_before(since)
    return Report(list_address, since, now, lines, other_permanent, other_temporary, classes, joined, left,
                  disabled, removed, enabled, members_start, active_start, members_now, active_now, tuple(days))


def _classes(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"


def _pct(part: int, whole: int) -> str:
    return f"{100 * rate(part, whole):.1f}%"


def text(report: Report) -> str:
    """The report as an admin reads it (the CLI's default and the weekly mail's body)."""
    r = report
    out = [f"Delivery report for {r.list}, {day_of(r.since)} to {fmt_time(r.until)} (UTC)", ""]
    out.append(f"Posts: {len(r.posts)}; recipients: {r.recipients}; permanent failures: {r.permanent} "
               f"({_pct(r.permanent, r.recipients)}); temporary failures: {r.temporary} "
               f"({_pct(r.temporary, r.recipients)})")
    if r.posts:
        out.append("")
        out.append(f"  {'post':<14} {'sent (UTC)':<16} {'recipients':>10} {'refused':>7} {'permanent':>9} "
                   f"{'temporary':>9}  status classes")
        for p in r.posts:
            out.append(f"  {p.post_id:<14} {fmt_time(p.at):<16} {p.recipients:>10} {p.refused:>7} "
                       f"{p.permanent:>9} {p.temporary:>9}  {_classes(p.classes)}")
    out.append("")
    out.append(f"Failures of the period by status class: {_classes(r.classes)}")
    out.append(f"Failures for no post of the period (older posts, or none named): permanent {r.other_permanent}, "
               f"temporary {r.other_temporary}")
    out.append("")
    out.append(f"Members: {r.members_start} -> {r.members_end} (receiving posts: {r.active_start} -> {r.active_end})")
    out.append("Joined: " + ", ".join(f"{k} {v}" for k, v in r.joined.items()))
    out.append("Left: " + ", ".join(f"{k} {v}" for k, v in r.left.items()))
    out.append(f"By bounces: disabled {r.disabled_by_bounces}, removed {r.removed_by_bounces}; "
               f"enabled again: {r.enabled}")
    if r.days:
        out.append("")
        out.append(f"  {'day':<10} {'members':>8} {'active':>7} {'posts':>6} {'recipients':>10} {'permanent':>9} "
                   f"{'temporary':>9} {'joined':>6} {'left':>5}")
        for d in r.days:
            out.append(f"  {d.date:<10} {d.members:>8} {d.active:>7} {d.posts:>6} {d.recipients:>10} "
                       f"{d.permanent:>9} {d.temporary:>9} {d.joined:>6} {d.left:>5}")
    return "\n".join(out) + "\n"


CSV_HEADER = ("record", "date", "post_id", "sent", "recipients", "refused", "permanent", "temporary",
              "status_classes", "members", "active", "posts", "joined", "left")


def csv_text(report: Report) -> str:
    """One row per post (record=post) and per day (record=day), under one header."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for p in report.posts:
        w.writerow(["post", day_of(p.at), p.post_id, fmt_time(p.at), p.recipients, p.refused, p.permanent,
                    p.temporary, _classes(p.classes), "", "", "", "", ""])
    for d in report.days:
        w.writerow(["day", d.date, "", "", d.recipients, "", d.permanent, d.temporary, "", d.members, d.active,
                    d.posts, d.joined, d.left])
    return buf.getvalue()


def weekly_due(last_sent: float | None, now: float) -> bool:
    """Whether a list's weekly report is due: never sent, or sent a week ago or more."""
    return last_sent is None or now - last_sent >= 7 * DAY
