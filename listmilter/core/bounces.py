"""What a message to <list>-bounces@ says, and what it does to a member's score.

Plain functions over plain data; listmilter.app.bounce_processing applies them.

A message to the bounce address is one of:
- a DSN (RFC 3464 message/delivery-status, RFC 6533 message/global-delivery-status),
  wherever it sits in the message (top level, inside multipart/mixed, forwarded as
  message/rfc822): each per-recipient block names the member by the ORCPT we gave
  it (Original-Recipient), else by Final-Recipient; the ENVID
  (Original-Envelope-Id) ties it to a post. Its fields are read by this module,
  not by Python's parser, which folds blocks separated by a line of spaces into one
  and does not read RFC 6533 reports at all;
- a non-standard bounce: from the null sender, or an MTA's report from a real
  sender (looks_like_ndr). Report fields written as text (DSN fields, Amazon
  SES's JSON) are read first (core/ndr.py), then flufl.bounce's detectors (less
  the senders, Message-IDs and list addresses they take for failures), then, if
  they find nothing, listmilter's own (core/ndr.py). An ENVID found in the
  message is kept with it;
- an ARF abuse report (FEEDBACK) or an auto-response (vacation replies: RFC 3834
  markers): never a failure. A delivery report is never taken for an auto-response;
- anything else: unrecognised, kept for the owner.

Every header is read through listmilter.core.mailparse.text, so a message parsed
with any policy (8-bit, folded, Header objects) reads the same and never raises.
`read_bytes` bounds the work on a huge message (HEURISTIC_LIMIT, READ_LIMIT).
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import quopri
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from listmilter.core import addresses, headers, mailparse, ndr, settings


class Kind(StrEnum):
    """What a message to the bounce address is."""
    DSN = "dsn"
    HEURISTIC = "heuristic"
    AUTORESPONSE = "autoresponse"
    UNRECOGNISED = "unrecognised"
    UNREADABLE = "unreadable"         # reading it failed (a bug): kept for the owner like UNRECOGNISED
    FEEDBACK = "feedback"             # an ARF complaint (RFC 5965): no failure, kept for the owner


DSN, HEURISTIC, AUTORESPONSE, UNRECOGNISED = Kind.DSN, Kind.HEURISTIC, Kind.AUTORESPONSE, Kind.UNRECOGNISED
UNREADABLE, FEEDBACK = Kind.UNREADABLE, Kind.FEEDBACK


class Verdict(StrEnum):
    """What one failure did to a member's score (recorded with every failure)."""
    SCORED = "scored"
    COUNTED_TODAY = "counted-today"   # permanent, but the member scored already today
    TEMPORARY = "temporary"
    NOT_MEMBER = "not-member"
    NOT_RECIPIENT = "not-recipient"   # a member, but not one the post went to (joined later, disabled)
    UNVERIFIED = "unverified"         # no ENVID we issued, and nobody to probe (a disabled member)
    EXPIRED = "expired"               # an ENVID we issued, of a post older than ENVID_MAX_AGE
    DUPLICATE = "duplicate"           # the same failure of the same post, seen before
    UNRECOGNISED = "unrecognised"     # nothing recognisable: the message is kept for the owner
    SUSPECT = "suspect"               # a member's failure bound to a post or nothing: a probe decides
    PROBE_BOUNCED = "probe-bounced"   # the member's probe bounced: the address is dead
    UNPROBED = "unprobed"             # a suspicion, but the list's probes for today are spent


# Verdicts that leave the message for the owner to look at, and why.
FOR_OWNER = {
    Verdict.NOT_MEMBER: "not a member of the list",
    Verdict.UNVERIFIED: "no envelope id listmilter issued ties it to a post, and the member is disabled "
                        "(no probe)",
    Verdict.NOT_RECIPIENT: "a member, but not a recipient of that post (joined later, or disabled)",
    Verdict.EXPIRED: "a DSN for a post more than 14 days old: too late to be a delivery report "
                     "of that post, so not scored",
    Verdict.UNPROBED: "a suspicion, but no probe: the list sent bounce_probes_per_day probes for "
                      "reports from other hosts in the last day",
}

