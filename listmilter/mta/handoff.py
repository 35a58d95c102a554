"""`listmilter deliver` hands its message to the running `listmilter serve`.

Postfix starts one `deliver` process per message (a DSN storm is hundreds a
second). Loading listmilter's core, parsing the YAML config and opening the
databases costs a process about 60 ms of CPU; `serve` already holds all of
it. So `deliver` connects to serve's socket, `STATE_DIR/deliver.sock`, sends
the envelope and the message, and exits with serve's answer. Serve does
exactly what `deliver` would have done (listmilter.mta.deliver.run) and logs it.
When serve cannot take the message (not running, stopping, serving another
config file), `deliver` does the work in its own process: slower, same result.

The client side runs before anything else in the process, so it imports only
`os`, `sys`, `_socket` and two dependency-free modules. The server side
imports what it needs inside `start`.

Protocol, netstrings over a unix stream socket that any local user may use
(mode 0666, in the state folder, which others may enter but not list): the
MTA may run `deliver` as a user other than the state folder's owner (a
Sendmail aliases-file program runs as DefaultUser). What a client can pass
is an envelope and a message for a list's address, which anyone can send
to that address by mail; serve treats it exactly so (docs/design.md).

    deliver: "listmilter-deliver/1" NUL CONFIG NUL RECIPIENT [NUL SENDER]
    serve:   "go"  or  "no REASON"          (after "no", deliver works alone)
    deliver: MESSAGE
    serve:   "CODE TEXT"                    (exit code, text for Postfix)

Nothing is done before the message has arrived whole; a connection lost
after it was sent exits 75, and Postfix retries (bounce processing and list
commands are safe to repeat).

One more request, for `listmilter check --live` (which serve is running?):

    check:   "listmilter-status/1"
    serve:   VERSION NUL CONFIG NUL PID      (CONFIG empty: built-in defaults)
"""

from __future__ import annotations

# socket.py costs 4 ms of imports (enum, selectors), a third of what a bare
# Python start costs; _socket is the C module it wraps.
import _socket
import os
import sys

from listmilter import paths
from listmilter.mta import netstring

SOCKET_NAME = "deliver.sock"
MAGIC = b"listmilter-deliver/1"
STATUS_MAGIC = b"listmilter-status/1"
MAX_HEADER = 10000
MAX_MESSAGE = 1 << 30
CONNECT_TIMEOUT = 2.0
FANOUT_MARK = "-fanout+"   # core/fanout.py's address, <list>-fanout+CODE@ (not imported: start-up time)
GO_TIMEOUT = 10.0          # serve answers "go" at once unless wedged; then work alone
ANSWER_TIMEOUT = 600.0     # outgoing mail and a busy database each have their own, shorter limits


# -- the client: `listmilter deliver` ---------------------------------------------
def parse_argv(argv: list[str]) -> tuple[str | None, str, str | None] | None:
    """(config, recipient, sender) for exactly `[-c CONFIG] deliver RECIPIENT [SENDER]`.

    Anything else (--help, an option after `deliver`, a typo) gives None and
    goes to the full command-line parser.
    """
    config = None
    rest = list(argv)
    if rest[:1] in (["-c"], ["--config"]) and len(rest) >= 2:
        config, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--config="):
        config, rest = rest[0][len("--config="):], rest[1:]
    elif rest and rest[0].startswith("-c") and len(rest[0]) > 2:
        config, rest = rest[0][2:], rest[1:]
    if len(rest) not in (2, 3) or rest[0] != "deliver" or any(a.startswith("-") for a in rest[1:]):
        return None
    return config, rest[1], rest[2] if len(rest) == 3 else None


