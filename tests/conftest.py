"""Shared fixtures and the test tiers.

Beds: a private Postfix (Bed) or Sendmail (SendmailBed) with `listmilter serve`
as its milter and an SMTP sink for everything it sends out. Tests that use a
bed, or start a server themselves (marked `mta`), form the slow tier; the rest
(`pytest -m "not mta"`) run in process and start no server: a guard below
fails any unmarked test that tries. docs/testing.md describes the tiers.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import smtplib
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bed import listmilter as bed_listmilter
from tests.bed.listmilter import ListmilterServer
from tests.bed.net import free_port, wait_until
from tests.bed.postfix import Postfix
from tests.bed.sendmail import Sendmail, run_dir
from tests.bed.sink import Sink

# A private PostgreSQL server (pg_server, pg_database): tests/bed/postgres.py.
pytest_plugins = ("tests.bed.postgres",)

_names = itertools.count(1)


class Bed:
    """Sink + listmilter + Postfix, wired as docs/postfix.md says."""

    def __init__(self, backend: str = "sqlite", unix_sockets: bool = False, extra: dict | None = None,
                 reinject: bool = True, signing_milter: str | None = None, main_cf: dict | None = None):
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
                                           postfix_socket_dir="listmilter" if unix_sockets else None,
                                           extra=extra)
        self.postfix = self.mta = Postfix(milter=None, sink_port=self.sink.port,
                                          config_path=self.listmilter.config_path, workdir=self.dir / "postfix",
                                          reinject_port=free_port() if reinject else None,
                                          reinject_milters=signing_milter or "", main_cf=main_cf)
        # Personal posts fan out from Postfix's queue into its listener without milters.
        self.listmilter.reinject_port = self.postfix.reinject_port
        try:
            # listmilter re-submits split-off copies and sends notices through this Postfix.
            self.listmilter.outgoing_port = self.postfix.port
            self.listmilter.write_config()
            self.listmilter.start()
            # Its ports are final now (a start that found one taken picked others).
            # A signing milter (OpenDKIM, docs/postfix.md) comes after listmilter: it signs the post as expanded.
            self.postfix.milter = ", ".join(filter(None, [self.listmilter.milter_spec, signing_milter]))
            self.postfix.socketmap = self.listmilter.socketmap_spec
            self.postfix.start()
            self.listmilter.follow_mta(self.postfix.port, self.postfix.reinject_port)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for stop in (self.mta.stop, self.listmilter.stop, self.sink.stop):
            try:
                stop()
            except Exception:
                pass

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def problems(self) -> list[str]:
        """What must fail the test that leaves it: see ListmilterServer.problems()."""
        return self.listmilter.problems()

    def settle(self, *log_lines: str, timeout: float = 60) -> None:
        """Wait until the MTA has handled all it was given, so what has not reached the
        sink will not: its queue is empty, each of `log_lines` is in listmilter's logs
        (serve's and the pipe's), and the queue is empty again (the logged step may
        have queued a notice). A message is in the queue from the client's 250 until
        its last delivery, so an empty queue leaves nothing in flight."""
        self.mta_drained(timeout)
        for line in log_lines:
            wait_until(lambda line=line: line in self.deliver_log(), timeout, interval=0.1,
                       what=f"{line!r} in listmilter's logs")
        if log_lines:
            self.mta_drained(timeout)

    def mta_drained(self, timeout: float = 60) -> None:
        wait_until(self.mta.queue_empty, timeout, interval=0.2,
                   what=f"the queue to drain:\n{self.mta.queue()[:2000]}")

    def deliver_log(self) -> str:
        """What `listmilter deliver` did: serve's log (handed off) and the pipe's own (worked alone)."""
        return self.listmilter.log() + self.mta.pipe_log.read_text()

    def new_list(self, members=(), name: str = "list", **list_settings) -> str:
        address = f"{name}{next(_names)}@example.org"
        self.listmilter.create_list(address, members, **list_settings)
        return address

    def smtp(self, sender: str, recipients: list[str], message: bytes) -> dict:
        with smtplib.SMTP("127.0.0.1", self.mta.port, timeout=60) as s:
            return s.sendmail(sender, recipients, message)

    def submit(self, sender: str, recipients: list[str], message: bytes) -> "Reply":
        """One SMTP transaction; the first reply that is not a success, else DATA's 250."""
        return submit(self.mta.port, sender, recipients, message)