# A genuine DSN comes within the queue lifetimes of the MTAs on the way (Postfix: 5 days by
# default). An ENVID older than this is someone replaying the ENVIDs of old posts they
# received (a member, or a former member), never evidence against another member.
ENVID_MAX_AGE = 14 * 86400.0          # 14 days


class Action(StrEnum):
    """What a score at the threshold leads to (the `bounce_action` setting)."""
    REMOVE = "remove"
    DISABLE = "disable"
    NOTIFY = "notify"

DAY = 86400.0


@dataclass(frozen=True)
class Failure:
    address: str          # as we addressed the member (ORCPT), else the final recipient
    permanent: bool       # Action: failed; a delay only is temporary
    status: str = ""      # RFC 3463 code, e.g. 5.1.1
    diagnostic: str = ""  # the remote server's words, one line


@dataclass(frozen=True)
class Report:
    kind: str
    envid: str = ""
    failures: tuple[Failure, ...] = ()


# -- reading -------------------------------------------------------------------
_AUTO_SUBJECT = re.compile(r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|"
                           r"abwesenheit|absence|vacation|on leave|r[ée]ponse automatique)",
                           re.IGNORECASE)


def is_auto_response(msg: email.message.Message) -> bool:
    """RFC 3834 and the common de-facto markers of vacation replies."""
    auto = mailparse.text(msg.get("Auto-Submitted")).strip().lower()
    if auto and not auto.startswith("no"):
        return True
    if any(msg.get(h) is not None for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")):
        return True
    if mailparse.text(msg.get("Precedence")).strip().lower() in ("auto_reply", "auto-reply"):
        return True
    return bool(_AUTO_SUBJECT.match(mailparse.text(msg.get("Subject"))))


def _one_line(value: object, limit: int = 300) -> str:
    return " ".join(mailparse.text(value).split())[:limit]


def _address_field(value: object) -> str:
    """`rfc822;bob@example.net` -> bob@example.net; a bare `<bob@example.net>` (no address
    type, as some MTAs write Final-Recipient) too; '' for other address types."""
    kind, sep, address = mailparse.text(value).partition(";")
    if not sep:
        address = kind if "@" in kind else ""
    elif kind.strip().lower() not in ("rfc822", "utf-8"):
        return ""
    return address.strip().strip("<>").strip()


def _undo_escape(text: str) -> str:
    """Bytes the parser kept as surrogates, read as UTF-8 (RFC 6533 reports are UTF-8)."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:      # real non-ASCII text mixed with lone surrogates: replace them
        return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _report_text(part: email.message.Message) -> str:
    """The body of a delivery-status part as text, whatever the parser made of it.

    Python parses message/delivery-status into one sub-message per block, but only
    a truly empty line ends a block: a line of spaces folds the next block into
    this one. message/global-delivery-status (RFC 6533) it reads as one message,
    the first block as headers and the rest as body. A base64 or quoted-printable
    report it parses as garbage headers. So the text is put back together and
    read again by `_blocks`, with the transfer encoding undone."""
    payload = part.get_payload()
    if isinstance(payload, list):
        chunks = []
        for sub in payload[:MAX_RECIPIENTS + 1]:
            if not isinstance(sub, email.message.Message):
                continue
            head = "".join(f"{k}: {mailparse.text(v)}\n" for k, v in sub.items())
            # decode=True: the bytes as they came (compat32's str payload replaces 8-bit with U+FFFD).
            raw = sub.get_payload(decode=True) if not sub.is_multipart() else None
            body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            chunks.append(head + ("\n" + body if body.strip() else ""))
        text = "\n".join(chunks)
    elif isinstance(payload, str):
        text = payload
    else:
        return ""
    cte = mailparse.text(part.get("Content-Transfer-Encoding")).strip().lower()
    if cte in ("base64", "quoted-printable"):
        raw = text.encode("ascii", "replace")
        try:
            decoded = base64.b64decode(raw) if cte == "base64" else quopri.decodestring(raw)
        except (binascii.Error, ValueError):
            decoded = b""
        return decoded.decode("utf-8", "replace")
    return _undo_escape(text)


MAX_RECIPIENTS = 100_000     # per report part; one of ours names at most a post's recipients
_FIELD = re.compile(r"([!-9;-~]+)[ \t]*:(.*)")
_RECIPIENT_FIELDS = ("original-recipient", "final-recipient")


def _blocks(text: str, max_lines: int = 10 * MAX_RECIPIENTS) -> list[list[tuple[str, str]]]:
    """RFC 3464 blocks as lists of (lower-case name, unfolded value). A blank line or a
    line of white space ends a block (real MTAs write either)."""
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.splitlines()[:max_lines]:
        if not line.strip():
            if current:
                blocks.append(current)
            current = []
        elif line[0] in " \t":
            if current:
                name, value = current[-1]
                current[-1] = (name, (value + " " + line.strip())[:2000])
        else:
            m = _FIELD.match(line)
            if m:
                current.append((m.group(1).lower(), m.group(2).strip()[:2000]))
    if current:
        blocks.append(current)
    return blocks


def _per_recipient(blocks: list[list[tuple[str, str]]]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The per-message fields and one dict per recipient. A block naming a recipient
    (Original-Recipient or Final-Recipient, in any order among its fields) is a
    recipient's; a second recipient inside one block (blocks a parser or an MTA ran
    together) starts a new one. Blocks naming nobody are the message's."""
    message: dict[str, str] = {}
    recipients: list[dict[str, str]] = []
    for block in blocks:
        current: dict[str, str] = {}
        segments = [current]
        previous = ""
        for name, value in block:
            # An Original-Recipient right after a Final-Recipient is its own (Amazon SES writes them so).
            if name in _RECIPIENT_FIELDS and (name in current or (
                    name == "original-recipient" and "final-recipient" in current
                    and previous != "final-recipient")):
                current = {}
                segments.append(current)
            current.setdefault(name, value)
            previous = name
        for segment in segments:
            if any(f in segment for f in _RECIPIENT_FIELDS):
                recipients.append(segment)
            else:
                for name, value in segment.items():
                    message.setdefault(name, value)
    return message, recipients


def _delivery_statuses(msg: email.message.Message) -> list[email.message.Message]:
    """Every delivery-status part, at any depth: inside multipart/mixed, or in a report
    forwarded as message/rfc822 (mailparse.parse bounds the depth). Not inside the
    message a report returns: a post that carried a report as an attachment would
    otherwise lend its recipients to the real report's ENVID."""
    found = []
    todo = [msg]
    while todo:
        part = todo.pop()
        ctype = part.get_content_type()
        if ctype in _STATUS_TYPES:
            found.append(part)
            continue
        if not part.is_multipart():
            continue
        children = [p for p in part.get_payload() if isinstance(p, email.message.Message)]
        if ctype == "multipart/report" and any(c.get_content_type() in _STATUS_TYPES for c in children):
            children = [c for c in children if c.get_content_type() in _STATUS_TYPES]
        todo.extend(reversed(children))       # in document order
    return found


_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ENVID_HEADERS = ("Original-Envelope-Id", "X-Original-Envelope-Id")
_ENVID_FIELDS = tuple(h.lower() for h in _ENVID_HEADERS)      # as _blocks names them


def _returned_envid(msg: email.message.Message) -> str:
    """An ENVID in the returned headers: a text/rfc822-headers part or a message/rfc822 one."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "text/rfc822-headers":
            for block in _blocks(mailparse.payload_text(part)[:MAX_HEADERS_TEXT])[:1]:
                for name, value in block:
                    if name in _ENVID_FIELDS:
                        return _one_line(value, 100)
        elif ctype == "message/rfc822":
            inner = part.get_payload()
            for sub in inner if isinstance(inner, list) else ():
                if isinstance(sub, email.message.Message):
                    for header in _ENVID_HEADERS:
                        if sub.get(header) is not None:
                            return _one_line(sub.get(header), 100)
    return ""


MAX_HEADERS_TEXT = 64 * 1024


def _failure(fields: dict[str, str]) -> Failure | None:
    """One recipient's failure, or None (delivered, relayed, expanded, or no address)."""
    action = fields.get("action", "").strip().lower()
    status = _one_line(fields.get("status"), 40).partition(" ")[0]
    code = status[:1]
    # Real DSNs say "failure", "failed (reason)" or even "error"; with no Action the status class decides.
    if action.startswith(("fail", "expire")):     # "expired" (SendGrid): it gave up
        permanent = True
    elif action.startswith("delay"):
        permanent = False
    elif action.startswith(("deliver", "relay", "expand")):
        return None
    elif code in ("4", "5"):
        permanent = code == "5"
    else:
        return None
    address = _address_field(fields.get("original-recipient")) or _address_field(fields.get("final-recipient"))
    if not addresses.is_valid(address):
        return None
    return Failure(address, permanent, status, _one_line(fields.get("diagnostic-code")))


def read_dsn(msg: email.message.Message) -> Report | None:
    """The failures an RFC 3464/6533 DSN reports, or None if `msg` holds no delivery-status
    part. The ENVID is the first Original-Envelope-Id found: in a report's per-message
    fields, else among a recipient's fields, else in the returned headers."""
    parts = _delivery_statuses(msg)
    if not parts:
        return None
    envid = ""
    failures: list[Failure] = []
    seen: set[tuple[str, bool]] = set()
    for part in parts[:20]:
        message, recipients = _per_recipient(_blocks(_report_text(part)))
        envid = envid or _one_line(message.get("original-envelope-id"), 100) or next(
            (_one_line(r["original-envelope-id"], 100) for r in recipients if r.get("original-envelope-id")), "")
        for fields in recipients[:MAX_RECIPIENTS]:
            failure = _failure(fields)
            if failure is not None and (addresses.key(failure.address), failure.permanent) not in seen:
                seen.add((addresses.key(failure.address), failure.permanent))
                failures.append(failure)
    return Report(DSN, envid or _returned_envid(msg), tuple(failures))




def is_feedback_report(msg: email.message.Message) -> bool:
    """An ARF (RFC 5965) complaint: a user pressed "spam", no delivery failed."""
    if msg.get_content_type() == "multipart/report" and \
            (msg.get_param("report-type") or "") == "feedback-report":
        return True
    return any(p.get_content_type() == "message/feedback-report" for p in msg.walk())


_NDR_SUBJECT = re.compile(r"undeliver|returned mail|failure notice|non[- ]?deliver|delivery (status )?notification|"
                          r"delivery (failed|failure|has failed|problem|warning)|failed (mail|delivery)|mail failed|"
                          r"(could|can|has|have|was|were) ?(not|n't)( yet)?( be| been)? delivered|"
                          r"mail delivery subsystem|delayed mail|warning: message", re.IGNORECASE)
_NDR_FROM = re.compile(r"^\s*[\"<]?(mailer[-_]daemon|postmaster|mdaemon|mail delivery (subsystem|system))\b",
                       re.IGNORECASE)


def looks_like_ndr(msg: email.message.Message) -> bool:
    """An MTA's non-delivery report rather than a person's or a vacation program's reply:
    RFC 3834's auto-generated (not auto-replied), a mailer-daemon or postmaster in From,
    or an NDR's usual subject."""
    auto = mailparse.text(msg.get("Auto-Submitted")).strip().lower()
    if auto.startswith("auto-generated"):
        return True
    try:
        sender = email.utils.parseaddr(mailparse.text(msg.get("From"))[:1000])[1]
    except Exception:       # the stdlib's address parser on hostile text
        sender = ""
    if _NDR_FROM.match(sender) or _NDR_FROM.match(mailparse.text(msg.get("From"))):
        return True
    return bool(_NDR_SUBJECT.search(headers.decode(mailparse.text(msg.get("Subject"))[:1000])))


def _reads_as_ndr(msg: email.message.Message, auto: bool, has_dsn: bool) -> bool:
    """Whether listmilter's own detectors (core/ndr.py) may read a message flufl.bounce found
    nothing in. They take the addresses a report names, so only an MTA's report: with a DSN
    part, or an NDR's From or Subject, or (from the null sender) an NDR's words. Marked as an
    auto-reply (Exchange and Postfix mark some NDRs so), only from a mailer-daemon or
    postmaster and with no auto-reply subject: a vacation reply never reads as a failure."""
    if auto:
        sender = mailparse.text(msg.get("From"))[:1000]
        subject = headers.decode(mailparse.text(msg.get("Subject"))[:1000])
        return bool(_NDR_FROM.search(sender) or re.search(r"\b(mailer-daemon|postmaster)@", sender, re.I)) \
            and not _AUTO_SUBJECT.match(subject)
    if has_dsn or looks_like_ndr(msg):
        return True
    return any(ndr.FAILURE_TEXT.search(text[:ndr.TEXT_LIMIT]) for text in ndr.report_texts(msg)[:3])


def read(msg: email.message.Message, null_sender: bool,
         heuristic_msg: email.message.Message | None = None) -> Report:
    """What a message that reached the bounce address is.

    A delivery report is read as one whatever else the message says: an MTA that
    sends its DSNs from a non-null sender and marks them Auto-Submitted does not
    make them auto-responses. An ARF complaint and an auto-reply never yield a
    failure. flufl.bounce's heuristics read `heuristic_msg` when given (the
    message cut to HEURISTIC_LIMIT, see `read_bytes`)."""
    if is_feedback_report(msg):
        return Report(FEEDBACK)
    report = read_dsn(msg)
    if report is not None and report.failures:
        return report
    envid = report.envid if report else _returned_envid(msg)
    auto = is_auto_response(msg)
    # From the null sender, or an MTA's report from a real one: flufl.bounce's detectors
    # (which find addresses quoted in any text, so never on a person's mail).
    # (Some MTAs mark their NDRs from <> auto-replied: from the null sender, every message is read.)
    if null_sender or report is not None or looks_like_ndr(msg):
        heuristic = heuristic_msg if heuristic_msg is not None else msg
        ours = _reads_as_ndr(msg, auto, report is not None)
        fields = ndr.structured(heuristic) if ours else None
        failures = tuple(Failure(a, p) for a, p in fields or ())
        if fields is None:
            temporary, permanent = _flufl_failures(heuristic)
            # flufl.bounce takes any address quoted near its markers: a sender, a Message-ID, the list.
            ignore = ndr.not_members(heuristic, senders=False)
            temporary, permanent = temporary - ignore, permanent - ignore
            failures = tuple(Failure(a, True) for a in sorted(permanent) if addresses.is_valid(a)) + \
                tuple(Failure(a, False) for a in sorted(temporary - permanent) if addresses.is_valid(a))
        if not failures and ours and fields is None:
            failures = tuple(Failure(a, p) for a, p in ndr.failures(heuristic))
        if failures:
            return Report(HEURISTIC, envid, failures)
    if report is not None:
        return report         # a DSN that names no failure (a success notice, or unreadable)
    if auto:
        return Report(AUTORESPONSE)
    return Report(UNRECOGNISED, envid)


# flufl.bounce's detectors run regular expressions over the whole text; on a 3 MB
# message that is seconds of CPU inside `serve` (the issue measured ~20 s). Every
# detector looks at the report's first screens of text, where MTAs put the
# failed addresses; 256 KB holds any real NDR's text and quoted headers many
# times over. The MIME structure is read from the first READ_LIMIT bytes
# (Python's parser alone costs ~0.3 s a MB on a message of many small parts),
# unless they hold a delivery-status part: Postfix names every failed member of
# a post in one DSN (~400 bytes each), so a dead domain on a big list makes a
# DSN of megabytes, and every one of them is read.
HEURISTIC_LIMIT = 256 * 1024
READ_LIMIT = 1024 * 1024


def read_bytes(data: bytes, null_sender: bool) -> Report:
    """`read` over raw bytes, the heuristics on its first HEURISTIC_LIMIT bytes, the rest as
    the comment above says (a cut MIME structure parses, with defects)."""
    msg = mailparse.parse(data[:READ_LIMIT])
    if len(data) > READ_LIMIT and _delivery_statuses(msg):
        msg = mailparse.parse(data)
    cut = mailparse.parse(data[:HEURISTIC_LIMIT]) if len(data) > HEURISTIC_LIMIT else None
    return read(msg, null_sender, cut)


def _flufl_failures(msg: email.message.Message) -> tuple[set[str], set[str]]:
    from flufl.bounce import all_failures
    try:
        temporary, permanent = all_failures(msg)
    except Exception:   # flufl.bounce 6 raises IndexError on some plain messages
        return set(), set()
    def decode(items: Iterable[object]) -> set[str]:
        return {a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a) for a in items}
    return decode(temporary), decode(permanent)


