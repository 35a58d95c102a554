"""A private OpenDKIM for tests (Debian's `opendkim`, `opendkim-tools`): signing only, on a free
127.0.0.1 port, with a key made for this instance and a config of its own (docs/postfix.md
gives the same lines for an admin). It runs in the foreground in a process group of its own,
so stop() ends it, also when the test fails; the public key's TXT record is `dns_record` for
the test DNS server (tests/bed/dns.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from .net import free_port, start_with_retry, wait_for_own_port
from .sendmail import run_dir

OPENDKIM = "/usr/sbin/opendkim"
GENKEY = "/usr/sbin/opendkim-genkey"

# The admin's opendkim.conf (docs/postfix.md), with this instance's paths and port.
CONF = """\
Mode                    s
Socket                  inet:{port}@127.0.0.1
KeyTable                file:{dir}/key.table
SigningTable            refile:{dir}/signing.table
Canonicalization        relaxed/relaxed
OversignHeaders         From
MTA                     {mta}
{internal}PidFile                 {dir}/opendkim.pid
UMask                   077
Syslog                  no
"""


def available() -> bool:
    return os.access(OPENDKIM, os.X_OK) and os.access(GENKEY, os.X_OK)


class OpenDKIM:
    def __init__(self, domain: str = "example.org", selector: str = "lists", workdir: Path | None = None,
                 mta: str = "listhost"):
        if not available():
            raise RuntimeError(f"{OPENDKIM} or {GENKEY} missing: run ./bootstrap (Debian opendkim, opendkim-tools)")
        # OpenDKIM refuses a key under a folder others may write to (such as /tmp): the key is
        # "not secure" and every message gets a tempfail. The Sendmail bed's folders are safe.
        self.dir = Path(workdir) if workdir else run_dir("opendkim-")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.domain, self.selector = domain, selector
        self.mta = mta      # Postfix's milter_macro_daemon_name: mail through it is signed, from any client
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        # 1024 bits: the public key fits one TXT string (255 bytes) of the test DNS server.
        subprocess.run([GENKEY, "-b", "1024", "-d", domain, "-s", selector, "-D", str(self.dir)],
                       check=True, capture_output=True)
        text = (self.dir / f"{selector}.txt").read_text()
        self.dns_name = f"{selector}._domainkey.{domain}."
        self.dns_record = "".join(re.findall(r'"([^"]*)"', text)).replace(" ", "")

    @property
    def milter(self) -> str:
        """Postfix's spelling of its socket."""
        return f"inet:127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        d = self.dir
        (d / "key.table").write_text(f"listkey {self.domain}:{self.selector}:{d}/{self.selector}.private\n")
        # Every message through it is signed for the list domain (docs/postfix.md says where it runs).
        (d / "signing.table").write_text("* listkey\n")
        # Not the admin's line: without it 127.0.0.1 is internal and would be signed anyway; with it
        # the test's clients on 127.0.0.1 stand for the Internet, and only `MTA` makes them signed.
        internal = "InternalHosts           192.0.2.1\n"
        (d / "opendkim.conf").write_text(CONF.format(port=self.port, dir=d, mta=self.mta, internal=internal))

    def start(self) -> "OpenDKIM":
        start_with_retry(self._start_once, self.stop, self._new_port)
        return self

    def _new_port(self) -> None:
        self.port = free_port()

    def _start_once(self) -> None:
        self._write_config()
        self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(self.dir / "opendkim.conf")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "opendkim.stderr", "ab"), start_new_session=True)
        proc = self.proc
        try:
            wait_for_own_port(self.port, lambda: proc.pid if proc.poll() is None else False, timeout=30)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"opendkim did not start: {(self.dir / 'opendkim.stderr').read_text()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
