"""Which command a message to a list's role address is, and whether to ignore it. Pure functions.

    <list>-subscribe@        subscribe (any message)
    <list>-unsubscribe@      unsubscribe (any message)
    <list>-confirm+TOKEN@    confirm TOKEN (also when the token is only in the Subject)
    <list>-request@          the first word of the Subject, else of the first body
                             lines: subscribe/join, unsubscribe/leave, help, or
                             "confirm TOKEN"; anything else is answered with help

Never answered (RFC 3834; logged by the caller): the null sender, messages
with Auto-Submitted other than "no", Precedence bulk/junk/list, and messages
carrying this list's own List-Id (a loop).
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

from listmilter.core import addresses, tokens


class Verb(StrEnum):
    """What a command asks for."""
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    CONFIRM = "confirm"
    HELP = "help"


SUBSCRIBE, UNSUBSCRIBE, CONFIRM, HELP = Verb.SUBSCRIBE, Verb.UNSUBSCRIBE, Verb.CONFIRM, Verb.HELP

_WORDS = {
    "subscribe": SUBSCRIBE, "join": SUBSCRIBE,
    "unsubscribe": UNSUBSCRIBE, "leave": UNSUBSCRIBE, "signoff": UNSUBSCRIBE, "remove": UNSUBSCRIBE,
    "help": HELP, "info": HELP,
    "confirm": CONFIRM,
}
_REPLY = re.compile(r"^\s*((re|aw|sv|antw|fwd?|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
BODY_LINES = 5      # how many non-empty, non-quoted body lines are read for a command


@dataclass(frozen=True)
class Command:
    kind: str                 # subscribe, unsubscribe, confirm, help
    address: str = ""         # whom it concerns: the From: address, else the envelope sender
    name: str = ""            # the display name from From:
    token: str = ""           # confirm only
    message_id: str = ""


def ignore_reason(sender: str, message_headers: dict[str, list[str]], list_id: str) -> str | None:
    """Why a message must not be answered (None: answer it). Header names in lower case."""
    if not sender:
        return "null sender"
    for value in message_headers.get("auto-submitted", []):
        if value.strip().split(";")[0].strip().lower() != "no":
            return f"auto-submitted: {value.strip()}"
    for value in message_headers.get("precedence", []):
        if value.strip().lower() in ("bulk", "junk", "list"):
            return f"precedence: {value.strip()}"
    for value in message_headers.get("list-id", []):
        if f"<{list_id.lower()}>" in value.lower():
            return "mail loop: the message carries this list's List-Id"
    if message_headers.get("x-loop"):
        return "mail loop: X-Loop"
    return None


def _first_word(text: str) -> tuple[str | None, str]:
    text = _REPLY.sub("", text or "").strip()
    word, _, rest = text.partition(" ")
    return _WORDS.get(word.strip(":,.!").lower()), rest


def body_lines(body: str) -> list[str]:
    out = []
    for line in (body or "").splitlines():
        line = line.strip()
        if not line or line.startswith(">"):
            continue
        if line.startswith("--"):            # signature or MIME boundary: stop
            break
        out.append(line)
        if len(out) >= BODY_LINES:
            break
    return out


_BRACKETED = re.compile(rb"\[(?:IPv6:)?([0-9A-Fa-f:.]{1,45})\]")
HEAD_SCAN = 64 * 1024       # bytes of a message searched for its first Received: header


def received_client(data: bytes) -> str:
    """The SMTP client's IP address from the topmost Received: header ("" when unknown).

    The pipe transport is not told the client; the MTA that handed us the
    message wrote it first in its own Received: header, above any the client
    brought: Postfix `from HELO (NAME [ADDR])`, Sendmail likewise, then a
    folded line `by ...`. Only that first header counts, and on its first
    line only the last [ADDR]: the HELO name before it is the client's own
    choice. Locally submitted mail (`Received: by ...`) has no client.
    """
    for line in data[:HEAD_SCAN].split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            return ""                        # end of the header: no Received: at all
        if line[:9].lower() == b"received:":
            found = _BRACKETED.findall(line)
            if not found:
                return ""
            try:
                return str(ipaddress.ip_address(found[-1].decode("ascii")))
            except ValueError:
                return ""
    return ""


def who(sender: str, from_header: str | None) -> tuple[str, str]:
    """(address, name) a command concerns: From: if it is a valid address, else the envelope sender."""
    if from_header:
        name, address = email.utils.parseaddr(from_header)
        if addresses.is_valid(address):
            return address, name
    return sender, ""


def parse(role: str, extension: str, sender: str, from_header: str | None, subject: str | None,
          body: str, message_id: str = "") -> Command:
    """The command of a message to `role` (request, subscribe, unsubscribe, confirm)."""
    address, name = who(sender, from_header)
    base = dict(address=address, name=name, message_id=message_id)
    if role == "subscribe":
        return Command(SUBSCRIBE, **base)
    if role == "unsubscribe":
        return Command(UNSUBSCRIBE, **base)
    if role == "confirm":
        # Anything that is no token is "" (an unknown token), never looked up.
        token = extension.lower() if tokens.TOKEN_RE.fullmatch(extension.lower()) else \
            (tokens.find_token(subject or "") or "")
        return Command(CONFIRM, token=token, **base)
    # -request@: the Subject first, then the first lines of the body
    found = tokens.find_token(subject or "")
    if found:
        return Command(CONFIRM, token=found, **base)
    kind, _ = _first_word(subject or "")
    if kind and kind != CONFIRM:
        return Command(kind, **base)
    for line in body_lines(body):
        found = tokens.find_token(line)
        if found:
            return Command(CONFIRM, token=found, **base)
        kind, _ = _first_word(line)
        if kind and kind != CONFIRM:
            return Command(kind, **base)
    return Command(HELP, **base)
