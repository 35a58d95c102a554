"""Sendmail's quarantine, read: what `mailq -qQ` (`sendmail -bp -qQ`) prints, and which queue ids
may name files. Pure functions; app/holdqueue.py runs the commands and touches the files.

A post the milter quarantines stays in Sendmail's queue folder with its control file renamed
from qf<ID> to hf<ID> (its `q` line holds the reason); the data file stays df<ID>. The listing:

            /var/spool/mqueue (1 request)
    -----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------
    6B2LbAjB025887      305 Wed Dec  2 21:37 <a@example.net>
         QUARANTINE: listmilter: held for the owners of dev@example.org: ...
                                             <b@example.net>
                    Total requests: 1

(checked with Sendmail 8.17.1.9). An entry's first line may end with `*` after the id (being
delivered) or carry a status line (`(Deferred: ...)`) after it.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, replace

# Sendmail's ids are 14 letters and digits (8.12 on); accepting a little more costs nothing. Only
# such an id ever becomes part of a file name or of a `-qI` match.
_ID = re.compile(r"[A-Za-z0-9]{8,20}")
_FOLDER = re.compile(r"^\s+(/\S.*?) \(\d+ requests?\)$")
_EMPTY = re.compile(r"^\s*(/\S.*?) is empty$")
_ENTRY = re.compile(r"^([A-Za-z0-9]{8,20})[*X-]?\s+(\d+)\s+(\w{3} \w{3} [ \d]\d \d\d:\d\d)\s+<(.*)>\s*$")
_RECIPIENT = re.compile(r"^\s+<(.*)>\s*$")


@dataclass(frozen=True)
class Entry:
    queue_id: str
    folder: str           # the queue folder it is in (a header line of the listing)
    size: int             # bytes of the body
    arrival: float        # 0.0 when the listing's date cannot be read
    sender: str
    recipients: int
    reason: str           # the quarantine reason; "" for an entry that is not quarantined


def valid_id(queue_id: str) -> bool:
    return bool(_ID.fullmatch(queue_id))


def arrival(text: str, now: float) -> float:
    """The listing's `Wed Dec  2 21:37` (local time, no year) as a time: the latest such moment
    not after `now` plus a day (a queue holds nothing from the future, clocks drift a little)."""
    try:
        moment = datetime.datetime.strptime(" ".join(text.split()[1:]), "%b %d %H:%M")
    except ValueError:
        return 0.0
    today = datetime.datetime.fromtimestamp(now)
    for year in (today.year, today.year - 1):
        try:
            when = moment.replace(year=year).timestamp()
        except ValueError:          # 29 February in a year without one
            continue
        if when <= now + 86400:
            return when
    return 0.0


def parse_listing(text: str, now: float) -> list[Entry]:
    """The entries of a `sendmail -bp` listing (with -qQ: the quarantined ones), in order."""
    out: list[Entry] = []
    folder = ""
    for line in text.splitlines():
        if m := _FOLDER.match(line) or _EMPTY.match(line):
            folder = m.group(1)
        elif m := _ENTRY.match(line):
            out.append(Entry(m.group(1), folder, int(m.group(2)), arrival(m.group(3), now), m.group(4), 0, ""))
        elif out and out[-1].folder == folder and line.strip().startswith("QUARANTINE:"):
            out[-1] = replace(out[-1], reason=line.strip()[len("QUARANTINE:"):].strip())
        elif out and out[-1].folder == folder and _RECIPIENT.match(line):
            out[-1] = replace(out[-1], recipients=out[-1].recipients + 1)
    return out
