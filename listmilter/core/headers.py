"""The header edits of a list post: RFC 2919 List-Id, RFC 2369 List-*, Subject prefix."""

from __future__ import annotations

import email.header
import re

from listmilter.core import addresses, mailparse

# Headers a list owns: any earlier copies (from another list upstream) are
# replaced by this list's own.
LIST_HEADERS = ("List-Id", "List-Post", "List-Help", "List-Subscribe", "List-Unsubscribe",
                "List-Unsubscribe-Post", "List-Owner", "List-Archive", "Precedence")

_UNDECODED = re.compile("[\ud800-\udfff]")
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|sv|antw|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


def list_id(list_address: str, configured: str = "") -> str:
    """The List-Id value without brackets: dev.example.org for dev@example.org."""
    return configured or list_address.replace("@", ".")


def list_headers(list_address: str, lid: str, description: str, posting: str,
                 unsubscribe_url: str | None = None) -> list[tuple[str, str]]:
    """The list's headers. With `unsubscribe_url` (a personal copy), List-Unsubscribe offers
    that https URL first and List-Unsubscribe-Post announces RFC 8058 one-click."""
    def mailto(role: str, query: str = "") -> str:
        return f"<mailto:{addresses.role_address(list_address, role)}{query}>"

    phrase = _phrase(description)
    return [
        ("List-Id", f"{phrase} <{lid}>" if phrase else f"<{lid}>"),
        ("List-Post", "NO" if posting == "announce" else f"<mailto:{list_address}>"),
        ("List-Help", mailto("request", "?subject=help")),
        ("List-Subscribe", mailto("subscribe")),
        ("List-Unsubscribe", f"<{unsubscribe_url}>, {mailto('unsubscribe')}" if unsubscribe_url
         else mailto("unsubscribe")),
        *([("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")] if unsubscribe_url else []),
        ("List-Owner", mailto("owner")),
        ("Precedence", "list"),
    ]


def _phrase(text: str) -> str:
    """A display phrase for List-Id: quoted if needed, RFC 2047 encoded if not ASCII."""
    text = " ".join(text.split())
    if not text:
        return ""
    if not text.isascii():
        return email.header.Header(text, "utf-8").encode()
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def decode(raw: str) -> str:
    """The text of a header value, RFC 2047 encoded words decoded (best effort), as one
    line (an encoded word may hide a line break or undecodable bytes: see mailparse.text)."""
    try:
        return mailparse.text(str(email.header.make_header(email.header.decode_header(raw))))
    except (email.errors.HeaderParseError, UnicodeDecodeError, LookupError, ValueError):
        return mailparse.text(raw)


def prefixed_subject(raw: str | None, prefix: str) -> str | None:
    """The new raw Subject value, or None if it stays as it is.

    The prefix goes in once: not again on "Re: [dev] ..." replies, also when the
    subject is RFC 2047 encoded. The original encoded words are kept as they
    are; a non-ASCII prefix becomes an encoded word of its own.
    """
    if not prefix.strip():
        return None
    if raw is None:
        raw = ""
    if _UNDECODED.search(raw):
        # 8-bit bytes that are not UTF-8 (pymilter hands them over surrogate-escaped):
        # a changed header goes back to the MTA as UTF-8, so it stays as it came.
        return None
    text = decode(raw)
    tag = prefix.strip().lower()
    head = _REPLY_PREFIX.sub("", text).lstrip().lower()
    if head.startswith(tag) or text.lower().lstrip().startswith(tag):
        return None
    raw = raw.lstrip()
    starts_encoded = raw.startswith("=?")
    if prefix.isascii():
        encoded = prefix
        # RFC 2047: an encoded word must be set off from the text before it.
        if starts_encoded and not encoded.endswith(" "):
            encoded += " "
    elif starts_encoded:
        # White space between two encoded words vanishes when decoded, so the
        # prefix's own trailing space goes inside its encoded word.
        encoded = email.header.Header(prefix, "utf-8").encode() + " "
    else:
        encoded = email.header.Header(prefix.rstrip(), "utf-8").encode() + " "
    return encoded + raw
