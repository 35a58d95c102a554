"""Mail listmilter sends itself, always through the local MTA (never straight to the world)."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess

from listmilter.core.config import Outgoing
from listmilter.core.errors import TemporaryError


class OutgoingError(TemporaryError):
    """The MTA did not take a message now."""


# A queue id the sendmail command does not tell (the log then cannot link that copy).
UNKNOWN_ID = "?"
# The MTA's reply to DATA names the new queue id: Postfix "Ok: queued as 4Fx2Q1Z0D3",
# Sendmail "4B2N1x0j012345 Message accepted for delivery".
_QUEUED = re.compile(rb"queued as ([0-9A-Za-z]+)|^(?:\d\.\d\.\d+ )?([0-9A-Za-z]+) Message accepted", re.I)


def queue_id(reply: bytes) -> str:
    """The queue id in an MTA's reply to DATA, or UNKNOWN_ID."""
    m = _QUEUED.search(reply)
    return (m.group(1) or m.group(2)).decode() if m else UNKNOWN_ID


class _SMTP(smtplib.SMTP):
    """smtplib.SMTP that keeps the reply to the last DATA (sendmail() drops it)."""
    data_reply = b""

    def data(self, msg):
        code, reply = super().data(msg)
        self.data_reply = reply
        return code, reply


def _smtp_host(outgoing: Outgoing) -> str:
    """Where to submit over SMTP. Only a sendmail Outgoing has no host (config builds it so);
    smtplib given none would fail too, at the first command."""
    if outgoing.smtp_host is None:
        raise OutgoingError(f"{outgoing.describe()}: no SMTP host")
    return outgoing.smtp_host


def _envelope_options(sender: str, recipients: list[str]) -> list[str]:
    """SMTPUTF8 for an 8-bit envelope (a poster who sent with it): it goes on as it came, where
    smtplib alone would raise UnicodeEncodeError at MAIL FROM (a 451 for days at the milter)."""
    return [] if sender.isascii() and all(r.isascii() for r in recipients) else ["SMTPUTF8"]


def send(outgoing: Outgoing, sender: str, recipients: list[str], message: bytes) -> None:
    """Submit one message; raise OutgoingError unless the MTA took it for every recipient."""
    send_many(outgoing, [(sender, recipients, message)])


def send_many(outgoing: Outgoing, messages: list[tuple[str, list[str], bytes]],
              queue_ids: list[str] | None = None) -> None:
    """Submit several messages, over one SMTP session where possible; the MTA's queue
    id of each is appended to `queue_ids` (UNKNOWN_ID through the sendmail command)."""
    if not messages:
        return
    ids = queue_ids if queue_ids is not None else []
    if outgoing.sendmail:
        for sender, recipients, message in messages:
            _sendmail(outgoing.sendmail, sender, recipients, message)
            ids.append(UNKNOWN_ID)
        return
    try:
        with _SMTP(_smtp_host(outgoing), outgoing.smtp_port, local_hostname="localhost",
                   timeout=120) as smtp:
            for sender, recipients, message in messages:
                refused = smtp.sendmail(sender, recipients, message, _envelope_options(sender, recipients))
                if refused:
                    raise OutgoingError(f"{outgoing.describe()} refused {refused}")
                ids.append(queue_id(smtp.data_reply))
    except (smtplib.SMTPException, OSError, socket.timeout) as e:
        raise OutgoingError(f"{outgoing.describe()}: {e}") from e