# -- scoring -------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """The bounce_* settings of one list."""
    action: str = "disable"
    threshold: int = 5
    stale_days: int = 7
    warnings: int = 3
    warning_interval_days: int = 7

    @classmethod
    def of(cls, s: settings.ListSettings) -> Policy:
        return cls(s.bounce_action, s.bounce_threshold, s.bounce_stale_days, s.bounce_warnings,
                   s.bounce_warning_interval_days)


@dataclass(frozen=True)
class Score:
    score: int = 0
    last_scored: float = 0.0     # time of the last bounce that counted
    last_bounce: float = 0.0     # time of the last permanent bounce, counted or not


def _day(t: float) -> int:
    return int(t // DAY)


def add_bounce(current: Score, now: float, policy: Policy) -> tuple[Score, bool]:
    """The score after a permanent bounce at `now`, and whether this bounce counted.

    A score with no bounce for `stale_days` starts again; bounces count at most
    once per (UTC) day, so a dead address scores once for a day's posts.
    """
    score = current
    if score.last_bounce and now - score.last_bounce > policy.stale_days * DAY:
        score = Score()
    if score.last_scored and _day(score.last_scored) == _day(now):
        return replace(score, last_bounce=max(now, score.last_bounce)), False
    return Score(score.score + 1, now, max(now, score.last_bounce)), True


def due(score: Score, now: float, policy: Policy) -> bool:
    """Does a score call for the list's bounce_action now?

    Checked at every bounce and by the hourly run, so a threshold lowered
    after a member scored applies to the score they have; a stale score
    (no bounce for stale_days) does not count.
    """
    if score.last_bounce and now - score.last_bounce > policy.stale_days * DAY:
        return False
    return score.score >= policy.threshold


def score_bounce(current: Score, now: float, policy: Policy, pending: str = "",
                 acted: bool = False) -> tuple[Score, bool, str]:
    """A scored permanent failure: the new score, whether it counted, and the action
    now pending (the policy's action once the score reaches the threshold, unless an
    action is pending or was taken already)."""
    new, counted = add_bounce(current, now, policy)
    if not pending and not acted and due(new, now, policy):
        pending = policy.action     # also for a failure counted today, after a lowered threshold
    return new, counted, pending


def verdict(failure: Failure, kind: str, posted_at: float | None, member_added: float | None,
            member_active: bool, now: float | None = None) -> Verdict:
    """Whether a failure may score the member: only a permanent failure, of a member,
    in a DSN carrying an ENVID we issued (`posted_at` is the post's time from it) at most
    ENVID_MAX_AGE before `now` (when given: a VERP code has its own age limit), of a member
    the post went to. `member_added` is None for a non-member."""
    if not failure.permanent:
        return Verdict.TEMPORARY
    if member_added is None:
        return Verdict.NOT_MEMBER
    if kind != Kind.DSN or posted_at is None:
        return Verdict.UNVERIFIED
    if now is not None and posted_at < now - ENVID_MAX_AGE:
        return Verdict.EXPIRED
    if not was_recipient(member_added, member_active, posted_at):
        return Verdict.NOT_RECIPIENT
    return Verdict.SCORED


def suspicion(failure: Failure, posted_at: float | None, member_added: float | None,
              member_active: bool, now: float | None = None) -> Verdict:
    """What a failure read from mail to the plain `<list>-bounces@` is, in any format (a
    DSN or an NDR read by the detectors). Nothing there binds the failure to the member:
    anyone who received a post has seen its ENVID. So a permanent failure of an active
    member is SUSPECT (a probe decides, core/probes.py), whether bound to a post we sent
    them (`posted_at`, from our ENVID) or to nothing; a replayed ENVID (EXPIRED), a post
    sent before they joined (NOT_RECIPIENT) and non-members stay what verdict() says."""
    v = verdict(failure, Kind.DSN, posted_at, member_added, member_active, now)
    if v == Verdict.SCORED or (v == Verdict.UNVERIFIED and member_active):
        return Verdict.SUSPECT
    return v


@dataclass(frozen=True)
class Steps:
    """How an action is carried out, in order: the membership change, the owners'
    notice (with keep/remove links or not), a first warning to the member, and what
    the bounce record says afterwards."""
    membership: str | None         # "unsubscribe", "disable" or None
    owner_notice: str              # the notice's kind: remove, disable, notify
    decision_links: bool           # the owners may answer keep or remove
    warn_member: bool              # the first of the policy's warnings (if it has any)
    record: str                    # "forget", "disabled" or "reported"
    logged_as: str


STEPS = {
    Action.REMOVE: Steps("unsubscribe", "remove", False, False, "forget", "removed"),
    Action.DISABLE: Steps("disable", "disable", True, True, "disabled", "disabled"),
    Action.NOTIFY: Steps(None, "notify", True, False, "reported", "reported to owner"),
}


def was_recipient(member_added: float, member_active: bool, posted_at: float | None) -> bool:
    """Could the member have received the post a DSN refers to?

    Joined after the post (a minute's slack for clocks), or disabled now: the
    bounce is not theirs to score.
    """
    if not member_active:
        return False
    if posted_at is None or not member_added:
        return True
    return member_added <= posted_at + 60


def next_step(warnings_sent: int, next_warning: float, now: float, policy: Policy) -> str | None:
    """For a member disabled by bounces: 'warn', 'remove' or None (nothing due yet)."""
    if now < next_warning:
        return None
    return "warn" if warnings_sent < policy.warnings else "remove"


# -- kept mail -----------------------------------------------------------------
def kept_to_delete(files: Iterable[tuple[str, int, float]], now: float, retention: float, quota: int,
                   keep: str = "") -> list[str]:
    """Of a list's kept files (path, size, mtime): those older than `retention` seconds,
    then the oldest until the rest fit in `quota` bytes. `keep` (the file just kept)
    stays, so the newest evidence is never the one lost."""
    doomed = []
    left = []
    for path, size, mtime in sorted(files, key=lambda f: (f[2], f[0])):
        if path != keep and now - mtime > retention:
            doomed.append(path)
        else:
            left.append((path, size))
    total = sum(size for _, size in left)
    for path, size in left:
        if total <= quota:
            break
        if path != keep:
            doomed.append(path)
            total -= size
    return doomed


# -- explaining ------------------------------------------------------------------
KIND_MEANS = {
    Kind.DSN: "a delivery status notification (RFC 3464/6533), read from its own fields",
    Kind.HEURISTIC: "a non-standard bounce, read by listmilter's and flufl.bounce's detectors (core/ndr.py)",
    Kind.AUTORESPONSE: "an automatic reply (vacation and the like): no bounce, dropped",
    Kind.FEEDBACK: "an abuse report (ARF, RFC 5965): no delivery failed, kept for the owners",
    Kind.UNRECOGNISED: "nothing listmilter recognises as a bounce: kept for the owners",
    Kind.UNREADABLE: "listmilter could not read it: kept for the owners",
}

WHY = {
    Verdict.SCORED: "a permanent failure of a member, from a post listmilter sent them: scores",
    Verdict.TEMPORARY: "a temporary failure (a delay): recorded, never scored",
    Verdict.NOT_MEMBER: FOR_OWNER[Verdict.NOT_MEMBER] + ": kept for the owners",
    Verdict.UNVERIFIED: FOR_OWNER[Verdict.UNVERIFIED] + ": kept for the owners",
    Verdict.NOT_RECIPIENT: FOR_OWNER[Verdict.NOT_RECIPIENT] + ": kept for the owners",
    Verdict.EXPIRED: FOR_OWNER[Verdict.EXPIRED] + ": kept for the owners",
    Verdict.UNPROBED: FOR_OWNER[Verdict.UNPROBED] + ": kept for the owners",
    Verdict.SUSPECT: "bound to a post by its ENVID at most, never to the member: a suspicion; the member "
                     "gets one probe message, and the bounce action is taken only if the probe bounces",
    Verdict.PROBE_BOUNCED: "a bounce to the member's probe address: the address is dead, the bounce "
                           "action is taken",
}

# How a failure is tied to a member or a post: a post's ENVID, a personal copy's
# VERP sender, or a probe's one-time return path (core/probes.py).
BINDINGS = ("envid", "verp", "probe", "none")


@dataclass(frozen=True)
class Explained:
    address: str
    status: str
    permanent: bool
    binding: str
    verdict: str
    why: str


@dataclass(frozen=True)
class Explanation:
    kind: str
    envid: str
    failures: tuple[Explained, ...]

    def as_json(self) -> dict[str, object]:
        return {"kind": str(self.kind), "failures": [
            {"address": f.address, "status": f.status, "permanent": f.permanent, "binding": f.binding,
             "verdict": str(f.verdict)} for f in self.failures]}


def explain(report: Report, posted_at: float | None,
            members: dict[str, tuple[float, bool]] | None, now: float | None = None) -> Explanation:
    """What listmilter makes of one report, without recording anything.

    `posted_at` is the post's time from the report's ENVID if it verified (for
    the list being looked at), else None; `members` maps each failed address's
    key (addresses.key) to (joined, active) for the members among them, or is
    None when no list is known (nobody can be scored then). Mail delivered to a
    probe's or a personal copy's own address is explained by core/probes.py and
    core/verp.py, which that address binds to its member."""
    binding = "envid" if posted_at is not None else "none"
    out = []
    for f in report.failures:
        if members is None:
            v = Verdict.TEMPORARY if not f.permanent else Verdict.UNVERIFIED
            why = WHY[v] if v == Verdict.TEMPORARY else \
                "no list to check the ENVID and the membership against (name the LIST)"
        else:
            member = members.get(addresses.key(f.address))
            v = suspicion(f, posted_at, member[0] if member else None, bool(member and member[1]), now)
            why = WHY.get(v, str(v))
        out.append(Explained(f.address, f.status, f.permanent, binding, v, why))
    return Explanation(report.kind, report.envid, tuple(out))


def envelope_sender(msg: email.message.Message) -> str | None:
    """The envelope sender a delivered file records in Return-Path ('' for <>), None if it has none."""
    value = msg.get("Return-Path")
    if value is None:
        return None
    return mailparse.text(value).strip().strip("<>").strip()


def envid_list(envid_text: str) -> str:
    """The list address at the end of one of our ENVIDs (POSTID.TIME.MAC.LIST), '' if none."""
    parts = envid_text.split(".", 3)
    return parts[3] if len(parts) == 4 and addresses.is_valid(parts[3]) else ""
