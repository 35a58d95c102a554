"""Logging in the syslog style Postfix admins grep: `listmilter[PID]: QUEUEID: key=value, ...`."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

logger = logging.getLogger("listmilter")


def setup(target: str = "stderr", facility: str = "mail", program: str = "listmilter") -> None:
    """Send listmilter's log to stderr, syslog (beside Postfix's lines) or a file."""
    target = os.environ.get("LISTMILTER_LOG") or target
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if target == "syslog":
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.facility_names.get(facility, 2 << 3))
        fmt = f"{program}[%(process)d]: %(message)s"
    elif target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        # The journal adds time, host and PID itself.
        fmt = "%(message)s" if os.environ.get("JOURNAL_STREAM") else \
            f"%(asctime)s {program}[%(process)d]: %(message)s"
    else:
        handler = logging.FileHandler(target)
        fmt = f"%(asctime)s {os.uname().nodename} {program}[%(process)d]: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%b %d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def fields(**kw) -> str:
    """`key=value, key=value` in Postfix's order of appearance; addresses in <>."""
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        parts.append(f"{k}={v}")
    return ", ".join(parts)
