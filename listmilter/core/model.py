"""The data every layer shares: a list, a member, a line of the consent record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from listmilter.core.errors import PermanentError


class NoSuchList(PermanentError, LookupError):
    pass


class ListExists(PermanentError, ValueError):
    pass


@dataclass(frozen=True)
class MailingList:
    address: str                       # canonical, lower case: dev@example.org
    settings: dict[str, Any] = field(default_factory=dict)   # the list's own settings only
    origin: str = ""                   # where it is defined, for `list show`


# Member status: who receives posts.
ACTIVE = "active"          # receives posts
DISABLED = "disabled"      # a member who receives nothing (bounces; may still post)
STATUSES = (ACTIVE, DISABLED)


@dataclass(frozen=True)
class Member:
    address: str
    name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    status: str = ACTIVE
    added: float = 0.0       # Unix time the member joined (0: unknown)


@dataclass(frozen=True)
class Event:
    """One line of the consent record: a membership change and how it was made."""
    at: float
    list: str
    address: str
    action: str     # subscribed, unsubscribed, disabled, enabled
    how: str        # cli, config, mail, web, bounce
    who: str = ""   # the admin user, the confirming Message-ID, the client address...
    detail: str = ""
