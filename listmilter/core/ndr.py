"""Non-delivery reports that are neither DSNs nor in a format flufl.bounce knows.

Plain functions over an email.message.Message, no I/O. listmilter.core.bounces
calls them after reading a DSN's own fields: `structured` before flufl.bounce's
detectors, `not_members` to drop what those take for a failed recipient but is
the list, the bounce address or a Message-ID, and `failures` when they find
nothing. Measured on real bounces of many MTAs and providers
(tests/data/sisimai, bench/ndr_corpus.py).

Each detector reads the report's own text: its text parts, not the message it
returns (message/rfc822, text/rfc822-headers, a text attachment, or what
follows a marker such as "----- Unsent message follows -----"), and gives
(address, permanent) pairs:

- ses_notification: an Amazon SES notification (JSON sent by SNS as mail): a
  Bounce's bouncedRecipients; a Complaint or a Delivery names no failure;
- inline_dsn: DSN fields written as text (Amazon WorkMail's "Technical
  report", a delivery-status part whose MIME boundary is broken): each
  Final-Recipient (its Original-Recipient when it has one), by Action and Status;
- report_addresses: the addresses an MTA names in its report (Sendmail V5,
  OpenSMTPD, DragonFly, Notes, Exchange 2003, Office 365, MailMarshal, Trend
  Micro, m-FILTER, Mimecast, the Japanese carriers...), each permanent or not by
  the SMTP reply or status code next to it, else by what the report says;
- returned_to: the returned message's To, when the report names nobody
  (Sendmail V5, Verizon): only if the returned headers are not a list post's,
  whose To is the list.

Never a member by accident: the addresses of the report's own headers (the
bounce address, and the list it belongs to), of the returned message's sender
headers and Message-ID, quoted sender lines, and MTAs' own (postmaster,
mailer-daemon) are left out. An auto-reply is not read here (the caller decides).
Bounded work: at most TEXT_LIMIT characters of text, MAX_LINES lines of at most
LINE_LIMIT characters, MAX_FAILURES addresses; no regular expression nests repeats
that can match the same text, so none backtracks without end (tests/test_ndr_corpus.py
feeds them hostile text).
"""

from __future__ import annotations

import email.message
import re
from collections.abc import Iterable

from listmilter.core import addresses, mailparse

TEXT_LIMIT = 256 * 1024
LINE_LIMIT = 1000
MAX_LINES = 4000
MAX_FAILURES = 100

Found = list[tuple[str, bool]]       # (address, permanent), in the order the report names them

# RFC 5322's atext less / & ?, which a member's address hardly ever holds and URLs and paths
# do ("identity/bob@example.org", "?endpoint=bob@example.org").
_ATEXT = "A-Za-z0-9!#$%'*+=^_`{|}~."
# The lookbehind makes a match start where an address can; the domain's labels are
# separated by a dot their class does not hold, so a failed match is given up fast.
_ADDRESS = re.compile(rf"(?<![{_ATEXT}/&?-])[{_ATEXT}-]{{1,64}}@[A-Za-z0-9-]{{1,63}}(?:\.[A-Za-z0-9-]{{1,63}}){{1,10}}")
# Words around an address that make it whom to ask, not who failed (Japanese puts them after).
_ADVICE = re.compile(r"contact|assistance|questions|write to|send (?:e-?)?mail to|reply to|abuse", re.IGNORECASE)
_ADVICE_AFTER = re.compile("連絡|問い合わせ|問合せ")

# The start of the returned message inside the report's text.
_RETURNED = re.compile(
    r"(?:original|returned|unsent|undelivered|undeliverable|rejected|bounced)\s(?:message|mail|e-?mail)"
    r"(?!\s(?:was|is|has|had|could|did|to|from|you|cannot|can't)\b)|"
    r"message\sheaders\sfollow|headers\sof\sthe\soriginal|original\smessage\sheaders|"
    r"below\sthis\sline\sis\sa\scopy|copy\sof\s(?:the|your)\s(?:original\s)?message|"
    r"message\s(?:text|body)\sfollows|text\sof\sthe\s(?:original\s)?message|"
    r"^(?:received|return-path|dkim-signature|x-original-to|delivered-to|message-id):|"
    r"^(?-i:From \S{1,300} {1,2}[A-Z][a-z]{2} )",         # an mbox From_ line: a returned report
    re.IGNORECASE)
