"""A TCP relay in front of an SMTP server that can stop its client at a chosen command.

Put between listmilter's `outgoing:` and Postfix, it lets a test catch serve
in the middle of a split or of its personal copies: `hold("MAIL", 3)` stops
the next session before its third MAIL FROM is passed on (two copies are
queued, the third is not), `hold(".")` before the end of a message's data,
`hold("QUIT")` after every message of the session was accepted. The test then
does what it wants (kill serve) and calls `release()`, which drops both sides
of the held session. Sessions not held are passed through unchanged.
"""

from __future__ import annotations

import socket
import threading

from .net import free_port


class HoldingRelay:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._hold: tuple[str, int] | None = None
        self.held = threading.Event()
        self._release = threading.Event()

    def start(self) -> "HoldingRelay":
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, name="relay", daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._listener:
            self._listener.close()

    def hold(self, command: str, nth: int = 1) -> None:
        """Stop the next session that sends `command` (MAIL, RCPT, DATA, QUIT, or "." for the
        end of a message's data) for the nth time, before passing it on."""
        with self._lock:
            self._hold = (command.upper(), nth)
            self.held.clear()
            self._release.clear()

    def release(self) -> None:
        """Drop the held session (both sides), and hold nothing more."""
        with self._lock:
            self._hold = None
        self._release.set()

    # -- inside ------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(client,), daemon=True).start()

    def _session(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=300)
        except OSError:
            client.close()
            return
        in_data = threading.Event()     # set by the server side on 354, before the client sees it
        threading.Thread(target=self._replies, args=(server, client, in_data), daemon=True).start()
        counts: dict[str, int] = {}
        reader = client.makefile("rb")
        try:
            for line in reader:
                if in_data.is_set():
                    if line != b".\r\n":
                        server.sendall(line)
                        continue
                    in_data.clear()
                    command = "."
                else:
                    command = line.split(b" ", 1)[0].split(b":", 1)[0].strip().decode("ascii", "replace").upper()
                counts[command] = counts.get(command, 0) + 1
                if self._should_hold(command, counts[command]):
                    self.held.set()
                    self._release.wait(300)
                    return
                server.sendall(line)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _should_hold(self, command: str, count: int) -> bool:
        with self._lock:
            if self._hold == (command, count) and not self.held.is_set():
                return True
        return False

    @staticmethod
    def _replies(server: socket.socket, client: socket.socket, in_data: threading.Event) -> None:
        try:
            for line in server.makefile("rb"):
                if line.startswith(b"354"):
                    in_data.set()
                client.sendall(line)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
