"""How listmilter writes a moment for people: in UTC, to the minute.

One form for notices, held-post mails and the admin commands, so an owner
can put a line of a notice beside a line of `listmilter bounces` or
`listmilter secret show`. (The delivery report writes its columns without
the suffix; its heading says UTC once.)
"""

from __future__ import annotations

import time


def utc_minute(t: float | None) -> str:
    """`2026-12-03 12:30 UTC`; `-` for no time (None or 0: never happened)."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) if t else "-"
