"""`listmilter deliver RECIPIENT [SENDER]`: the pipe transport for a list's role addresses.

Postfix runs it once per recipient (listmilter_destination_recipient_limit = 1)
with the whole message on stdin. Exit codes follow sysexits.h, which
Postfix's pipe(8) understands: 0 done, 67 no such list (bounce), 75 try
again later. 75 only for what a retry can fix (listmilter.core.errors: the
store, the MTA taking a notice, a hand-off lost); a message that cannot be
understood is kept (bounce address) or refused with a log line, and exits 0
(docs/design.md, "Mail that cannot be understood"). An unexpected error (a
bug) is 75, so Postfix keeps the message; its traceback goes to the log only.

Mail to <list>-bounces@ goes to bounce processing (listmilter.app.bounce_processing).
A post to the list address itself (or mail to <list>-owner@) gets here only
when the milter did not expand it: on purpose (null sender, a loop: logged
and discarded), or because the milter did not see it (listmilter was down
at end of data, or a path without the milter): then serve re-submits it
through the MTA, whose milter expands it (core.plan.unexpanded_at_pipe).

The `deliver` process normally hands the message to the running `listmilter
serve`, which runs `run` below (listmilter.mta.handoff); `main` is the same work
done in the pipe's own process when serve cannot take it. That process may
run as another user (a Sendmail aliases-file program runs as DefaultUser)
and so be unable to read the store or the secret: it exits 75 and says so.
"""

from __future__ import annotations

import os
import sys
import time
from os import EX_NOPERM, EX_NOUSER, EX_OK, EX_TEMPFAIL  # sysexits.h, as the docstring says

from listmilter.core import addresses, mailparse, plan
from listmilter.core.errors import PermanentError, TemporaryError
from listmilter.log import fields, logger


class Deferred(TemporaryError):
    """Keep the message queued; the text is what the admin sees in the Postfix log."""


def sender_of(sender_arg: str | None, message_head) -> str:
    """The envelope sender: the argument, else Return-Path (Sendmail aliases pass none).

    As text (mailparse.text): bytes that are not UTF-8, which argv and the hand-off
    pass surrogate-escaped, become U+FFFD, so no store query can fail on them.
    """
    if sender_arg is not None:
        return "" if sender_arg in ("", "<>", "MAILER-DAEMON") else addresses.strip_brackets(mailparse.text(sender_arg))
    return addresses.strip_brackets(message_head.get("Return-Path", ""))


def deliver(runtime_factory, recipient: str, sender_arg: str | None, data: bytes,
            can_resubmit=None) -> tuple[int, str]:
    """(exit code, text for Postfix's log and bounce) for one message to a role address.

    can_resubmit: inside serve, a callable saying whether serve's milter is
    running; None in a pipe process working alone (no milter of its own).
    """
    head = mailparse.parse(data, headers_only=True)
    sender = sender_of(sender_arg, head)
    recipient = addresses.strip_brackets(mailparse.text(recipient))
    try:
        config, store = runtime_factory()
    except Exception as e:
        # Alone as a user who may not read them (a Sendmail aliases program), or a broken config.
        raise Deferred(f"cannot work without listmilter serve{_as_user()}: {e}{_why_alone()}") from e
    mlist, role = plan.find_list(recipient, store.get_list)
    base = dict(to=f"<{recipient}>", **{"from": f"<{sender}>"}, size=len(data))
    if mlist is None:
        logger.info("deliver: %s", fields(**base, status="bounced (no such list)"))
        return EX_NOUSER, f"{recipient}: no such mailing list"
    if role is None or role.role == "owner":
        return _unexpanded(config, mlist, role is not None, recipient, sender, data, base, can_resubmit)
    if role.role == "fanout":       # a personal post queued by the milter (core/fanout.py)
        from listmilter.app import fanout
        from listmilter.store import site_secret as keys_of
        status = fanout.deliver(config, store, keys_of(config), mlist, role.extension, sender, data)
        logger.info("deliver: %s", fields(**base, list=f"<{mlist.address}>", role=role.role, status=status))
        return EX_OK, ""
    if role.role in ("request", "subscribe", "unsubscribe", "confirm"):
        from listmilter.app import subscription_service as service
        return service.deliver_command(config, store, mlist, role, sender, data), ""
    # What is left is <list>-bounces@ (addresses.ROLES).
    from listmilter.app import bounce_processing
    from listmilter.store import site_secret as secret_of
    site_secret = secret_of(config)
    extra = {}
    outcome = None
    if role.extension.partition("-")[0] in bounce_processing.DECISIONS:
        status = bounce_processing.decide(config, store, site_secret, mlist, role.extension, sender, data)
    else:
        from listmilter.core import probes
        if probes.is_code(role.extension):      # <list>-bounces+probe-CODE@: a bounce probe's
            from listmilter.app import probe_bounces
            outcome = probe_bounces.handle(config, store, site_secret, mlist, role.extension, sender, data)
            if outcome is None:
                extra["probe"] = "not verified"
        elif role.extension:      # <list>-bounces+CODE@: a personal copy's VERP sender
            from listmilter.app import verp_bounces
            if verp_bounces.is_code(role.extension):
                outcome = verp_bounces.handle(config, store, site_secret, mlist, role.extension, sender, data)
                if outcome is None:
                    extra["verp"] = "not verified"
        if outcome is None:
            outcome = bounce_processing.handle(config, store, site_secret, mlist, sender, data)
        status = outcome.summary()
        if outcome.envid:
            extra["envid"] = outcome.envid
    logger.info("deliver: %s", fields(**base, list=f"<{mlist.address}>", role=role.role,
                                       status=status, **extra))
    return EX_OK, ""


