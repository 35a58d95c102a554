"""A private Sendmail instance for tests and benchmarks (runs as root, no system config).

Debian's sendmail-bin conflicts with postfix, so ./bootstrap unpacks
sendmail-bin and sendmail-cf into SENDMAIL_ROOT; this builds a .cf from the
unpacked cf/m4/cf.m4 and runs `sendmail -bD` on a free 127.0.0.1 port, in a
process group of its own so stop() can end it and every child it forked.
The .mc holds exactly the listmilter lines docs/sendmail.md gives an admin.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .net import free_port, start_with_retry, wait_for_own_port, wait_until
from .postfix import PIPE_USER, pipe_runtime
from .procs import alive, descendants, kill

SENDMAIL_ROOT = Path(os.environ.get("LISTMILTER_SENDMAIL_ROOT", "/opt/listmilter-test/sendmail"))
SENDMAIL = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
CF_DIR = SENDMAIL_ROOT / "usr/share/sendmail/cf"
# Sendmail refuses to build an alias database under a world-writable folder
# such as /tmp, so instances live here.
RUN_DIR = SENDMAIL_ROOT.parent / "run"

# The admin's lines (docs/sendmail.md), with this bed's ports and paths filled in.
MILTER_MC = """\
dnl listmilter expands posts; F=T: tempfail when it is down; E: time for a big list.
INPUT_MAIL_FILTER(`listmilter', `S={milter_socket}, F=T, T=S:10s;R:1m;E:{eom_timeout}')dnl
"""
LISTMILTER_MC = MILTER_MC + """\
dnl Which addresses are lists or their role addresses: listmilter's socketmap.
LOCAL_CONFIG
Ktransport socket -T<TEMP> inet:{socketmap_port}@127.0.0.1
dnl Role addresses (and unexpanded list mail) go to the listmilter mailer.
MAILER_DEFINITIONS
Mlistmilter,	P={program}, F=lsDFMqu9, U={user}, S=EnvFromL/HdrFromL, R=EnvToL/HdrToL,
		D=/, T=DNS/RFC822/X-Unix,
		A={argv} deliver $u $g
LOCAL_RULE_0
R$+ < @ $=w . >		$: $1 < @ $2 . > $| $(transport $1 @ $2 $: NOTFOUND $)
R$* $| $* <TEMP>	$#error $@ 4.3.0 $: "451 listmilter table unavailable; try again later"
R$+ < @ $+ . > $| $- :	$# $3 $@ $2 $: $1 @ $2
R$* $| $*		$: $1
"""


def run_dir(prefix: str = "sendmail-") -> Path:
    """A fresh folder for one instance, where Sendmail accepts files and sockets as safe.

    Sendmail refuses a file whose folders up to / are writable by group or others,
    so every folder this makes gets its mode set, whatever the umask.
    """
    for folder in (RUN_DIR.parent, RUN_DIR):
        folder.mkdir(mode=0o755, exist_ok=True)
        os.chmod(folder, 0o755)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=RUN_DIR))
    d.chmod(0o755)
    return d


def available() -> bool:
    return SENDMAIL.exists() and (CF_DIR / "m4" / "cf.m4").exists()


class Sendmail:
    """One private Sendmail: start(), stop(), queue inspection."""

    def __init__(self, *, milter: str | None, sink_port: int, config_path: Path | None = None,
                 socketmap_port: int | None = None, list_domain: str = "example.org",
                 eom_timeout: str = "10m", workdir: Path | None = None,
                 extra_milters: dict[str, str] | None = None, queue_only: bool = False,
                 aliases: dict[str, str] | None = None, default_user: str | None = None):
        if not available():
            raise RuntimeError(f"no Sendmail unpacked under {SENDMAIL_ROOT}: run ./bootstrap")
        self.dir = Path(workdir) if workdir else run_dir()
        self.port = free_port()
        self.milter = milter      # Sendmail's spec: local:/path or inet:PORT@127.0.0.1
        self.sink_port = sink_port
        self.config_path = config_path
        self.socketmap_port = socketmap_port
        self.list_domain = list_domain
        self.eom_timeout = eom_timeout
        # name -> milter socket: a listener of its own with only that milter (benchmarks);
        # None: a listener with no milter at all.
        self.extra_milters = dict(extra_milters or {})
        self.ports = {name: free_port() for name in self.extra_milters}
        self.queue_only = queue_only    # accept and keep in the queue, deliver nothing (benchmarks)
        # The classic route (docs/sendmail.md, "Aliases"): local part -> `listmilter deliver` for
        # that address, run as DefaultUser; then the socketmap lines are left out.
        self.aliases = dict(aliases or {})
        self.default_user = default_user
        self.cf = self.dir / "test.cf"
        self.pipe_log = self.dir / "pipe.log"
        self.proc: subprocess.Popen | None = None

    # -- configuration ---------------------------------------------------
    def mc(self) -> str:
        d = self.dir
        lines = f"""\
divert(0)dnl
VERSIONID(`listmilter test bed')dnl
OSTYPE(`linux')dnl
dnl A fully qualified name and no DNS: otherwise start-up waits ~60 s for lookups.
define(`confDOMAIN_NAME', `mx.example.test')dnl
define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl
define(`confHOSTS_FILE', `{d}/hosts')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`QUEUE_DIR', `{d}/queue')dnl
define(`STATUS_FILE', `{d}/statistics')dnl
define(`confPID_FILE', `{d}/sendmail.pid')dnl
define(`ALIAS_FILE', `{d}/aliases')dnl
define(`HELP_FILE', `{d}/helpfile')dnl
define(`confCF_VERSION', `test')dnl
define(`confTO_QUEUEWARN', `0')dnl
define(`confMIN_QUEUE_AGE', `0')dnl
define(`confDELIVERY_MODE', `{"queueonly" if self.queue_only else "background"}')dnl
define(`confMAX_DAEMON_CHILDREN', `40')dnl
define(`confREFUSE_LA', `100')dnl
define(`confQUEUE_LA', `100')dnl
define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {self.sink_port}')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`nocanonify')dnl
DAEMON_OPTIONS(`Port={self.port}, Addr=127.0.0.1, Name=MTA')dnl
LOCAL_DOMAIN(`{self.list_domain}')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
        if self.default_user:
            lines += f"define(`confDEF_USER_ID', `{self.default_user}')dnl\n"
        if self.milter and self.aliases:
            lines += MILTER_MC.format(milter_socket=self.milter, eom_timeout=self.eom_timeout)
        elif self.milter and self.socketmap_port:
            runtime = pipe_runtime()
            config = f" -c {self.config_path}" if self.config_path else ""
            argv = (f"env PYTHONPATH={runtime} LISTMILTER_LOG={self.pipe_log}"
                    f" {runtime}/bin/listmilter{config}")
            lines += LISTMILTER_MC.format(
                milter_socket=self.milter, socketmap_port=self.socketmap_port,
                eom_timeout=self.eom_timeout, program="/usr/bin/env", user=f"{PIPE_USER}:nogroup",
                argv=argv)
        for name, spec in self.extra_milters.items():
            # MAIL_FILTER, not INPUT_MAIL_FILTER: only this listener uses it. An empty
            # InputMailFilters= gives a listener without the global (listmilter) milter.
            if spec:
                lines += f"MAIL_FILTER(`{name}', `S={spec}, F=T, T=S:10s;R:1m;E:{self.eom_timeout}')dnl\n"
            lines += (f"DAEMON_OPTIONS(`Port={self.ports[name]}, Addr=127.0.0.1, Name={name}, "
                      f"InputMailFilters={name if spec else ''}')dnl\n")
        return lines

    def _write_config(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        (d / "queue").mkdir(exist_ok=True)
        os.chmod(d / "queue", 0o700)
        (d / "service.switch").write_text("hosts files\naliases files\n")
        (d / "hosts").write_text("127.0.0.1 localhost mx.example.test\n")
        self._write_alias_program()
        self._write_command()
        (d / "aliases").write_text("postmaster: root\n" + "".join(
            f'{name}: "|{self.alias_command(address)}"\n' for name, address in self.aliases.items()))
        (d / "helpfile").write_text("")
        (d / "statistics").write_text("")
        self.pipe_log.touch()
        # Written by whoever runs `deliver`: the aliases' DefaultUser, or the mailer's U= user.
        os.chown(self.pipe_log, *_ids((self.default_user or PIPE_USER).partition(":")[0]
                                      if self.aliases else PIPE_USER))
        (d / "test.mc").write_text(self.mc())
        proc = subprocess.run(["m4", "-D", f"_CF_DIR_={CF_DIR}/", f"{CF_DIR}/m4/cf.m4", str(d / "test.mc")],
                              capture_output=True, text=True)
        if proc.returncode != 0 or proc.stderr.strip():
            raise RuntimeError(f"m4 failed on {d / 'test.mc'}:\n{proc.stderr}")
        self.cf.write_text(proc.stdout)
        built = self.sendmail_cmd("-bi")     # the alias database, so unknown users get 550
        if built.returncode != 0:
            raise RuntimeError(f"sendmail -bi: {built.stderr.decode(errors='replace')}")

    def alias_command(self, address: str) -> str:
        """An aliases-file program line (docs/sendmail.md): `listmilter deliver ADDRESS`."""
        return f"{self.dir}/listmilter deliver {address}"

    def _write_alias_program(self) -> None:
        # Sendmail refuses an alias longer than its token limit ("prescan: token
        # too long"), so the bed's interpreter, package path and config go into
        # a wrapper; an admin's line is just /usr/local/bin/listmilter deliver ...
        runtime = pipe_runtime()
        config = f" -c {self.config_path}" if self.config_path else ""
        wrapper = self.dir / "listmilter"
        wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/env PYTHONPATH={runtime} LISTMILTER_LOG={self.pipe_log}"
                           f" {runtime}/bin/listmilter{config} \"$@\"\n")
        wrapper.chmod(0o755)

    @property
    def command(self) -> Path:
        """This instance's sendmail command, for listmilter's `mta.sendmail` (docs/sendmail.md)."""
        return self.dir / "sendmail-command"

    def _write_command(self) -> None:
        # An admin's is /usr/sbin/sendmail itself; here the .cf is a private one and the host
        # name must be an FQDN (sendmail_cmd says why).
        self.command.write_text("#!/bin/sh\nexec unshare -u sh -c 'hostname mx.example.test && exec \"$@\"' sh "
                                f"{SENDMAIL} -C {self.cf} \"$@\"\n")
        self.command.chmod(0o755)

    def sendmail_cmd(self, *args: str, input: bytes | None = None, timeout: float = 60
                     ) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-u", "sh", "-c", 'hostname mx.example.test && exec "$@"', "sh",
                               str(SENDMAIL), "-C", str(self.cf), *args], input=input,
                              capture_output=True, timeout=timeout)

    def bs_session(self, commands: list[bytes], timeout: float = 60) -> list[tuple[int, str]]:
        """`sendmail -bs`: the sendmail command speaking SMTP on stdin, as programs that
        submit through it do; one command at a time (Sendmail refuses unannounced
        pipelining). The reply to the greeting, then to each command."""
        proc = subprocess.Popen(["unshare", "-u", "sh", "-c", 'hostname mx.example.test && exec "$@"', "sh",
                                 str(SENDMAIL), "-C", str(self.cf), "-bs"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

        def reply() -> tuple[int, str]:
            lines = []
            while True:
                line = proc.stdout.readline()
                if not line:
                    raise ConnectionError(f"sendmail -bs closed after {lines}")
                lines.append(line.decode(errors="replace").rstrip("\r\n"))
                if line[3:4] != b"-":
                    return int(line[:3]), " ".join(x[4:] for x in lines)
        try:
            replies = [reply()]
            for command in commands:
                proc.stdin.write(command)
                proc.stdin.flush()
                replies.append(reply())
                if command.startswith(b"QUIT"):
                    break
            return replies
        finally:
            proc.stdin.close()
            proc.wait(timeout)

    # -- life cycle --------------------------------------------------------
    def start(self) -> "Sendmail":
        start_with_retry(self._start_once, self.stop, self._new_ports)
        return self

    def _new_ports(self) -> None:
        self.port = free_port()
        self.ports = {name: free_port() for name in self.extra_milters}

    def _start_once(self) -> None:
        self._write_config()
        # -bD: the daemon stays in the foreground, so this Popen is its process
        # (unshare and sh exec it). -q1s: queue runs every second, so retries and
        # DSNs come quickly. unshare -u: a host name of its own (an FQDN), set
        # without touching the machine's; with a short one Sendmail waits ~60 s on DNS.
        self.proc = subprocess.Popen(["unshare", "-u", "sh", "-c", 'hostname mx.example.test && exec "$@"', "sh",
                                      str(SENDMAIL), "-C", str(self.cf), "-bD",
                                      *([] if self.queue_only else ["-q1s"])],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sendmail.stderr", "ab"),
                                     start_new_session=True)
        proc = self.proc
        try:
            for port in (self.port, *self.ports.values()):
                wait_for_own_port(port, lambda: proc.pid if proc.poll() is None else False, timeout=30)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"sendmail did not start: {(self.dir / 'sendmail.stderr').read_text()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        # SMTP session children call setsid(), so the daemon's process group does
        # not hold them all: find every descendant while the daemon still lives.
        procs = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in procs:
            kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in procs[1:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in procs:
            kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- queue -------------------------------------------------------------
    def queue(self) -> str:
        return self.sendmail_cmd("-bp").stdout.decode(errors="replace")

    def queue_empty(self) -> bool:
        return "is empty" in self.queue()

    def wait_queue_empty(self, timeout: float = 60) -> None:
        wait_until(self.queue_empty, timeout, interval=0.2, what="the Sendmail queue to drain")


def _ids(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def queue_ids(listing: str) -> list[str]:
    return re.findall(r"^(\w{14})\*?\s", listing, re.M)
