"""Personal copies into the MTA's listener without milters: parallel SMTP sessions with PIPELINING.

smtplib waits for each reply before the next command: four round trips per
copy. A session here sends each copy's end of data together with the next
copy's MAIL, RCPT and DATA (RFC 2920 allows message content first in a group),
so a copy costs one round trip, and `sessions` of them run side by side (the
MTA's smtpd and cleanup work in parallel, as Postfix's own smtp-source does).

A copy is written from the post's template as it is made (plan.PersonalTemplate
.copy) and forgotten once sent: memory does not grow with the list.

What the MTA answers decides each copy:
- 250 after the data: queued (its queue id is kept for the log);
- 5xx to RCPT or after the data: refused for good, logged and skipped, as the
  MTA would have bounced it;
- anything else (4xx, 5xx to MAIL, a lost connection): ReinjectError, a
  TemporaryError: the fan-out stops and the MTA retries the post later.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from listmilter.app.outgoing import UNKNOWN_ID, queue_id
from listmilter.core.errors import TemporaryError
from listmilter.core.plan import Copy

TIMEOUT = 300.0         # Postfix's smtpd waits as long for a client; a reply never takes longer
MAX_REPLY = 64 * 1024
T = TypeVar("T")
_IOV_MAX = 512          # buffers to one sendmsg (Linux allows 1024)
_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")


class ReinjectError(TemporaryError):
    """The listener did not take a copy now."""


@dataclass
class Sent:
    """What one batch came to."""
    queued: list[str] = field(default_factory=list)           # queue ids
    refused: dict[str, str] = field(default_factory=dict)      # member -> the MTA's reply

    def merge(self, other: Sent) -> None:
        self.queued.extend(other.queued)
        self.refused.update(other.refused)


class Stuffer:
    """DATA content from a copy's parts: a dot doubled at each line start (after any LF:
    Postfix's smtpd ends a line at a bare LF too), and CRLF at the end if the last part has
    none. A big part that every copy shares (the post's header block and body, the
    stretches around a footer) is stuffed once per fan-out, not once per copy: the
    sessions share this cache."""

    BIG = 4096

    def __init__(self) -> None:
        self.cache: dict[tuple[int, bool], tuple[bytes, bytes]] = {}   # (id, at line start) -> (part, stuffed)

    def _one(self, part: bytes, at_start: bool) -> bytes:
        key = (id(part), at_start)
        if len(part) >= self.BIG:
            hit = self.cache.get(key)
            if hit is not None and hit[0] is part:      # the object itself, not one reusing its id
                return hit[1]
        out = part.replace(b"\n.", b"\n..")
        if at_start and out.startswith(b"."):
            out = b"." + out
        if len(part) >= self.BIG:
            self.cache[key] = (part, out)
        return out

    def parts(self, parts: tuple[bytes, ...]) -> list[bytes]:
        out, at_start = [], True
        for part in parts:
            if part:
                out.append(self._one(part, at_start))
                at_start = part.endswith(b"\n")
        if not at_start:
            out.append(b"\r\n")
        return out


class Session:
    """One SMTP session to the listener."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT, stuffer: Stuffer | None = None):
        self.where = f"{host}:{port}"
        self.stuffer = stuffer or Stuffer()
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ReinjectError(f"reinject {self.where}: {e}") from e
        self.reader = self.sock.makefile("rb")
        try:
            self._expect(self._reply(), 220, "greeting")
            self._send(b"EHLO localhost\r\n")
            code, text = self._reply()
            self._expect((code, text), 250, "EHLO")
        except BaseException:
            self.close()
            raise
        self.pipelining = b"\nPIPELINING" in b"\n" + text.upper() or text.upper().startswith(b"PIPELINING")

    def _send(self, *buffers: bytes) -> None:
        """Write the buffers as one write (sendmsg): a copy's parts and the next envelope leave
        together, never as small writes that Nagle's algorithm holds until the server's
        delayed ACK (40 ms a copy), and without joining them into one more copy."""
        views = [memoryview(b) for b in buffers if b]
        try:
            while views:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0], sent = views[0][sent:], 0
        except OSError as e:
            raise ReinjectError(f"reinject {self.where}: {e}") from e

    def _reply(self) -> tuple[int, bytes]:
        """(code, text of every line joined by LF)."""
        lines = []
        size = 0
        while True:
            try:
                line = self.reader.readline(1024)
            except OSError as e:
                raise ReinjectError(f"reinject {self.where}: {e}") from e
            if not line:
                raise ReinjectError(f"reinject {self.where}: connection closed")
            size += len(line)
            if len(line) < 4 or not line[:3].isdigit() or size > MAX_REPLY:
                raise ReinjectError(f"reinject {self.where}: not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def _expect(self, reply: tuple[int, bytes], code: int, what: str) -> None:
        if reply[0] != code:
            raise ReinjectError(f"reinject {self.where}: {what}: {reply[0]} {reply[1].decode(errors='replace')}")

    def send(self, copies: Iterable[Copy], mail_options: tuple[str, ...]) -> Sent:
        """Send copies one after another, each copy's data pipelined with the next envelope."""
        out = Sent()
        pending: Copy | None = None
        options = (" " + " ".join(mail_options)) if mail_options else ""
        for c in copies:
            if _UNSAFE.search(c.member) or _UNSAFE.search(c.sender):
                # The stores accept only checked addresses; should one be bad anyway, it must not
                # become a command of its own on this session.
                out.refused[c.member] = "not an address listmilter can send to (control character or <>)"
                continue
            commands = [f"MAIL FROM:<{c.sender}>{options}\r\n".encode("utf-8", "surrogateescape"),
                        f"RCPT TO:<{c.member}> {' '.join(c.rcpt_options)}\r\n".encode("utf-8", "surrogateescape"),
                        b"DATA\r\n"]
            if pending is not None and not self.pipelining:
                self._send(*self.stuffer.parts(pending.parts), b".\r\n")
                self._end_of_data(pending, out)
            if self.pipelining:
                data = [*self.stuffer.parts(pending.parts), b".\r\n"] if pending is not None else []
                self._send(*data, *commands)
                if pending is not None:
                    self._end_of_data(pending, out)
                mail, rcpt, data_reply = self._reply(), self._reply(), self._reply()
            else:
                self._send(commands[0])
                mail = self._reply()
                self._send(commands[1])
                rcpt = self._reply()
                self._send(commands[2])
                data_reply = self._reply()
            pending = None
            self._expect(mail, 250, f"MAIL FROM:<{c.sender}>")
            if data_reply[0] == 354:
                pending = c
                continue
            if 500 <= rcpt[0] < 600:
                out.refused[c.member] = f"{rcpt[0]} {rcpt[1].decode(errors='replace')}"
            else:
                self._expect(rcpt, 250, f"RCPT TO:<{c.member}>")
                self._expect(data_reply, 354, "DATA")
            self._send(b"RSET\r\n")         # MAIL opened a transaction: close it for the next copy
            self._expect(self._reply(), 250, "RSET")
        if pending is not None:
            self._send(*self.stuffer.parts(pending.parts), b".\r\n")
            self._end_of_data(pending, out)
        return out

    def _end_of_data(self, c: Copy, out: Sent) -> None:
        code, text = self._reply()
        if code == 250:
            out.queued.append(queue_id(text) if text else UNKNOWN_ID)
        elif 500 <= code < 600:
            out.refused[c.member] = f"{code} {text.decode(errors='replace')}"
        else:
            raise ReinjectError(f"reinject {self.where}: end of data for <{c.member}>: "
                                f"{code} {text.decode(errors='replace')}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        try:
            self.reader.close()
        finally:
            self.sock.close()


class Pool:
    """`sessions` sessions to one listener, opened as needed and kept for a whole fan-out."""

    def __init__(self, host: str, port: int, sessions: int):
        self.host, self.port, self.size = host, port, sessions
        self.sessions: list[Session] = []
        self.stuffer = Stuffer()
        self.executor = ThreadPoolExecutor(sessions, thread_name_prefix="fanout")

    def send(self, members: list[T], make: Callable[[T], Copy], mail_options: tuple[str, ...]) -> Sent:
        """Every member's copy (`make` makes one), the members shared out among the sessions; returns when
        the MTA has answered for every copy (or raises ReinjectError)."""
        share = max(1, -(-len(members) // self.size))
        slices = [members[i:i + share] for i in range(0, len(members), share)]
        while len(self.sessions) < len(slices):
            self.sessions.append(Session(self.host, self.port, stuffer=self.stuffer))
        futures = [self.executor.submit(session.send, (make(m) for m in part), mail_options)
                   for session, part in zip(self.sessions[:len(slices)], slices, strict=True)]
        out = Sent()
        failed: BaseException | None = None
        for f in futures:
            try:
                out.merge(f.result())
            except BaseException as e:      # wait for the others all the same: no session left mid-copy
                failed = failed or e
        if failed is not None:
            self.close()
            raise failed
        return out

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.sessions = []
        self.executor.shutdown(wait=False)