# A line quoting who sent the message, or when, or what: never a failed recipient.
_QUOTED = re.compile(r"^\W{0,8}(?:original[ -]|x-[a-z-]{1,30}-)?(?:from|sender|reply-to|return-path|errors-to|"
                     r"message-id|in-reply-to|references|to|cc|date|sent|subject|envelope-from)\s{0,8}:",
                     re.IGNORECASE)
_MTA_LOCAL = re.compile(r"(?:mailer-?daemon|mail-?daemon|postmaster|post_master|no-?reply|do-?not-?reply|"
                        r"hostmaster|abuse)", re.IGNORECASE)
_LIST_ROLE = re.compile(r"-(?:bounces|owner|request|admin)$", re.IGNORECASE)
_CODE = re.compile(r"(?:^|[\s:>(\[;#<'\"])([45])(?:\d\d(?=[\s-]|$)|\.\d{1,3}\.\d{1,3}(?![\d.]))")
_DELAY = re.compile(r"\b(?:delay(?:ed)?|will (?:continue to |keep |be )?(?:retry|retried|try|trying|attempt)|"
                    r"temporar(?:y|ily)|not yet been delivered|still trying|deferred)\b", re.IGNORECASE)
_GAVE_UP = re.compile(r"\b(?:permanent|fatal|gave up|giving up|cannot send message for|"
                      r"could not be delivered|couldn't be delivered|does(?: not|n't) exist|unknown)\b",
                      re.IGNORECASE)
# A report that gave up on a temporary failure (Sendmail's "Cannot send message for 5 days"):
# the message is returned, a failure whatever the code of the last attempt.
_EXPIRED = re.compile(r"\b(?:cannot send message for|gave up|giving up|retry (?:time(?:out)?|period) "
                      r"(?:exceeded|expired)|too long in (?:the )?queue|could not be delivered within|"
                      r"message expired|expired after)\b", re.IGNORECASE)
# What an MTA's report says that a person's mail rarely does: reason to read a report
# that came with no other mark of one.
FAILURE_TEXT = re.compile(
    r"could(?: not|n't) be delivered|undeliver|delivery (?:has )?failed|failed to deliver|"
    r"error (?:delivering|sending|occurred)|permanent(?: fatal)? error|user unknown|unknown user|"
    r"no such (?:user|mailbox|address)|does(?: not|n't) exist|not (?:be )?reached|rejected|"
    r"mailbox (?:is )?(?:full|unavailable)|host unknown|failure", re.IGNORECASE)
_REPORT_PARTS = ("message/delivery-status", "message/global-delivery-status", "message/feedback-report")
_DSN_FIELD = re.compile(r"^\s{0,8}(final-recipient|original-recipient|action|status)\s{0,8}:(.*)", re.IGNORECASE)


def _lines(text: str) -> list[str]:
    return [line[:LINE_LIMIT] for line in text[:TEXT_LIMIT].splitlines()[:MAX_LINES]]


def _find(line: str, advice: bool = False, next_line: str = "") -> list[str]:
    """The valid addresses in a line, lower-cased, in order; with `advice`, not one that
    comes with words such as "please contact" (those after it may be on the next line)."""
    found = []
    for m in _ADDRESS.finditer(line):
        if advice and (_ADVICE.search(line, max(0, m.start() - 60), m.start()) or
                       _ADVICE_AFTER.search(line[m.end():m.end() + 30] + next_line[:30])):
            continue
        address = m.group().strip(".").lower()
        if addresses.is_valid(address):
            found.append(address)
    return found


