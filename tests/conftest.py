"""Fixtures: a private Postfix with listmilter as its milter, and a sink for everything else."""

from __future__ import annotations

import itertools
import shutil
import smtplib
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.bed.listmilter import ListmilterServer
from tests.bed.net import wait_until
from tests.bed.postfix import Postfix
from tests.bed.sendmail import Sendmail, run_dir
from tests.bed.sink import Sink

# A private PostgreSQL server (pg_server, pg_database): tests/bed/postgres.py.
pytest_plugins = ("tests.bed.postgres",)

_names = itertools.count(1)


class Bed:
    """Sink + listmilter + Postfix, wired as docs/postfix.md says."""

    def __init__(self, backend: str, unix_sockets: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix=f"lmbed-{backend}-"))
        self.dir.chmod(0o755)
        self.sink = Sink().start()
        socket_dir = None
        if unix_sockets:
            # The production layout: a folder inside Postfix's queue directory
            # (its chroot), group postfix, setgid so the sockets get that group;
            # Postfix names it relative to the queue directory.
            socket_dir = self.dir / "postfix" / "queue" / "listmilter"
            socket_dir.mkdir(parents=True)
            shutil.chown(socket_dir, group="postfix")
            socket_dir.chmod(0o2750)
        self.listmilter = ListmilterServer(self.dir / "listmilter", backend, socket_dir=socket_dir,
                                           postfix_socket_dir="listmilter" if unix_sockets else None)
        self.postfix = self.mta = Postfix(milter=self.listmilter.milter_spec, sink_port=self.sink.port,
                               config_path=self.listmilter.config_path,
                               socketmap=self.listmilter.socketmap_spec, workdir=self.dir / "postfix")
        # listmilter re-submits split-off copies through this Postfix.
        self.listmilter.outgoing_port = self.postfix.port
        self.listmilter.write_config()
        self.listmilter.start()
        self.postfix.start()

    def stop(self) -> None:
        for stop in (self.mta.stop, self.listmilter.stop, self.sink.stop):
            try:
                stop()
            except Exception:
                pass

    def settle(self, seconds: float = 1.5) -> None:
        """Wait for the MTA's queue to drain, then a little, so extra copies would have arrived."""
        wait_until(self.mta.queue_empty, 30, interval=0.2, what="the queue to drain")
        time.sleep(seconds)

    def deliver_log(self) -> str:
        """What `listmilter deliver` did: serve's log (handed off) and the pipe's own (worked alone)."""
        return self.listmilter.log() + self.mta.pipe_log.read_text()

    def new_list(self, members=(), name: str = "list", **list_settings) -> str:
        address = f"{name}{next(_names)}@example.org"
        self.listmilter.create_list(address, members, **list_settings)
        return address

    def smtp(self, sender: str, recipients: list[str], message: bytes) -> dict:
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=60) as s:
            return s.sendmail(sender, recipients, message)


class SendmailBed(Bed):
    """Sink + listmilter + Sendmail, wired as docs/sendmail.md says."""

    def __init__(self, backend: str, eom_timeout: str = "10m", **sendmail_options):
        self.dir = Path(tempfile.mkdtemp(prefix=f"lmbed-sendmail-{backend}-"))
        self.dir.chmod(0o755)
        self.sink = Sink().start()
        # Sendmail refuses a milter socket under a world-writable folder such as /tmp.
        sendmail_dir = run_dir()
        self.listmilter = ListmilterServer(self.dir / "listmilter", backend,
                                           milter_path=sendmail_dir / "listmilter.sock")
        self.sendmail = self.mta = Sendmail(workdir=sendmail_dir,
            milter=f"local:{self.listmilter.milter_path}", sink_port=self.sink.port,
            config_path=self.listmilter.config_path, socketmap_port=self.listmilter.socketmap_port,
            eom_timeout=eom_timeout, **sendmail_options)
        try:
            self.listmilter.outgoing_port = self.sendmail.port
            self.listmilter.write_config()
            self.listmilter.start()
            self.sendmail.start()
        except BaseException:
            self.stop()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sendmail.dir, ignore_errors=True)

    def smtp(self, sender: str, recipients: list[str], message: bytes) -> dict:
        # Sendmail (since the SMTP smuggling fix) refuses a bare LF; SMTP wants CRLF.
        message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        with smtplib.SMTP("127.0.0.1", self.sendmail.port, timeout=60) as s:
            return s.sendmail(sender, recipients, message)


def message(subject: str = "hello", sender: str = "alice@example.net", to: str = "list@example.org",
            extra: str = "", body: str = "Hello, list.\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{next(_names)}.test@example.net>\r\n{extra}\r\n{body}").encode()


def dsn_message(envid_text: str, *blocks: str, to: str = "dev-bounces@example.org") -> bytes:
    """An RFC 3464 DSN as an MTA writes one: one per-recipient block each (dedented)."""
    per_rcpt = "".join("\n" + textwrap.dedent(b).strip() + "\n" for b in blocks)
    return textwrap.dedent(f"""\
        From: MAILER-DAEMON@mx.example.test (Mail Delivery System)
        To: {to}
        Subject: Undelivered Mail Returned to Sender
        Auto-Submitted: auto-replied
        MIME-Version: 1.0
        Content-Type: multipart/report; report-type=delivery-status; boundary="B"

        --B
        Content-Type: text/plain

        I'm sorry to have to inform you that your message could not be delivered.

        --B
        Content-Type: message/delivery-status

        Reporting-MTA: dns; mx.example.test
        Original-Envelope-Id: {envid_text}
        """).encode() + per_rcpt.encode() + b"\n--B--\n"


@pytest.fixture(scope="module", params=["sqlite", "yaml"])
def bed(request):
    b = Bed(request.param)
    yield b
    b.stop()
    if not request.session.testsfailed:
        shutil.rmtree(b.dir, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "yaml"])
def smbed(request):
    b = SendmailBed(request.param)
    yield b
    b.stop()
    if not request.session.testsfailed:
        b.remove()


@pytest.fixture
def clean_smbed(smbed):
    smbed.sink.clear()
    smbed.sink.replies.clear()
    yield smbed


@pytest.fixture
def clean_bed(bed):
    bed.sink.clear()
    yield bed


@pytest.fixture
def tmp_config(tmp_path):
    return tmp_path / "listmilter.yaml"


# Hypothesis (tests/test_fuzz.py): "ci", the default, is bounded and reproducible;
# HYPOTHESIS_PROFILE=nightly explores far more inputs, new ones each run.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
