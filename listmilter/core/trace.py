"""Follow a post through the mail log: `listmilter trace QUEUEID`.

Pure: lines in, lines out. A post can leave under several queue ids:
listmilter logs each one it made (split-off copies, refusal notices,
personal copies) as `queued_as=ID ...` on a line of the post's own queue id,
and Postfix logs the DSN it makes for a failed delivery as `ID: sender
non-delivery notification: NEWID`. The DSNs come back to `<list>-bounces@`,
whose `deliver:` lines carry the post's ENVID, which starts with the post's
queue id. Starting from any of those ids, the post is found again by going up
to the id that made it, then down to everything it made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_QUEUED_AS = re.compile(r"\bqueued_as=([0-9A-Za-z?]+(?: [0-9A-Za-z?]+)*)")
_NOTIFICATION = re.compile(r"\b([0-9A-Za-z]+): sender (?:non-delivery|delivery status|delay) notification: "
                           r"([0-9A-Za-z]+)")
_ID = re.compile(r"^[0-9A-Za-z]{5,}$")
_STATUS = re.compile(r"\bto=<([^>]*)>.*\bstatus=(\w+)")


@dataclass(frozen=True)
class Trace:
    root: str                  # the post's own queue id
    ids: tuple[str, ...]       # every queue id it produced, the root first
    lines: tuple[str, ...]     # the log lines about any of them, in log order
    statuses: dict[str, int]   # deliveries by Postfix status (sent, deferred, bounced ...)


def is_queue_id(text: str) -> bool:
    return bool(_ID.match(text))


def _links(lines: list[str]) -> tuple[dict[str, list[str]], dict[str, str], set[str]]:
    """(children of each queue id, parent of each child, the ids that are DSNs)."""
    children: dict[str, list[str]] = {}
    parent: dict[str, str] = {}
    notices: set[str] = set()

    def link(a: str, b: str) -> None:
        if b != "?" and b not in parent and b != a:
            children.setdefault(a, []).append(b)
            parent[b] = a
    for line in lines:
        m = _QUEUED_AS.search(line)
        if m:
            owner = re.search(r"\]: ([0-9A-Za-z]+): ", line) or re.match(r"([0-9A-Za-z]+): ", line)
            if owner:
                for child in m.group(1).split():
                    link(owner.group(1), child)
        m = _NOTIFICATION.search(line)
        if m:
            link(m.group(1), m.group(2))
            notices.add(m.group(2))
    return children, parent, notices


def follow(lines: list[str], queue_id: str) -> Trace | None:
    """Everything the log says about the post `queue_id` belongs to; None if it is not there."""
    children, parent, notices = _links(lines)
    root = queue_id
    while root in parent:
        root = parent[root]
    ids = [root]
    for current in ids:                     # grows while it is walked: breadth first
        ids.extend(c for c in children.get(current, ()) if c not in ids)
    words = re.compile(r"\b(" + "|".join(map(re.escape, ids)) + r")\b")
    found = [line for line in lines if words.search(line)]
    if not found:
        return None
    statuses: dict[str, int] = {}
    dsns = re.compile(r"\b(" + "|".join(map(re.escape, notices)) + r"): ") if notices else None
    for line in found:
        m = _STATUS.search(line)
        # Deliveries of the post; not those of the DSNs about it, nor listmilter's own lines.
        if m and " relay=" in line and not (dsns and dsns.search(line)):
            statuses[m.group(2)] = statuses.get(m.group(2), 0) + 1
    return Trace(root, tuple(ids), tuple(found), statuses)


_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                        "Oct", "Nov", "Dec"), 1)}
_SYSLOG_TIME = re.compile(r"^([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d)(\.\d+)?")
_ISO_TIME = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(\.\d+)?")


def _when(line: str) -> tuple[float, ...] | None:
    m = _ISO_TIME.match(line)
    if m:
        return tuple(float(g) for g in m.groups()[:6]) + (float(m.group(7) or 0),)
    m = _SYSLOG_TIME.match(line)
    if m and m.group(1) in _MONTHS:
        return (0.0, float(_MONTHS[m.group(1)]), *(float(g) for g in m.groups()[1:5]), float(m.group(6) or 0))
    return None


def merge(files: list[list[str]]) -> list[str]:
    """Lines of several logs (Postfix's and listmilter's own) in time order; one log as it is."""
    if len(files) == 1:
        return list(files[0])
    keyed: list[tuple[tuple[float, ...], int, str]] = []
    for f in files:
        last: tuple[float, ...] = ()
        for line in f:
            last = _when(line) or last        # a line without a time stays after the one before
            keyed.append((last, len(keyed), line))
    return [line for _, _, line in sorted(keyed)]
