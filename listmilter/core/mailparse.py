"""Reading a message: the one way every edge parses mail (pipe transport, bounces, commands).

Python's compat32 policy hands back an `email.header.Header` object, not a
str, for a header with 8-bit bytes, and keeps folded values folded; code that
calls `.split()` or writes the value into a new header then fails, and the
mail is retried for days. Here the parsing is compat32's (flufl.bounce's
detectors expect its Message objects) but every header value read is a plain
str, through `text`: unfolded, 8-bit bytes read as UTF-8 (RFC 6532), bytes
that are not UTF-8 shown as U+FFFD.

`parse` never raises: a MIME structure Python cannot take whole (nested past
MAX_DEPTH, where walking it would hit the recursion limit) is read for its
headers only, which is what a message that cannot be understood gets anyway.
`body_text`, the text a command is read from, is '' for a body it cannot read.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import re

MAX_DEPTH = 50          # MIME nesting; real mail stays under ten

_ESCAPED = re.compile("[\udc80-\udcff]+")      # bytes the parser could not decode (surrogateescape)
_SURROGATE = re.compile("[\ud800-\udfff]")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_MSGID = re.compile(r"<[^<>\s\x00-\x1f\x7f]{1,250}>")


def _undo_escape(m: re.Match[str]) -> str:
    return m.group().encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def text(value: object) -> str:
    """A header value as one line of text, whatever the parser or the MTA gave (str, Header, bytes, None)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value)
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", _ESCAPED.sub(_undo_escape, value))
    if "\n" in value or "\r" in value:
        value = _FOLD.sub("", value).replace("\r", " ").replace("\n", " ")
    return value


def one_line(value: object) -> str:
    """`text(value)` fit to quote in a notice or a header we write: control characters (a
    hostile message may carry any) and runs of white space become one space."""
    return " ".join("".join(c if c.isprintable() else " " for c in text(value)).split())


def message_id(value: object) -> str:
    """The msg-id of a Message-ID header (its first <...>), '' if it has none."""
    m = _MSGID.search(text(value))
    return m.group() if m else ""


class _TextPolicy(email.policy.Compat32):
    """compat32, except that a header value read is always a str (see `text`)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return text(value)


POLICY = _TextPolicy()


def _depth(msg: email.message.Message) -> int:
    deepest, stack = 0, [(msg, 1)]
    while stack:
        part, depth = stack.pop()
        deepest = max(deepest, depth)
        # Only multipart payloads: get_payload() of a text part decodes it with the
        # part's own charset, and raises for some (idna, a name with a NUL).
        if part.is_multipart() and depth <= MAX_DEPTH:
            stack.extend((p, depth + 1) for p in part.get_payload() if isinstance(p, email.message.Message))
    return deepest


def _whole(data: bytes) -> email.message.Message | None:
    try:
        msg = email.parser.BytesParser(policy=POLICY).parsebytes(data)
    except Exception:       # RecursionError on deep nesting, or whatever else hostile bytes bring
        return None
    return msg if _depth(msg) <= MAX_DEPTH else None


def readable(data: bytes) -> bool:
    """Whether `parse` reads all of `data`, not only its headers (see MAX_DEPTH)."""
    return _whole(data) is not None


def parse(data: bytes, headers_only: bool = False) -> email.message.Message:
    """The message in `data`; never raises (see the module's docstring)."""
    msg = None if headers_only else _whole(data)
    if msg is not None:
        return msg
    try:
        return email.parser.BytesParser(policy=POLICY).parsebytes(data, headersonly=True)
    except Exception:       # the stdlib's parser on hostile bytes: nothing readable, an empty message
        return email.message.Message(policy=POLICY)


def payload_text(part: email.message.Message) -> str:
    """The body of a non-multipart part as text: transfer encoding undone, then its charset
    (UTF-8 when it names none or one Python cannot use for text). Never raises, unlike
    compat32's get_payload(), which decodes with whatever charset the sender named."""
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    charset = part.get_content_charset() if len(part.get("Content-Type", "")) <= 1000 else None
    try:
        return raw.decode(charset or "utf-8", "replace")
    except (LookupError, ValueError):    # unknown, or a codec that is no text charset (idna, a NUL)
        return raw.decode("utf-8", "replace")


def body_text(data: bytes, limit: int) -> str:
    """The text a reader sees first: the first text/plain part that is no attachment, decoded,
    at most `limit` characters ('' if there is none). Never raises.

    Read with this module's policy, not policy.default, whose header parser
    takes minutes on a 60 KB Content-Type a sender can write.
    """
    for part in parse(data).walk():
        if part.get_content_type() == "text/plain" and not \
                part.get("Content-Disposition", "").strip().lower().startswith("attachment"):
            return payload_text(part)[:limit]
    return ""
