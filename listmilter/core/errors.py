"""One error hierarchy for everything listmilter raises on purpose.

Each edge maps these to its own answer in one place:

    kind        milter       pipe (deliver)   CLI                  web
    temporary   451 4.3.0    exit 75          exit 75              503
    permanent   550 / 5xx    exit 0 + log     exit 1 (or its own)  400/404

"Temporary" means a retry can fix it (a locked store, a full disk, the MTA
not answering, a config being fixed): the MTA keeps the mail and retries.
"Permanent" means it never will: refuse once or keep it, never retry.
"""

from __future__ import annotations


class ListmilterError(Exception):
    """Base of listmilter's own errors."""
    temporary = False


class TemporaryError(ListmilterError):
    """A retry can fix it: tempfail (451 / exit 75 / HTTP 503)."""
    temporary = True


class PermanentError(ListmilterError):
    """No retry will fix it: refuse or keep, once."""
    temporary = False
