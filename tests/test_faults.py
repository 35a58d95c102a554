"""The fault matrix (docs/reliability.md), run against the real Postfix bed.

Each test is one row: it breaks something at a precise point of a post's
life, asserts exactly what the client (or Postfix's pipe) was told, retries as
a real client would (the same message bytes, once the fault is gone), and
counts every delivery at the sink: nothing lost, nothing duplicated beyond the
bound docs/reliability.md states for that row.

How a point is reached: between SMTP commands by a client that stops there
(Client); inside a split or the personal copies by a relay between
listmilter's `outgoing:` and Postfix that holds the session at a chosen
command (tests/bed/relay.py); where neither reaches (Postfix sends the milter
the headers, body and end of message only after the client's final ".", and a
hand-off takes milliseconds) by serve killing itself with SIGKILL at a named
stage (LISTMILTER_TEST_KILL_AT, listmilter/mta/killpoint.py).

One bed for the module (sqlite store), its state folder on a small tmpfs so a
row can fill it up; every row uses lists and members of its own.
"""

from __future__ import annotations

import concurrent.futures
import email
import errno
import os
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.bed.listmilter import cli
from tests.bed.net import free_port, wait_until
from tests.bed.procs import alive
from tests.bed.relay import HoldingRelay
from tests.conftest import Bed, message

# Starts private MTAs and listmilter serve (the mta tier, docs/testing.md).
pytestmark = pytest.mark.mta

# -- What the client and Postfix see: one place per expected reply -----------------------
# The bed runs docs/postfix.md's wiring: milter_default_action = accept, list addresses
# validated by listmilter's socketmap at RCPT (local_recipient_maps), fallback_transport
# to the pipe. When that wiring changes, change these and docs/reliability.md together.
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as \w+")
MAIL_OK = "250 2.1.0 Ok"
RCPT_OK = "250 2.1.5 Ok"
# smtpd lost the milter in mid-session: milter_default_action = accept takes the message,
# and the pipe transport keeps the list address queued until serve runs (then re-submits it).
WAITS_FOR_SERVE = ("status=deferred (temporary failure. Command output: listmilter: listmilter serve is not "
                   "running; the post goes through the milter once it runs")
# serve dead at RCPT: the socketmap that validates list addresses does not answer first.
RCPT_TABLE_DOWN = "451 4.3.0 <{rcpt}>: Temporary lookup failure"
# Postfix stopped under an open session.
POSTFIX_GONE = "(connection closed without a reply)"
# What Postfix's pipe logs for a hand-off whose serve died after saying "go".
HANDOFF_LOST = ("status=deferred (temporary failure. Command output: listmilter: listmilter serve "
                "did not answer (connection closed); will retry )")
# ... for a DSN while another process holds the bounce database's write lock (whether the
# open or the write meets the lock depends on the thread serve runs the hand-off in),
# while the state folder is read-only, and while it is full. {state}: the state folder.
_DSN_DEFERRED = (r"status=deferred \(temporary failure\. Command output: listmilter: "
                 r"bounce database {state}/bounces\.sqlite: ")
STORE_LOCKED = _DSN_DEFERRED + r"(cannot open: )?database is locked \)"
READ_ONLY = _DSN_DEFERRED + r"cannot open: unable to open database file \)"
# (Full, SQLite cannot grow a -wal or -shm file either: at open, that can read "disk I/O error".)
DISK_FULL = _DSN_DEFERRED + r"(cannot open: )?(disk I/O error|database or disk is full) \)"
# The one-click page.
WEB_BUSY = 503
WEB_DONE = (200, "You have been unsubscribed.")
WEB_AGAIN = (200, "This address is not subscribed (any more).")
WEB_FORGED = 400

SENDER = "carol@example.net"
KILL_AT = "LISTMILTER_TEST_KILL_AT"
STATE_SIZE = "32m"


