"""DMARC-safe From: which policy a From domain publishes, and the From rewrite.

A list post keeps the poster's From but goes out from the list's server, so
a receiver that enforces the poster's DMARC policy (RFC 7489) rejects or
quarantines it, and bounce processing then scores innocent members. For
such posts the From becomes the list's own address ("Alice via dev"), as
Mailman 3's munge_from does; or (wrap_message, as Mailman 3's) the post goes
out as a message of the list's own with the original attached whole, so the
poster's DKIM signature still verifies inside it. Everything here is pure: the DNS lookup is
listmilter.app.dmarc_lookup; the milter applies the header edits plan makes.
Nothing here raises on hostile headers: what cannot be understood is the
safe side (mitigate), with a reason the edge logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formataddr, getaddresses
from typing import Sequence

from listmilter.core import headers, mailparse

POLICIES = ("none", "quarantine", "reject")
MUNGE_FROM, WRAP_MESSAGE, NO_MITIGATION = "munge_from", "wrap_message", "none"     # dmarc_mitigation
NO_POLICY = ""              # no DMARC record (or none that parses): nothing to mitigate
UNKNOWN = "unknown"         # the lookup failed (timeout, SERVFAIL) or the From has no domain: mitigate
ORIGINAL_FROM = "X-Original-From"
# A From field longer than this is not parsed (a real one is well under 1,000 characters).
MAX_FROM = 4096
MAX_NAME = 64               # characters of the poster's name kept in "NAME via LIST"

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Record:
    p: str
    sp: str | None


@dataclass(frozen=True)
class Verdict:
    policy: str         # one of POLICIES, NO_POLICY or UNKNOWN
    reason: str         # for the log: where the policy came from, or why there is none


def parse_record(txt: str) -> tuple[Record | None, str]:
    """One TXT record at _dmarc.DOMAIN (RFC 7489 6.3): (record, "") or (None, why it is no policy)."""
    tags = [t.strip() for t in txt.split(";")]
    if not tags or tags[0].replace(" ", "").replace("\t", "") != "v=DMARC1":
        return None, "not a DMARC record (v=DMARC1 must come first)"
    values: dict[str, str] = {}
    for tag in tags[1:]:
        if not tag:
            continue
        name, eq, value = tag.partition("=")
        if not eq:
            return None, f"malformed DMARC record: tag {tag[:40]!r} has no '='"
        values.setdefault(name.strip().lower(), value.strip().lower())
    p = values.get("p")
    if p not in POLICIES:
        return None, f"malformed DMARC record: p={p[:20] if p is not None else '(missing)'!r}"
    sp = values.get("sp")
    # RFC 7489 would make a bad sp= no policy at all; falling back to p= is the stricter side.
    return Record(p, sp if sp in POLICIES else None), ""


def _candidates(txts: Sequence[str]) -> list[str]:
    return [t for t in txts if t.lstrip().startswith("v=DMARC1")]


def has_record(txts: Sequence[str]) -> bool:
    """Is there a DMARC record at this name at all? Only if not is the organizational domain asked."""
    return bool(_candidates(txts))


def select_record(txts: Sequence[str]) -> tuple[Record | None, str]:
    """The DMARC record among the TXT records at one name (RFC 7489 6.6.3: exactly one, else none)."""
    candidates = _candidates(txts)
    if not candidates:
        return None, "no DMARC record"
    if len(candidates) > 1:
        return None, f"{len(candidates)} DMARC records (RFC 7489: then none applies)"
    return parse_record(candidates[0])


def choose(domain: str, org_domain: str, domain_txts: Sequence[str], org_txts: Sequence[str]) -> Verdict:
    """The policy for From domain `domain` (RFC 7489 6.6.3): its own record's p=, else the
    organizational domain's sp= (or p=) when `domain` is a subdomain of it. Only a name
    without any DMARC record falls back to the organizational domain; several records or
    one that does not parse end the search with no policy."""
    record, why = select_record(domain_txts)
    if record is not None:
        return Verdict(record.p, f"p={record.p} at _dmarc.{domain}")
    if org_domain and org_domain != domain and not has_record(domain_txts):
        org, org_why = select_record(org_txts)
        if org is not None:
            if org.sp is not None:
                return Verdict(org.sp, f"sp={org.sp} at _dmarc.{org_domain}")
            return Verdict(org.p, f"p={org.p} at _dmarc.{org_domain}")
        return Verdict(NO_POLICY, f"_dmarc.{domain}: {why}; _dmarc.{org_domain}: {org_why}")
    return Verdict(NO_POLICY, f"_dmarc.{domain}: {why}")


def mitigate(verdict: Verdict, mitigation: str, policies: Sequence[str]) -> bool:
    """Rewrite this post's From? A failed lookup is the safe side: yes."""
    if mitigation == NO_MITIGATION:
        return False
    return verdict.policy == UNKNOWN or verdict.policy in policies


