"""A private Postfix instance for tests and benchmarks (runs as root, no systemd).

Recipe from shared/notes/mta-facts.md: its own config, queue and data
directories, its own smtpd on a free 127.0.0.1 port, everything relayed to
a sink, listmilter as smtpd_milters and non_smtpd_milters, and listmilter's
socketmap table and pipe transport wired in exactly as docs/postfix.md says.
"""

from __future__ import annotations

import atexit
import compileall
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .net import PortTaken, free_port, start_with_retry, wait_for_own_port, wait_until
from .procs import alive, descendants

PIPE_USER = "nobody"
PIPE_GROUP = "nogroup"
# What `listmilter deliver` and `listmilter web` need at run time; copied where the
# pipe user can read it, because a checkout may sit under a folder only root can enter.
# (cryptography's compiled parts need cffi's backend module; without the copy the
# system's own python3-cryptography would be used, not the version pip installs.)
# psycopg (with its C part and pool) for store.dsn.
# pyproject's dependencies (and the postgresql extra) that `deliver` imports, by import name.
_PIPE_PACKAGES = ("listmilter", "yaml", "flufl", "public", "dns", "waitress", "cryptography", "cffi",
                  "_cffi_backend", "psycopg", "psycopg_c", "psycopg_pool", "typing_extensions.py",
                  "publicsuffixlist")
_pipe_runtime: Path | None = None


def pipe_runtime() -> Path:
    """A world-readable copy of listmilter and its run-time packages (once per process)."""
    global _pipe_runtime
    if _pipe_runtime is None:
        import yaml

        import listmilter
        site = Path(yaml.__file__).resolve().parent.parent
        src = Path(listmilter.__file__).resolve().parent
        root = Path(tempfile.mkdtemp(prefix="listmilter-pipe-"))
        os.chmod(root, 0o755)
        for name in _PIPE_PACKAGES:
            origin = src if name == "listmilter" else site / name
            if origin.is_file():       # a module of one file
                shutil.copy(origin, root / name)
            elif origin.exists():
                shutil.copytree(origin, root / name,
                                ignore=shutil.ignore_patterns("__pycache__", "tests"))
            for module in site.glob(f"{name}.*.so"):        # an extension module alone
                shutil.copy(module, root / module.name)
        # Byte-compiled as pip does at install: the pipe user cannot write
        # __pycache__ here and would compile every module on every delivery.
        compileall.compile_dir(root, quiet=1)
        # The command, as pip writes a console script (docs/install.md's
        # /usr/local/bin/listmilter), so the pipe starts as in production.
        (root / "bin").mkdir()
        (root / "bin" / "listmilter").write_text(
            "#!/usr/bin/python3\nimport sys\nfrom listmilter.cli import main\n"
            "if __name__ == '__main__':\n    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
            "    sys.exit(main())\n")
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() or path.parent.name == "bin" else 0o644)
        atexit.register(shutil.rmtree, root, True)
        _pipe_runtime = root
    return _pipe_runtime


# The re-injection listener docs/postfix.md gives (personal copies from serve's fan-out).
# With a signing milter (docs/postfix.md, "Signing list mail with OpenDKIM") it runs that one alone.
REINJECT_SERVICE = ("127.0.0.1:{port} inet n - n - - smtpd"
                    " -o syslog_name=postfix/reinject"
                    " -o smtpd_milters={milters} -o receive_override_options={overrides}no_header_body_checks"
                    " -o smtpd_client_restrictions= -o smtpd_helo_restrictions="
                    " -o smtpd_sender_restrictions= -o smtpd_relay_restrictions="
                    " -o smtpd_recipient_restrictions=permit_mynetworks,reject"
                    " -o mynetworks=127.0.0.0/8 -o smtpd_client_connection_count_limit=0")


