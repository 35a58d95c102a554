"""Shared pieces of the benchmarks: members, the sink, the Postfix, timing one post."""

from __future__ import annotations

import json
import os
import platform
import re
import smtplib
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bed.net import free_port, wait_for_port  # noqa: E402
from tests.bed.postfix import Postfix  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def start_postgresql(workdir: Path):
    """A private PostgreSQL (tests/bed/postgres.py) with fsync on, as a site runs it, and a new
    database with listmilter's schema: (server, database); stop the server with .stop()."""
    from tests.bed.postgres import PostgreSQL
    workdir.chmod(0o755)          # user postgres enters it
    server = PostgreSQL(workdir / "postgresql", fsync=True).start()
    try:
        return server, server.new_database()
    except BaseException:
        server.stop()
        raise


def store_config(backend: str, db=None) -> dict:
    """The config's `store:` keys for a benchmark backend (postgresql: `db` from start_postgresql)."""
    if backend == "postgresql":
        return {"backend": "postgresql", "dsn": db.dsn, "password_file": db.password_file}
    return {"backend": backend}
DOMAINS = ("example.net", "example.com", "example.edu", "example.info")
BIG_LIMITS = {"message_size_limit": "200000000", "mailbox_size_limit": "200000000"}


def member(i: int) -> str:
    """m000001@example.net, spread over four domains (19-20 characters)."""
    return f"m{i:06d}@{DOMAINS[i % len(DOMAINS)]}"


def members(n: int) -> list[str]:
    return [member(i) for i in range(1, n + 1)]


def write_members(path: Path, addrs: list[str]) -> Path:
    path.write_text("".join(a + "\n" for a in addrs))
    os.chmod(path, 0o644)
    return path


def message(to: str, n: int = 0) -> bytes:
    body = "This is a benchmark post.\r\n" * 20
    return (f"From: alice@example.net\r\nTo: {to}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench.{time.time_ns()}.{n}@example.net>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n{body}").encode()


class SmtpSink:
    """Postfix's own smtp-sink (C, fast): accepts everything, announces DSN."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SmtpSink":
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-m", "512",
                                      f"127.0.0.1:{self.port}", "1024"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BenchPostfix(Postfix):
    """tests.bed's Postfix plus extra smtpd listeners, each with its own milter:
    one Postfix (one queue manager, one smtp client pool, one sink) for every
    milter compared."""

    def __init__(self, *, extra_listeners: dict[str, str], **kw):
        super().__init__(**kw)
        # name -> milter spec; name -> port
        self.extra_listeners = dict(extra_listeners)
        self.ports = {name: free_port() for name in self.extra_listeners}

    def _write_config(self) -> None:
        super()._write_config()
        for name, milter in self.extra_listeners.items():
            port = self.ports[name]
            self.postconf("-Me", f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd"
                                 f" -o smtpd_milters={milter}")

    def start(self) -> "BenchPostfix":
        super().start()
        for port in self.ports.values():
            wait_for_port(port)
        return self


class MaillogTail:
    """Counts `QUEUEID: to=<...> ... status=sent` lines in the private Postfix log."""

    _SENT = re.compile(rb"\b([0-9A-Za-z]+): to=<[^>]*>.*? status=sent ")

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""
        self.sent: dict[str, int] = {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            m = self._SENT.search(line)
            if m:
                qid = m.group(1).decode()
                self.sent[qid] = self.sent.get(qid, 0) + 1


def post(port: int, list_address: str, n: int, tail: MaillogTail, timeout: float = 600.0) -> dict:
    """Send one post; return seconds from the end of DATA (the final dot) to the
    250 reply, and to the last of n `status=sent` lines for its queue id."""
    t0, t_250, text = submit_post(port, list_address, message(list_address, n), timeout)
    qid = text.rsplit(" ", 1)[-1]
    deadline = time.monotonic() + timeout
    while True:
        tail.poll()
        if tail.sent.get(qid, 0) >= n:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{qid}: {tail.sent.get(qid, 0)} of {n} delivered after {timeout}s")
        time.sleep(0.01)
    t_last = time.perf_counter() - t0
    return {"queue_id": qid, "to_250": t_250, "to_last_delivery": t_last, "delivered": tail.sent[qid]}


def wait_queue_empty(postfix: Postfix, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not postfix.queue_empty():
        if time.monotonic() > deadline:
            raise TimeoutError("Postfix queue not empty:\n" + postfix.queue()[:2000])
        time.sleep(0.2)


def rss(pid: int) -> dict:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def machine() -> dict:
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "postfix": first(["postconf", "-h", "-d", "mail_version"]),
            "kernel": platform.release(),
            "mem_total": first(["sh", "-c", "grep MemTotal /proc/meminfo"])}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU a process has used so far, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def stop_all(*stops) -> None:
    """Call each stop (None: skipped), whatever the others do; a failure is only reported."""
    for stop in stops:
        if stop:
            try:
                stop()
            except Exception as e:
                print(f"warning: stopping: {e}", file=sys.stderr)


def submit_post(port: int, list_address: str, content: bytes, timeout: float = 600.0) -> tuple[float, float, str]:
    """One post over SMTP (content with CRLF line ends): (time of its final ".", seconds to the
    250, the 250's text); RuntimeError for any other answer."""
    data = re.sub(rb"(?m)^\.", b"..", content) + b"\r\n.\r\n"
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=timeout)
    try:
        s.ehlo()
        s.mail("alice@example.net")
        code, resp = s.rcpt(list_address)
        if code != 250:
            raise RuntimeError(f"RCPT: {code} {resp!r}")
        code, resp = s.docmd("DATA")
        if code != 354:
            raise RuntimeError(f"DATA: {code} {resp!r}")
        t0 = time.perf_counter()
        s.send(data)
        code, resp = s.getreply()
        t_250 = time.perf_counter() - t0
        try:
            s.quit()
        except smtplib.SMTPException:
            pass
    finally:
        s.close()
    if code != 250:
        raise RuntimeError(f"post to {list_address} answered {code} {resp!r}")
    return t0, t_250, resp.decode(errors="replace")