def log_status(verdict: Verdict, mitigation: str, policies: Sequence[str]) -> str | None:
    """What the log says of a post's DMARC verdict (None: nothing, its From stays); the
    unknown policy is a warning (`verdict.policy == UNKNOWN`)."""
    done = "post wrapped" if mitigation == WRAP_MESSAGE else "From rewritten"
    if verdict.policy == UNKNOWN and mitigation != NO_MITIGATION:
        return f"DMARC policy unknown ({verdict.reason}); {done} to be safe"
    if mitigate(verdict, mitigation, policies):
        return f"DMARC {verdict.reason}; {done}"
    return None


# -- the From field ------------------------------------------------------------------------
@dataclass(frozen=True)
class Poster:
    name: str               # display name, decoded ("" if none)
    address: str            # "" if none could be parsed
    domain: str | None      # lower case, ASCII; None: no domain to look up (mitigate)
    reason: str = ""        # why there is no domain


def _domain(address: str) -> str | None:
    domain = address.rpartition("@")[2].strip().rstrip(".").lower()
    if not domain.isascii() or "." not in domain or len(domain) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        return None
    return domain


def poster(message_headers: Sequence[tuple[str, str]]) -> Poster:
    """Who the From field names, and the domain whose policy counts."""
    froms = [v for n, v in message_headers if n.lower() == "from"]
    if not froms:
        return Poster("", "", None, "no From header")
    if len(froms) > 1:
        return Poster("", "", None, f"{len(froms)} From headers")
    value = froms[0]
    if len(value) > MAX_FROM:
        return Poster("", "", None, f"From header of {len(value)} characters")
    try:
        pairs = [(n, a) for n, a in getaddresses([value]) if "@" in a]
    except Exception:
        pairs = []
    if len(pairs) != 1:
        return Poster("", "", None, f"From names {len(pairs)} addresses")
    name, address = pairs[0]
    domain = _domain(address)
    return Poster(headers.decode(name), address, domain, "" if domain else "From has no usable domain")


def _formatted(name: str, address: str) -> str | None:
    """"NAME" <ADDRESS>, the name RFC 2047-encoded when it is not ASCII; None for a non-ASCII address."""
    if not address.isascii():
        return None         # SMTPUTF8 or 8-bit: no clean way to write it in a 7-bit header
    if name.isascii():
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>' if name else f"<{address}>"
    try:
        return formataddr((name, address), charset="utf-8")
    except (UnicodeError, ValueError):
        return None


@dataclass(frozen=True)
class Munged:
    """Header edits: changes by (name, 1-based index, value), deletions by (name, index), additions."""
    change: tuple[tuple[str, int, str], ...]
    delete: tuple[tuple[str, int], ...]
    add: tuple[tuple[str, str], ...]


def munge_from(message_headers: Sequence[tuple[str, str]], list_address: str, list_name: str) -> Munged:
    """From: "Alice via dev" <dev@example.org>; the poster added to Reply-To (Mailman 3: merged
    into an existing Reply-To, never a second one); the original From kept in X-Original-From."""
    who = poster(message_headers)
    local = who.address.rpartition("@")[0] if who.address else ""
    # A name that is an address keeps its local part: two domains in one From look like spam (Mailman).
    name = mailparse.one_line(who.name).split("@")[0].strip()
    name = (name or mailparse.one_line(local) or "someone")[:MAX_NAME]
    via = f"{name} via {mailparse.one_line(list_name) or list_address.partition('@')[0]}"
    new_from = _formatted(via, list_address) or f"<{list_address}>"

    change: list[tuple[str, int, str]] = []
    delete: list[tuple[str, int]] = []
    add: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    reply_to: tuple[int, str] | None = None
    for header_name, value in message_headers:
        lname = header_name.lower()
        counts[lname] = counts.get(lname, 0) + 1
        if lname == "from":
            if counts[lname] == 1:
                change.append((header_name, 1, new_from))
            else:
                delete.append((header_name, counts[lname]))     # one From only (RFC 5322)
            add.append((ORIGINAL_FROM, value))
        elif lname == "reply-to" and reply_to is None:
            reply_to = (counts[lname], value)
    if not counts.get("from"):
        add.append(("From", new_from))
    if who.address:
        poster_value = _formatted(mailparse.one_line(who.name), who.address) or f"<{who.address}>"
        if reply_to is None:
            add.append(("Reply-To", poster_value))
        elif who.address.lower() not in reply_to[1].lower():
            change.append(("Reply-To", reply_to[0], f"{reply_to[1].rstrip().rstrip(',')}, {poster_value}"))
    delete.sort(key=lambda item: -item[1])
    return Munged(tuple(change), tuple(delete), tuple(add))


