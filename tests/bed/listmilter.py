"""Run `listmilter serve` as a real process, and drive its store like an admin does."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .postfix import PIPE_USER
from .net import free_port, wait_for_port, wait_until


def cli(config: Path, *args: str, input: str | None = None, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "listmilter", "-c", str(config), *args],
                          input=input, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"listmilter {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _connects(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


def socketmap_query(port: int, request: str) -> str:
    data = request.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
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
                 extra: dict | None = None, milter_path: Path | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.backend = backend
        self.milter_port = free_port()
        # A unix socket for the milter instead of the port (what docs/sendmail.md advises).
        self.milter_path = milter_path
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
        return f"inet:127.0.0.1:{self.milter_port}"

    @property
    def socketmap_spec(self) -> str:    # as Postfix writes it
        return f"inet:127.0.0.1:{self.socketmap_port}"

    def config(self) -> dict:
        cfg = {
            "milter": {"socket": f"unix:{self.milter_path}" if self.milter_path
                       else f"inet:{self.milter_port}@127.0.0.1"},
            "socketmap": {"socket": f"inet:{self.socketmap_port}@127.0.0.1"},
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
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "serve.stderr", "ab"))
        if self.milter_path:
            wait_until(lambda: _connects(self.milter_path), 15, what=f"a listener on {self.milter_path}")
        else:
            wait_for_port(self.milter_port)
        wait_for_port(self.socketmap_port)
        # The pipe transport runs as another user (Postfix refuses root), as the
        # milter would in production; hand it the state folder.
        for path in [self.state_dir, *self.state_dir.rglob("*")]:
            shutil.chown(path, PIPE_USER)
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
            cli(self.config_path, "list", "set", address, key, value)
        if members:
            cli(self.config_path, "members", "add", address, "-", input="\n".join(members) + "\n")

    def knows(self, address: str) -> bool:
        return socketmap_query(self.socketmap_port, f"recipients {address}").startswith("OK")
