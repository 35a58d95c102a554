"""Per-list settings: their names, types, built-in defaults and where a value came from.

A setting's value is looked up in order: the list itself (its YAML block, or
`listmilter list set` for SQLite lists), then `defaults:` in the config
file, then the built-in default below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from listmilter.core import addresses, footer
from listmilter.core.errors import PermanentError


class SettingError(PermanentError, ValueError):
    pass


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise SettingError(f"must be one of {', '.join(allowed)} (got {value!r})")
        return value
    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise SettingError(f"must be a string (got {value!r})")
    if "\n" in value or "\r" in value:
        raise SettingError("must be a single line")
    return value


def _items(value: Any, what: str) -> list[str]:
    """A list setting's items, stripped: a YAML list, or one string split at commas and blanks
    (`list set`); SettingError "must be WHAT" for anything else."""
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        raise SettingError(f"must be {what} (got {value!r})")
    for item in value:
        if not isinstance(item, str):
            raise SettingError(f"must be {what} (got {item!r})")
    return [item.strip() for item in value]


def _addresses(value: Any) -> tuple[str, ...]:
    out = []
    for item in _items(value, "a list of addresses"):
        try:
            out.append(addresses.check(item))
        except addresses.AddressError as e:
            raise SettingError(str(e)) from None
    return tuple(out)


def _count(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SettingError(f"must be a whole number of at least {minimum} (got {value!r})")
        return value
    return parse


def _policies(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    allowed = ("reject", "quarantine", "none")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v in allowed for v in value):
        raise SettingError(f"must be a list of DMARC policies from {', '.join(allowed)} (got {value!r})")
    return tuple(dict.fromkeys(value))


def _flag(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    if not isinstance(value, bool):
        raise SettingError(f"must be true or false (got {value!r})")
    return value


def _list_id(value: Any) -> str:
    text = _text(value)
    if text and not all(part for part in text.split(".")) or " " in text or "<" in text:
        raise SettingError(f"must be a dot-atom such as dev.example.org (got {text!r})")
    return text


def _footer(value: Any) -> str:
    if not isinstance(value, str):
        raise SettingError(f"must be a string (got {value!r})")
    try:
        footer.check_template(value)
    except footer.FooterError as e:
        raise SettingError(str(e)) from None
    return value.replace("\r\n", "\n")


def _patterns(value: Any) -> tuple[str, ...]:
    """Addresses, or regular expressions written with a leading ^ (matched against the whole
    sender address, case-insensitively), as Mailman writes them in accept_these_nonmembers."""
    out = []
    for item in _items(value, "a list of addresses or ^regular expressions"):
        if item.startswith("^"):
            try:
                re.compile(item, re.IGNORECASE)
            except re.error as e:
                raise SettingError(f"{item!r} is not a valid regular expression: {e}") from None
            out.append(item)
            continue
        try:
            out.append(addresses.check(item))
        except addresses.AddressError as e:
            raise SettingError(f"{e} (a regular expression starts with ^)") from None
    return tuple(out)


def _reply_to(value: Any) -> str:
    text = _text(value).strip()
    if text in ("poster", "list"):
        return text
    try:
        return addresses.check(text)
    except addresses.AddressError:
        raise SettingError(f"must be poster, list or a mail address (got {text!r})") from None


def _folder(value: Any) -> str:
    text = _text(value)
    if text and not text.startswith("/"):
        raise SettingError(f"must be an absolute folder path, or empty (got {text!r})")
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("posting", "members", _choice("open", "members", "announce"),
            "who may post: open (anyone), members (members only), announce (owners only)"),
    Setting("owners", (), _addresses,
            "addresses of the list owners; they receive mail to <list>-owner@ and may always post"),
    Setting("subject_prefix", "", _text,
            "text put in front of the Subject once, e.g. \"[dev] \" (empty: none)"),
    Setting("description", "", _text,
            "one line describing the list; shown in List-Id and help replies"),
    Setting("list_id", "", _list_id,
            "the RFC 2919 List-Id (empty: the list address with @ turned into a dot)"),
    # Moderation (listmilter.core.moderation): a held post waits in the MTA's hold queue.
    Setting("moderated", False, _flag,
            "hold every post (except the owners') for an owner's decision"),
    Setting("nonmember_action", "hold", _choice("hold", "reject", "discard", "accept"),
            "posting: members lists, a post from someone who is no member (nor in accept_nonmembers): "
            "hold (for the owners), reject (550 at RCPT), discard (silently), accept"),
    Setting("accept_nonmembers", (), _patterns,
            "addresses, or regular expressions starting with ^, that may post to a members list "
            "without being members"),
    Setting("moderated_members", (), _addresses,
            "addresses whose posts are held for the owners"),
    Setting("max_message_size", 0, _count(0),
            "a post larger than this many bytes (header and body) is held; 0: no limit"),
    Setting("hold_days", 14, _count(1),
            "a held post nobody decided on is discarded after this many days (the poster is told)"),
    Setting("reply_to", "poster", _reply_to,
            "Reply-To of the posts: poster (left as the poster wrote it), list (the list address) "
            "or a mail address"),
    # DMARC (listmilter.core.dmarc): posts from domains whose policy would make receivers refuse them.
    Setting("dmarc_mitigation", "munge_from", _choice("munge_from", "wrap_message", "none"),
            "for a post whose From domain publishes a DMARC policy in dmarc_policies: munge_from "
            "(From: \"Alice via dev\" <dev@...>, the poster in Reply-To, the original in X-Original-From), "
            "wrap_message (the same From and Reply-To on a message of the list's own, the post attached "
            "whole as message/rfc822, its DKIM signature intact) or none (sent as it came)"),
    Setting("dmarc_policies", ("reject", "quarantine"), _policies,
            "the DMARC policies (p=, or sp= for a subdomain) that trigger dmarc_mitigation; "
            "a failed DNS lookup always does"),
    # Subscriptions (mail to <list>-request@, -subscribe@, -unsubscribe@, -confirm+TOKEN@; the web).
    Setting("subscribe_policy", "confirm", _choice("open", "confirm", "moderate", "confirm+moderate"),
            "joining: open (at once), confirm (the address confirms first), moderate (an owner approves), "
            "confirm+moderate (both)"),
    Setting("unsubscribe_confirm", True, _flag,
            "leaving by mail needs a confirmation (true) or happens at once (false); one-click "
            "unsubscribe on the web is always at once"),
    Setting("owner_notices", False, _flag,
            "mail the owners when someone joins or leaves"),
    Setting("confirm_days", 3, _count(1),
            "days a confirmation code stays valid"),
    Setting("confirm_limit_per_address", 3, _count(1),
            "at most this many replies to commands (confirmations, help...) per address and list per day, "
            "counted apart for requests from the address itself and for requests others made for it"),
    Setting("confirm_limit_per_list", 100, _count(1),
            "at most this many mails to others (a confirmation to an address that is not the envelope "
            "sender) per list per day"),
    Setting("confirm_limit_per_sender", 3, _count(1),
            "at most this many mails to others that one envelope sender may cause per list per day"),
    Setting("confirm_limit_per_client", 10, _count(1),
            "at most this many mails to others that one SMTP client address may cause per list per day"),
    Setting("templates", "", _folder,
            "a folder with your own NAME.txt notice templates (empty: the shipped ones); "
            "a missing file falls back to the shipped one"),
    Setting("one_click", True, _flag,
            "with web.base_url configured: send every member a copy of their own carrying a "
            "personal RFC 8058 one-click List-Unsubscribe URL (false: one copy for all, mailto only)"),
    Setting("footer", "", _footer,
            "text added to every post: {unsubscribe_url}, {list_address}, {member}, {postal_address} "
            "(empty: no footer). A footer with {member}, or {unsubscribe_url} on a list with one-click "
            "links, makes the list send one copy per member; any other is added once, in place"),
    Setting("postal_address", "", _text,
            "the sender's postal address, for {postal_address} in the footer (CAN-SPAM asks for one)"),
    Setting("archive", False, _flag,
            "keep every accepted post, as it went out, in a Maildir under state_dir/archive/LIST/ "
            "(`listmilter archive` exports it)"),
    Setting("report_weekly", False, _flag,
            "mail the owners the list's delivery report of the past week, once a week "
            "(`listmilter report` prints it at any time)"),
    # Bounce processing (listmilter deliver for <list>-bounces@).
    Setting("bounce_action", "disable", _choice("remove", "disable", "notify"),
            "what a bouncing member's score leads to: remove (and tell the owner), disable (warn, "
            "then remove), notify (report to the owner only)"),
    Setting("bounce_threshold", 5, _count(1),
            "score at which bounce_action is taken; a permanent failure adds 1, at most once a day"),
    Setting("bounce_stale_days", 7, _count(1),
            "a score with no new bounce for this many days starts again from 0"),
    Setting("bounce_warnings", 3, _count(0),
            "disable: how many warnings a disabled member gets before removal"),
    Setting("bounce_warning_interval_days", 7, _count(1),
            "disable: days between those warnings"),
    Setting("bounce_unrecognised", "digest", _choice("digest", "forward", "keep"),
            "mail to <list>-bounces@ that scores nobody is kept (in state_dir/bounces/, listed by "
            "`listmilter bounces LIST --kept`); digest: the owners get one mail a day at most, naming "
            "what was kept since the last; forward: each one, as it comes; keep: nothing"),
    Setting("bounce_kept_max_kb", 1024, _count(1),
            "a kept message is cut after this many KB (the owners' forwarded copy too)"),
    Setting("bounce_kept_days", 30, _count(1),
            "kept messages older than this many days are deleted (hourly, and at each new one)"),
    Setting("bounce_kept_quota_mb", 100, _count(1),
            "at most this many MB of kept messages per list: the oldest go first"),
    Setting("bounce_probe_days", 7, _count(1),
            "a failure bound only to a post (its ENVID) sends the member one probe; a probe that does "
            "not bounce within this many days clears the suspicion"),
    Setting("bounce_probes_per_day", 100, _count(0),
            "at most this many probes a day for reports that came from other hosts over SMTP (the local "
            "MTA's own DSNs are not limited); the suspicions past it are kept for the owners; 0: no limit"),
)}


def parse(name: str, value: Any) -> Any:
    """Check a value for setting `name`; raise SettingError with a message for admins."""
    setting = SETTINGS.get(name)
    if setting is None:
        raise SettingError(f"unknown list setting {name!r} (known: {', '.join(SETTINGS)})")
    return setting.parse(value)


@dataclass(frozen=True)
class ListSettings:
    """Every setting's effective value for one list: the list's own, else the
    config file's `defaults:`, else built-in (Config.list_settings builds it).
    One field per entry of SETTINGS, checked by the tests."""
    posting: str
    owners: tuple[str, ...]
    subject_prefix: str
    description: str
    list_id: str
    moderated: bool
    nonmember_action: str
    accept_nonmembers: tuple[str, ...]
    moderated_members: tuple[str, ...]
    max_message_size: int
    hold_days: int
    reply_to: str
    dmarc_mitigation: str
    dmarc_policies: tuple[str, ...]
    subscribe_policy: str
    unsubscribe_confirm: bool
    owner_notices: bool
    confirm_days: int
    confirm_limit_per_address: int
    confirm_limit_per_list: int
    confirm_limit_per_sender: int
    confirm_limit_per_client: int
    templates: str
    one_click: bool
    footer: str
    postal_address: str
    archive: bool
    report_weekly: bool
    bounce_action: str
    bounce_threshold: int
    bounce_stale_days: int
    bounce_warnings: int
    bounce_warning_interval_days: int
    bounce_unrecognised: str
    bounce_kept_max_kb: int
    bounce_kept_days: int
    bounce_kept_quota_mb: int
    bounce_probe_days: int
    bounce_probes_per_day: int


@dataclass(frozen=True)
class Effective:
    value: Any
    origin: str   # "list", "defaults (FILE:LINE)" or "built-in"


def resolve(name: str, list_settings: dict[str, Any], defaults: dict[str, Any],
            defaults_origin: dict[str, str] | None = None) -> Effective:
    if name in list_settings:
        return Effective(list_settings[name], "list")
    if name in defaults:
        where = (defaults_origin or {}).get(name, "defaults")
        return Effective(defaults[name], where)
    return Effective(SETTINGS[name].default, "built-in")


def resolve_all(list_settings: dict[str, Any], defaults: dict[str, Any]) -> ListSettings:
    return ListSettings(**{name: resolve(name, list_settings, defaults).value for name in SETTINGS})