def _decoded(part: email.message.Message) -> str:
    """A leaf part's text, as mailparse.payload_text reads it, also from a message parsed with
    compat32 itself (whose 8-bit header values are Header objects, not str)."""
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    charset = None
    if len(mailparse.text(part.get("Content-Type"))) <= 1000:
        try:
            charset = part.get_content_charset()
        except (TypeError, AttributeError, ValueError):     # compat32's parameter parser on a Header
            charset = None
    try:
        return raw.decode(charset or "utf-8", "replace")
    except (LookupError, ValueError):    # unknown, or a codec that is no text charset (idna, a NUL)
        return raw.decode("utf-8", "replace")


def _texts(msg: email.message.Message) -> tuple[list[str], list[email.message.Message]]:
    """The text parts of the report (decoded), and the messages it returns. Not inside a
    returned message: what a post quotes is not the report's."""
    texts: list[str] = []
    returned: list[email.message.Message] = []
    todo = [msg]
    size = 0
    while todo and size < TEXT_LIMIT:
        part = todo.pop()
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            inner = part.get_payload()
            returned += [m for m in (inner if isinstance(inner, list) else []) if isinstance(m, email.message.Message)]
            continue
        if ctype in _REPORT_PARTS:      # read by listmilter.core.bounces from its own fields
            continue
        if ctype == "text/rfc822-headers":
            returned.append(mailparse.parse(_decoded(part)[:TEXT_LIMIT].encode("utf-8", "replace"),
                                            headers_only=True))
            continue
        if part.is_multipart():
            children = [p for p in part.get_payload() if isinstance(p, email.message.Message)]
            if ctype == "multipart/alternative":
                plain = [c for c in children if c.get_content_type() == "text/plain"]
                children = plain[:1] or children[:1]
            todo.extend(reversed(children))
            continue
        # A text attachment is a returned message or a file of the post, once the report has
        # a text. A multipart whose boundary is broken reads as one text: its report is in it.
        attached = mailparse.text(part.get("Content-Disposition")).strip().lower().startswith("attachment")
        if attached and texts:
            continue
        if (ctype.startswith(("text/", "multipart/")) and ctype != "text/html") or (ctype == "text/html" and not texts):
            text = _decoded(part)[:TEXT_LIMIT - size]
            if ctype == "text/html":
                text = re.sub(r"<[^<>]{0,2000}>", " ", text).replace("&lt;", "<").replace("&gt;", ">")
            texts.append(text)
            size += len(text)
    return texts, returned


def report_texts(msg: email.message.Message) -> list[str]:
    """The report's own text parts, decoded (at most TEXT_LIMIT characters in all)."""
    return _texts(msg)[0]


