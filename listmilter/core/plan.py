"""What to do with one message: the pure core behind the milter.

The milter feeds plain data in (sender, recipients, headers, list lookups)
and applies the plain data that comes out (recipient, sender and header
edits, and which parts go out as messages of their own). Nothing here talks
to an MTA or a store.

One message, several audiences: a milter can edit only the one message it
sees, and every recipient of it gets the same headers. So a message to two
lists and a person is split: the part that stays in this message is the plain
recipients (unmodified) if there are any, else the first list; every other
list gets a copy of the original message re-submitted through the MTA to
that list's address alone, where the milter expands it like any single post.

Lists on this server that are members of the list are expanded inline
(nested_members); what reaches the pipe transport unexpanded is decided by
unexpanded_at_pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Callable, Iterator, Sequence, cast

from listmilter.core import addresses, dmarc, envid, footer, headers, policy, settings, verp
from listmilter.core.keys import Keyring
from listmilter.core.model import MailingList


class Kind(StrEnum):
    """What one recipient of a message is."""
    LIST = "list"          # a post to expand
    OWNER = "owner"        # <list>-owner@: an alias for the list's owners
    REFUSED = "refused"    # a post the sender may not make (kept only where the MTA cannot reject)
    DROPPED = "dropped"    # a post the list discards silently (nonmember_action: discard)
    PLAIN = "plain"        # anything else: a person, a role address for the pipe transport


LIST, OWNER, REFUSED, PLAIN, DROPPED = Kind.LIST, Kind.OWNER, Kind.REFUSED, Kind.PLAIN, Kind.DROPPED


@dataclass(frozen=True)
class Recipient:
    rcpt: str                    # exactly as the MTA gave it (delrcpt needs that)
    address: str                 # bare address
    kind: Kind = PLAIN
    list_address: str = ""
    reason: str = ""
    hold: str = ""               # LIST: why the post waits for the owners (core/moderation.py); "" to send it


def find_list(address: str, get_list: Callable[[str], MailingList | None]
              ) -> tuple[MailingList | None, addresses.RoleAddress | None]:
    """The list an address belongs to, and the role address it is (None: the list itself)."""
    for list_key, role in addresses.candidates(address):
        if not list_key.isascii():
            continue    # never a list (addresses.check: ASCII); undecodable bytes would make SQLite raise
        found = get_list(list_key)
        if found is not None:
            return found, role
    return None, None


@dataclass(frozen=True)
class Split:
    in_place_list: str | None            # the list whose edits this message gets (None: no edits)
    reinject: tuple[str, ...]            # lists that get a copy of their own
    refused: tuple[Recipient, ...]       # refused posts to remove from this message
    owners: tuple[Recipient, ...]        # <list>-owner@ recipients to expand in place
    reject_reason: str | None = None     # set when nothing is left: refuse the whole message
    dropped: tuple[Recipient, ...] = ()  # posts a list discards: removed from this message
    discard_all: bool = False            # nothing else is left: the whole message is dropped


def split(recipients: list[Recipient]) -> Split:
    lists: list[str] = []
    for r in recipients:
        if r.kind == LIST and r.list_address not in lists:
            lists.append(r.list_address)
    refused = tuple(r for r in recipients if r.kind == REFUSED)
    dropped = tuple(r for r in recipients if r.kind == DROPPED)
    owners = tuple(r for r in recipients if r.kind == OWNER)
    plain = [r for r in recipients if r.kind in (PLAIN, OWNER)]
    if not lists and not plain and refused:
        return Split(None, (), refused, (), reject_reason=refused[0].reason, dropped=dropped)
    if not lists and not plain and dropped:
        return Split(None, (), (), (), dropped=dropped, discard_all=True)
    if plain or not lists:
        return Split(None, tuple(lists), refused, owners, dropped=dropped)
    return Split(lists[0], tuple(lists[1:]), refused, owners, dropped=dropped)


@dataclass
class Edits:
    """Changes to apply at end of message, in this order."""
    del_rcpts: list[str] = field(default_factory=list)
    add_rcpts: list[tuple[str, str | None]] = field(default_factory=list)   # (address, ESMTP params)
    sender: tuple[str, str] | None = None                                    # (address, ESMTP params)
    del_headers: list[tuple[str, int]] = field(default_factory=list)        # (name, 1-based index)
    change_headers: list[tuple[str, int, str]] = field(default_factory=list)
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None           # the new body (a shared footer, wrap_message); None: unchanged
    notes: tuple[str, ...] = ()         # for the log: the footer's fate


@dataclass(frozen=True)
class ListSettings:
    """The effective settings the expansion needs (resolved by the caller)."""
    address: str
    posting: str
    subject_prefix: str
    description: str
    list_id: str
    footer: str = ""            # the footer template (core/footer.py); "" for none
    postal_address: str = ""
    dmarc_mitigation: str = "munge_from"
    dmarc_policies: tuple[str, ...] = ("reject", "quarantine")
    reply_to: str = "poster"    # poster | list | an address (settings.reply_to)

    def wants_dmarc(self) -> bool:
        """Is a DMARC lookup worth its time for a post to this list?"""
        return self.dmarc_mitigation != "none" and bool(self.dmarc_policies)


def effective_settings(address: str, s: settings.ListSettings) -> ListSettings:
    return ListSettings(address, s.posting, s.subject_prefix, s.description, headers.list_id(address, s.list_id),
                        s.footer, s.postal_address, s.dmarc_mitigation, s.dmarc_policies, s.reply_to)


def one_click_links(base_url: str | None, s: settings.ListSettings) -> bool:
    """Does each member get a one-click unsubscribe link of their own (web.base_url and one_click)?"""
    return bool(base_url) and s.one_click


def footer_per_member(base_url: str | None, s: settings.ListSettings) -> bool:
    """Does the list's footer need each member's own values: {member}, or {unsubscribe_url}
    where every member has a one-click link of their own? Any other footer is the same for
    all ({unsubscribe_url} is then the list's mailto: unsubscribe address) and goes in place."""
    used = footer.fields_of(s.footer)
    return "member" in used or ("unsubscribe_url" in used and one_click_links(base_url, s))


def personal(base_url: str | None, s: settings.ListSettings) -> bool:
    """Does a post to a list with these settings go out as one copy per member? With a
    one-click link to give, or a footer to fill in per member."""
    return one_click_links(base_url, s) or footer_per_member(base_url, s)


def footer_in_place(base_url: str | None, s: settings.ListSettings) -> bool:
    """Is the list's footer added once, by the milter's body replacement, for all members?"""
    return bool(s.footer) and not personal(base_url, s)


def body_needed(ls: ListSettings, personal_post: bool) -> bool:
    """Must the milter keep a post's body to edit it in place: a shared footer to add, or a
    post that may be wrapped (wrap_message; known only once the From domain's policy is)?"""
    return (bool(ls.footer) and not personal_post) or \
        (ls.dmarc_mitigation == dmarc.WRAP_MESSAGE and ls.wants_dmarc())


def shared_values(ls: ListSettings, member: str = "") -> footer.Values:
    """The footer's values without a one-click link: the list's mailto: unsubscribe address."""
    return footer.Values(f"mailto:{addresses.role_address(ls.address, 'unsubscribe')}", ls.address, member,
                         ls.postal_address)


def shared_footer(ls: ListSettings, message_headers: list[tuple[str, str]], body: bytes
                  ) -> tuple[bytes | None, tuple[str, ...]]:
    """The post's body (`message_headers` as it goes out) with the list's footer, the same for
    every member: (the new body, or None to leave it as it is; notes for the log). The same
    core/footer.py code as for a personal copy, so the bytes are a personal copy's without
    its member's values."""
    tmpl = footer.prepare(message_headers, body)
    if tmpl.untouched:
        return None, tuple(tmpl.notes)
    return footer.render(tmpl, body, ls.footer, shared_values(ls)), tuple(tmpl.notes)


def unique_members(list_address: str, members: list[str]) -> list[str]:
    """Members once each (by case-insensitive key); never the list or its own role addresses."""
    own = addresses.key(list_address)
    local, _, domain = own.rpartition("@")
    seen: set[str] = set()
    out = []
    for m in members:
        k = m.lower()
        if k in seen or k == own:
            continue
        seen.add(k)
        if k.endswith("@" + domain) and k.startswith(local + "-"):
            found = [role for _, role in addresses.candidates(k) if role and role.list_key == own]
            if found:
                continue
        out.append(m)
    return out


def expand_list(ls: ListSettings, list_rcpts: list[str], members: list[str],
                message_headers: list[tuple[str, str]], post_id: str, secret: Keyring | bytes,
                posted_at: float, verdict: dmarc.Verdict | None = None, body: bytes | None = None) -> Edits:
    """The edits that turn this message into a post of list `ls` to `members`
    (with a DMARC-safe From when `verdict`, the From domain's policy, asks for it; for
    wrap_message that is a new body too, made from `body`, which must then be given)."""
    edits = Edits()
    edits.del_rcpts = list(list_rcpts)
    edits.add_rcpts = [(m, f"NOTIFY=FAILURE ORCPT=rfc822;{m}") for m in unique_members(ls.address, members)]
    bounces = addresses.role_address(ls.address, "bounces")
    edits.sender = (f"<{bounces}>", f"RET=HDRS ENVID={envid.make(post_id, ls.address, secret, posted_at)}")

    counts: dict[str, int] = {}
    subject_index, subject_raw = 0, None
    # The re-submission marker is listmilter's own business: members never see it.
    owned = {h.lower() for h in headers.LIST_HEADERS} | {RESUBMITTED.lower()}
    for name, value in message_headers:
        lname = name.lower()
        counts[lname] = counts.get(lname, 0) + 1
        if lname in owned:
            edits.del_headers.append((name, counts[lname]))
        elif lname == "subject" and subject_raw is None:
            subject_index, subject_raw = counts[lname], value
    # Delete from the last occurrence down, so earlier indexes stay right.
    edits.del_headers.sort(key=lambda item: (item[0].lower(), -item[1]))

    new_subject = headers.prefixed_subject(subject_raw, ls.subject_prefix)
    if new_subject is not None:
        if subject_raw is None:
            edits.add_headers.append(("Subject", new_subject.rstrip() or "(no subject)"))
        else:
            edits.change_headers.append(("Subject", subject_index, new_subject))
    edits.add_headers.extend(headers.list_headers(ls.address, ls.list_id, ls.description, ls.posting))
    # Kept by other list servers (Mailman, Sympa) where they replace List-Id:
    # the post comes back to us with it if it loops through a list elsewhere.
    edits.add_headers.append((BEEN_THERE, ls.address))
    if verdict is not None and dmarc.mitigate(verdict, ls.dmarc_mitigation, ls.dmarc_policies):
        # The munged From needs the poster in Reply-To (dmarc.munge_from merges it into what is there,
        # so reply_to: list gives "Reply-To: list, poster" below).
        munged = dmarc.munge_from(reply_to_edited(message_headers, ls), ls.address, ls.description)
        edits.change_headers.extend(munged.change)
        edits.del_headers.extend(munged.delete)
        edits.add_headers.extend(munged.add)
        _merge_reply_to(edits, message_headers, ls, munged)
        if ls.dmarc_mitigation == dmarc.WRAP_MESSAGE:
            if body is None:
                raise ValueError("wrap_message needs the post's body")
            # The same From and Reply-To on a wrapper around the post; the list's own headers
            # (deleted and added above) are left to this function.
            wrapped = dmarc.wrap_message(message_headers, body, post_id, keep=frozenset(owned),
                                         inner_drop=frozenset({RESUBMITTED.lower()}))
            edits.del_headers.extend(wrapped.delete)
            edits.add_headers.extend(wrapped.add)
            edits.body = wrapped.body
    else:
        _apply_reply_to(edits, message_headers, ls)
    edits.del_headers.sort(key=lambda item: (item[0].lower(), -item[1]))
    return edits


def reply_to_value(ls: ListSettings) -> str | None:
    """The Reply-To the list sets (None: the poster's own stays)."""
    if ls.reply_to == "poster":
        return None
    return ls.address if ls.reply_to == "list" else ls.reply_to


def reply_to_edited(message_headers: list[tuple[str, str]], ls: ListSettings) -> list[tuple[str, str]]:
    """The headers with the list's Reply-To in place of the poster's (unchanged for reply_to: poster)."""
    value = reply_to_value(ls)
    if value is None:
        return message_headers
    return [(n, v) for n, v in message_headers if n.lower() != "reply-to"] + [("Reply-To", value)]


def _apply_reply_to(edits: Edits, message_headers: list[tuple[str, str]], ls: ListSettings) -> None:
    value = reply_to_value(ls)
    if value is None:
        return
    count = sum(1 for n, _ in message_headers if n.lower() == "reply-to")
    edits.del_headers.extend(("Reply-To", i) for i in range(count, 0, -1))
    edits.add_headers.append(("Reply-To", value))


def _merge_reply_to(edits: Edits, message_headers: list[tuple[str, str]], ls: ListSettings,
                    munged: dmarc.Munged) -> None:
    """munge_from saw the headers as reply_to_edited made them: its Reply-To change or addition
    (the last Reply-To there is the list's) becomes, in the real message, the poster's Reply-To
    fields removed and one Reply-To added."""
    if reply_to_value(ls) is None:
        return
    merged = [v for n, _, v in munged.change if n.lower() == "reply-to"] + \
        [v for n, v in munged.add if n.lower() == "reply-to"]
    edits.change_headers[:] = [c for c in edits.change_headers if c[0].lower() != "reply-to"]
    edits.add_headers[:] = [a for a in edits.add_headers if a[0].lower() != "reply-to"]
    count = sum(1 for n, _ in message_headers if n.lower() == "reply-to")
    edits.del_headers.extend(("Reply-To", i) for i in range(count, 0, -1))
    edits.add_headers.append(("Reply-To", merged[-1] if merged else reply_to_value(ls) or ""))


# The milter calls (pymilter's names) that carry out edits, in this order.
ADDRCPT, DELRCPT, CHGFROM, CHGHEADER, ADDHEADER, REPLACEBODY = \
    "addrcpt", "delrcpt", "chgfrom", "chgheader", "addheader", "replacebody"


def edit_steps(edits: Sequence[Edits]) -> Iterator[tuple[str, tuple[object, ...]]]:
    """The edits as milter calls, in an order that is safe to stop after any step.

    With milter_default_action = accept, an MTA keeps the edits already made
    when the milter dies half-way through end of message (tried: Postfix
    3.7 delivered to the members added so far, with the list address gone).
    So every recipient is added before any is removed: a message cut short
    still has the list address, the pipe transport re-submits it, and the
    members already added get a second copy (a duplicate, never a loss).
    Header edits come after the removals, so such a message never carries
    the list's own List-Id, which would mark it as a loop. The body comes
    last: cut short before it, a post goes without its footer (or, wrapped,
    with a wrapper's header over the original body), never to nobody.

    A generator: a 100,000-member post would otherwise hold a second list of
    100,000 steps (about 20 MiB) beside the recipients it is made from.
    """
    for e in edits:
        for address, params in e.add_rcpts:
            yield ADDRCPT, (f"<{address}>", params)
    for e in edits:
        for rcpt in e.del_rcpts:
            yield DELRCPT, (rcpt,)
    for e in edits:
        if e.sender:
            yield CHGFROM, e.sender
    for e in edits:
        for name, index in e.del_headers:
            yield CHGHEADER, (name, index, None)
        for name, index, value in e.change_headers:
            yield CHGHEADER, (name, index, value)
        for name, value in e.add_headers:
            yield ADDHEADER, (name, value)
    for e in edits:
        if e.body is not None:
            yield REPLACEBODY, (e.body,)


def expand_owners(owner_rcpts: list[Recipient], owners_of: Callable[[str], tuple[str, ...]]) -> Edits:
    """<list>-owner@ becomes the list's owners; the message itself is not changed."""
    edits = Edits()
    seen: set[str] = set()
    for r in owner_rcpts:
        targets = owners_of(r.list_address)
        if not targets:
            continue        # never delete a recipient without adding someone in its place
        edits.del_rcpts.append(r.rcpt)
        for t in targets:
            if t.lower() not in seen:
                seen.add(t.lower())
                edits.add_rcpts.append((t, None))
    return edits


def list_ids(message_headers: list[tuple[str, str]]) -> list[str]:
    return [v for n, v in message_headers if n.lower() == "list-id"]


BEEN_THERE = "X-BeenThere"


def been_there(message_headers: list[tuple[str, str]], list_address: str) -> bool:
    """Has this message been through `list_address` already (an X-BeenThere naming it)?"""
    own = addresses.key(list_address)
    return any(n.lower() == BEEN_THERE.lower() and addresses.key(addresses.strip_brackets(" ".join(v.split()))) == own
               for n, v in message_headers)


def loop_reason(sender: str, message_headers: list[tuple[str, str]], ls: ListSettings) -> str | None:
    """Why a post to `ls` must not be expanded (None: expand it)."""
    reason = policy.not_expanded_reason(sender, list_ids(message_headers), ls.list_id.lower())
    if reason is None and been_there(message_headers, ls.address):
        reason = "mail loop: the message already carries this list's X-BeenThere"
    return reason


# -- nested lists -------------------------------------------------------------------
def list_finder(list_addresses: list[str]) -> Callable[[str], str | None]:
    """address -> the list it is (its address as stored), None for anything else.

    Only addresses in a list domain are looked at, so a list of 100,000 people
    costs one set lookup each. A role address (dev-owner@) is not a list.
    """
    lists = {addresses.key(a): a for a in list_addresses}
    domains = {k.rpartition("@")[2] for k in lists}

    def list_of(address: str) -> str | None:
        if address.rpartition("@")[2].lower() not in domains:
            return None
        for key, role in addresses.candidates(address):
            if key in lists:
                return lists[key] if role is None else None
        return None
    return list_of


def nested_members(list_address: str, members_of: Callable[[str], list[str]],
                   list_of: Callable[[str], str | None]) -> tuple[list[tuple[str, str]], list[str]]:
    """Who a post to `list_address` reaches when lists on this server are members of it.

    Returns ([(member, the list it was found on)], [nested lists, in order]).
    A member that is a list is replaced by that list's members, level by
    level (a person on the list itself and on a nested list counts as the
    list's own); each list is expanded once, so cycles (A in B, B in A) end,
    and each address appears once.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    visited = {addresses.key(list_address)}
    nested: list[str] = []
    todo = [list_address]
    while todo:
        current = todo.pop(0)
        for member in unique_members(current, members_of(current)):
            inner = list_of(member)
            if inner is not None:
                if addresses.key(inner) not in visited:
                    visited.add(addresses.key(inner))
                    nested.append(inner)
                    todo.append(inner)
                continue
            k = addresses.key(member)
            if k not in seen:
                seen.add(k)
                out.append((member, current))
    return out, nested


# -- mail that reaches the pipe transport unexpanded --------------------------------
# A list address (or <list>-owner@) reaches the pipe transport when the milter
# left a post alone on purpose (null sender, a loop), or when the milter did
# not see it: listmilter was down at end of data (milter_default_action =
# accept lets other mail through), or the mail came by a path without the
# milter. Such a post is re-submitted through the MTA, where the milter
# expands it; the marker stops a path without the milter from looping.
RESUBMITTED = "X-Listmilter-Resubmitted"
RESUBMIT_HOLD = 600     # seconds: a post back sooner than this after a re-submission waits


@dataclass(frozen=True)
class PipeAction:
    action: str         # DISCARD | RESUBMIT | DEFER
    reason: str


DISCARD, RESUBMIT, DEFER = "discard", "resubmit", "defer"


def resubmitted_at(message_headers: list[tuple[str, str]], recipient: str, now: float) -> float | None:
    """When listmilter last re-submitted this message to `recipient` (None: never, or a marker from the future)."""
    own = addresses.key(recipient)
    times = []
    for name, value in message_headers:
        if name.lower() != RESUBMITTED.lower():
            continue
        address, _, when = value.partition(";")
        try:
            t = float(when.strip())
        except ValueError:
            continue
        if addresses.key(address.strip()) == own and t <= now:
            times.append(t)
    return max(times) if times else None


def unexpanded_at_pipe(recipient: str, sender: str, message_headers: list[tuple[str, str]],
                       ls: ListSettings, owner_alias: bool, now: float, can_resubmit: bool) -> PipeAction:
    """What the pipe transport does with mail for a list address (or its -owner@ alias)."""
    if not owner_alias:
        reason = loop_reason(sender, message_headers, ls)
        if reason:
            return PipeAction(DISCARD, f"not expanded: {reason}")
    last = resubmitted_at(message_headers, recipient, now)
    if last is not None and now - last < RESUBMIT_HOLD:
        return PipeAction(DEFER, f"came back unexpanded {now - last:.0f}s after listmilter re-submitted it; "
                                 f"outgoing: must reach an smtpd with listmilter's milter; tried again "
                                 f"{RESUBMIT_HOLD // 60} minutes after the re-submission")
    if not can_resubmit:
        return PipeAction(DEFER, "listmilter serve is not running; the post goes through the milter "
                                 "once it runs")
    return PipeAction(RESUBMIT, "the milter did not see it")


def resubmission(message: bytes, recipient: str, now: float) -> bytes:
    """The message to re-submit: CRLF line ends, without the Return-Path the delivery
    added and older markers for `recipient`, with a new marker on top."""
    text = message.replace(b"\r\n", b"\n")
    if text.startswith(b"From "):       # an mbox separator some delivery agents write
        text = text.partition(b"\n")[2]
    if text.startswith(b"\n"):
        head, body = b"", text[1:]        # an empty header section
    else:
        head, sep, body = text.partition(b"\n\n")
        if not sep and not _looks_like_header(head):
            head, body = b"", text          # no header section at all
    kept: list[bytes] = []
    drop = False
    own = addresses.key(recipient).encode("utf-8", "surrogateescape")
    for line in head.split(b"\n") if head else []:
        if line[:1] in (b" ", b"\t"):
            if not drop:
                kept.append(line)
            continue
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        drop = lname == b"return-path" or (
            lname == RESUBMITTED.lower().encode() and value.partition(b";")[0].strip().lower() == own)
        if not drop:
            kept.append(line)
    marker = f"{RESUBMITTED}: {recipient}; {int(now)}".encode("utf-8", "surrogateescape")
    out = b"\n".join([marker, *kept]) + b"\n\n" + body
    return out.replace(b"\n", b"\r\n")


def _looks_like_header(block: bytes) -> bool:
    first = block.split(b"\n", 1)[0]
    name, colon, _ = first.partition(b":")
    return bool(colon) and bool(name) and b" " not in name.strip()


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """(name, value) of each header field of a raw message, unfolded, as text (8-bit kept as
    surrogate escapes): enough for the decisions above, never an exception."""
    head = message.replace(b"\r\n", b"\n").partition(b"\n\n")[0]
    out: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            out.append((name.strip(), value.strip()))
    return out


# -- personal copies (one-click unsubscribe) ------------------------------------------
def xtext(text: str) -> str:
    """RFC 3461 xtext, for ORCPT over SMTP."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in text)


@dataclass(frozen=True)
class Copies:
    """A post as one message per member (each with its own List-Unsubscribe URL, footer
    and VERP envelope sender)."""
    sender: str                                   # <list>-bounces@ (for a member without a VERP sender)
    mail_options: tuple[str, ...]                 # RET=HDRS ENVID=...
    envid: str
    copies: list[tuple[str, tuple[str, ...], bytes]]   # (member, RCPT options, message)
    senders: dict[str, str] = field(default_factory=dict)   # member -> <list>-bounces+CODE@ (core/verp.py)
    notes: tuple[str, ...] = ()                   # for the log: the footer's fate, VERP fallbacks


def apply_header_edits(message_headers: list[tuple[str, str]], edits: Edits) -> list[tuple[str, str]]:
    """The header list after `edits` (deletions and changes by 1-based index per name; additions last)."""
    drop = {(n.lower(), i) for n, i in edits.del_headers}
    change = {(n.lower(), i): v for n, i, v in edits.change_headers}
    counts: dict[str, int] = {}
    out = []
    for name, value in message_headers:
        lname = name.lower()
        counts[lname] = counts.get(lname, 0) + 1
        key = (lname, counts[lname])
        if key in drop:
            continue
        out.append((name, change.get(key, value)))
    out.extend(edits.add_headers)
    return out


def _header_bytes(items: list[tuple[str, str]]) -> bytes:
    text = "".join(f"{n}: {v}\r\n" for n, v in items).replace("\r\n", "\n").replace("\n", "\r\n")
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Copy:
    """One member's copy of a post."""
    member: str
    rcpt_options: tuple[str, ...]       # NOTIFY=FAILURE ORCPT=rfc822;...
    sender: str                         # its VERP sender, or the plain bounces address
    # The message in pieces: the post's header block and body are the same objects in every
    # copy (written from one template, never copied per member); the member's own bytes between.
    parts: tuple[bytes, ...]

    @property
    def message(self) -> bytes:
        return b"".join(self.parts)


class PersonalTemplate:
    """A post made ready once to be copied per member: the same edits as expand_list (with
    the DMARC rewrite the verdict asks for), plus, per copy, a personal List-Unsubscribe
    (the member's one-click URL; without one the shared mailto: alone), the list's footer with
    the member's values, and a VERP envelope sender naming member and post.

    The shared header block and the body (cut for the footer) are made here once; `copy`
    only fills in one member's values, so copies can be streamed one at a time."""

    def __init__(self, ls: ListSettings, message_headers: list[tuple[str, str]], body: bytes, post_id: str,
                 secret: Keyring | bytes, posted_at: float, verdict: dmarc.Verdict | None = None):
        self.ls, self.post_id, self.secret, self.posted_at = ls, post_id, secret, posted_at
        edits = expand_list(ls, [], [], message_headers, post_id, secret, posted_at, verdict, body)
        unsubscribe = {"list-unsubscribe", "list-unsubscribe-post"}
        edits.add_headers = [(n, v) for n, v in edits.add_headers if n.lower() not in unsubscribe]
        out_headers = apply_header_edits(message_headers, edits)
        self.head = _header_bytes(out_headers)
        self.body = body if edits.body is None else edits.body      # wrap_message: the wrapper's
        self.unsubscribe_address = addresses.role_address(ls.address, "unsubscribe")
        # expand_list always sets the sender (bounces address, ENVID).
        sender = cast(tuple[str, str], edits.sender)
        self.sender = addresses.strip_brackets(sender[0])
        self.envid = sender[1].partition("ENVID=")[2]
        self.mail_options = ("RET=HDRS", f"ENVID={self.envid}")
        # The body is read once, here; each copy only fills its member's values in (core/footer.py).
        self.body_template = footer.prepare(out_headers, self.body) if ls.footer else footer.Template()
        self.notes = list(self.body_template.notes)
        # One entry per copy that goes from the plain bounces address (its VERP sender too long);
        # a list, as copies are made in several threads at once and append is atomic.
        self.too_long: list[str] = []

    def copy(self, member: str, url: str) -> Copy:
        """One member's copy; `url` their one-click link ("" for none)."""
        mailto = f"<mailto:{self.unsubscribe_address}>"
        if url:
            personal = _header_bytes([("List-Unsubscribe", f"<{url}>, {mailto}"),
                                      ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")])
        else:
            personal = _header_bytes([("List-Unsubscribe", mailto)])
        values = shared_values(self.ls, member)
        own_body = footer.render_parts(self.body_template, self.body, self.ls.footer,
                                       replace(values, unsubscribe_url=url) if url else values)
        verp_sender = verp.make(self.ls.address, member, self.post_id, self.posted_at, self.secret)
        if verp_sender is None:
            self.too_long.append(member)
        return Copy(member, ("NOTIFY=FAILURE", f"ORCPT=rfc822;{xtext(member)}"), verp_sender or self.sender,
                    (self.head, personal + b"\r\n", *own_body))

    def all_notes(self) -> tuple[str, ...]:
        """For the log: the footer's fate, and VERP fallbacks among the copies made so far."""
        notes = list(self.notes)
        if self.too_long:
            notes.append(f"VERP sender longer than {verp.MAX_LOCAL} characters before the @: "
                         f"{len(self.too_long)} copies go from the plain bounces address")
        return tuple(notes)


def personal_copies(ls: ListSettings, members: list[str], message_headers: list[tuple[str, str]],
                    body: bytes, post_id: str, secret: Keyring | bytes, url_for: Callable[[str], str],
                    posted_at: float, verdict: dmarc.Verdict | None = None) -> Copies:
    """Every member's copy at once (the inline path, without outgoing.reinject: the poster
    waits); the fan-out streams them from a PersonalTemplate instead."""
    template = PersonalTemplate(ls, message_headers, body, post_id, secret, posted_at, verdict)
    made = [template.copy(m, url_for(m)) for m in unique_members(ls.address, members)]
    return Copies(template.sender, template.mail_options, template.envid,
                  [(c.member, c.rcpt_options, c.message) for c in made],
                  {c.member: c.sender for c in made if c.sender != template.sender}, template.all_notes())


# -- end of message: the whole decision for one message ------------------------------
@dataclass(frozen=True)
class InPlace:
    """What the edge looked up for the list this message becomes a post of."""
    settings: ListSettings
    members: list[str]
    personal: bool                      # one copy per member (plan.personal: one-click links or a member's footer)
    verdict: dmarc.Verdict | None = None    # the From domain's DMARC policy (None: not looked up)
    hold: str = ""                      # why the post waits for the owners (core/moderation.py); "" to send


@dataclass(frozen=True)
class EndOfMessage:
    """Everything the milter does at end of message, as plain data, in order:
    refuse the whole message; or re-submit `resubmit` (lists that get the
    original as a message of their own) and tell `refusals` (posters refused
    where the MTA could not refuse the recipient); then either send `copies`
    and discard this message, or apply `edits` to it."""
    reject: str | None = None
    resubmit: tuple[str, ...] = ()
    refusals: tuple[Recipient, ...] = ()
    copies: Copies | None = None
    edits: tuple[Edits, ...] = ()
    expanded: tuple[tuple[str, int, str], ...] = ()      # (list, members, ENVID) for the log
    fanout: str | None = None           # the post waits at this address for serve's fan-out
    discard: bool = False               # every recipient was a list that drops the post: discard it
    hold: str = ""                      # after the edits, put the message on the hold queue, for this reason
    notes: tuple[str, ...] = ()         # for the log: the in-place footer's fate


def end_of_message(recipients: list[Recipient], split_: Split, in_place: InPlace | None,
                   owners: dict[str, tuple[str, ...]], message_headers: list[tuple[str, str]],
                   body: bytes, post_id: str, secret: Keyring | bytes, url_for: Callable[[str], str] | None,
                   now: float, fanout_address: str | None = None) -> EndOfMessage:
    """The plan for one message at end of message; `in_place` is given when split_.in_place_list is.
    A personal post is copied here (`url_for`, the inline path) or, given `fanout_address`,
    left in the MTA's queue for serve's fan-out."""
    if split_.reject_reason:
        return EndOfMessage(reject=split_.reject_reason)
    if split_.discard_all:
        return EndOfMessage(discard=True)
    edits: list[Edits] = []
    expanded: list[tuple[str, int, str]] = []
    copies = None
    if in_place is not None and in_place.personal and fanout_address is not None:
        # The copies are made later, by serve, from the MTA's queue (core/fanout.py); a held
        # post waits on the hold queue with this recipient, and its release starts the fan-out.
        rcpts = [r.rcpt for r in recipients if r.kind == LIST and r.list_address == in_place.settings.address]
        edits.append(Edits(del_rcpts=rcpts, add_rcpts=[(fanout_address, None)]))
    # Without a fan-out, a held post is expanded in this message, which the hold queue keeps:
    # personal copies would be messages of their own, sent before anyone approved them.
    elif in_place is not None and in_place.personal and url_for is not None and not in_place.hold:
        copies = personal_copies(in_place.settings, in_place.members, message_headers, body, post_id,
                                 secret, url_for, now, in_place.verdict)
    elif in_place is not None:
        ls = in_place.settings
        rcpts = [r.rcpt for r in recipients if r.kind == LIST and r.list_address == ls.address]
        post = expand_list(ls, rcpts, in_place.members, message_headers, post_id, secret, now, in_place.verdict,
                           body)
        if ls.footer and not in_place.personal:
            # One footer for all, by the milter's body replacement: the post stays one queue file.
            new_body, post.notes = shared_footer(ls, apply_header_edits(message_headers, post),
                                                 body if post.body is None else post.body)
            post.body = new_body if new_body is not None else post.body
        edits.append(post)
        assert post.sender is not None
        expanded.append((ls.address, len(post.add_rcpts), post.sender[1].partition("ENVID=")[2]))
    if split_.owners:
        edits.append(expand_owners(list(split_.owners), lambda address: owners.get(address, ())))
    if split_.reinject:
        edits.append(Edits(del_rcpts=[r.rcpt for r in recipients
                                      if r.kind == LIST and r.list_address in split_.reinject]))
    for r in split_.refused + split_.dropped:
        edits.append(Edits(del_rcpts=[r.rcpt]))
    return EndOfMessage(resubmit=split_.reinject, refusals=split_.refused, copies=copies,
                        edits=tuple(edits), expanded=tuple(expanded), notes=tuple(n for e in edits for n in e.notes),
                        fanout=fanout_address if in_place is not None and in_place.personal else None,
                        hold=in_place.hold if in_place is not None and copies is None else "")


# -- the archive -----------------------------------------------------------------------
def archived_copy(ls: ListSettings, message_headers: list[tuple[str, str]], body: bytes,
                  post_id: str, secret: Keyring | bytes, posted_at: float,
                  verdict: dmarc.Verdict | None = None, in_place_footer: bool = False) -> bytes:
    """The post as its members got it (List-* headers, prefixed Subject, wrapped for wrap_message,
    the footer when it was added in place; the shared mailto: List-Unsubscribe, never a member's
    personal link or footer), with Unix line ends for a Maildir."""
    edits = expand_list(ls, [], [], message_headers, post_id, secret, posted_at, verdict, body)
    out_headers = apply_header_edits(message_headers, edits)
    out_body = body if edits.body is None else edits.body
    if in_place_footer and ls.footer:
        out_body = shared_footer(ls, out_headers, out_body)[0] or out_body
    data = _header_bytes(out_headers) + b"\r\n" + out_body
    return data.replace(b"\r\n", b"\n")