def _unexpanded(config, mlist, owner_alias: bool, recipient: str, sender: str, data: bytes, base: dict,
                can_resubmit) -> tuple[int, str]:
    """A list address (or its -owner@ alias) that the milter did not expand."""
    ls = plan.effective_settings(mlist.address, config.list_settings(mlist.settings))
    now = time.time()
    running = bool(can_resubmit and can_resubmit())
    what = plan.unexpanded_at_pipe(recipient, sender, plan.header_fields(data), ls, owner_alias, now, running)
    base = dict(base, list=f"<{mlist.address}>")
    if what.action == plan.DISCARD:
        logger.info("deliver: %s", fields(**base, status=f"discarded ({what.reason})"))
        return EX_OK, ""
    if what.action == plan.DEFER:
        raise Deferred(what.reason)
    from listmilter.app import outgoing
    refused = outgoing.resubmit(config.outgoing, sender, recipient, plan.resubmission(data, recipient, now))
    if refused:
        # The milter applied the posting policy the MTA skipped: a bounce to the sender, once.
        logger.info("deliver: %s", fields(**base, status=f"bounced (re-submitted and refused: {refused})"))
        return EX_NOPERM, f"{recipient}: {refused}"
    logger.info("deliver: %s", fields(**base, status=f"re-submitted ({what.reason}) to {config.outgoing.describe()}"))
    return EX_OK, ""


def _why_alone() -> str:
    """Why this process works without serve (set by the hand-off client; None inside serve)."""
    from listmilter.mta import handoff
    return f" (listmilter serve did not take it: {handoff.why_alone})" if handoff.why_alone else ""


def _as_user() -> str:
    import pwd
    try:
        return f" as user {pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f" as uid {os.geteuid()}"


def run(runtime_factory, recipient: str, sender: str | None, data: bytes,
        can_resubmit=None) -> tuple[int, str]:
    """`deliver`, every outcome an exit code and a reason: never raises.

    Temporary errors (the store, the MTA, the site's keys, a config being
    fixed) are 75 with their reason, which says what the admin must do;
    permanent ones exit 0 with a log line (no retry can help); anything else
    is a bug: 75, so nothing is lost, with the traceback in the log and not in
    the text Postfix puts in its logs and bounces.
    """
    try:
        return deliver(runtime_factory, recipient, sender, data, can_resubmit)
    except TemporaryError as e:
        logger.error("deliver: %s", fields(to=f"<{recipient}>", status=f"deferred ({e})"))
        return EX_TEMPFAIL, str(e)
    except PermanentError as e:
        logger.error("deliver: %s", fields(to=f"<{recipient}>", status=f"refused ({e})"))
        return EX_OK, ""
    except PermissionError as e:
        # Another user than the state folder's owner (a Sendmail aliases-file
        # program), with serve not there to do it: a retry once serve runs works.
        text = f"cannot work without listmilter serve{_as_user()}: {e.strerror}: {e.filename}{_why_alone()}"
        logger.error("deliver: %s", fields(to=f"<{recipient}>", status=f"deferred ({text})"))
        return EX_TEMPFAIL, text
    except Exception:  # never lose mail: Postfix retries on 75
        logger.exception("deliver: %s", fields(to=f"<{recipient}>", status="deferred (internal error)"))
        return EX_TEMPFAIL, "internal error, will retry; the details are in listmilter's log"


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
