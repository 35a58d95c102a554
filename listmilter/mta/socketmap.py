"""A Postfix socketmap table served from the list store, so no map is edited by hand.

Postfix asks `socketmap:inet:127.0.0.1:8898:recipients` whether an address
exists (local_recipient_maps, last, so only the list domain's unknown
addresses are asked; virtual_mailbox_maps...). Sendmail's ruleset 0 asks
`transport` where to deliver it (Postfix routes with fallback_transport
instead: a table in transport_maps is asked about every address, and a
listmilter that is down would stop all mail). Every list and its role
addresses exist; all of them route to listmilter's pipe transport (the
milter removes the list address itself from every post it expands, so only
unexpanded mail reaches the pipe for it). Protocol: one
netstring "NAME KEY" per request, answered "OK value", "NOTFOUND ", "TEMP why"
or "PERM why" (Postfix's socketmap_table(5)).
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, cast

from listmilter.core import plan
from listmilter.log import logger
from listmilter.mta import netstring as netstrings
from listmilter.store import StoreError

if TYPE_CHECKING:
    from listmilter.app.runtime import Runtime

MAX_REQUEST = 10000
MAPS = ("recipients", "transport")


def answer(request: str, get_list, transport: str) -> str:
    """The reply to one request; pure apart from the get_list lookup."""
    name, _, key = request.partition(" ")
    if name not in MAPS:
        return f"PERM unknown map {name!r}; known: {', '.join(MAPS)}"
    if "@" not in key:
        return "NOTFOUND "
    try:
        mlist, _role = plan.find_list(key, get_list)
    except StoreError as e:
        return f"TEMP {e}"
    if mlist is None:
        return "NOTFOUND "
    return f"OK {mlist.address}" if name == "recipients" else f"OK {transport}:"


def netstring(text: str) -> bytes:
    return netstrings.encode(text.encode("utf-8", "surrogateescape"))


def read_netstring(f) -> str | None:
    data = netstrings.read(f, MAX_REQUEST)
    return None if data is None else data.decode("utf-8", "surrogateescape")


class _Handler(socketserver.StreamRequestHandler):
    server: _TCPServer | _UnixServer      # start() serves it only from these

    def handle(self):
        runtime = self.server.runtime
        while True:
            try:
                request = read_netstring(self.rfile)
            except netstrings.Malformed as e:
                logger.warning("warning: socketmap: %s; closing the connection", e)
                return
            except OSError:
                return
            if request is None:
                return
            config, store = runtime.current()
            reply = answer(request, store.get_list, config.transport)
            if reply.startswith("TEMP"):
                logger.error("socketmap: %s -> %s", request, reply)
            self.wfile.write(netstring(reply))
            self.wfile.flush()


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    runtime: Runtime                      # set by start() before it serves


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    runtime: Runtime                      # set by start() before it serves


def parse_socket(spec: str) -> tuple[str, str | tuple[str, int]]:
    """libmilter-style spec -> (family, address): inet:PORT@HOST or unix:/path."""
    kind, _, rest = spec.partition(":")
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        return kind, (host or ("::" if kind == "inet6" else "0.0.0.0"), int(port))
    if kind in ("unix", "local"):
        return "unix", rest
    raise ValueError(f"unsupported socket {spec!r}")


def start(runtime, spec: str) -> socketserver.BaseServer:
    """Serve the socketmap in a background thread; returns the server (call shutdown())."""
    family, address = parse_socket(spec)
    server: _TCPServer | _UnixServer
    if isinstance(address, str):      # family "unix": a path
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
        server = _UnixServer(address, _Handler)
        os.chmod(address, 0o666)   # who may connect is decided by the folder it is in
    else:
        server = (_TCP6Server if family == "inet6" else _TCPServer)(address, _Handler)
    server.runtime = runtime
    threading.Thread(target=server.serve_forever, name="socketmap", daemon=True).start()
    return server


def stop(server: socketserver.BaseServer) -> None:
    """Stop answering and close the listening socket (a unix socket file is removed)."""
    server.shutdown()
    server.server_close()
    if isinstance(server, _UnixServer):
        try:
            # The path start() bound: getsockname() gives a str back.
            os.unlink(cast(str, server.server_address))
        except OSError:
            pass
