"""Run `listmilter serve` as a real process, and drive its store like an admin does."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from .net import free_port, wait_for_port, wait_for_unix, wait_until
from .postfix import PIPE_USER, pipe_runtime


def cli(config: Path, *args: str, input: str | None = None, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "listmilter", "-c", str(config), *args],
                          input=input, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"listmilter {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def socketmap_query(where: int | str, request: str) -> str:
    """One socketmap request to a TCP port on 127.0.0.1, or to a unix socket path."""
    data = request.encode()
    if isinstance(where, int):
        conn = socket.create_connection(("127.0.0.1", where), timeout=5)
    else:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(5)
        conn.connect(where)
    with conn as s:
        s.sendall(b"%d:%s," % (len(data), data))
        reply = b""
        while not reply.endswith(b","):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b":", 1)[1][:-1].decode()


class ListmilterServer:
    """A listmilter config folder plus a `listmilter serve` process using it."""

    def __init__(self, workdir: Path, backend: str = "sqlite", outgoing_port: int | None = None,
                 extra: dict | None = None, socket_dir: Path | None = None,
                 postfix_socket_dir: str | None = None, milter_path: Path | None = None):
        # socket_dir: unix sockets there instead of TCP ports; postfix_socket_dir:
        # how Postfix names that folder (e.g. relative to its queue directory).
        # milter_path: the milter alone on a unix socket (Sendmail's bed).
        self.socket_dir = Path(socket_dir) if socket_dir else None
        self.postfix_socket_dir = postfix_socket_dir or (str(socket_dir) if socket_dir else None)
        self.milter_path = Path(milter_path) if milter_path else None
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.backend = backend
        self.milter_port = free_port()
        self.socketmap_port = free_port()
        self.config_path = self.dir / "listmilter.yaml"
        self.log_path = self.dir / "listmilter.log"
        self.state_dir = self.dir / "state"
        self.lists: dict[str, dict] = {}
        self.outgoing_port = outgoing_port
        self.extra = dict(extra or {})
        self.proc: subprocess.Popen | None = None
        self._mtime = time.time()
        self.write_config()

    @property
    def milter_spec(self) -> str:       # as Postfix writes it
        if self.socket_dir:
            return f"unix:{self.postfix_socket_dir}/milter.sock"
        return f"inet:127.0.0.1:{self.milter_port}"

    @property
    def socketmap_spec(self) -> str:    # as Postfix writes it
        if self.socket_dir:
            return f"unix:{self.postfix_socket_dir}/socketmap.sock"
        return f"inet:127.0.0.1:{self.socketmap_port}"

    @property
    def socketmap_address(self) -> int | str:
        return str(self.socket_dir / "socketmap.sock") if self.socket_dir else self.socketmap_port

    def config(self) -> dict:
        if self.socket_dir:
            milter = f"unix:{self.socket_dir}/milter.sock"
            table = f"unix:{self.socket_dir}/socketmap.sock"
        else:
            milter = f"unix:{self.milter_path}" if self.milter_path else f"inet:{self.milter_port}@127.0.0.1"
            table = f"inet:{self.socketmap_port}@127.0.0.1"
        cfg = {
            "milter": {"socket": milter},
            "socketmap": {"socket": table},
            "state_dir": str(self.state_dir),
            "store": {"backend": self.backend},
            "site": {"admin": "admin@example.net"},
            "log": {"target": str(self.log_path)},
        }
        if self.outgoing_port:
            cfg["outgoing"] = {"smtp": f"127.0.0.1:{self.outgoing_port}"}
        if self.backend == "yaml" and self.lists:
            cfg["lists"] = self.lists
        cfg.update(self.extra)
        return cfg

    def write_config(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        # A strictly newer mtime, so a reload is never missed within one clock tick.
        self._mtime = max(self._mtime + 1, time.time())
        os.utime(tmp, (self._mtime, self._mtime))
        os.replace(tmp, self.config_path)
        os.chmod(self.config_path, 0o644)

    # -- process -----------------------------------------------------------
    def start(self) -> "ListmilterServer":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "listmilter", "-c", str(self.config_path), "serve"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "serve.stderr", "ab"),
            # As systemd's UMask=0007 does: sockets reachable by the folder's group.
            umask=0o007 if self.socket_dir else -1)
        if self.socket_dir:
            wait_for_unix(self.socket_dir / "milter.sock")
            wait_for_unix(self.socket_dir / "socketmap.sock")
        else:
            if self.milter_path:
                wait_for_unix(self.milter_path)
            else:
                wait_for_port(self.milter_port)
            wait_for_port(self.socketmap_port)
        # The pipe transport runs as another user (Postfix refuses root), as the
        # milter would in production; hand it the state folder.
        for path in [self.state_dir, *self.state_dir.rglob("*")]:
            try:
                shutil.chown(path, PIPE_USER)
            except OSError as e:    # a read-only state folder (test_faults.py) stays as it is
                if e.errno != errno.EROFS:
                    raise
        # As systemd/listmilter.tmpfiles makes it: others may enter (to reach
        # deliver.sock as a Sendmail aliases program does), not list it.
        try:
            os.chmod(self.state_dir, 0o751)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @contextmanager
    def web(self, port: int):
        """`listmilter web` with this config on 127.0.0.1:port, as the pipe transport's user
        (as in production), logging to web.log; stopped when the block ends."""
        stderr = open(self.dir / "web.stderr", "ab")
        self.web_log = self.dir / "web.log"
        self.web_log.touch()
        shutil.chown(self.web_log, PIPE_USER)
        proc = subprocess.Popen(
            ["/usr/bin/env", f"PYTHONPATH={pipe_runtime()}", f"LISTMILTER_LOG={self.web_log}",
             "/usr/bin/python3", "-m", "listmilter", "-c", str(self.config_path), "web",
             "--listen", f"127.0.0.1:{port}"],
            user=PIPE_USER, cwd="/", stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_port(port, timeout=20)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            stderr.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    # -- lists, the way an admin makes them ----------------------------------
    def create_list(self, address: str, members=(), **list_settings) -> None:
        if self.backend == "yaml":
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in list_settings.items()}
            entry["members"] = list(members)
            self.lists[address] = entry
            self.write_config()
            if self.proc:
                wait_until(lambda: self.knows(address), 10, what=f"listmilter to load {address}")
            return
        args = ["list", "create", address]
        for owner in list_settings.pop("owners", ()):
            args += ["--owner", owner]
        cli(self.config_path, *args)
        for key, value in list_settings.items():
            cli(self.config_path, "list", "set", address, key, str(value))
        if members:
            cli(self.config_path, "members", "add", address, "-", input="\n".join(members) + "\n")

    def knows(self, address: str) -> bool:
        return socketmap_query(self.socketmap_address, f"recipients {address}").startswith("OK")
