"""Mail that listmilter writes itself: refusal notices and admin notices."""

from __future__ import annotations

import email.message
import email.policy
import email.utils
import os
import re
import string

from . import addresses


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
    quoted = "".join(f"    {n}: {v}\n" for n, v in message_headers
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


# -- subscription notices: templates ---------------------------------------------
# Shipped as package data (listmilter/templates/NAME.txt); a list's `templates`
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
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    # Not folded at 78: a token in the Subject must survive a reply as one word.
    return msg.as_bytes(policy=email.policy.SMTP.clone(max_line_length=998))