# -- the bed -------------------------------------------------------------------------
def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode:     # the bed runs as root; a container also needs CAP_SYS_ADMIN
        raise RuntimeError(f"mount {' '.join(args)}: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    def done() -> bool:
        return subprocess.run(["umount", str(path)], capture_output=True).returncode == 0
    try:
        wait_until(done, 10, interval=0.2, what=f"{path} to unmount")
    except TimeoutError:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _state_on_tmpfs(bed: Bed) -> None:
    """Move serve's (stopped) state folder onto a tmpfs of STATE_SIZE, mounted in its place,
    owned and moded as the folder was (docs/install.md: the pipe transport's user owns it)."""
    state = bed.listmilter.state_dir
    saved = state.with_name("state.before-tmpfs")
    subprocess.run(["cp", "-a", str(state), str(saved)], check=True)     # -a: owners too
    for sock in saved.glob("*.sock"):
        sock.unlink()
    st = state.stat()
    _mount("-t", "tmpfs", "-o", f"size={STATE_SIZE},mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}",
           "tmpfs", str(state))
    subprocess.run(["cp", "-a", f"{saved}/.", str(state)], check=True)
    shutil.rmtree(saved)


@pytest.fixture(scope="module")
def fbed(request):
    # Without outgoing.reinject: the copies of personal posts go through outgoing.smtp, the
    # holding relay, as every other mail listmilter sends. (The fan-out's faults, with the
    # re-injection listener: tests/test_fanout.py.)
    bed = Bed("sqlite", reinject=False)
    relay = HoldingRelay(bed.postfix.port).start()
    state = bed.listmilter.state_dir
    mounted = False
    try:
        bed.relay = relay
        bed.kill_at = None
        web_port = free_port()
        # listmilter re-submits through the relay; web.base_url makes one_click lists
        # go out as personal copies, with links to the `listmilter web` started here.
        bed.listmilter.outgoing_port = relay.port
        bed.listmilter.extra["web"] = {"base_url": f"http://127.0.0.1:{web_port}"}
        bed.listmilter.write_config()
        # smtpd caches a failed address lookup for as long as the process lives
        # (smtpd_resolve.c); a real client's retry comes minutes later, when the
        # process that cached it has gone. Idle smtpd processes go after 2 s here.
        bed.postfix.extra["max_idle"] = "2s"
        bed.postfix.postconf("-e", "max_idle = 2s")
        bed.postfix.reload()
        bed.listmilter.stop()
        _state_on_tmpfs(bed)
        mounted = True
        bed.listmilter.start()
        with bed.listmilter.web(web_port):
            yield bed
    finally:
        bed.stop()
        relay.stop()
        if mounted:
            _umount(state)
    if not request.session.testsfailed:
        shutil.rmtree(bed.dir, ignore_errors=True)


@pytest.fixture
def fb(fbed):
    """The module's bed, with serve running normally, the relay and the sink passing everything."""
    yield fbed
    fbed.relay.release()
    fbed.sink.clear()
    if not fbed.postfix.running:
        fbed.postfix.start()
    proc = fbed.listmilter.proc
    if proc is None or proc.poll() is not None or fbed.kill_at:
        start_serve(fbed)


# -- serve ---------------------------------------------------------------------------
def start_serve(bed: Bed, kill_at: str | None = None) -> None:
    """(Re)start serve; with kill_at it SIGKILLs itself at that stage (killpoint.STAGES)."""
    proc = bed.listmilter.proc
    if proc and proc.poll() is None:
        kill_serve(bed)         # a clean stop waits up to 5 s for libmilter's timer
    bed.listmilter.stop()
    bed.kill_at = kill_at
    if kill_at:
        os.environ[KILL_AT] = kill_at
    try:
        bed.listmilter.start()
    finally:
        os.environ.pop(KILL_AT, None)


def kill_serve(bed: Bed) -> None:
    """kill -9 from outside."""
    proc = bed.listmilter.proc
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL


def assert_killed_itself(bed: Bed, timeout: float = 60) -> None:
    assert bed.listmilter.proc.wait(timeout) == -signal.SIGKILL


def wait_for_smtpd_to_forget(bed: Bed) -> None:
    """Wait until every smtpd that answered "Temporary lookup failure" has exited: it keeps
    that failure cached for (sender, recipient) as long as it lives (max_idle)."""
    refused = r"postfix/smtpd\[(\d+)\]: NOQUEUE: reject: RCPT .*: Temporary lookup failure"
    pids = {int(p) for p in re.findall(refused, bed.postfix.log())}
    wait_until(lambda: not any(alive(p) for p in pids), 30, what=f"smtpd {pids} to exit")


# -- a client that stops where a row needs it ------------------------------------------
class Client:
    """One SMTP session; each step returns the server's reply as "CODE TEXT"."""

    def __init__(self, bed: Bed):
        self.smtp = smtplib.SMTP("127.0.0.1", bed.postfix.port, timeout=90)
        self.smtp.ehlo("client.example.net")

    @staticmethod
    def _text(code: int, text: bytes) -> str:
        return f"{code} {text.decode(errors='replace')}"

    def _step(self, fn, *args) -> str:
        try:
            return self._text(*fn(*args))
        except smtplib.SMTPServerDisconnected:
            return POSTFIX_GONE

    def mail(self, sender: str) -> str:
        return self._step(self.smtp.mail, sender)

    def rcpt(self, rcpt: str) -> str:
        return self._step(self.smtp.rcpt, rcpt)

    def data(self, msg: bytes, midway=None) -> str:
        """DATA, the message in two halves (midway() called between them), the final "."."""
        reply = self._step(self.smtp.docmd, "DATA")
        if not reply.startswith("354"):
            return reply
        payload = re.sub(rb"(?m)^\.", b"..", re.sub(rb"\r?\n", b"\r\n", msg))
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        half = len(payload) // 2
        try:
            self.smtp.send(payload[:half])
            if midway:
                midway()
            self.smtp.send(payload[half:] + b".\r\n")
        except (OSError, smtplib.SMTPServerDisconnected):
            return POSTFIX_GONE
        return self._step(self.smtp.getreply)

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            self.smtp.close()


def post(bed: Bed, rcpts: list[str], msg: bytes, sender: str = SENDER) -> str:
    """A whole transaction, as a client would send it; the first refusal or the final reply."""
    c = Client(bed)
    try:
        reply = c.mail(sender)
        if reply != MAIL_OK:
            return reply
        for rcpt in rcpts:
            reply = c.rcpt(rcpt)
            if reply != RCPT_OK:
                return reply
        return c.data(msg)
    finally:
        c.close()


def assert_queued(reply: str) -> None:
    assert QUEUED.fullmatch(reply), reply


# -- counting ------------------------------------------------------------------------
def message_id(msg: bytes) -> str:
    return email.message_from_bytes(msg)["Message-ID"]


def delivered(bed: Bed, msg: bytes) -> dict[str, int]:
    """How many copies of this post (by Message-ID) each recipient got."""
    mid = message_id(msg)
    return dict(Counter(r.lower() for r, m in bed.sink.deliveries() if m.message["Message-ID"] == mid))


def expect_delivered(bed: Bed, msg: bytes, expected: dict[str, int]) -> None:
    """Wait for as many deliveries as expected, let the queue drain, then compare exactly."""
    total = sum(expected.values())
    wait_until(lambda: sum(delivered(bed, msg).values()) >= total, 60,
               what=f"{total} deliveries of {message_id(msg)} (have {delivered(bed, msg)})")
    bed.settle()
    assert delivered(bed, msg) == expected


def members(row: str, n: int, domain: str = "example.net") -> list[str]:
    return [f"{row}{i}@{domain}" for i in range(1, n + 1)]


def once(addresses) -> dict[str, int]:
    return {a: 1 for a in addresses}


def in_place_list(bed: Bed, who: list[str]) -> str:
    return bed.new_list(who, posting="open", one_click="false")


# == kill -9 at each milter stage ======================================================
def _stop_after_mail(bed, c, lst, msg):
    assert c.mail(SENDER) == MAIL_OK
    kill_serve(bed)
    return c.rcpt(lst)


def _stop_after_rcpt(bed, c, lst, msg):
    assert c.mail(SENDER) == MAIL_OK
    assert c.rcpt(lst) == RCPT_OK
    kill_serve(bed)
    return c.data(msg)


def _stop_during_data(bed, c, lst, msg):
    assert c.mail(SENDER) == MAIL_OK
    assert c.rcpt(lst) == RCPT_OK
    return c.data(msg, midway=lambda: kill_serve(bed))


def waits_for_serve(bed: Bed, lists: list[str]) -> None:
    """The post was taken without the milter: each list address waits in Postfix's queue
    (the pipe transport defers it while serve is down), and nobody got anything."""
    for lst in lists:
        wait_until(lambda lst=lst: _deferred(bed, lst, re.escape(WAITS_FOR_SERVE)), 30,
                   what=f"the pipe transport to keep {lst} queued")


def flush(bed: Bed) -> None:
    """Postfix's next retry of what waits, now (the bed's own backoff is seconds anyway)."""
    subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-f"], check=True)


@pytest.mark.parametrize("stage, steps, taken", [
    ("after MAIL", _stop_after_mail, False),
    ("after RCPT", _stop_after_rcpt, True),
    ("during DATA", _stop_during_data, True),
], ids=["after-mail", "after-rcpt", "during-data"])
def test_serve_killed_between_client_commands(fb, stage, steps, taken):
    row = "k" + stage.split()[1].lower()[:4]
    who = members(row, 2)
    lst = in_place_list(fb, who)
    msg = message(f"killed {stage}", SENDER, lst)
    c = Client(fb)
    try:
        reply = steps(fb, c, lst, msg)
    finally:
        c.close()
    if taken:
        assert_queued(reply)
        waits_for_serve(fb, [lst])
        assert delivered(fb, msg) == {}
        start_serve(fb)
        flush(fb)
    else:
        assert reply == RCPT_TABLE_DOWN.format(rcpt=lst)
        fb.settle()
        assert delivered(fb, msg) == {}
        start_serve(fb)
        wait_for_smtpd_to_forget(fb)
        assert_queued(post(fb, [lst], msg))      # the client's retry
    expect_delivered(fb, msg, once(who))


@pytest.mark.parametrize("stage", ["header", "body", "eom", "eom-edited"])
def test_serve_killed_inside_the_milter(fb, stage):
    who = members("s" + stage.replace("-", ""), 2)
    lst = in_place_list(fb, who)
    msg = message(f"killed at {stage}", SENDER, lst)
    start_serve(fb, kill_at=stage)
    assert_queued(post(fb, [lst], msg))
    assert_killed_itself(fb)
    if stage == "eom-edited":
        # Every edit was made before the kill: Postfix keeps them (accept), the post is expanded.
        expect_delivered(fb, msg, once(who))
        assert f"to=<{lst}>" not in fb.postfix.log()
        start_serve(fb)
        return
    waits_for_serve(fb, [lst])
    assert delivered(fb, msg) == {}
    start_serve(fb)
    flush(fb)
    expect_delivered(fb, msg, once(who))


def test_an_unknown_kill_stage_stops_serve_at_start(tmp_path):
    """A mistyped stage would make a test's serve never die where the test expects: refused."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\nmilter: {{socket: 'unix:{tmp_path}/m.sock'}}\n"
                   f"socketmap: {{socket: 'unix:{tmp_path}/s.sock'}}\nlog: {{target: {tmp_path}/log}}\n")
    proc = subprocess.run([sys.executable, "-m", "listmilter", "-c", str(cfg), "serve"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, KILL_AT: "eom-edit"})
    assert proc.returncode == os.EX_USAGE
    assert proc.stderr == ("listmilter: LISTMILTER_TEST_KILL_AT must be one of header, body, eom, eom-edited, "
                           "handoff, handoff-done\n")


# == inside a split and the personal copies: the relay holds listmilter's own session ==
def _post_while_held(bed: Bed, rcpts: list[str], msg: bytes) -> str:
    """Send; when listmilter's re-submission reaches the relay's hold, kill serve; the reply."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, bed, rcpts, msg)
        wait_until(lambda: bed.relay.held.is_set() or first.done(), 60,
                   what="listmilter's re-submission to reach the relay's hold")
        assert bed.relay.held.is_set(), first.result()
        kill_serve(bed)
        bed.relay.release()
        return first.result(timeout=120)


@pytest.mark.parametrize("hold, copy_queued", [(".", False), ("QUIT", True)],
                         ids=["copy-in-flight", "copy-queued"])
def test_serve_killed_during_a_split(fb, hold, copy_queued):
    row = "sp" + ("q" if copy_queued else "f")
    a_who, b_who = members(row + "a", 2), members(row + "b", 2)
    a, b = in_place_list(fb, a_who), in_place_list(fb, b_who)
    msg = message("split", SENDER, f"{a}, {b}")
    # a stays in this message; b's copy goes back through Postfix from serve.
    fb.relay.hold(hold)
    assert_queued(_post_while_held(fb, [a, b], msg))
    if copy_queued:     # b's copy passed the milter (expanded) before the kill
        wait_until(lambda: delivered(fb, msg) == once(b_who), 60, what="b's copy")
    waits_for_serve(fb, [a, b])     # the message itself, taken unexpanded, still has both lists
    start_serve(fb)
    flush(fb)
    expect_delivered(fb, msg, once(a_who) | {m: 2 if copy_queued else 1 for m in b_who})


def test_serve_killed_during_the_personal_copies(fb):
    who = members("pc", 5)
    lst = fb.new_list(who, posting="open")      # one_click (the default) and web.base_url set
    msg = message("personal copies", SENDER, lst)
    fb.relay.hold("MAIL", 3)                    # two copies queued, the third not
    assert_queued(_post_while_held(fb, [lst], msg))
    wait_until(lambda: sum(delivered(fb, msg).values()) == 2, 60, what="the two copies queued before the kill")
    first = set(delivered(fb, msg))
    assert len(first) == 2 and first < set(who)
    waits_for_serve(fb, [lst])
    start_serve(fb)
    flush(fb)
    expect_delivered(fb, msg, {m: 2 if m in first else 1 for m in who})
    assert all(m.message["List-Unsubscribe"].startswith("<http://127.0.0.1:")
               for m in fb.sink.messages if m.message["Message-ID"] == message_id(msg))


# == the hand-off: a DSN from Postfix's pipe to serve over deliver.sock ==============
def bounce_records(bed: Bed, lst: str, member: str) -> tuple[list[str], int | None]:
    """The verdicts recorded for member's bounces, and the member's score."""
    db = sqlite3.connect(bed.listmilter.state_dir / "bounces.sqlite")
    try:
        verdicts = [r[0] for r in db.execute("SELECT verdict FROM bounces WHERE list=? AND key=?",
                                             (lst, member))]
        score = db.execute("SELECT score FROM scores WHERE list=? AND key=?", (lst, member)).fetchone()
    finally:
        db.close()
    return verdicts, score[0] if score else None


def _scored(bed: Bed, lst: str, member: str, verdict: str = "scored") -> int:
    return sum(f"list=<{lst}>, role=bounces" in line and f"<{member}> 5.1.1 {verdict}" in line
               for line in bed.deliver_log().splitlines())


def _deferred(bed: Bed, to: str, pattern: str) -> bool:
    """Postfix logged the delivery to `to` deferred with a status matching `pattern` (a regex)."""
    return any(f"to=<{to}>" in line and re.search(pattern, line) for line in bed.postfix.log().splitlines())


def _bounce_deferred(bed: Bed, lst: str, pattern: str) -> bool:
    """The same for a DSN to lst's bounce address: the plain one, or a member's VERP address
    (`<list>-bounces+CODE@`, the sender of personal copies)."""
    local, _, domain = lst.partition("@")
    to = re.compile(rf"to=<{re.escape(local)}-bounces(\+[^@>]+)?@{re.escape(domain)}>")
    return any(to.search(line) and re.search(pattern, line) for line in bed.postfix.log().splitlines())


def bounce_list(bed: Bed, row: str) -> tuple[str, str, str]:
    """A list with a member the next hop refuses for good: a post to it makes Postfix write a DSN."""
    ok, dead = members(row, 2)
    lst = in_place_list(bed, [ok, dead])
    bed.sink.post_replies[dead] = f"550 5.1.1 <{dead}>: no such user"
    return lst, ok, dead


SENT, IN_FLIGHT = "suspect (probe sent)", "suspect (a probe is in flight already)"


@pytest.mark.parametrize("stage, verdicts", [("handoff", [SENT]), ("handoff-done", [SENT, IN_FLIGHT])])
def test_serve_killed_during_a_hand_off(fb, stage, verdicts):
    lst, ok, dead = bounce_list(fb, "h" + stage.replace("-", ""))
    fb.sink.let_probes_arrive()       # the probe is delivered: only the post's DSN comes back
    bounces = lst.replace("@", "-bounces@")
    start_serve(fb, kill_at=stage)
    msg = message(f"bounce at {stage}", SENDER, lst)
    assert_queued(post(fb, [lst], msg))
    assert_killed_itself(fb)          # the DSN reached serve from the pipe
    wait_until(lambda: _deferred(fb, bounces, re.escape(HANDOFF_LOST)), 30, what="Postfix to defer the DSN")
    start_serve(fb)
    wait_until(lambda: sum(_scored(fb, lst, dead, v) for v in (SENT, IN_FLIGHT)) == len(verdicts), 60,
               what="Postfix's retry of the DSN")
    fb.settle()
    assert [v for v in (SENT, IN_FLIGHT) for _ in range(_scored(fb, lst, dead, v))] == verdicts
    # Recorded once, scored never (a probe decides), and one probe sent whichever stage serve died at.
    assert bounce_records(fb, lst, dead) == (["suspect"], None)
    assert delivered(fb, msg) == {ok: 1}
    assert [m.mail_from.startswith(lst.split("@")[0] + "-bounces+probe-") for m in fb.sink.for_recipient(dead)] \
        == [True]


# == the store ===========================================================================
LOCKER = """
import sqlite3, sys

held = []
for path in sys.argv[1:]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    held.append(db)
print("locked", flush=True)
sys.stdin.read()
"""


def one_click_url(received) -> str:
    return re.match(r"<(https?://[^>]+)>", received.message["List-Unsubscribe"]).group(1)


def click(url: str) -> tuple[int, str]:
    """The one-click POST a mailbox provider sends (RFC 8058); (status, the page's text)."""
    request = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    text = re.search(r"<p>(.*?)</p>", body)
    return status, text.group(1) if text else body


def copy_for(bed: Bed, msg: bytes, member: str):
    (got,) = [m for r, m in bed.sink.deliveries() if r == member and m.message["Message-ID"] == message_id(msg)]
    return got


def unsubscribes(bed: Bed, lst: str, member: str) -> int:
    out = cli(bed.listmilter.config_path, "members", "history", lst, member, "--csv").stdout
    return sum(line.split(",")[2] == "unsubscribed" for line in out.splitlines()[1:])


def _leaver_on(bed: Bed, lst: str, row: str) -> str:
    """A member more on lst, and personal copies for it, so its post carries a one-click link."""
    leaver = f"{row}leaver@example.net"
    cli(bed.listmilter.config_path, "list", "set", lst, "one_click", "true")
    cli(bed.listmilter.config_path, "members", "add", lst, "-", input=leaver + "\n")
    return leaver


def _fault_then_recovery(bed: Bed, lst: str, ok: str, dead: str, leaver: str, deferred: str, fault, repair):
    """The store rows: under the fault a post, its DSN and a one-click; then repair() and the retries.
    deferred: what Postfix logs for the DSN meanwhile (a regex, {state} the state folder)."""
    deferred = deferred.format(state=re.escape(str(bed.listmilter.state_dir)))
    msg = message(f"under a fault ({lst})", SENDER, lst)
    fault()
    try:
        assert_queued(post(bed, [lst], msg))            # posts need only reads
        wait_until(lambda: leaver in delivered(bed, msg), 60, what="the leaver's copy")
        url = one_click_url(copy_for(bed, msg, leaver))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            clicked = pool.submit(click, url)
            wait_until(lambda: _bounce_deferred(bed, lst, deferred), 60,
                       what="Postfix to defer the DSN")
            assert clicked.result()[0] == WEB_BUSY
    finally:
        repair()
    wait_until(lambda: _scored(bed, lst, dead), 60, what="Postfix's retry of the DSN")
    assert click(url) == WEB_DONE                        # the member's retry
    bed.settle()
    assert bounce_records(bed, lst, dead) == (["scored"], 1)
    assert unsubscribes(bed, lst, leaver) == 1
    assert delivered(bed, msg) == {ok: 1, leaver: 1}


def test_store_locked_by_another_process(fb):
    lst, ok, dead = bounce_list(fb, "lk")
    leaver = _leaver_on(fb, lst, "lk")
    state = fb.listmilter.state_dir
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, *(str(state / n) for n in
                               ("listmilter.sqlite", "bounces.sqlite", "pending.sqlite"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def release():
        locker.stdin.close()
        locker.wait(10)
    try:
        assert locker.stdout.readline() == "locked\n"
    except BaseException:
        release()
        raise
    _fault_then_recovery(fb, lst, ok, dead, leaver, STORE_LOCKED, lambda: None, release)


def test_state_folder_read_only(fb):
    """A read-only bind mount over the state folder, serve restarted on it (Linux refuses to make
    a mount read-only while files on it are open for writing, so not under a running serve)."""
    lst, ok, dead = bounce_list(fb, "ro")
    leaver = _leaver_on(fb, lst, "ro")
    state = fb.listmilter.state_dir
    mounted = []

    def read_only():
        kill_serve(fb)
        _mount("--bind", str(state), str(state))
        mounted.append(state)
        _mount("-o", "remount,bind,ro", str(state))
        mark = len(fb.listmilter.log())
        start_serve(fb)
        # It runs (the store opens read-only), without the hand-off socket.
        assert f"warning: cannot listen on {state}/deliver.sock" in fb.listmilter.log()[mark:]

    def writable():
        kill_serve(fb)
        if mounted:
            _umount(state)
        start_serve(fb)
    _fault_then_recovery(fb, lst, ok, dead, leaver, READ_ONLY, read_only, writable)


def test_state_folder_full(fb):
    lst, ok, dead = bounce_list(fb, "df")
    leaver = _leaver_on(fb, lst, "df")
    state = fb.listmilter.state_dir
    filler = state / "filler"

    def fill():
        # SQLite reuses the space of its -wal files: truncate them first, as after a
        # checkpoint, so that the next write needs new space.
        for name in ("listmilter.sqlite", "bounces.sqlite", "pending.sqlite"):
            db = sqlite3.connect(state / name)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def free():
        filler.unlink(missing_ok=True)
    _fault_then_recovery(fb, lst, ok, dead, leaver, DISK_FULL, fill, free)


# == Postfix restarted ===================================================================
def test_postfix_restarted_mid_post(fb):
    who = members("pr", 2)
    lst = in_place_list(fb, who)
    # A post already expanded and queued, its next hop answering 4xx for now ...
    waiting = message("queued across the restart", SENDER, lst)
    for m in who:
        fb.sink.post_replies[m] = "451 4.3.0 not now"
    assert_queued(post(fb, [lst], waiting))
    wait_until(lambda: all(_deferred(fb, m, "status=deferred") for m in who), 30, what="the expanded post to wait")
    # ... and one whose client is cut off in the middle of DATA.
    msg = message("cut off by a Postfix restart", SENDER, lst)
    c = Client(fb)
    try:
        assert c.mail(SENDER) == MAIL_OK
        assert c.rcpt(lst) == RCPT_OK
        reply = c.data(msg, midway=fb.postfix.stop)
    finally:
        c.close()
    assert reply == POSTFIX_GONE
    fb.sink.post_replies.clear()
    fb.postfix.start()
    assert_queued(post(fb, [lst], msg))
    expect_delivered(fb, msg, once(who))
    expect_delivered(fb, waiting, once(who))


# == the web endpoint flooded while posts flow ===========================================
def test_web_flooded_with_one_click_requests_while_posts_flow(fb):
    stay, leave = members("fs", 3), members("fl", 10)
    lst = fb.new_list(stay + leave, posting="open")     # personal copies with one-click links
    before = message("before the flood", SENDER, lst)
    assert_queued(post(fb, [lst], before))
    expect_delivered(fb, before, once(stay + leave))
    urls = {m: one_click_url(copy_for(fb, before, m)) for m in leave}
    some = next(iter(urls.values()))
    forged = [some[:-4] + ("AAAA" if not some.endswith("AAAA") else "BBBB")] * 100
    clicks = [u for u in urls.values() for _ in range(20)] + forged      # 300 POSTs
    during = [message(f"during the flood {i}", SENDER, lst) for i in range(5)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        futures = [(u, pool.submit(click, u)) for u in clicks]
        replies = [post(fb, [lst], m) for m in during]
        answers = [(u, f.result()) for u, f in futures]
    print(f"{len(clicks)} one-click POSTs and {len(during)} posts in {time.monotonic() - started:.1f} s")
    for reply in replies:
        assert_queued(reply)
    for m, url in urls.items():
        got = Counter(a for u, a in answers if u == url)
        assert got == {WEB_DONE: 1, WEB_AGAIN: 19}, (m, got)
    assert Counter(a[0] for u, a in answers if u == forged[0]) == {WEB_FORGED: 100}
    # Every post reached those who stay exactly once, a leaver at most once.
    total = len(during) * len(stay)
    wait_until(lambda: sum(delivered(fb, m).get(s, 0) for m in during for s in stay) >= total, 60,
               what="the posts during the flood")
    fb.settle()
    for m in during:
        got = delivered(fb, m)
        assert {s: got.get(s) for s in stay} == once(stay)
        assert all(n == 1 for n in got.values()) and set(got) <= set(stay + leave)
    assert all(unsubscribes(fb, lst, m) == 1 for m in leave)
    after = message("after the flood", SENDER, lst)
    assert_queued(post(fb, [lst], after))
    expect_delivered(fb, after, once(stay))
