"""An SMTP sink that records every envelope it receives (aiosmtpd, in a thread).

It stands for "the rest of the world": the private Postfix relays all
outbound mail to it. Per-address replies let tests make Postfix produce real
DSNs (550 = permanent, 450 = temporary).
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from .net import wait_until


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    mail_options: list[str]
    content: bytes

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.content, policy=email.policy.default)


@dataclass
class _Handler:
    replies: dict[str, str] = field(default_factory=dict)
    post_replies: dict[str, str] = field(default_factory=dict)
    probes_arrive: bool = False         # post_replies spare bounce probes (from <list>-bounces+probe-...@)
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    rcpt_options: dict[int, list[list[str]]] = field(default_factory=dict)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-DSN", responses[-1]]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.replies.get(address.lower())
        if not reply and envelope.mail_from not in ("", "<>") and \
                not (self.probes_arrive and "-bounces+probe-" in envelope.mail_from):
            reply = self.post_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                rcpt_options=list(envelope.rcpt_options),
                mail_options=list(envelope.mail_options),
                content=envelope.original_content or envelope.content,
            ))
        return "250 OK queued"


class _DSNSMTP(SMTP):
    """aiosmtpd refuses every MAIL/RCPT parameter it does not know; this sink
    takes the DSN ones (RFC 3461) and records them, so tests can see what
    Postfix passes on."""

    _DSN = {"NOTIFY", "ORCPT", "RET", "ENVID"}

    def _getparams(self, params):
        result = super()._getparams(params)
        if result is None:
            return None
        return {k: v for k, v in result.items() if k not in self._DSN}


class _Controller(Controller):
    """Listens on a socket bound before start (port 0: the kernel picks a free port, no race)."""

    def __init__(self, handler, sock: socket.socket, smtputf8: bool = True):
        self._sock = sock
        self._smtputf8 = smtputf8
        super().__init__(handler, hostname="127.0.0.1", port=sock.getsockname()[1])

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=self._sock)

    def factory(self):
        return _DSNSMTP(self.handler, hostname="sink.example.test", data_size_limit=0,
                    enable_SMTPUTF8=self._smtputf8, decode_data=False, ident="sink")


class Sink:
    """Records messages; `replies` maps a lower-case address to an SMTP reply for RCPT.
    `smtputf8=False`: a server that does not offer SMTPUTF8."""

    def __init__(self, smtputf8: bool = True) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._handler = _Handler()
        self._controller = _Controller(self._handler, sock, smtputf8)

    def start(self) -> "Sink":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def replies(self) -> dict[str, str]:
        return self._handler.replies

    @property
    def post_replies(self) -> dict[str, str]:
        """Like `replies`, for mail with a sender only: list posts bounce, notices (from <>) arrive."""
        return self._handler.post_replies

    def let_probes_arrive(self, arrive: bool = True) -> None:
        """post_replies refuse list posts but let bounce probes arrive (the member's address works
        for a probe: a test that does not want a probe's bounce)."""
        self._handler.probes_arrive = arrive

    @property
    def messages(self) -> list[Received]:
        with self._handler.lock:
            return list(self._handler.messages)

    def clear(self) -> None:
        with self._handler.lock:
            self._handler.messages.clear()
        self._handler.replies.clear()
        self._handler.post_replies.clear()
        self._handler.probes_arrive = False

    def deliveries(self) -> list[tuple[str, Received]]:
        """One (recipient, message) pair per delivered recipient."""
        return [(r, m) for m in self.messages for r in m.rcpt_tos]

    def by_recipient(self) -> dict[str, list[Received]]:
        """The messages each recipient (lower-cased) got."""
        out: dict[str, list[Received]] = {}
        for rcpt, m in self.deliveries():
            out.setdefault(rcpt.lower(), []).append(m)
        return out

    def recipients(self) -> list[str]:
        return [r for r, _ in self.deliveries()]

    def wait_for_recipients(self, count: int, timeout: float = 60.0) -> list[tuple[str, Received]]:
        wait_until(lambda: len(self.deliveries()) >= count, timeout,
                   what=f"{count} deliveries at the sink (have {len(self.deliveries())})")
        return self.deliveries()

    def for_recipient(self, address: str) -> list[Received]:
        return [m for r, m in self.deliveries() if r.lower() == address.lower()]