# -- wrap_message ---------------------------------------------------------------------------
# What the wrapper keeps of the post's own header (Mailman 3's KEEPERS, plus the trace and
# the addressees a reply needs): everything else (Sender, DKIM-Signature, Content-*...) is
# the original's, and stays in the attached original only. From and Reply-To are rewritten
# (munge_from); the caller's own headers (`keep`, List-*) are the caller's business.
WRAPPER_KEEPS = frozenset({"received", "date", "message-id", "in-reply-to", "references", "subject", "to", "cc",
                           "precedence", "auto-submitted", "x-beenthere", "from", "reply-to"})


@dataclass(frozen=True)
class Wrapped:
    """The wrapper's header edits (deletions by (name, 1-based index), additions) and its body."""
    delete: tuple[tuple[str, int], ...]
    add: tuple[tuple[str, str], ...]
    body: bytes


def original_message(message_headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """The message as it came (header fields as the MTA passed them, CRLF line ends), for the attachment."""
    head = "".join(f"{n}: {v}\r\n" for n, v in message_headers).replace("\r\n", "\n").replace("\n", "\r\n")
    try:
        data = head.encode("utf-8", "surrogateescape")      # 8-bit bytes as they came
    except UnicodeEncodeError:      # a lone surrogate no bytes could have made: never from the MTA
        data = head.encode("utf-8", "replace")
    return data + b"\r\n" + body


def wrap_message(message_headers: Sequence[tuple[str, str]], body: bytes, seed: str,
                 keep: frozenset[str] = frozenset(), inner_drop: frozenset[str] = frozenset()) -> Wrapped:
    """The post as a message/rfc822 part of a multipart/mixed wrapper (Mailman 3's wrap_message).

    The attached original is the post byte for byte as it came (less the `inner_drop` fields,
    listmilter's own markers), so a DKIM signature on it still verifies; the Message-ID stays
    on the wrapper so replies thread as they do for every other post. `seed` (the post id)
    makes the boundary, which is checked not to occur in the original."""
    inner = original_message([(n, v) for n, v in message_headers if n.lower() not in inner_drop], body)
    delete: list[tuple[str, int]] = []
    counts: dict[str, int] = {}
    for name, _ in message_headers:
        lname = name.lower()
        counts[lname] = counts.get(lname, 0) + 1
        if lname in WRAPPER_KEEPS or lname in keep or lname.startswith("list-"):
            continue
        delete.append((name, counts[lname]))
    delete.sort(key=lambda item: (item[0].lower(), -item[1]))
    n = 0
    while True:
        boundary = f"=_listmilter.{_token(seed)}.{n}"
        if ("--" + boundary).encode() not in inner:
            break
        n += 1
    eight_bit = any(b > 127 for b in inner)
    part = (f"--{boundary}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n"
            + ("Content-Transfer-Encoding: 8bit\r\n" if eight_bit else "") + "\r\n").encode()
    add = [("MIME-Version", "1.0"), ("Content-Type", f'multipart/mixed; boundary="{boundary}"')]
    if eight_bit:
        add.append(("Content-Transfer-Encoding", "8bit"))
    return Wrapped(tuple(delete), tuple(add), part + inner + f"\r\n--{boundary}--\r\n".encode())


def _token(seed: str) -> str:
    return "".join(c for c in seed if c.isascii() and c.isalnum())[:40] or "post"