def resubmit(outgoing: Outgoing, sender: str, recipient: str, message: bytes) -> str | None:
    """Put a message back through the MTA (and so its milter) for one recipient.

    Returns the reply when the MTA refuses it for good (5xx: e.g. the posting
    policy, which the milter applies at RCPT), or an envelope no MTA can take,
    None when it was taken; raises OutgoingError for anything a retry can fix.
    """
    if "\0" in sender or "\0" in recipient:
        # A forged Return-Path (Sendmail's aliases pass no sender): no command line or MTA takes it.
        return "the envelope holds a NUL character"
    if outgoing.sendmail:
        _sendmail(outgoing.sendmail, sender, [recipient], message)
        return None
    try:
        with smtplib.SMTP(_smtp_host(outgoing), outgoing.smtp_port, local_hostname="localhost",
                          timeout=120) as smtp:
            smtp.sendmail(sender, [recipient], message, _envelope_options(sender, [recipient]))
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients.get(recipient, (0, b""))
        if 500 <= code < 600:
            return f"{code} {text.decode(errors='replace')}"
        raise OutgoingError(f"{outgoing.describe()}: {code} {text.decode(errors='replace')}") from e
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
        if 500 <= e.smtp_code < 600:
            reply = e.smtp_error.decode(errors="replace") if isinstance(e.smtp_error, bytes) else e.smtp_error
            return f"{e.smtp_code} {reply}"
        raise OutgoingError(f"{outgoing.describe()}: {e}") from e
    except (smtplib.SMTPNotSupportedError, UnicodeEncodeError):     # the latter: a server without ESMTP
        return f"{outgoing.describe()} does not offer SMTPUTF8, which this envelope needs"
    except (smtplib.SMTPException, OSError, socket.timeout) as e:
        raise OutgoingError(f"{outgoing.describe()}: {e}") from e
    return None


def _sendmail(path: str, sender: str, recipients: list[str], message: bytes,
              options: list[str] | None = None) -> None:
    try:
        proc = subprocess.run([path, "-i", "-f", sender or "<>", *(options or []), "--", *recipients],
                              input=message,
                              capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OutgoingError(f"sendmail: {path}: {e}") from e
    if proc.returncode != 0:
        raise OutgoingError(f"sendmail: {path} exited {proc.returncode}: "
                            f"{proc.stderr.decode(errors='replace').strip()}")


def send_copies(outgoing: Outgoing, sender: str, mail_options: tuple[str, ...], envid: str,
                copies: list[tuple[str, tuple[str, ...], bytes]], progress=None,
                every: int = 100, queue_ids: list[str] | None = None,
                senders: dict[str, str] | None = None) -> dict[str, str]:
    """One message per recipient, each with its own DSN options, over one SMTP session
    (many transactions), from senders[recipient] (its VERP address) or else `sender`.
    A recipient the MTA refuses for good (5xx to RCPT) is skipped and returned
    ({address: reply}); anything else raises OutgoingError. The queue id of each copy
    the MTA took is appended to `queue_ids`."""
    refused_for_good: dict[str, str] = {}
    ids = queue_ids if queue_ids is not None else []
    own = senders or {}
    if outgoing.sendmail:
        for n, (rcpt, _, message) in enumerate(copies, 1):
            # Postfix's sendmail: -N NOTIFY, -R RET, -V ENVID (ORCPT cannot be given).
            _sendmail(outgoing.sendmail, own.get(rcpt, sender), [rcpt], message,
                      ["-N", "failure", "-R", "hdrs", "-V", envid])
            ids.append(UNKNOWN_ID)
            if progress and n % every == 0:
                progress()
        return refused_for_good
    try:
        with _SMTP(_smtp_host(outgoing), outgoing.smtp_port, local_hostname="localhost",
                   timeout=120) as smtp:
            for n, (rcpt, rcpt_options, message) in enumerate(copies, 1):
                try:
                    smtp.sendmail(own.get(rcpt, sender), [rcpt], message, list(mail_options), list(rcpt_options))
                    ids.append(queue_id(smtp.data_reply))
                except smtplib.SMTPRecipientsRefused as e:
                    code, text = e.recipients.get(rcpt, (0, b""))
                    if not 500 <= code < 600:
                        raise
                    refused_for_good[rcpt] = f"{code} {text.decode(errors='replace')}"
                if progress and n % every == 0:
                    progress()
    except (smtplib.SMTPException, OSError, socket.timeout) as e:
        raise OutgoingError(f"{outgoing.describe()}: {e}") from e
    return refused_for_good
