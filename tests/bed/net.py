"""Free ports, who listens on them, and waiting for listeners on 127.0.0.1."""

import os
import random
import socket
import time

# Below the kernel's ephemeral range (32768-60999 by default), where outgoing
# connections take their local ports: a port chosen here is not taken by a
# connect() between free_port() and the server's bind. Servers that can bind
# port 0 themselves (the sink) do that; the others are started with
# start_with_retry, which checks that the listener is theirs.
_PORTS = (20000, 32000)


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on now (for a server that is told its port in a config file)."""
    for _ in range(200):
        port = random.randint(*_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def listener_pids(port: int) -> set[int]:
    """The processes holding a socket that listens on TCP `port` (127.0.0.1 or any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    pids = set()
    if not inodes:
        return pids
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    pids.add(int(pid))
                    break
            except OSError:
                continue
    return pids


class PortTaken(Exception):
    """Another process listens on a port a server was told to use (the free_port race)."""


def wait_for_own_port(port: int, owner, timeout: float = 15.0) -> None:
    """Wait until `port` listens and belongs to `owner()` (a pid, or None while it starts).

    Raises PortTaken when someone else holds the port, or when the owner died
    (it could not bind); the caller picks new ports and starts again.
    """
    deadline = time.monotonic() + timeout
    while True:
        pid = owner()
        if pid is False:
            raise PortTaken(f"the server for port {port} exited before it listened")
        holders = listener_pids(port)
        if pid is not None and pid in holders:
            return
        if pid is not None and holders:
            # A port has one listener: ours can never bind it now.
            raise PortTaken(f"port {port} is held by pid {sorted(holders)}, not by {pid}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing of ours listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def start_with_retry(start, stop, new_ports, attempts: int = 3):
    """start(); on PortTaken, stop(), new_ports(), and start again (at most `attempts` times)."""
    for attempt in range(attempts):
        try:
            return start()
        except PortTaken:
            stop()
            if attempt == attempts - 1:
                raise
            new_ports()


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def wait_for_unix(path, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on a unix socket."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {path} after {timeout}s") from None
            time.sleep(0.05)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll predicate() until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
