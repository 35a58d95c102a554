"""`listmilter deliver RECIPIENT [SENDER]`: the pipe transport for a list's role addresses.

Postfix runs it once per recipient (listmilter_destination_recipient_limit = 1)
with the whole message on stdin. Exit codes follow sysexits.h, which
Postfix's pipe(8) understands: 0 done, 67 no such list (bounce), 75 try
again later. Any internal error is 75, so Postfix keeps the message.

Mail to <list>-bounces@ goes to bounce processing (listmilter.app.bounce_processing).
The `deliver` process normally hands the message to the running `listmilter
serve`, which runs `run` below (listmilter.mta.handoff); `main` is the same work
done in the pipe's own process when serve cannot take it.
"""

from __future__ import annotations

import email.parser
import email.policy
import sys
from os import EX_NOUSER, EX_OK, EX_TEMPFAIL  # sysexits.h, as the docstring says

from listmilter.core import addresses, plan, policy
from listmilter.core.errors import TemporaryError
from listmilter.log import fields, logger


class Deferred(TemporaryError):
    """Keep the message queued; the text is what the admin sees in the Postfix log."""


def sender_of(sender_arg: str | None, message_head) -> str:
    """The envelope sender: the argument, else Return-Path (Sendmail aliases pass none)."""
    if sender_arg is not None:
        return "" if sender_arg in ("", "<>", "MAILER-DAEMON") else addresses.strip_brackets(sender_arg)
    return addresses.strip_brackets(message_head.get("Return-Path", "") or "")


def deliver(runtime_factory, recipient: str, sender_arg: str | None, data: bytes) -> tuple[int, str]:
    """(exit code, text for Postfix's log and bounce) for one message to a role address."""
    head = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    sender = sender_of(sender_arg, head)
    recipient = addresses.strip_brackets(recipient)
    config, store = runtime_factory()
    mlist, role = plan.find_list(recipient, store.get_list)
    base = dict(to=f"<{recipient}>", **{"from": f"<{sender}>"}, size=len(data))
    if mlist is None:
        logger.info("deliver: %s", fields(**base, status="bounced (no such list)"))
        return EX_NOUSER, f"{recipient}: no such mailing list"
    if role is None or role.role == "owner":
        # Only mail the milter chose not to expand may reach the pipe for the
        # list address itself; anything else means the milter was bypassed.
        ls = plan.effective_settings(mlist.address, config.list_settings(mlist.settings))
        reason = policy.not_expanded_reason(sender, head.get_all("List-Id") or [], ls.list_id.lower())
        if role is None and reason:
            logger.info("deliver: %s", fields(**base, list=f"<{mlist.address}>",
                                               status=f"discarded (not expanded: {reason})"))
            return EX_OK, ""
        raise Deferred(f"mail for {recipient} reached the pipe transport without passing the milter; "
                       "check smtpd_milters and non_smtpd_milters")
    if role.role in ("request", "subscribe", "unsubscribe", "confirm"):
        from listmilter.app import subscription_service as service
        return service.deliver_command(config, store, mlist, role, sender, data), ""
    # What is left is <list>-bounces@ (addresses.ROLES).
    from listmilter.app import bounce_processing
    from listmilter.store import site_secret as secret_of
    site_secret = secret_of(config)
    extra = {}
    if role.extension.partition("-")[0] in bounce_processing.DECISIONS:
        status = bounce_processing.decide(config, store, site_secret, mlist, role.extension, sender, data)
    else:
        outcome = bounce_processing.handle(config, store, site_secret, mlist, sender, data)
        status = outcome.summary()
        if outcome.envid:
            extra["envid"] = outcome.envid
    logger.info("deliver: %s", fields(**base, list=f"<{mlist.address}>", role=role.role,
                                       status=status, **extra))
    return EX_OK, ""


def run(runtime_factory, recipient: str, sender: str | None, data: bytes) -> tuple[int, str]:
    """`deliver`, with every failure turned into 75 and a reason: never raises."""
    try:
        return deliver(runtime_factory, recipient, sender, data)
    except TemporaryError as e:    # Deferred, a busy or full store, the MTA not taking mail now, a bad secret file
        logger.error("deliver: %s", fields(to=f"<{recipient}>", status=f"deferred ({e})"))
        return EX_TEMPFAIL, str(e)
    except Exception as e:  # never lose mail: Postfix retries on 75
        logger.exception("deliver: to=<%s>, status=deferred (internal error)", recipient)
        return EX_TEMPFAIL, f"internal error, will retry: {e.__class__.__name__}: {e}"


def main(runtime_factory, recipient: str, sender: str | None) -> int:
    """The pipe transport's work in this process: stdin in, exit code out."""
    try:
        data = sys.stdin.buffer.read()
    except OSError as e:
        print(f"listmilter: cannot read the message: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    code, text = run(runtime_factory, recipient, sender, data)
    if text:
        print(f"listmilter: {text}", file=sys.stderr)
    return code