class Postfix:
    """One private Postfix: start(), stop(), submit(), queue inspection."""

    def __init__(self, *, milter: str | None, sink_port: int, config_path: Path | None = None,
                 socketmap: str | None = None, list_domain: str = "example.org",
                 main_cf: dict[str, str] | None = None, workdir: Path | None = None,
                 reinject_port: int | None = None, reinject_milters: str = ""):
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="postfix-"))
        self.port = free_port()
        self.milter = milter
        self.sink_port = sink_port
        self.config_path = config_path
        self.socketmap = socketmap
        self.list_domain = list_domain
        self.extra = dict(main_cf or {})
        self.reinject_port = reinject_port      # the re-injection smtpd without milters (docs/postfix.md)
        self.reinject_milters = reinject_milters    # ... but for a signing milter, if given
        self.pipe_log = self.dir / "pipe.log"
        self.config_by_env = False      # the pipe finds its config by $LISTMILTER_CONFIG, not -c
        self.running = False

    # -- configuration ---------------------------------------------------
    def _main_cf(self) -> dict[str, str]:
        d = self.dir
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": f"{d}/queue",
            "data_directory": f"{d}/data",
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "myorigin": "example.test",
            "mydestination": self.list_domain,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": f"{d}/maillog",
            "maillog_file_prefixes": f"{d}",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            # One local alias, so a test can show local mail flowing while listmilter is down.
            "alias_maps": "inline:{ {postmaster = postmaster@example.net} }",
            "alias_database": "",
            "smtp_dns_support_level": "disabled",
            "milter_default_action": "accept",
            "milter_protocol": "6",
            "recipient_delimiter": "+",
            "in_flow_delay": "0",
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
            "delay_warning_time": "0",
            "biff": "no",
            "smtputf8_enable": "no",
            "local_recipient_maps": "",
        }
        if self.milter:
            cf["smtpd_milters"] = self.milter
            cf["non_smtpd_milters"] = self.milter
        if self.socketmap:
            # The lines docs/postfix.md gives an admin, with this bed's socket
            # (the bed has no system users: $alias_maps stands for passwd and aliases).
            cf["local_recipient_maps"] = f"$alias_maps socketmap:{self.socketmap}:recipients"
            cf["fallback_transport"] = "listmilter"
            cf["listmilter_destination_recipient_limit"] = "1"
            cf["local_destination_concurrency_limit"] = "20"
        cf.update(self.extra)
        return cf

    def _write_config(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # mkdtemp gives 0700; postfix-owned daemons must enter it
        (d / "queue").mkdir(parents=True, exist_ok=True)
        (d / "data").mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "data", "postfix")
        shutil.copy("/usr/share/postfix/master.cf.dist", d / "master.cf")
        (d / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self._main_cf().items()))
        backdate(d)
        self.postconf("-MX", "smtp/inet")
        self.postconf("-Me", f"127.0.0.1:{self.port}/inet = 127.0.0.1:{self.port} inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")
        if self.reinject_port:
            self.postconf("-Me", f"127.0.0.1:{self.reinject_port}/inet = " + REINJECT_SERVICE.format(
                port=self.reinject_port, milters=self.reinject_milters,
                overrides="" if self.reinject_milters else "no_milters,"))
        if self.socketmap:
            runtime = pipe_runtime()
            config = f"-c {self.config_path} " if self.config_path else ""
            env = f" LISTMILTER_CONFIG={self.config_path}" if self.config_by_env else ""
            if self.config_by_env:
                config = ""
            self.pipe_log.touch()
            shutil.chown(self.pipe_log, PIPE_USER)
            self.postconf(
                "-Me",
                "listmilter/unix = listmilter unix - n n - - pipe"
                f" flags=Rq user={PIPE_USER} null_sender="
                f" argv=/usr/bin/env PYTHONPATH={runtime} LISTMILTER_LOG={self.pipe_log}{env}"
                f" {runtime}/bin/listmilter {config}deliver ${{recipient}} ${{sender}}")

    def configure(self) -> "Postfix":
        """Write main.cf and master.cf without starting (what `postconf` reads)."""
        self._write_config()
        return self

    def reload(self) -> None:
        """`postfix reload`, and wait until the processes that ran the old config are gone."""
        master = self.master_pid()
        old = set(descendants(master)) if master else set()
        mark = len(self.log())
        subprocess.run(["postfix", "-c", str(self.dir), "reload"], check=True, capture_output=True, text=True)
        wait_until(lambda: "reload -- version" in self.log()[mark:], 15, what="postfix to reload")
        # Old smtpd processes finish their session and exit; until then one could take a connection.
        wait_until(lambda: not any(alive(p) for p in old), 15, interval=0.1,
                   what="postfix's old processes to exit after reload")

    def master_pid(self) -> int | None:
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def postconf(self, *args: str) -> str:
        out = subprocess.run(["postconf", "-c", str(self.dir), *args], check=True,
                             capture_output=True, text=True).stdout
        backdate(self.dir)
        return out

    # -- life cycle --------------------------------------------------------
    def start(self) -> "Postfix":
        start_with_retry(self._start_once, self.stop, self._new_port)
        return self

    def _new_port(self) -> None:
        self.port = free_port()
        if self.reinject_port:
            self.reinject_port = free_port()

    def _start_once(self) -> None:
        self._write_config()
        mark = len(self.log())
        started = subprocess.run(["postfix", "-c", str(self.dir), "start"], capture_output=True, text=True)
        if started.returncode:
            # `postfix start` waits for master (master -w), which exits when it cannot bind
            # a port; its own "Address already in use" never reaches maillog_file, because
            # postlogd is not running yet. The likely cause is another test's server taking a
            # port after free_port(), so PortTaken makes start_with_retry try new ports; a real
            # config error fails every attempt and the last one shows the log.
            tail = "\n".join(self.log()[mark:].splitlines()[-5:])
            raise PortTaken(f"postfix start exited {started.returncode} (ports {self.port},"
                            f" {self.reinject_port}): {started.stderr.strip()}\n{tail}")
        self.running = True

        def owner():
            if f"port {self.port}: Address already in use" in self.log()[mark:]:
                return False
            return self.master_pid()
        wait_for_own_port(self.port, owner)

    def stop(self) -> None:
        if not self.running:
            return
        subprocess.run(["postfix", "-c", str(self.dir), "stop"], capture_output=True, text=True)
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        try:
            wait_until(lambda: not _alive(pidfile), timeout=15, what="postfix master to exit")
        except TimeoutError:
            subprocess.run(["postfix", "-c", str(self.dir), "abort"], capture_output=True)
        self.running = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- mail ------------------------------------------------------------
    def sendmail(self, message: bytes, sender: str, recipients: list[str]) -> subprocess.CompletedProcess:
        """Local submission with Postfix's sendmail command (pickup, non_smtpd_milters)."""
        return subprocess.run(["sendmail", "-C", str(self.dir), "-f", sender, "--", *recipients],
                              input=message, capture_output=True, timeout=60)

    def queue(self) -> str:
        return subprocess.run(["postqueue", "-c", str(self.dir), "-p"], capture_output=True,
                              text=True).stdout

    def queue_empty(self) -> bool:
        # Twice, a moment apart: showq reads the queue folders one after another, and
        # a file moving between two of them (deferred -> active) can be missed once.
        if "Mail queue is empty" not in self.queue():
            return False
        time.sleep(0.1)
        return "Mail queue is empty" in self.queue()

    def log(self) -> str:
        try:
            return (self.dir / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def backdate(config_dir: Path) -> None:
    """Give main.cf and master.cf an mtime in the past. Postfix re-reads a config file
    changed within the last ~2 s until it is older (it may still be being edited):
    every postconf and postfix command after an edit would wait those 2 s."""
    past = time.time() - 10
    for name in ("main.cf", "master.cf"):
        try:
            os.utime(Path(config_dir) / name, (past, past))
        except FileNotFoundError:
            pass


def empty_config(folder: Path) -> str:
    """A Postfix config folder with an empty main.cf and master.cf (every parameter at its
    default, no services), for MAIL_CONFIG: `listmilter check` reads it through postconf in
    milliseconds. Without one (no main.cf in /etc/postfix on a test machine) postconf
    exits fatal, and Postfix's fatal exit sleeps a second first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("main.cf", "master.cf"):
        (folder / name).touch()
    backdate(folder)
    return str(folder)


def _alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    return alive(pid)
