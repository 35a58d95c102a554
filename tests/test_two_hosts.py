"""Two MX hosts, one list service: two private Postfix instances, each with its own
`listmilter serve`, sharing one private PostgreSQL (docs/install.md, "Two MX hosts").

Each host has its own config file and state folder (its hand-off socket, kept
bounces); they share the `store:` lines and `web.base_url`, so lists, members,
pending requests, bounce scores and the site's keys are the same on both.
Host B also runs `listmilter web`; the links both hosts put in mail point there.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.net import free_port, wait_for_port, wait_until
from tests.bed.postfix import PIPE_USER, Postfix, pipe_runtime
from tests.bed.postgres import PostgreSQL
from tests.bed.sink import Sink
from tests.conftest import dsn_message, message

# Starts private MTAs and listmilter serve (the mta tier, docs/testing.md).
pytestmark = pytest.mark.mta


# What Postfix answers for a list address while the database is down: the
# socketmap lookup (local_recipient_maps) fails before the milter is asked.
LOOKUP_FAILED = "451 4.3.0 <{rcpt}>: Temporary lookup failure"
# ...and what the milter answers when the lookup passed and its own read failed.
STORE_DOWN = "451 4.3.0 listmilter: list store unavailable; try again later"


class Host:
    """One MX host: its Postfix, its `listmilter serve`, its config file and state folder."""

    def __init__(self, name: str, root: Path, sink: Sink, store: dict, web: dict):
        self.name = name
        self.listmilter = ListmilterServer(root / name / "listmilter", "postgresql",
                                           extra={"store": store, "web": web})
        self.postfix = Postfix(milter=self.listmilter.milter_spec, sink_port=sink.port,
                               config_path=self.listmilter.config_path,
                               socketmap=self.listmilter.socketmap_spec, workdir=root / name / "postfix")
        self.listmilter.outgoing_port = self.postfix.port      # notices and re-submissions go out here
        self.listmilter.write_config()
        self.config = self.listmilter.config_path

    def start(self) -> None:
        self.listmilter.start()
        # Either start may have found a port taken and picked another: each learns the other's final ones.
        self.postfix.milter, self.postfix.socketmap = self.listmilter.milter_spec, self.listmilter.socketmap_spec
        self.postfix.start()
        self.listmilter.follow_mta(self.postfix.port)

    def stop(self) -> None:
        for stop in (self.postfix.stop, self.listmilter.stop):
            try:
                stop()
            except Exception:
                pass

    def smtp(self, sender: str, recipients: list[str], data: bytes) -> dict:
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=60) as s:
            return s.sendmail(sender, recipients, data)

    def cli(self, *args: str, **kw):
        return cli(self.config, *args, **kw)

    def log(self) -> str:
        return self.listmilter.log() + self.postfix.pipe_log.read_text()

    def drained(self) -> bool:
        return self.postfix.queue_empty()


class Site:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lm2mx-"))
        self.root.chmod(0o755)
        self.pg = PostgreSQL(self.root / "postgresql")
        self.sink = Sink()
        self.hosts: list[Host] = []
        self.web: subprocess.Popen | None = None
        self.web_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.web_port}"

    def start(self) -> None:
        self.pg.start()
        self.db = self.pg.new_database(upgrade=False)
        self.sink.start()
        # The lines docs/install.md gives both hosts.
        store = {"backend": "postgresql", "dsn": self.db.dsn, "password_file": self.db.password_file}
        self.a = Host("a", self.root, self.sink, store, {"base_url": self.base_url})
        self.b = Host("b", self.root, self.sink, store,
                      {"base_url": self.base_url, "listen": f"127.0.0.1:{self.web_port}"})
        self.hosts = [self.a, self.b]
        # Once, from either host, before the first serve: the schema.
        from listmilter.store.postgresql.schema import MIGRATIONS
        assert f"schema version 0 -> {len(MIGRATIONS)}" in self.a.cli("db", "upgrade").stdout
        for host in self.hosts:
            host.start()
        self._start_web()

    def _start_web(self) -> None:
        """Host B's `listmilter web`, as the pipe transport's user, as in production."""
        log = self.b.listmilter.dir / "web.log"
        log.touch()
        shutil.chown(log, PIPE_USER)
        self.web_stderr = open(self.b.listmilter.dir / "web.stderr", "ab")
        self.web = subprocess.Popen(
            ["/usr/bin/env", f"PYTHONPATH={pipe_runtime()}", f"LISTMILTER_LOG={log}",
             "/usr/bin/python3", "-m", "listmilter", "-c", str(self.b.config), "web"],
            user=PIPE_USER, cwd="/", stdout=subprocess.DEVNULL, stderr=self.web_stderr)
        wait_for_port(self.web_port, timeout=20)

    def _stop_web(self) -> None:
        if self.web:
            self.web.terminate()
            try:
                self.web.wait(10)
            except subprocess.TimeoutExpired:
                self.web.kill()
                self.web.wait()
            self.web_stderr.close()

    def stop(self) -> None:
        """Everything started, also after a failure half-way through start()."""
        for stop in [self._stop_web, *(h.stop for h in self.hosts), self.sink.stop,
                     lambda: self.pg.stop("immediate")]:
            try:
                stop()
            except Exception:
                pass

    def settle(self, *lines: str, timeout: float = 90) -> None:
        """Both queues empty and each line logged somewhere, then the queues empty again."""
        for host in self.hosts:
            wait_until(host.drained, timeout, interval=0.2, what=f"host {host.name}'s queue to drain")
        for line in lines:
            wait_until(lambda line=line: any(line in h.log() for h in self.hosts), timeout, interval=0.2,
                       what=f"{line!r} in a host's log")
        for host in self.hosts:
            wait_until(host.drained, timeout, interval=0.2, what=f"host {host.name}'s queue to drain")


@pytest.fixture(scope="module")
def site(request):
    s = Site()
    try:
        s.start()
        yield s
    finally:
        s.stop()
        if not request.session.testsfailed:
            shutil.rmtree(s.root, ignore_errors=True)


_names = iter(range(1, 10_000))


def new_list(host: Host, members=(), **settings) -> str:
    address = f"two{next(_names)}@example.org"
    host.listmilter.create_list(address, members, **settings)
    return address


def role(lst: str, name: str) -> str:
    return lst.replace("@", f"-{name}@")


def mail_for(site: Site, address: str, subject: str, timeout: float = 60):
    return wait_until(lambda: next((m for m in site.sink.for_recipient(address)
                                    if subject in str(m.message["Subject"])), None),
                      timeout, what=f"mail for {address} about {subject!r}")


def members(host: Host, lst: str) -> list[str]:
    return sorted(host.cli("members", "ls", lst).stdout.split())


def test_subscribe_through_a_confirm_through_b_one_click_on_b(site):
    a, b = site.a, site.b
    lst = new_list(a, ["old@example.net"], posting="open")
    new = "new@example.net"
    a.smtp(new, [role(lst, "subscribe")], message("join", new, role(lst, "subscribe")))
    confirmation = mail_for(site, new, "Please confirm")
    token = re.search(r"confirm ([a-z2-7]{24})", str(confirmation.message["Subject"])).group(1)
    assert f"{site.base_url}/confirm/{token}" in confirmation.message.get_content()
    assert f"{lst}\t{new}\tsubscribe\tawaiting-confirmation" in b.cli("pending", lst).stdout

    # The reply reaches the other MX: the same pending request, used there.
    reply = role(lst, f"confirm+{token}")
    b.smtp(new, [reply], message(f"Re: {confirmation.message['Subject']}", new, reply))
    welcome = mail_for(site, new, "Welcome")
    assert f"to=<{reply}>" in b.log() and f"to=<{reply}>" not in a.log()
    assert members(a, lst) == ["new@example.net", "old@example.net"]
    link = re.search(r"(http://\S+/u/\S+)", welcome.message.get_content()).group(1)
    assert link.startswith(f"{site.base_url}/u/")

    # A post through A reaches them; its one-click link (made on A) works on B's web.
    a.cli("list", "set", lst, "one_click", "true")
    a.smtp("carol@example.net", [lst], message("first post", "carol@example.net", lst))
    got = mail_for(site, new, "first post")
    url = re.match(r"<(https?://[^>]+)>", got.message["List-Unsubscribe"]).group(1)
    assert url.startswith(f"{site.base_url}/u/")
    with urllib.request.urlopen(urllib.request.Request(url, data=b"List-Unsubscribe=One-Click"),
                                timeout=20) as r:
        assert r.status == 200 and "unsubscribed" in r.read().decode()
    assert members(a, lst) == ["old@example.net"]
    record = a.cli("members", "history", lst, new, "--csv").stdout.splitlines()[1:]
    assert [line.split(",")[2:4] for line in record] == [["subscribed", "mail"], ["unsubscribed", "web"]]


def _envid_for(site: Site, host: Host, lst: str, subject: str) -> str:
    """The ENVID of the last post to `lst` through `host`, from its log (the sink sees it upper-cased)."""
    pattern = re.compile(rf"list=<{re.escape(lst)}>, .*status=expanded, .*envid=(\S+)")
    found = wait_until(lambda: pattern.findall(host.listmilter.log()), 30, what=f"the ENVID of {subject!r}")
    return found[-1]


def test_a_post_through_a_its_dsn_at_b_sends_one_probe(site):
    a, b = site.a, site.b
    lst = new_list(a, ["dead@example.net", "alive@example.net"], posting="open", one_click="false")
    a.smtp("carol@example.net", [lst], message("bouncing post", "carol@example.net", lst))
    mail_for(site, "dead@example.net", "bouncing post")
    envid = _envid_for(site, a, lst, "bouncing post")
    # The remote MTA's DSN for that post goes to the domain's other MX, B, and is
    # retried through A as well (a duplicate): one probe, from whichever host read it first.
    bounces_addr = role(lst, "bounces")
    dsn = dsn_message(envid, """
        Final-Recipient: rfc822; dead@example.net
        Action: failed
        Status: 5.1.1
        Diagnostic-Code: smtp; 550 5.1.1 <dead@example.net>: no such user
        """, to=bounces_addr)
    b.smtp("", [bounces_addr], dsn)
    site.settle(f"list=<{lst}>, role=bounces")
    a.smtp("", [bounces_addr], dsn)
    wait_until(lambda: sum(f"list=<{lst}>, role=bounces" in line
                           for h in site.hosts for line in h.log().splitlines()) >= 2, 60,
               what="both hosts to handle the DSN")
    lines = [line for h in site.hosts for line in h.log().splitlines() if f"list=<{lst}>, role=bounces" in line]
    assert sum("<dead@example.net> 5.1.1 suspect (probe sent)" in line for line in lines) == 1
    assert sum("<dead@example.net> 5.1.1 suspect (a probe is in flight already)" in line for line in lines) == 1
    for host in (a, b):       # the probe in flight is in the shared database; nothing scored
        listing = host.cli("bounces", lst).stdout
        assert f"probe in flight: {lst} dead@example.net sent" in listing and "no bouncing members" in listing
    mail_for(site, "dead@example.net", "Checking your address")
    site.settle(f"list=<{lst}>, role=bounces")
    assert sum("Checking your address" in str(m.message["Subject"])
               for m in site.sink.for_recipient("dead@example.net")) == 1


def _add(host: Host, lst: str, addrs: list[str], out: dict) -> None:
    out[host.name] = host.cli("members", "add", lst, "-", input="\n".join(addrs) + "\n").stdout


def _post(host: Host, lst: str, subjects: list[str], replies: list[str], deadline: float) -> None:
    """A sending MTA: each post retried after a 4xx until it is accepted."""
    for subject in subjects:
        while True:
            try:
                host.smtp("sender@example.net", [lst], message(subject, "sender@example.net", lst))
                break
            except smtplib.SMTPRecipientsRefused as e:
                (code, text), = e.recipients.values()
                replies.append(f"{code} {text.decode()}")
            except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as e:
                replies.append(f"{e.smtp_code} {e.smtp_error.decode()}")
            if code_of(replies[-1]) // 100 != 4 or time.monotonic() > deadline:
                raise AssertionError(f"{subject}: {replies[-1]}")
            time.sleep(0.5)


def flush(host: Host) -> None:
    """`postqueue -f`: deliver what is queued now (also for a transport in defer_transports)."""
    subprocess.run(["postqueue", "-c", str(host.postfix.dir), "-f"], check=True, capture_output=True)


def code_of(reply: str) -> int:
    return int(reply.split()[0])


def _count(site: Site, lst_members: list[str], subjects: list[str]) -> dict[tuple[str, str], int]:
    got: dict[tuple[str, str], int] = {}
    for rcpt, m in site.sink.deliveries():
        subject = str(m.message["Subject"])
        if subject in subjects:
            got[(rcpt.lower(), subject)] = got.get((rcpt.lower(), subject), 0) + 1
    return got


def test_parallel_imports_and_posts_on_both_hosts(site):
    a, b = site.a, site.b
    lst = new_list(a, posting="open", one_click="false")
    first = [f"p{i}@example.net" for i in range(0, 300)]
    second = [f"p{i}@example.net" for i in range(150, 450)]
    out: dict[str, str] = {}
    threads = [threading.Thread(target=_add, args=(a, lst, first, out)),
               threading.Thread(target=_add, args=(b, lst, second, out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    added = [int(re.search(r"added (\d+), already members (\d+)", text).group(1)) for text in out.values()]
    assert sum(added) == 450 and len(members(b, lst)) == 450
    history = a.cli("members", "history", lst, "--csv").stdout.splitlines()[1:]
    assert len(history) == 450                      # one consent record each, never two

    subjects = [f"parallel {h.name} {n}" for h in (a, b) for n in range(4)]
    replies: list[str] = []
    deadline = time.monotonic() + 120
    posters = [threading.Thread(target=_post, args=(h, lst, [s for s in subjects if f" {h.name} " in s],
                                                    replies, deadline)) for h in (a, b)]
    for t in posters:
        t.start()
    for t in posters:
        t.join(150)
    assert replies == []
    site.settle()
    got = _count(site, first + second, subjects)
    expected = {(m, s) for m in set(first + second) for s in subjects}
    assert set(got) == expected and set(got.values()) == {1}


def test_database_stopped_mid_traffic_tempfails_then_delivers_everything_once(site):
    a, b = site.a, site.b
    lst = new_list(a, [f"q{i}@example.net" for i in range(25)], posting="open", one_click="false")
    # A DSN accepted by B while the database is up, delivered while it is down: B holds
    # it (defer_transports) until we flush the queue. The list domain's addresses reach the
    # pipe through local(8) (fallback_transport, docs/postfix.md), so local is the one held.
    a.smtp("carol@example.net", [lst], message("before the outage", "carol@example.net", lst))
    mail_for(site, "q0@example.net", "before the outage")
    envid = _envid_for(site, a, lst, "before the outage")
    bounces_addr = role(lst, "bounces")
    dsn = dsn_message(envid, """
        Final-Recipient: rfc822; q1@example.net
        Action: failed
        Status: 5.2.2
        Diagnostic-Code: smtp; 552 5.2.2 mailbox full
        """, to=bounces_addr)
    b.postfix.postconf("-e", "defer_transports = local")
    b.postfix.reload()
    try:
        b.smtp("", [bounces_addr], dsn)
        held = rf"(\w+): to=<{re.escape(bounces_addr)}>, relay=none, .*status=deferred \(deferred transport\)"
        qid = wait_until(lambda: re.findall(held, b.postfix.log()), 30, what="B to hold the DSN")[0]
        site.pg.stop("fast")
        try:
            # The exact answer to a post while the database is down.
            with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
                a.smtp("sender@example.net", [lst], message("refused", "sender@example.net", lst))
            (code, text), = e.value.recipients.values()
            assert f"{code} {text.decode()}" == LOOKUP_FAILED.format(rcpt=lst)
            # The held DSN is tried now: the pipe exits 75 (EX_TEMPFAIL) and Postfix keeps it.
            flush(b)
            deferred = wait_until(lambda: [line for line in b.postfix.log().splitlines()
                                           if f"{qid}: to=<{bounces_addr}>, relay=listmilter" in line
                                           and "status=deferred" in line], 60, what="B's pipe to defer the DSN")
            assert (f"dsn=4.3.0, status=deferred (temporary failure. Command output: listmilter: postgresql store "
                    f"{site.db.url}: connection failed: ") in deferred[0]
            assert qid in b.postfix.queue()
            # Posts go on arriving at both hosts meanwhile; their senders retry.
            subjects = [f"outage {h.name} {n}" for h in (a, b) for n in range(2)]
            replies: list[str] = []
            deadline = time.monotonic() + 180
            posters = [threading.Thread(target=_post, args=(h, lst, [s for s in subjects if f" {h.name} " in s],
                                                            replies, deadline)) for h in (a, b)]
            for t in posters:
                t.start()
            wait_until(lambda: len(replies) >= 2, 60, what="posts to be refused while the database is down")
        finally:
            site.pg.start()
        for t in posters:
            t.join(200)
        flush(b)
        wait_until(lambda: qid not in b.postfix.queue(), 60, what="the DSN to be delivered")
    finally:
        b.postfix.postconf("-e", "defer_transports =")
        b.postfix.reload()
    # Every refusal was a 4xx saying what happened, never a 5xx.
    allowed = {LOOKUP_FAILED.format(rcpt=lst), STORE_DOWN}
    assert replies and set(replies) <= allowed, set(replies) - allowed
    site.settle()
    # Everything delivered once: each post to each member.
    lst_members = [f"q{i}@example.net" for i in range(25)]
    got = _count(site, lst_members, subjects + ["before the outage"])
    expected = {(m, s) for m in lst_members for s in subjects + ["before the outage"]}
    assert set(got) == expected and set(got.values()) == {1}, {k: v for k, v in got.items() if v != 1}
    # The DSN held through the outage was handled once, when the database came back.
    lines = [line for h in site.hosts for line in h.log().splitlines() if f"list=<{lst}>, role=bounces" in line]
    assert sum("<q1@example.net>" in line for line in lines) == 1
    assert "refused" not in "".join(m.message["Subject"] or "" for m in site.sink.messages)