def state_dir_of(config_path: str) -> str:
    """The config file's top-level `state_dir:`, read without a YAML parser.

    A value written in a way this does not read gives the wrong folder: no
    socket there, or a serve that answers "no", and deliver works alone.
    Never the wrong result, only a slower one.
    """
    try:
        with open(config_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return paths.DEFAULT_STATE_DIR
    for line in text.splitlines():
        if line.startswith("state_dir:"):
            value = line[len("state_dir:"):].split(" #", 1)[0].strip()
            if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
                value = value[1:-1]
            return value or paths.DEFAULT_STATE_DIR
    return paths.DEFAULT_STATE_DIR


class _Reader:
    """read(n) over a socket, for netstring.read (_socket has no makefile)."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                break
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# Why the last `deliver` worked alone (for its message when it cannot finish alone).
why_alone: str | None = None


def deliver(argv: list[str]) -> int | None:
    """Hand the delivery to serve: its exit code, or None when this process must do it."""
    global why_alone
    parsed = parse_argv(argv)
    if parsed is None:
        return None
    config, recipient, sender = parsed
    if FANOUT_MARK in recipient.lower():
        # A post's fan-out (core/fanout.py) runs in this process, not in serve: its memory goes
        # back to the system when it ends, and a restart of serve does not cut it short.
        why_alone = "a fan-out runs in the pipe's own process"
        return None
    config_path, _ = paths.path_from_environment(config)
    socket_path = os.path.join(state_dir_of(config_path), SOCKET_NAME)
    header = b"\0".join([MAGIC, _encode(os.path.abspath(config_path)), _encode(recipient)]
                        + ([] if sender is None else [_encode(sender)]))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(socket_path)
            sock.sendall(netstring.encode(header))
            sock.settimeout(GO_TIMEOUT)
            reader = _Reader(sock)
            answer = netstring.read(reader, MAX_HEADER)
            if answer != b"go":
                why_alone = f"{socket_path}: serve answered {(answer or b'nothing').decode(errors='replace')!r}"
                return None
        except (OSError, netstring.Malformed) as e:
            # No serve, or one that cannot take it: nothing was done yet.
            why_alone = f"{socket_path}: {getattr(e, 'strerror', None) or e}"
            return None
        try:
            data = sys.stdin.buffer.read()
        except OSError as e:
            print(f"listmilter: cannot read the message: {e}", file=sys.stderr)
            return os.EX_TEMPFAIL
        try:
            sock.settimeout(ANSWER_TIMEOUT)
            sock.sendall(netstring.encode(data))
            answer = netstring.read(reader, MAX_HEADER)
        except (OSError, netstring.Malformed) as e:
            answer, why = None, str(e)
        else:
            why = "connection closed"
        if answer is None:
            print(f"listmilter: listmilter serve did not answer ({why}); will retry", file=sys.stderr)
            return os.EX_TEMPFAIL
    finally:
        sock.close()
    code, _, text = answer.partition(b" ")
    if text:
        print(f"listmilter: {text.decode('utf-8', 'replace')}", file=sys.stderr)
    return int(code) if code.isdigit() else os.EX_TEMPFAIL


# -- the server: inside `listmilter serve` ------------------------------------------
def start(runtime, can_resubmit=None):
    """Listen on STATE_DIR/deliver.sock in a background thread; returns the server for `stop`.

    can_resubmit() says whether serve's milter runs, so list mail that missed
    it can be put back through the MTA (listmilter.mta.deliver); by default,
    the milter of this process (not stopping).
    """
    import socketserver
    import threading

    from listmilter.log import logger
    if can_resubmit is None:
        from listmilter.mta.milter import ListMilter
        can_resubmit = lambda: not ListMilter.in_flight.stopping  # noqa: E731

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with server.lock:
                server.active += 1
            try:
                serve_one(self.request, runtime, server.config_path, can_resubmit)
            except Exception:   # one broken request must not stop the server; deliver retries
                logger.exception("deliver: hand-off failed")
            finally:
                with server.lock:
                    server.active -= 1
                    server.lock.notify_all()

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        # Postfix runs up to default_process_limit (100) pipe processes at
        # once; a unix socket refuses a connect at once when the backlog is
        # full, and that deliver would then work alone.
        request_queue_size = 256
        # Set by start() before it serves:
        path: str                           # the socket, renamed into place
        inode: int                          # ...and its inode, for stop(): not a newer serve's socket
        config_path: str | None             # realpath of serve's config file; None: built-in defaults
        lock: threading.Condition           # guards active, notified when it drops
        active: int                         # hand-offs in progress

    path = os.path.join(runtime.config.state_dir, SOCKET_NAME)
    # Bound under a temporary name and renamed into place: the socket never
    # exists with a wider mode, and a stale one from a crash is replaced.
    tmp = f"{path}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    server = Server(tmp, Handler)
    os.chmod(tmp, 0o666)      # any local user: see the module's docstring
    from listmilter.store import statedir
    statedir.adopt(runtime.config.state_dir, tmp)
    os.rename(tmp, path)
    server.path = path
    server.inode = os.stat(path).st_ino
    server.config_path = os.path.realpath(runtime.path) if runtime.path else None
    server.lock = threading.Condition()
    server.active = 0
    threading.Thread(target=server.serve_forever, name="deliver-socket", daemon=True).start()
    return server


def serve_one(sock, runtime, config_path: str | None, can_resubmit=None) -> None:
    """One hand-off: check the request, say go, take the message, run it, answer."""
    from listmilter.log import fields, logger
    from listmilter.mta import deliver, killpoint
    sock.settimeout(GO_TIMEOUT)
    f = sock.makefile("rb")
    try:
        header = netstring.read(f, MAX_HEADER)
        if header is None:
            return
        if header == STATUS_MAGIC:
            from listmilter import __version__
            sock.sendall(netstring.encode(b"\0".join(
                (_encode(__version__), _encode(config_path or ""), b"%d" % os.getpid()))))
            return
        magic, *parts = header.split(b"\0")
        if magic != MAGIC or len(parts) not in (2, 3):
            logger.warning("warning: deliver socket: not a deliver request; ignored")
            sock.sendall(netstring.encode(b"no protocol"))
            return
        client_config, recipient, *sender_part = (p.decode("utf-8", "surrogateescape") for p in parts)
        sender = sender_part[0] if sender_part else None
        if config_path is None or os.path.realpath(client_config) != config_path:
            logger.warning("warning: deliver socket: %s uses config %s, this serve runs %s; "
                           "the pipe process delivers it itself", recipient, client_config, config_path)
            sock.sendall(netstring.encode(b"no other config"))
            return
        sock.sendall(netstring.encode(b"go"))
        sock.settimeout(ANSWER_TIMEOUT)
        data = netstring.read(f, MAX_MESSAGE)
    except (OSError, netstring.Malformed) as e:
        logger.warning("warning: deliver socket: %s; nothing delivered, the pipe process retries", e)
        return
    if data is None:
        return      # the pipe process went away before sending the message
    killpoint.reached("handoff")
    code, text = deliver.run(runtime.current, recipient, sender, data, can_resubmit)
    killpoint.reached("handoff-done")
    try:
        sock.sendall(netstring.encode(b"%d %s" % (code, _encode(text))))
    except OSError as e:
        logger.warning("warning: deliver: %s; Postfix retries a message already handled",
                       fields(to=f"<{recipient}>", status=f"no answer to the pipe process ({e})"))


def status(state_dir: str, timeout: float = 5.0) -> tuple[str, str, int]:
    """(version, config path, pid) of the serve listening in `state_dir`; OSError or
    netstring.Malformed when there is none (or it does not understand the question)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.path.join(state_dir, SOCKET_NAME))
        sock.sendall(netstring.encode(STATUS_MAGIC))
        answer = netstring.read(_Reader(sock), MAX_HEADER)
    finally:
        sock.close()
    parts = (answer or b"").split(b"\0")
    if len(parts) != 3 or not parts[2].isdigit():
        raise netstring.Malformed(f"unexpected answer {answer!r}")
    return parts[0].decode(), parts[1].decode("utf-8", "surrogateescape"), int(parts[2])


def stop(server, timeout: float = 10.0) -> None:
    """Refuse new hand-offs (deliver then works alone), wait for those in flight, close."""
    import time
    try:
        if os.stat(server.path).st_ino == server.inode:    # not a newer serve's socket
            os.unlink(server.path)
    except OSError:
        pass
    server.shutdown()
    server.server_close()
    deadline = time.monotonic() + timeout
    with server.lock:
        while server.active and time.monotonic() < deadline:
            server.lock.wait(deadline - time.monotonic())
