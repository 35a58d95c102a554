"""Mail that listmilter writes itself: refusal notices and admin notices."""

from __future__ import annotations

import email.message
import email.policy
import email.utils
import os
import re
import string

from listmilter.core import addresses, mailparse, when


def _message(from_addr: str, to_addr: str, subject: str, text: str) -> email.message.EmailMessage:
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = from_addr
    msg["To"] = to_addr
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=from_addr.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text)
    return msg


def refusal(list_address: str, sender: str, reason: str, message_headers: list[tuple[str, str]]
            ) -> bytes:
    """Told to the sender when a post made with the sendmail command is refused.

    (Over SMTP the sender gets the 550 reply instead; the sendmail command
    cannot refuse one recipient of a message.)
    """
    owner = addresses.role_address(list_address, "owner")
    quoted = "".join(f"    {n}: {mailparse.text(v)}\n" for n, v in message_headers
                     if n.lower() in ("from", "to", "cc", "subject", "date", "message-id"))
    text = (f"Your message was not sent to the list {list_address}:\n\n"
            f"    {reason}\n\n"
            f"The other recipients of the message, if any, were not affected.\n"
            f"If you think this is wrong, write to the list owners at {owner}.\n\n"
            f"The message:\n{quoted}")
    msg = _message(owner, sender, f"Not delivered to {list_address}", text)
    return msg.as_bytes()


def list_created(list_address: str, admin: str, owners: tuple[str, ...], posting: str, by: str) -> bytes:
    text = (f"The mailing list {list_address} was created by {by}.\n\n"
            f"    owners:  {', '.join(owners) or '(none)'}\n"
            f"    posting: {posting}\n\n"
            f"Posts go to {list_address}; bounces come back to "
            f"{addresses.role_address(list_address, 'bounces')}.\n")
    return _message(admin, admin, f"New mailing list: {list_address}", text).as_bytes()


# -- bounce processing ---------------------------------------------------------
def _evidence(rows: list[tuple]) -> str:
    """Lines of (at, status, diagnostic) for a notice."""
    return "".join(f"    {when.utc_minute(at)}  {status or '-'}  {diagnostic or ''}\n"
                   for at, status, diagnostic in rows)


def bounce_owner(list_address: str, owners: tuple[str, ...], address: str, what: str, score: int,
                 evidence: list[tuple], keep_address: str = "", remove_address: str = "") -> bytes:
    """To the owners: a member was removed or disabled by bounces, or (notify) is bouncing.

    For disable and notify, replying decides too: keep_address and
    remove_address carry a token only this notice knows.
    """
    owner = addresses.role_address(list_address, "owner")
    subjects = {
        "remove": f"{address} removed from {list_address} (bounces)",
        "disable": f"{address} disabled on {list_address} (bounces)",
        "notify": f"{address} is bouncing on {list_address}",
    }
    actions = {
        "remove": "was removed from the list. To add them back:\n\n"
                  f"    listmilter members add {list_address} {address}\n",
        "disable": "no longer receives posts (still a member). They will be warned, then removed "
                   "unless re-enabled:\n\n"
                   f"    listmilter members enable {list_address} {address}\n",
        "notify": "still receives posts; nothing was changed. Decide with one of:\n\n"
                  f"    listmilter members remove {list_address} {address}\n"
                  f"    listmilter members enable {list_address} {address}    "
                  "(keep, and start the score again from 0)\n",
    }
    text = (f"Mail to {address}, a member of {list_address}, failed permanently "
            f"(bounce score {score}).\nThe member {actions[what]}\n")
    if keep_address and what in ("disable", "notify"):
        text += (f"Or by mail: reply to this message to keep {address} (re-enabled, score 0),\n"
                 f"or send any message to\n\n    {remove_address}\n\nto remove them.\n\n")
    text += f"The failures (UTC, status, the remote server's words):\n{_evidence(evidence)}"
    msg = _message(owner, ", ".join(owners), subjects[what], text)
    if keep_address and what in ("disable", "notify"):
        msg["Reply-To"] = keep_address
    return msg.as_bytes()


def bounce_warning(list_address: str, address: str, number: int, of: int, removal: str) -> bytes:
    """To a member disabled by bounces."""
    owner = addresses.role_address(list_address, "owner")
    text = (f"Mail from the list {list_address} to {address} has been failing, so the list "
            f"stopped sending you posts.\n\n"
            f"If this address works again, ask the list owners at {owner} to re-enable it.\n"
            f"Otherwise it will be removed from the list {removal}.\n\n"
            f"(warning {number} of {of})\n")
    return _message(owner, address, f"Your membership of {list_address} is disabled", text).as_bytes()


def bounce_probe(list_address: str, address: str) -> bytes:
    """To a member a delivery report named as failing, sent from a one-time probe address
    (core/probes.py): if this bounces, the address is dead; if it arrives, nothing happens."""
    owner = addresses.role_address(list_address, "owner")
    text = (f"A delivery report said that mail from the list {list_address} to {address} failed.\n\n"
            f"This message checks that: if you can read it, your address works and you need not "
            f"do anything. Your membership is unchanged.\n\n"
            f"Questions go to the list owners at {owner}.\n")
    return _message(owner, address, f"Checking your address for {list_address}", text).as_bytes()