class SendmailBed(Bed):
    """Sink + listmilter + Sendmail, wired as docs/sendmail.md says."""

    def __init__(self, backend: str = "sqlite", eom_timeout: str = "10m", extra: dict | None = None,
                 reinject: bool = False, **sendmail_options):
        self.dir = Path(tempfile.mkdtemp(prefix=f"lmbed-sendmail-{backend}-"))
        self.dir.chmod(0o755)
        self.sink = Sink().start()
        # Sendmail refuses a milter socket under a world-writable folder such as /tmp.
        sendmail_dir = run_dir()
        # Held posts are in Sendmail's quarantine, listed and released through this instance's command.
        extra = {"mta": {"type": "sendmail", "sendmail": str(sendmail_dir / "sendmail-command")}, **(extra or {})}
        self.listmilter = ListmilterServer(self.dir / "listmilter", backend,
                                           milter_path=sendmail_dir / "listmilter.sock", extra=extra)
        self.sendmail = self.mta = Sendmail(workdir=sendmail_dir,
            milter=f"local:{self.listmilter.milter_path}", sink_port=self.sink.port,
            config_path=self.listmilter.config_path, socketmap_port=None, eom_timeout=eom_timeout,
            **sendmail_options)
        if reinject:
            # docs/sendmail.md: a listener without the milter (InputMailFilters=) for serve's fan-out.
            self.sendmail.extra_milters["reinject"] = None
            self.sendmail.ports["reinject"] = free_port()
            self.listmilter.reinject_port = self.sendmail.ports["reinject"]
        try:
            self.listmilter.outgoing_port = self.sendmail.port
            self.listmilter.write_config()
            self.listmilter.start()
            self.sendmail.socketmap_port = self.listmilter.socketmap_port
            self.sendmail.start()
            self.listmilter.follow_mta(self.sendmail.port, self.sendmail.ports.get("reinject"))
        except BaseException:
            self.stop()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sendmail.dir, ignore_errors=True)

    def smtp(self, sender: str, recipients: list[str], message: bytes) -> dict:
        # Sendmail (since the SMTP smuggling fix) refuses a bare LF; SMTP wants CRLF.
        return super().smtp(sender, recipients, crlf(message))

    def submit(self, sender: str, recipients: list[str], message: bytes) -> "Reply":
        return super().submit(sender, recipients, crlf(message))


def crlf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class Reply:
    stage: str           # MAIL, RCPT <address>, DATA, or END (after the final dot)
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.code} {self.text}"


def submit(port: int, sender: str, recipients: list[str], message: bytes) -> Reply:
    """Speak SMTP to 127.0.0.1:port and say where it stopped, with the server's exact reply."""
    def reply(stage: str, code: int, text: bytes | str) -> Reply:
        return Reply(stage, code, text.decode(errors="replace") if isinstance(text, bytes) else text)
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=60)
    except smtplib.SMTPConnectError as e:
        return reply("CONNECT", e.smtp_code, e.smtp_error)
    try:
        s.ehlo("client.example.net")
        code, text = s.mail(sender)
        if code != 250:
            return reply("MAIL", code, text)
        for rcpt in recipients:
            code, text = s.rcpt(rcpt)
            if code not in (250, 251):
                return reply(f"RCPT {rcpt}", code, text)
        try:
            code, text = s.data(message)
        except smtplib.SMTPDataError as e:
            return reply("DATA", e.smtp_code, e.smtp_error)
        return reply("END", code, text)
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            s.close()


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


# -- beds ----------------------------------------------------------------------------
def _passed(request) -> bool:
    reports = getattr(request.node, "lm_reports", {})
    return bool(reports) and all(r.passed for r in reports.values())


def _finish(bed: Bed, keep_files: bool) -> None:
    """Stop a bed and fail the test if serve crashed, exited non-zero or logged a traceback."""
    problems = bed.problems()
    bed.stop()
    problems += bed.listmilter.problems()
    if not keep_files:
        bed.remove()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def _bed_args(param) -> dict:
    if param is None:
        return {}
    return {"backend": param} if isinstance(param, str) else dict(param)


@pytest.fixture(scope="module", params=["sqlite", "yaml"])
def bed(request):
    b = Bed(request.param)
    yield b
    # Files stay after a failure in the module, for its logs.
    _finish(b, keep_files=bool(request.session.testsfailed))


@pytest.fixture(scope="module", params=["sqlite", "yaml"])
def smbed(request):
    b = SendmailBed(request.param)
    yield b
    _finish(b, keep_files=bool(request.session.testsfailed))


def _clean(b: Bed):
    """Per test on a module's bed: nothing left from the test before (its late notices were
    drained by its teardown), and at the end serve checked for crashes and tracebacks."""
    b.sink.clear()
    b.listmilter.forgive()          # anything earlier was reported by the test it belonged to
    yield b
    problems = b.problems()
    try:
        b.mta_drained()             # so nothing this test caused lands in the next one's sink
    except TimeoutError as e:
        problems.append(str(e))
    b.sink.clear()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def clean_bed(bed):
    yield from _clean(bed)


@pytest.fixture
def clean_smbed(smbed):
    yield from _clean(smbed)


@pytest.fixture
def own_bed(request):
    """A Postfix bed for this test alone; indirect param: a backend name or Bed's keyword arguments."""
    b = Bed(**_bed_args(getattr(request, "param", None)))
    yield b
    _finish(b, keep_files=not _passed(request))


