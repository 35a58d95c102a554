"""The fan-out address and the fan-out's progress record: a personal post waits in the MTA's queue.

A post to a list delivered per member (a one-click link or a footer with
each member's own values, plan.personal) is not copied while the poster waits. When
`outgoing.reinject` names the MTA's listener without milters, the milter
replaces the post's list recipients with one address,

    <list-local>-fanout+CODE@domain       CODE = POSTID-TIME-MAC (core/verp.py's form)

and the MTA answers the poster 250 as for any other message. The socketmap
routes that address to the pipe transport, and that `listmilter deliver`
process sends the copies (app/fanout.py). The post stays in the MTA's queue
until `deliver` says it is done: if it dies, the MTA retries the pipe and the
fan-out goes on from its progress record.

The MAC (a key of its own, "fanout") binds list, post id and time: an outsider
who writes to `dev-fanout+...@` cannot make a post go to the members
(the milter refuses the address at RCPT too), and replaying a code only finds
its post's record done.

The record names the last member done, by address key: members are sent in
key order, so after a crash the members above it are left, whoever joined
or left meanwhile.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

from listmilter.core import addresses, verp
from listmilter.core.keys import Keyring

USE = "fanout"
ROLE = "fanout"
_MEMBER = ""        # a fan-out code names a post, not a member


def address(list_address: str, post_id: str, posted_at: float, secret: Keyring | bytes) -> str:
    """The address a post to `list_address` waits at in the MTA's queue."""
    return addresses.role_address(list_address, ROLE,
                                  verp.code(list_address, _MEMBER, post_id, posted_at, secret, USE))


def verified(list_address: str, extension: str, secret: Keyring | bytes, now: float) -> verp.Code | None:
    """The post a fan-out address's extension names, if its MAC verifies and its time is
    one a queued post can have; None for anything else. Never raises."""
    parsed = verp.parse(extension)
    if parsed is None or not verp.fresh(parsed, now):
        return None
    return parsed if verp.verify(parsed, list_address, _MEMBER, secret, USE) else None


def post_key(post_id: str, posted_at: float) -> str:
    """The name of a post's record: the queue id alone may be used again by a later message."""
    return f"{post_id.lower()}-{int(posted_at)}"


@dataclass(frozen=True)
class Progress:
    """How far a post's fan-out got. `after`: the key of the last member whose copy the MTA
    took (or refused for good); "" when none was yet."""
    list_address: str
    post_id: str
    posted_at: float
    started: float
    updated: float = 0.0
    after: str = ""
    sent: int = 0
    refused: int = 0
    members: int = 0            # members left when the current attempt began, plus those done
    attempts: int = 0
    done: bool = False

    def advanced(self, last_member: str, sent: int, refused: int, now: float) -> Progress:
        return replace(self, after=addresses.key(last_member), sent=self.sent + sent,
                       refused=self.refused + refused, updated=now)

    @property
    def left(self) -> int:
        return 0 if self.done else max(0, self.members - self.sent - self.refused)

    def dumps(self) -> bytes:
        lines = [f"list {self.list_address}", f"post {self.post_id}", f"posted {self.posted_at:.0f}",
                 f"started {self.started:.3f}", f"updated {self.updated:.3f}", f"after {self.after}",
                 f"sent {self.sent}", f"refused {self.refused}", f"members {self.members}",
                 f"attempts {self.attempts}", f"done {int(self.done)}"]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def loads(data: bytes) -> Progress | None:
    """A record as `dumps` wrote it; None for anything else (a torn or foreign file)."""
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        name, _, value = line.partition(" ")
        fields[name] = value
    try:
        return Progress(fields["list"], fields["post"], float(fields["posted"]), float(fields["started"]),
                        float(fields["updated"]), fields["after"], int(fields["sent"]), int(fields["refused"]),
                        int(fields["members"]), int(fields["attempts"]), fields["done"] == "1")
    except (KeyError, ValueError):
        return None


def in_order(found: list[tuple[str, str]], after: str) -> list[tuple[str, str]]:
    """The (member, list it is on) pairs still to do, in the order the record counts them (by
    the member's address key). Sorts `found` in place: no second copy of a big list is made."""
    def key(pair: tuple[str, str]) -> str:
        return addresses.key(pair[0])
    found.sort(key=key)
    return found[bisect.bisect_right(found, after, key=key):]