def unrecognised_bounce(list_address: str, owners: tuple[str, ...], why: str, original: bytes) -> bytes:
    """To the owners: mail to <list>-bounces@ that scored nobody, with the message attached."""
    owner = addresses.role_address(list_address, "owner")
    msg = _message(owner, ", ".join(owners), f"Unrecognised bounce for {list_address}",
                   f"This message reached {addresses.role_address(list_address, 'bounces')} "
                   f"but counted against no member:\n\n    {why}\n\nIt is attached as it arrived.\n")
    # Attached as bytes, never parsed and written again (hostile mail can make Python's
    # parser or generator fail). message/rfc822 must be 7bit or 8bit (RFC 2046) and the
    # generator writes only ASCII there, and a MIME structure that listmilter could not
    # read whole would trouble the owner's mail reader too: all else goes as a file,
    # original.eml.
    lines = original.replace(b"\r\n", b"\n").split(b"\n")
    if original.isascii() and b"\0" not in original and b"\r" not in b"".join(lines) and \
            max(map(len, lines)) <= 998 and mailparse.readable(original):
        part = email.message.EmailMessage(policy=email.policy.SMTP)
        part["Content-Type"] = "message/rfc822"
        part["Content-Disposition"] = "attachment"
        part.set_payload("\r\n".join(line.decode("ascii") for line in lines))
        msg.make_mixed()
        msg.attach(part)
    else:
        msg.add_attachment(original, maintype="application", subtype="octet-stream",
                           filename="original.eml")
    return msg.as_bytes()


def unrecognised_digest(list_address: str, owners: tuple[str, ...], kept: list[tuple[float, str, str]]) -> bytes:
    """To the owners, at most once a day: what reached <list>-bounces@ and counted against no
    member, each (at, why, kept file); the messages stay in the files."""
    owner = addresses.role_address(list_address, "owner")
    bounces_address = addresses.role_address(list_address, "bounces")
    lines = [f"{len(kept)} message{'s' if len(kept) != 1 else ''} reached {bounces_address} "
             "and counted against no member since the last of these mails.",
             "Each is kept in a file until bounce_kept_days have passed:", ""]
    for at, why, path in kept:
        lines.append(f"  {when.utc_minute(at)}  {mailparse.one_line(why)[:200]}")
        if path:
            lines.append(f"      {mailparse.one_line(path)}")
    lines += ["", f"To list them: listmilter bounces {list_address} --kept",
              "(Setting bounce_unrecognised: forward sends each one as it comes; keep, none.)"]
    msg = _message(owner, ", ".join(owners),
                   f"Unrecognised bounces for {list_address}: {len(kept)}", "\n".join(lines) + "\n")
    return msg.as_bytes()


# -- subscription notices: templates ---------------------------------------------
# Shipped as package data (listmilter/app/templates/NAME.txt); a list's `templates`
# setting names a folder whose NAME.txt, if present, is used instead.
# Format: a "Subject: ..." line, an empty line, the text. $name is replaced
# (string.Template; unknown names stay as written). A line starting with
# "[if name] " is kept only when $name is not empty.
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
_IF = re.compile(r"^\[if (\w+)\] ?")


def template_text(name: str, folder: str = "") -> str:
    if folder:
        try:
            with open(os.path.join(folder, f"{name}.txt"), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            pass
    with open(os.path.join(TEMPLATE_DIR, f"{name}.txt"), encoding="utf-8") as f:
        return f.read()


def render(text: str, values: dict[str, str]) -> tuple[str, str]:
    """(subject, body) of a template filled with `values`."""
    lines = []
    for line in text.splitlines():
        m = _IF.match(line)
        if m:
            if not values.get(m.group(1)):
                continue
            line = line[m.end():]
        lines.append(string.Template(line).safe_substitute(values))
    subject = "(no subject)"
    if lines and lines[0].lower().startswith("subject:"):
        subject = lines[0].split(":", 1)[1].strip()
        lines = lines[1:]
        if lines and not lines[0].strip():
            lines = lines[1:]
    return " ".join(subject.split()), "\n".join(lines).rstrip() + "\n"


def command_reply(from_addr: str, to_addr: str, subject: str, text: str, reply_to: str | None = None,
                  in_reply_to: str = "") -> bytes:
    """A reply listmilter sends for a list: from <list>-request@, marked auto-replied (RFC 3834)."""
    msg = _message(from_addr, to_addr, subject, text)
    if reply_to:
        msg["Reply-To"] = reply_to
    if in_reply_to and in_reply_to.isascii():     # an 8-bit msg-id would need SMTPUTF8 here
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    # Not folded at 78: a token in the Subject must survive a reply as one word.
    return msg.as_bytes(policy=email.policy.SMTP.clone(max_line_length=998))