def _split(texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """The report's own lines, and the returned message's lines that follow a marker."""
    report: list[str] = []
    returned: list[str] = []
    for text in texts:
        lines = _lines(text)
        for i, line in enumerate(lines):
            if _RETURNED.search(line):
                report += lines[:i]
                returned += lines[i + 1:]
                break
        else:
            report += lines
    return report[:MAX_LINES], returned[:MAX_LINES]


def _header_lines(lines: list[str]) -> dict[str, list[str]]:
    """Header fields quoted as text (a returned message's, inline): lower-case name -> values."""
    fields: dict[str, list[str]] = {}
    for line in lines[:200]:
        name, sep, value = line.strip().partition(":")
        if sep and name and len(name) < 40 and " " not in name:
            fields.setdefault(name.lower(), []).append(value)
    return fields


_SENDER_FIELDS = ("from", "sender", "reply-to", "return-path", "errors-to", "message-id", "in-reply-to",
                  "references", "list-post", "list-owner", "list-help", "list-subscribe", "list-unsubscribe")
_OWN_FIELDS = ("from", "sender", "reply-to", "to", "cc", "return-path", "message-id")
# Where the report was delivered: the bounce address here, but some MTAs (DragonFly) write the
# failed recipient into X-Original-To. So only an address of a list's role counts.
_DELIVERY_FIELDS = ("delivered-to", "x-original-to", "envelope-to", "x-envelope-to")
_LIST_FIELDS = ("list-id", "list-post", "list-unsubscribe")


def _returned_fields(msg: email.message.Message, returned_lines: list[str]) -> list[dict[str, list[str]]]:
    _, returned = _texts(msg)
    out = [{k.lower(): [mailparse.text(v) for v in r.get_all(k) or []] for k in set(r.keys())} for r in returned[:5]]
    out.append(_header_lines(returned_lines))
    return out


def _all(fields: dict[str, list[str]], names: Iterable[str]) -> set[str]:
    return {a for name in names for value in fields.get(name, [])[:20] for a in _find(value[:LINE_LIMIT])}


def not_members(msg: email.message.Message, senders: bool = True) -> set[str]:
    """Addresses a report names that are never a failed member: the report's own header
    addresses (the bounce address and the list's: <list>-bounces+...@ -> <list>@), the
    returned message's Message-ID and List-* and, with `senders`, its sender addresses
    (flufl.bounce's detectors go without: a test message to oneself bounces too)."""
    own = {k: [mailparse.text(v) for v in msg.get_all(k) or []] for k in _OWN_FIELDS + _DELIVERY_FIELDS}
    out = _all(own, _OWN_FIELDS)
    out |= {a for a in _all(own, _DELIVERY_FIELDS) if _LIST_ROLE.search(a.rpartition("@")[0].partition("+")[0])}
    for fields in _returned_fields(msg, _split(_texts(msg)[0])[1]):
        out |= _all(fields, _SENDER_FIELDS if senders else _SENDER_FIELDS[5:])
    for address in list(out):
        local, _, domain = address.rpartition("@")
        base = _LIST_ROLE.sub("", local.partition("+")[0])
        out |= {f"{base}@{domain}", f"{base}-bounces@{domain}"}
    return out


def _ignored(address: str, exclude: set[str]) -> bool:
    local = address.rpartition("@")[0]
    return address in exclude or bool(_MTA_LOCAL.fullmatch(local)) or local.endswith("-bounces") \
        or "-bounces+" in local


def inline_dsn(lines: list[str]) -> Found | None:
    """DSN fields written as text: one recipient per Final-Recipient (or Original-Recipient
    met again), by its Action, else its Status class. None if no line names a recipient."""
    recipients: list[dict[str, str]] = []
    current: dict[str, str] = {}
    previous = ""
    for line in lines + [""]:
        m = _DSN_FIELD.match(line)
        name, value = (m.group(1).lower(), m.group(2).strip()) if m else ("", "")
        # A block ends at an empty line, or where a second recipient starts (the fields of a
        # block come in any order: Amazon WorkMail writes Action first, an Original-Recipient
        # may follow its Final-Recipient).
        if not line.strip() or name.endswith("recipient") and (name in current or (
                name == "original-recipient" and "final-recipient" in current
                and previous != "final-recipient")):
            if "final-recipient" in current or "original-recipient" in current:
                recipients.append(current)
            current = {}
        if name:
            current.setdefault(name, value)
            previous = name
    if not recipients:
        return None
    found: Found = []
    for fields in recipients[:MAX_FAILURES]:
        action = fields.get("action", "").lower()
        status = fields.get("status", "").strip()[:1]
        if action.startswith(("deliver", "relay", "expand")):
            continue
        named = _find(fields.get("original-recipient", "")) or _find(fields.get("final-recipient", ""))
        if named:
            found.append((named[0], action.startswith("fail") or not action.startswith("delay") and status != "4"))
    return found


def _judge(text: str) -> tuple[bool, bool]:
    """What the report says of all its recipients: (it gave up, it will try again)."""
    return bool(_EXPIRED.search(text)), bool(_DELAY.search(text) and not _GAVE_UP.search(text))


def _permanent(code: str, judged: tuple[bool, bool]) -> bool:
    """Permanent by the code, unless the report gave up; with no code, unless it says it will
    try again."""
    gave_up, will_retry = judged
    if gave_up:
        return True
    if code:
        return code == "5"
    return not will_retry


def _code(lines: list[str]) -> str:
    """The class ('4' or '5') of the first failure code in these lines, '' if none."""
    for line in lines:
        m = _CODE.search(line)
        if m:
            return m.group(1)
    return ""


def report_addresses(lines: list[str], exclude: set[str], subject: str = "") -> Found:
    """Every address the report names but a sender's, an MTA's or the list's, permanent by
    the code on its line or the few after it (before the next address), else unless the
    report says it will try again."""
    named: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if _QUOTED.match(line):
            continue
        for address in _find(line, True, lines[i + 1] if i + 1 < len(lines) else ""):
            if not _ignored(address, exclude) and address not in (a for _, a in named):
                named.append((i, address))
        if len(named) >= MAX_FAILURES:
            break
    if not named:
        return []
    judged = _judge(subject + "\n" + "\n".join(lines))
    found: Found = []
    for n, (i, address) in enumerate(named):
        end = named[n + 1][0] if n + 1 < len(named) and named[n + 1][0] > i else i + 4
        found.append((address, _permanent(_code(lines[i:max(end, i + 1)][:4]), judged)))
    return found


def returned_to(msg: email.message.Message, lines: list[str], returned_lines: list[str],
                exclude: set[str], subject: str = "") -> Found:
    """The returned message's To, if it names one address and is no list post's."""
    for fields in _returned_fields(msg, returned_lines):
        if any(name in fields for name in _LIST_FIELDS) or "to" not in fields:
            continue
        to = [a for a in _all(fields, ("to",)) if not _ignored(a, exclude)]
        if len(to) == 1 and len(fields["to"]) == 1:
            return [(to[0], _permanent(_code(lines), _judge(subject + "\n" + "\n".join(lines))))]
    return []


_SES_TYPE = re.compile(r'\\?"notificationType\\?"\s{0,9}:\s{0,9}\\?"(\w{1,30})')
_SES_BOUNCE_TYPE = re.compile(r'\\?"bounceType\\?"\s{0,9}:\s{0,9}\\?"(\w{1,30})')
_SES_RECIPIENTS = re.compile(r'\\?"bouncedRecipients\\?"\s{0,9}:\s{0,9}\[([^\]]{0,20000})')
_SES_ADDRESS = re.compile(r'\\?"emailAddress\\?"\s{0,9}:\s{0,9}\\?"([^"\\]{1,254})')


def ses_notification(lines: list[str]) -> Found | None:
    """An Amazon SES notification (JSON, sent by SNS as mail): a Bounce's bouncedRecipients,
    permanent if its bounceType is Permanent; nothing for a Complaint or a Delivery. None
    if the text is no SES notification."""
    text = "".join(line[1:] if line.startswith(" ") else line for line in lines)   # lines SNS wrapped
    kind = _SES_TYPE.search(text)
    if not kind:
        return None
    if kind.group(1) != "Bounce":
        return []
    bounce_type = _SES_BOUNCE_TYPE.search(text)
    permanent = bool(bounce_type and bounce_type.group(1) == "Permanent")
    recipients = _SES_RECIPIENTS.search(text)
    found: Found = []
    for m in _SES_ADDRESS.finditer(recipients.group(1) if recipients else ""):
        address = m.group(1).strip().lower()
        if addresses.is_valid(address) and len(found) < MAX_FAILURES:
            found.append((address, permanent))
    return found


def structured(msg: email.message.Message) -> Found | None:
    """What a report says in fields of its own written as text (an SES notification, DSN
    fields), or None if it has none. Read before flufl.bounce's detectors, which take any
    address in them (a Diagnostic-Code's, a sender's); [] is an answer: no failure."""
    lines, _ = _split(_texts(msg)[0])
    ses = ses_notification(lines)
    if ses is not None:
        return ses
    recipients = inline_dsn(lines)
    if recipients is None:
        return None
    exclude = not_members(msg)
    return [(a, p) for a, p in recipients if not _ignored(a, exclude)]


def failures(msg: email.message.Message) -> Found:
    """The failed recipients a non-DSN report names, by the first detector that finds any."""
    lines, returned_lines = _split(_texts(msg)[0])
    exclude = not_members(msg)
    subject = mailparse.text(msg.get("Subject"))[:LINE_LIMIT]
    return report_addresses(lines, exclude, subject) or \
        returned_to(msg, lines, returned_lines, exclude, subject)
