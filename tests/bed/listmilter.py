"""Run `listmilter serve` as a real process, and drive its store like an admin does."""

from __future__ import annotations

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

from .net import PortTaken, free_port, start_with_retry, wait_for_own_port, wait_for_port, wait_for_unix, wait_until
from .postfix import PIPE_GROUP, PIPE_USER, pipe_runtime

# Set by tests/conftest.py for each test: True when it is not marked mta (the fast tier).
IN_PROCESS = False


def cli(config: Path, *args: str, input: str | None = None, env: dict | None = None,
        check: bool = True, process: bool | None = None) -> subprocess.CompletedProcess:
    """`listmilter -c CONFIG ARGS...`: its exit code, stdout and stderr (text, as subprocess gives them).

    In the fast tier it runs in this process (`cli_in_process`): an interpreter start and
    the package's imports cost ~0.15 s a command, most of what a CLI test took. The mta
    tier, `process=True` and `deliver` (the pipe transport, an entry point of its own:
    tests/test_handoff.py) run a real `python -m listmilter`; tests/test_cli.py and
    tests/test_site_config.py keep real processes for the entry point itself."""
    if process is None:
        process = not IN_PROCESS or "deliver" in args
    argv = ["-c", str(config), *args]
    if process:
        proc = subprocess.run([sys.executable, "-m", "listmilter", *argv],
                              input=input, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **(env or {})})
    else:
        proc = cli_in_process(argv, input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"listmilter {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def cli_in_process(argv: list[str], input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`listmilter.cli.main(argv)` as `python -m listmilter` would run it, in this process:
    stdin, stdout and stderr are pipes' worth of bytes with the encodings and error handlers
    a child gets under a UTF-8 locale, read back as text with universal newlines (as
    subprocess.run(text=True) does); `env` is set for the call; SystemExit gives the exit
    code and any other exception a traceback on stderr and exit 1, as the interpreter would.
    What the command changes in this process is put back: the listmilter logger (log.setup
    points it at stderr and stops propagation), the environment, the umask."""
    import io
    import logging
    import traceback

    from listmilter.cli import main

    def stream(data: bytes, errors: str) -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors, write_through=True)

    stdin = stream((input or "").encode("utf-8", "surrogateescape"), "surrogateescape")
    stdout, stderr = stream(b"", "surrogateescape"), stream(b"", "backslashreplace")
    logger = logging.getLogger("listmilter")
    saved_logger = (list(logger.handlers), logger.level, logger.propagate)
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    saved_std = (sys.stdin, sys.stdout, sys.stderr)
    umask = os.umask(0o022)
    os.umask(umask)
    os.environ.update(env or {})
    sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
    try:
        try:
            code = main(argv)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        for f in (stdout, stderr):
            f.flush()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_std
        os.umask(umask)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for handler in list(logger.handlers):
            if handler not in saved_logger[0]:
                logger.removeHandler(handler)
                handler.close()
        for handler in saved_logger[0]:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.setLevel(saved_logger[1])
        logger.propagate = saved_logger[2]

    def text(f: io.TextIOWrapper) -> str:
        return io.TextIOWrapper(io.BytesIO(f.buffer.getvalue()), encoding="utf-8").read()     # newline=None

    return subprocess.CompletedProcess(["listmilter", *argv], code, text(stdout), text(stderr))


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
        self.stderr_path = self.dir / "serve.stderr"
        self.state_dir = self.dir / "state"
        # Made as docs/install.md's tmpfiles entry makes it: owned by the user the
        # pipe transport runs as, before any listmilter command. Nothing chowns it
        # later: files root's commands (and this root-run serve) make in it must
        # be handed to that user by listmilter itself (store/statedir.py).
        self.state_dir.mkdir(exist_ok=True)
        shutil.chown(self.state_dir, PIPE_USER, PIPE_GROUP)
        # As systemd/listmilter.tmpfiles makes it: others may enter (to reach
        # deliver.sock as a Sendmail aliases program does), not list it.
        os.chmod(self.state_dir, 0o751)
        self.lists: dict[str, dict] = {}
        self.outgoing_port = outgoing_port
        self.reinject_port: int | None = None     # the MTA's listener without milters (outgoing.reinject)
        self.extra = dict(extra or {})
        self.env: dict[str, str] = {}      # extra environment for serve (e.g. LISTMILTER_PERIODIC_INTERVAL)
        self.prefix: list[str] = []        # a command serve runs under (it must exec serve: same pid)
        self.config_by_env = False         # serve finds its config by $LISTMILTER_CONFIG, not -c
        self.proc: subprocess.Popen | None = None
        self.exit_codes: list[int] = []    # serve's, each time it was stopped
        self._marks = (0, 0)               # log and stderr offsets already looked at (problems())
        self._started = False
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
            if self.reinject_port:
                cfg["outgoing"]["reinject"] = f"127.0.0.1:{self.reinject_port}"
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
    def follow_mta(self, outgoing_port: int, reinject_port: int | None = None) -> None:
        """The MTA's final ports, once it started (it may have found one taken and picked
        another): if they moved, rewrite the config and start again on them."""
        if (self.outgoing_port, self.reinject_port) == (outgoing_port, reinject_port):
            return
        self.outgoing_port, self.reinject_port = outgoing_port, reinject_port
        self.write_config()
        self.stop()
        self.start()

    def start(self) -> "ListmilterServer":
        # The first start may find a port taken since free_port(); a restart keeps
        # its ports (Postfix or Sendmail was configured with them).
        new_ports = self._new_ports if not self._started else None
        start_with_retry(self._start_once, self._kill, new_ports or (lambda: None),
                         attempts=3 if new_ports else 1)
        self._started = True
        return self

    def _new_ports(self) -> None:
        self.milter_port = free_port()
        self.socketmap_port = free_port()
        self.write_config()

    def _start_once(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("LISTMILTER_LOG", "LISTMILTER_CONFIG")}
        config = [] if self.config_by_env else ["-c", str(self.config_path)]
        if self.config_by_env:
            env["LISTMILTER_CONFIG"] = str(self.config_path)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "listmilter", *config, "serve"],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "ab"), env={**env, **self.env},
            # As systemd's UMask=0007 does: sockets reachable by the folder's group.
            umask=0o007 if self.socket_dir else -1)
        proc = self.proc

        def owner():
            return proc.pid if proc.poll() is None else False
        try:
            if self.socket_dir:
                wait_for_unix(self.socket_dir / "milter.sock")
                wait_for_unix(self.socket_dir / "socketmap.sock")
            else:
                if self.milter_path:
                    wait_for_unix(self.milter_path)
                else:
                    wait_for_own_port(self.milter_port, owner)
                wait_for_own_port(self.socketmap_port, owner)
        except (PortTaken, TimeoutError):
            if proc.poll() is not None and "in use" not in self.stderr() + self.log():
                raise RuntimeError(f"listmilter serve exited {proc.returncode}:\n{self.stderr()[-3000:]}") from None
            raise

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.exit_codes.append(self.proc.returncode)
        self.proc = None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def problems(self) -> list[str]:
        """What a test must not leave behind in serve: a traceback or a failed periodic
        run in its log or stderr since the last look, a serve that died by itself, or
        one that exited non-zero when stopped. Resets the marks (see forgive())."""
        out = []
        log, err = self.log(), self.stderr()
        new_log, new_err = log[self._marks[0]:], err[self._marks[1]:]
        self._marks = (len(log), len(err))
        for name, text in (("log", new_log), ("stderr", new_err)):
            for needle in ("Traceback", "periodic run failed"):
                if needle in text:
                    at = text.index(needle)
                    out.append(f"serve's {name} has {needle!r}:\n{text[max(0, at - 300):at + 2000]}")
        # Exit 0 is a stop the test asked for (SIGTERM, SIGHUP); anything else is a crash.
        if self.proc is not None and self.proc.poll() not in (None, 0):
            out.append(f"serve died by itself (exit {self.proc.returncode}):\n{err[-2000:]}")
        out += [f"serve exited {code} when stopped:\n{err[-2000:]}" for code in self.exit_codes if code != 0]
        self.exit_codes = [code for code in self.exit_codes if code == 0]
        return out

    def forgive(self) -> None:
        """The tracebacks logged so far were caused on purpose: problems() skips them."""
        self._marks = (len(self.log()), len(self.stderr()))

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
