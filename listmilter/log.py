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
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
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
    handler.setFormatter(Formatter(fmt, datefmt="%b %d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str) -> str:
    """`text` with every character that is not printable (CR, LF, TAB, other C0 and C1
    controls, bidi overrides, lone surrogates...) written as a visible escape such as
    \\n or \\x1b, so a value taken from mail can never start a log line of its own."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def fields(**kw) -> str:
    """`key=value, key=value` in Postfix's order of appearance; addresses in <>; values escaped."""
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        parts.append(f"{k}={escape(str(v))}")
    return ", ".join(parts)


# Queue ids on one log line: a syslog line stays well under the 8 KB rsyslog keeps.
IDS_PER_LINE = 100


def log_queue_ids(queue_id: str, list_address: str, ids: list[str]) -> None:
    """The queue ids of a post's copies (`listmilter trace` follows them), IDS_PER_LINE to
    a line: `QUEUEID: list=<LIST>, copies=N[, part=K/M], queued_as=ID ID ...`."""
    chunks = [ids[i:i + IDS_PER_LINE] for i in range(0, len(ids), IDS_PER_LINE)]
    for n, chunk in enumerate(chunks, 1):
        logger.info("%s: %s", queue_id, fields(
            list=f"<{list_address}>", copies=len(ids),
            part=f"{n}/{len(chunks)}" if len(chunks) > 1 else None, queued_as=" ".join(chunk)))


class Formatter(logging.Formatter):
    """Every line escaped (see `escape`), whatever a caller put in it; a traceback,
    which only a bug writes, follows on lines of its own, each indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return "\n".join("    " + escape(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.split("\n"))