@pytest.fixture
def own_smbed(request):
    b = SendmailBed(**_bed_args(getattr(request, "param", None)))
    yield b
    _finish(b, keep_files=not _passed(request))


@pytest.fixture
def owner(request):
    """An owner address of this test's own, so no notice of another test can reach it."""
    return f"boss{next(_names)}@example.com"


@pytest.fixture
def tmp_config(tmp_path):
    return tmp_path / "listmilter.yaml"


# Hypothesis (tests/test_fuzz.py): "ci", the default, is bounded and reproducible;
# HYPOTHESIS_PROFILE=nightly explores far more inputs, new ones each run.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- the tiers -----------------------------------------------------------------------
# A test that uses one of these fixtures (directly or through another) starts a
# Postfix, Sendmail, `listmilter serve`, `listmilter web`, nginx or the SMTP sink.
# (site and nginx: tests/test_web.py's `listmilter web` and the nginx in front of it;
# pg_server, pg_database: a private PostgreSQL, tests/bed/postgres.py.)
MTA_FIXTURES = {"bed", "smbed", "own_bed", "own_smbed", "web", "site", "nginx", "pg_server", "pg_database",
                "own_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        # `state` and test_store's `store` ask for pg_database at run time when their parameter names it.
        on_postgresql = any(v in ("postgresql", "yaml+postgresql") for v in params.values())
        if MTA_FIXTURES & set(getattr(item, "fixturenames", ())) or on_postgresql:
            item.add_marker(pytest.mark.mta)


def pytest_collection_finish(session):
    # What collection made (modules, strategies, items) lives until the end: keep the cyclic
    # garbage collector from walking it again in every full collection (~0.7 s of the fast tier).
    gc.freeze()


# What starting a server looks like on a command line.
def _starts_server(argv) -> bool:
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = [argv]
    args = [os.fspath(a) if not isinstance(a, bytes) else a.decode() for a in argv]
    names = [os.path.basename(a) for a in args]
    if any("listmilter" in a for a in args) and {"serve", "web"} & set(args):
        return True
    if "postfix" in names and "start" in args:
        return True
    if "sendmail" in names and {"-bD", "-bd"} & set(args):
        return True
    if "pg_ctl" in names and "start" in args:
        return True
    return bool({"smtp-sink", "nginx"} & set(names)) or any(a.endswith("floor_milter.py") for a in args)


class ServerGuard:
    """Refuses (and records) a server started while a test without the mta marker runs:
    in the test, or in any fixture it sets up, module-scoped ones included."""

    current = None          # the test item pytest is running (setup, call and teardown)

    @classmethod
    def check(cls, what: str) -> None:
        item = cls.current
        if item is None or item.get_closest_marker("mta"):
            return
        item.__dict__.setdefault("lm_refused", []).append(what)
        raise RuntimeError(f"{item.nodeid} is not marked mta but starts a server ({what}): use a bed "
                           "fixture or mark it @pytest.mark.mta (docs/testing.md)")


def pytest_configure(config):
    popen_init = subprocess.Popen.__init__

    def guarded_popen(self, args, *a, **kw):
        if _starts_server(args):
            ServerGuard.check(" ".join(map(str, args if isinstance(args, (list, tuple)) else [args])))
        popen_init(self, args, *a, **kw)
    subprocess.Popen.__init__ = guarded_popen

    for cls in (Sink, ListmilterServer):
        def guarded_start(self, *a, __start=cls.start, **kw):
            ServerGuard.check(type(self).__name__ + ".start()")
            return __start(self, *a, **kw)
        cls.start = guarded_start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    ServerGuard.current = item
    # The fast tier runs `listmilter` commands in process (tests/bed/listmilter.py, cli()).
    bed_listmilter.IN_PROCESS = item.get_closest_marker("mta") is None
    yield
    ServerGuard.current = None
    bed_listmilter.IN_PROCESS = False


@pytest.fixture(autouse=True)
def _server_guard(request):
    """The servers this test tried to start without the mta marker (it fails if any)."""
    refused = request.node.__dict__.setdefault("lm_refused", [])
    yield refused
    if refused:
        pytest.fail(f"started a server without the mta marker: {refused}", pytrace=False)


# -- skips CI accepts ----------------------------------------------------------------
# A skip hides a check. With CI=true (the CI job sets it) any skip whose reason
# does not start with one of these fails instead; docs/testing.md says why each is here.
ALLOWED_SKIPS: tuple[str, ...] = (
    # Mount namespaces are refused in some containers (unshare -m: Operation not permitted).
    "cannot hide postconf here (unshare -m",
)


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    item.__dict__.setdefault("lm_reports", {})[report.when] = report
    if report.skipped and _ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, and the reason is not in conftest.ALLOWED_SKIPS: {reason}"
