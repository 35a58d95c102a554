"""The milter's callbacks in process, driven as libmilter drives them (pymilter's TestCtx).

Every path of listmilter.mta.milter.ListMilter: what each callback answers, the
exact reply it sets, and every edit it asks the MTA for. The store is a real
SQLite store in tmp_path; mail listmilter sends itself (split-off copies,
refusal notices, personal copies) goes through `outgoing.sendmail`, a small
script that records each submission in a folder (or fails on demand), so no
server runs. What the MTAs make of these answers: test_postfix.py,
test_sendmail.py, test_failures.py.
"""

from __future__ import annotations

import email
import email.policy
import functools
import logging
import socket
import sqlite3
import threading
import time
from io import BytesIO
from pathlib import Path

import Milter
import Milter.test  # noqa: F401  (first: makes @noreply callbacks answer CONTINUE under TestCtx)
import pytest
from Milter.testctx import TestCtx as _TestCtx  # (no Test* name here: pytest would collect it)

from listmilter.app.runtime import Runtime
from listmilter.core import envid, plan, verp
from listmilter.core.model import Member
from listmilter.core.tokens import read_unsubscribe_token
from listmilter.mta import milter as milter_mod
from listmilter.mta.milter import InFlight, ListMilter
from listmilter.store import StoreError
from tests.bed.net import wait_until

QUEUE_ID = "4F2A61C0D3"


class Ctx(_TestCtx):
    """TestCtx that records every edit, in order, as (action, arguments...)."""

    def __init__(self):
        super().__init__()
        self.edits: list[tuple] = []
        self.progress_calls = 0

    def _eom_only(self, what: str) -> None:
        if not self._body:
            raise OSError(f"{what} not called from eom()")     # as libmilter refuses it

    def addheader(self, field, value, idx=-1):
        self._eom_only("addheader")
        self.edits.append(("addheader", field, value))

    def chgheader(self, field, idx, value):
        self._eom_only("chgheader")
        self.edits.append(("chgheader", field, idx, value))

    def addrcpt(self, rcpt, params=None):
        self._eom_only("addrcpt")
        self.edits.append(("addrcpt", rcpt, params))

    def delrcpt(self, rcpt):
        self._eom_only("delrcpt")
        self.edits.append(("delrcpt", rcpt))

    def chgfrom(self, sender, params=None):
        self._eom_only("chgfrom")
        self.edits.append(("chgfrom", sender, params))

    def replacebody(self, chunk):
        self._eom_only("replacebody")
        self.edits.append(("replacebody", chunk))

    def progress(self):
        self.progress_calls += 1


def untrapped(callback, *args):
    """What pymilter's C wrapper does with an exception a callback lets out
    (miltermodule.c, _report_exception, exception policy TEMPFAIL, the default):
    reply 451 4.3.0 and TEMPFAIL. test_failures.py sees that reply from Postfix."""
    try:
        return callback(*args)
    except Exception as e:
        ctx = callback.__self__
        ctx.escaped = e
        ctx.setreply("451", "4.3.0", "pymilter: untrapped exception in listmilter")
        return Milter.TEMPFAIL


class Session:
    """One SMTP session from the MTA's side: callbacks in libmilter's order, each
    answer kept, the session stopping where a real MTA would stop."""

    def __init__(self, port: int = 25):
        self.ctx = Ctx()
        self.ctx.escaped = None
        self.ctx._setsymval("i", QUEUE_ID)
        assert self.ctx._connect() == Milter.CONTINUE    # negotiate, creates the ListMilter
        self.milter: ListMilter = self.ctx.getpriv()
        # TestCtx passes the address as a string; libmilter gives (ip, port). Port 0
        # is Postfix's sendmail command (non_smtpd_milters): no per-recipient refusals.
        self.ctx._stage = Milter.M_CONNECT
        assert self.milter.connect("localhost", 2, ("127.0.0.1", port)) == Milter.CONTINUE
        self.ctx._stage = None
        self.answers: dict[str, int] = {}

    @property
    def reply(self):
        return self.ctx._reply

    def send(self, sender: str, rcpts: list[str], message: bytes) -> int:
        """MAIL, RCPT..., DATA, headers, EOH, body, EOM; the first answer that ends the message."""
        c = self.ctx
        c._reply = None
        c.edits.clear()
        rc = self.answers["envfrom"] = untrapped(c._envfrom, f"<{sender}>")
        if rc != Milter.CONTINUE:
            return rc
        accepted = []
        for r in rcpts:
            rc = self.answers[f"envrcpt {r}"] = untrapped(c._envrcpt, f"<{r}>")
            if rc == Milter.CONTINUE:
                accepted.append(r)
            elif rc != Milter.REJECT:       # TEMPFAIL at RCPT: that recipient is deferred
                return rc
        if not accepted:
            return Milter.REJECT
        rc = self.answers["data"] = untrapped(c._data)
        if rc != Milter.CONTINUE:
            return rc
        msg = email.message_from_bytes(message, policy=email.policy.compat32)
        for name, value in msg.items():
            rc = untrapped(c._header, name, value)
            if rc != Milter.CONTINUE:
                return rc
        rc = self.answers["eoh"] = untrapped(c._eoh)
        if rc != Milter.CONTINUE:
            return rc
        body = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
        rc = self.answers["body"] = untrapped(c._feed_body, BytesIO(body))
        if rc not in (Milter.CONTINUE, Milter.SKIP):
            return rc
        rc = self.answers["eom"] = untrapped(c._eom)
        return rc

    def close(self) -> None:
        self.ctx._close()


# -- the world the milter runs in ----------------------------------------------------
SENDMAIL_SCRIPT = """#!/bin/sh
# A stand-in for the MTA's sendmail command: one folder per submission with its
# arguments and message. With FAIL_AFTER holding N, the submissions after the
# first N fail as the MTA's would (exit 75, EX_TEMPFAIL).
out={out}
n=$(ls "$out" | wc -l)
if [ -f {fail_after} ] && [ "$n" -ge "$(cat {fail_after})" ]; then
    echo "sendmail: queue file write error" >&2; exit 75
fi
d="$out/$(printf %05d "$n")"; mkdir "$d"
printf '%s\\n' "$@" > "$d/argv"; cat > "$d/message"
"""


class World:
    """A config, a real sqlite store and a Runtime, as `listmilter serve` has them."""

    def __init__(self, root: Path, web: bool = False, outgoing: str | None = None):
        self.root = root
        self.outbox = root / "outbox"
        self.outbox.mkdir()
        self.fail_after = root / "FAIL_AFTER"
        script = root / "sendmail"
        script.write_text(SENDMAIL_SCRIPT.format(out=self.outbox, fail_after=self.fail_after))
        script.chmod(0o755)
        self.config = root / "listmilter.yaml"
        self.config.write_text(
            f"state_dir: {root}/state\nsite:\n  admin: admin@example.net\n"
            f"outgoing:\n  {outgoing or f'sendmail: {script}'}\n"
            + ("web:\n  base_url: https://lists.example.org\n" if web else ""))
        self.runtime = Runtime(str(self.config))
        self.store = self.runtime.store

    def new_list(self, address: str, members=(), **settings) -> str:
        self.store.create_list(address, settings)
        self.store.add_members(address, [Member(m) for m in members], "config", "test")
        return address

    def submissions(self) -> list[tuple[list[str], bytes]]:
        return [((d / "argv").read_text().splitlines(), (d / "message").read_bytes())
                for d in sorted(self.outbox.iterdir())]

    def break_members_table(self) -> None:
        db = sqlite3.connect(Path(self.runtime.config.state_dir) / "listmilter.sqlite")
        db.execute("DROP TABLE members")
        db.commit()
        db.close()


@pytest.fixture
def log():
    """listmilter's log lines while the test runs."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    handler = Keep()
    logger = logging.getLogger("listmilter")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _world(tmp_path, monkeypatch, **kw) -> World:
    w = World(tmp_path, **kw)
    monkeypatch.setattr(ListMilter, "runtime", w.runtime, raising=False)   # serve sets it
    monkeypatch.setattr(ListMilter, "in_flight", InFlight())
    monkeypatch.setattr(Milter, "factory", ListMilter)
    return w


@pytest.fixture
def world(tmp_path, monkeypatch):
    w = _world(tmp_path, monkeypatch)
    yield w
    w.store.close()


@pytest.fixture
def web_world(tmp_path, monkeypatch):
    w = _world(tmp_path, monkeypatch, web=True)
    yield w
    w.store.close()


def post(subject="hello", sender="carol@example.net", to="dev@example.org", extra="", body="Hello, list.\n"):
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <m1@example.net>\r\n"
            f"{extra}\r\n{body}").encode()


def list_headers(lst: str, lid: str | None = None, post_header: str | None = None) -> list[tuple]:
    local, domain = lst.split("@")
    return [("addheader", "List-Id", f"<{lid or lst.replace('@', '.')}>"),
            ("addheader", "List-Post", post_header or f"<mailto:{lst}>"),
            ("addheader", "List-Help", f"<mailto:{local}-request@{domain}?subject=help>"),
            ("addheader", "List-Subscribe", f"<mailto:{local}-subscribe@{domain}>"),
            ("addheader", "List-Unsubscribe", f"<mailto:{local}-unsubscribe@{domain}>"),
            ("addheader", "List-Owner", f"<mailto:{local}-owner@{domain}>"),
            ("addheader", "Precedence", "list")]


def in_flight_is_empty() -> bool:
    return ListMilter.in_flight.count == 0


# -- expansion in place ------------------------------------------------------------------
def test_a_post_is_expanded_in_place_with_these_exact_edits(world, log):
    lst = world.new_list("dev@example.org", ["m1@example.net", "M2@example.com", "m1@EXAMPLE.net"],
                         posting="members", subject_prefix="[dev] ")
    s = Session()
    rc = s.send("m2@example.com", ["DEV@example.org"],
                post(extra="List-Id: <other.example.com>\r\nPrecedence: bulk\r\n"))
    assert rc == Milter.ACCEPT and s.reply is None
    assert s.answers["data"] == Milter.CONTINUE and s.answers["body"] == Milter.SKIP   # body not buffered
    edits = s.ctx.edits
    chgfrom = edits[3]
    assert chgfrom[0] == "chgfrom" and chgfrom[1] == "<dev-bounces@example.org>"
    params = chgfrom[2].split(" ")
    assert params[0] == "RET=HDRS" and params[1].startswith(f"ENVID={QUEUE_ID}.")
    post_id = envid.parse(params[1][len("ENVID="):], lst, world.runtime.secret)
    assert post_id is not None and post_id.post_id == QUEUE_ID and abs(post_id.posted_at - time.time()) < 60
    assert edits == [
        # Members once each (by case-insensitive address), with DSN parameters naming them,
        # added before the list address goes (plan.edit_steps: safe to stop after any step).
        ("addrcpt", "<m1@example.net>", "NOTIFY=FAILURE ORCPT=rfc822;m1@example.net"),
        ("addrcpt", "<M2@example.com>", "NOTIFY=FAILURE ORCPT=rfc822;M2@example.com"),
        ("delrcpt", "<DEV@example.org>"),
        chgfrom,
        ("chgheader", "List-Id", 1, None),          # another list's headers go, ours come
        ("chgheader", "Precedence", 1, None),
        ("chgheader", "Subject", 1, "[dev] hello"),
        *list_headers(lst),
        ("addheader", "X-BeenThere", lst)]
    line = next(x for x in log if "status=expanded" in x)
    assert line == (f"{QUEUE_ID}: list=<{lst}>, from=<m2@example.com>, client=localhost[127.0.0.1], "
                    f"status=expanded, members=2, envid={params[1][len('ENVID='):]}")
    assert world.submissions() == [] and in_flight_is_empty()


def test_custom_list_id_and_announce_list_headers(world):
    lst = world.new_list("news@example.org", ["r@example.net"], posting="announce", owners=["boss@example.org"],
                         list_id="news.lists.example.org", description="News")
    s = Session()
    assert s.send("Boss@Example.org", [lst], post(to=lst)) == Milter.ACCEPT
    added = [e for e in s.ctx.edits if e[0] == "addheader"]
    assert added[0] == ("addheader", "List-Id", "News <news.lists.example.org>")
    assert added[1] == ("addheader", "List-Post", "NO")
    # The custom id is also what marks a loop.
    s2 = Session()
    assert s2.send("boss@example.org", [lst], post(to=lst, extra="List-Id: <news.lists.example.org>\r\n")) \
        == Milter.ACCEPT and s2.ctx.edits == []


def test_without_a_queue_id_the_envid_gets_a_random_post_id(world):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    s.ctx._macros.pop("i")
    assert s.send("carol@example.net", [lst], post()) == Milter.ACCEPT
    params = next(e for e in s.ctx.edits if e[0] == "chgfrom")[2]
    post_id = params.split("ENVID=")[1].split(".")[0]
    assert len(post_id) == 12 and int(post_id, 16) >= 0


# -- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("posting, sender, words", [
    ("members", "stranger@example.net", "only members of dev@example.org may post to it; "
                                        "stranger@example.net is not a member"),
    ("announce", "m@example.net", "dev@example.org is an announcement list; only its owners may post to it"),
])
def test_a_refused_poster_gets_550_at_rcpt_and_the_message_goes_on_without_that_list(world, log, posting,
                                                                                      sender, words):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting=posting, nonmember_action="reject")
    s = Session()
    assert s.send(sender, [lst, "person@example.net"], post(sender=sender)) == Milter.ACCEPT
    assert s.answers[f"envrcpt {lst}"] == Milter.REJECT
    assert s.answers["data"] == Milter.ACCEPT          # only the person is left: no list work
    assert s.ctx.edits == [] and world.submissions() == []
    assert f"{QUEUE_ID}: list=<{lst}>, from=<{sender}>, client=localhost[127.0.0.1], status=rejected ({words})" \
        in log
    s2 = Session()
    assert s2.send(sender, [lst], post(sender=sender)) == Milter.REJECT
    assert s2.reply == ("550", "5.7.1", words)


def test_a_sender_with_a_percent_sign_is_refused_with_550_not_451(world):
    """libmilter and pymilter read % in a reply as a format character: the reason
    must arrive as a 550, never as the 451 of a failed setreply (retried for days)."""
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="members", nonmember_action="reject")
    s = Session()
    assert s.send("a%b@example.net", [lst], post(sender="a%b@example.net")) == Milter.REJECT
    assert s.ctx.escaped is None
    code, xcode, text = s.reply
    assert (code, xcode) == ("550", "5.7.1") and "a%%b@example.net is not a member" in text


def test_the_sendmail_command_cannot_refuse_one_recipient_so_the_sender_gets_a_notice(world, log):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="members", nonmember_action="reject")
    # Alone: the whole message is refused at end of message (the MTA bounces it with the reason).
    s = Session(port=0)
    assert s.send("out@example.net", [lst], post(sender="out@example.net")) == Milter.REJECT
    assert s.answers[f"envrcpt {lst}"] == Milter.CONTINUE
    assert s.reply == ("550", "5.7.1", "only members of dev@example.org may post to it; out@example.net is "
                                       "not a member")
    assert s.ctx.edits == [] and world.submissions() == []
    # Beside a person: the person keeps the message; the list recipient goes; the sender is told.
    s = Session(port=0)
    assert s.send("out@example.net", [lst, "person@example.net"], post(sender="out@example.net")) == Milter.ACCEPT
    assert s.ctx.edits == [("delrcpt", f"<{lst}>")]
    (argv, notice), = world.submissions()
    assert argv == ["-i", "-f", "<>", "--", "out@example.net"]
    text = email.message_from_bytes(notice, policy=email.policy.default)
    assert text["To"] == "out@example.net" and "only members of" in text.get_body().get_content()


# -- mail that is not expanded -------------------------------------------------------
def test_null_sender_mail_to_a_list_is_left_for_the_pipe_transport(world):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    assert s.send("", [lst], post(sender="MAILER-DAEMON@example.net")) == Milter.ACCEPT
    assert s.answers["data"] == Milter.ACCEPT and s.ctx.edits == [] and in_flight_is_empty()


def test_a_post_carrying_the_lists_own_list_id_is_not_expanded(world, log):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    assert s.send("m@example.net", [lst], post(extra="List-Id: Dev <DEV.example.org>\r\n")) == Milter.ACCEPT
    assert s.ctx.edits == [] and world.submissions() == []
    assert f"{QUEUE_ID}: list=<{lst}>, from=<m@example.net>, status=not expanded (mail loop: the message " \
           "already carries this list's List-Id)" in log


def test_role_addresses_and_strangers_are_no_list_work(world):
    world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    assert s.send("carol@example.net", ["dev-request@example.org", "dev-bounces+keep-x@example.org",
                                        "somebody@example.org"], post()) == Milter.ACCEPT
    assert s.answers["data"] == Milter.ACCEPT and s.ctx.edits == []


# -- the owner alias -------------------------------------------------------------------
def test_the_owner_address_becomes_the_owners_or_the_site_admin(world):
    world.new_list("dev@example.org", ["m@example.net"], owners=["o1@example.net", "O2@example.com"])
    world.new_list("solo@example.org", ["m@example.net"])
    s = Session()
    assert s.send("stranger@example.net", ["dev-owner@example.org", "solo-owner@example.org",
                                           "person@example.net"], post()) == Milter.ACCEPT
    assert s.ctx.edits == [
        ("addrcpt", "<o1@example.net>", None), ("addrcpt", "<O2@example.com>", None),
        ("addrcpt", "<admin@example.net>", None),
        ("delrcpt", "<dev-owner@example.org>"), ("delrcpt", "<solo-owner@example.org>")]
    assert world.submissions() == []


# -- one message, several lists -------------------------------------------------------------
def test_two_lists_and_a_person_each_list_gets_the_original_resubmitted(world, log):
    a = world.new_list("alpha@example.org", ["a1@example.net"], posting="open")
    b = world.new_list("beta@example.org", ["b1@example.net"], posting="open")
    # 8-bit bytes in a header must reach the re-submitted copies unchanged.
    original = post(to=f"{a}, {b}", extra="X-Note: x\r\n").replace(b"X-Note: x", b"X-Note: gr\xfc\xdfe")
    s = Session()
    assert s.send("carol@example.net", [a, "person@example.net", b], original) == Milter.ACCEPT
    assert s.answers["body"] == Milter.CONTINUE        # the body was kept for the copies
    assert s.ctx.edits == [("delrcpt", f"<{a}>"), ("delrcpt", f"<{b}>")]
    subs = world.submissions()
    assert [argv for argv, _ in subs] == [["-i", "-f", "carol@example.net", "--", a],
                                          ["-i", "-f", "carol@example.net", "--", b]]
    for _, copy in subs:
        assert copy.replace(b"\r\n", b"\n") == original.replace(b"\r\n", b"\n")
    assert [x for x in log if "split" in x] == [
        f"{QUEUE_ID}: list=<{a}>, from=<carol@example.net>, "
        "status=split (re-submitted as a message of its own), queued_as=?",
        f"{QUEUE_ID}: list=<{b}>, from=<carol@example.net>, status=split (re-submitted as a message of its own), "
        "queued_as=?"]


def test_two_lists_without_a_person_keep_the_first_in_place(world):
    a = world.new_list("alpha@example.org", ["a1@example.net"], posting="open")
    b = world.new_list("beta@example.org", ["b1@example.net"], posting="open")
    s = Session()
    assert s.send("carol@example.net", [a, b], post()) == Milter.ACCEPT
    edits = s.ctx.edits
    assert edits[:3] == [("addrcpt", "<a1@example.net>", "NOTIFY=FAILURE ORCPT=rfc822;a1@example.net"),
                         ("delrcpt", f"<{a}>"), ("delrcpt", f"<{b}>")]
    assert edits[3][:2] == ("chgfrom", "<alpha-bounces@example.org>")
    assert [argv[-1] for argv, _ in world.submissions()] == [b]


@pytest.mark.parametrize("how", ["sendmail exits 75", "smtp refused"])
def test_a_failed_resubmission_tempfails_the_whole_message_and_changes_nothing(tmp_path, monkeypatch, log, how):
    # A port that is bound but never listens: connection refused, and nobody else can take it.
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    smtp = f"smtp: 127.0.0.1:{hold.getsockname()[1]}" if how == "smtp refused" else None
    world = _world(tmp_path, monkeypatch, outgoing=smtp)
    a = world.new_list("alpha@example.org", ["a1@example.net"], posting="open")
    b = world.new_list("beta@example.org", ["b1@example.net"], posting="open")
    world.fail_after.write_text("0")
    s = Session()
    assert s.send("carol@example.net", [a, "person@example.net", b], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: cannot split the message; try again later")
    assert s.ctx.edits == [] and world.submissions() == [] and s.ctx.escaped is None
    assert any(f"{QUEUE_ID}: from=<carol@example.net>, status=deferred (cannot re-submit: " in x for x in log)
    assert in_flight_is_empty()
    world.store.close()
    hold.close()


# -- personal copies (one-click unsubscribe) ----------------------------------------------
def test_personal_copies_are_submitted_each_with_its_own_link_then_the_original_discarded(web_world, log):
    w = web_world
    lst = w.new_list("dev@example.org", ["p1@example.net", "p2@example.com"], posting="open")
    s = Session()
    assert s.send("carol@example.net", [lst], post()) == Milter.DISCARD
    assert s.ctx.edits == []
    subs = w.submissions()
    assert [argv[:2] + argv[3:8] for argv, _ in subs] == [["-i", "-f", "-N", "failure", "-R", "hdrs", "-V"]] * 2
    assert [argv[-2:] for argv, _ in subs] == [["--", "p1@example.net"], ["--", "p2@example.com"]]
    # Each copy goes from its member's own VERP address, which names that member and this post.
    for argv, _ in subs:
        local, _, domain = argv[2].partition("@")
        assert domain == "example.org" and local.startswith("dev-bounces+"), argv[2]
        bound = verp.find(local.partition("+")[2], lst, ["p1@example.net", "p2@example.com"], w.runtime.secret)
        assert bound is not None and bound.member == argv[-1] and bound.post_id == QUEUE_ID.lower()
    envid_value = subs[0][0][8]
    assert envid_value.startswith(f"{QUEUE_ID}.") and subs[1][0][8] == envid_value
    urls = []
    for (_argv, copy), member in zip(subs, ["p1@example.net", "p2@example.com"], strict=True):
        m = email.message_from_bytes(copy, policy=email.policy.default)
        url = m["List-Unsubscribe"].split(">")[0].lstrip("<")
        token = url.rsplit("/", 1)[1]
        link = read_unsubscribe_token(w.runtime.secret, token)
        assert (link.list, link.address) == (lst, member)
        assert link.epoch == w.store.member(lst, member).added        # the link names this membership
        assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert m["List-Id"] == "<dev.example.org>"
        urls.append(url)
    assert urls[0] != urls[1]
    assert any("status=expanded (personal copies), members=2" in x for x in log)


@pytest.mark.parametrize("with_web", [False, True])
def test_a_footer_makes_personal_copies_with_the_mailto_link_without_one_click(tmp_path, monkeypatch, log, with_web):
    w = _world(tmp_path, monkeypatch, web=with_web)
    footer = "Leave: {unsubscribe_url}\nTo {member} from {list_address}, {postal_address}"
    # Without web.base_url, or with one_click off: one copy per member all the same, for the footer.
    lst = w.new_list("dev@example.org", ["p1@example.net", "p2@example.com"], posting="open", footer=footer,
                     postal_address="1 Main St", one_click=False)
    s = Session()
    assert s.send("carol@example.net", [lst], post()) == Milter.DISCARD
    subs = w.submissions()
    assert [argv[-1] for argv, _ in subs] == ["p1@example.net", "p2@example.com"]
    for (argv, copy), member in zip(subs, ["p1@example.net", "p2@example.com"], strict=True):
        m = email.message_from_bytes(copy, policy=email.policy.default)
        assert m["List-Unsubscribe"] == "<mailto:dev-unsubscribe@example.org>" and m["List-Unsubscribe-Post"] is None
        # (This post's body has Unix line ends: the footer follows them.)
        assert m.get_content() == (f"Hello, list.\n\nLeave: mailto:dev-unsubscribe@example.org\n"
                                   f"To {member} from dev@example.org, 1 Main St\n")
        assert argv[2].startswith("dev-bounces+")
    assert any("status=footer added (text/plain)" in x for x in log)
    w.store.close()


def test_a_personal_copy_failing_part_way_tempfails_and_the_original_is_kept(web_world, log):
    w = web_world
    lst = w.new_list("dev@example.org", ["p1@example.net", "p2@example.net", "p3@example.net"], posting="open")
    w.fail_after.write_text("1")
    s = Session()
    assert s.send("carol@example.net", [lst], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: cannot split the message; try again later")
    assert s.ctx.edits == []
    # The first copy was queued before the failure: the sender's retry duplicates it (never a loss).
    assert [argv[-1] for argv, _ in w.submissions()] == ["p1@example.net"]


def test_progress_keeps_the_mta_waiting_and_a_failing_progress_is_logged_once(web_world, log, monkeypatch):
    w = web_world
    lst = w.new_list("dev@example.org", [f"p{i}@example.net" for i in range(6)], posting="open")
    # progress() every 2 copies instead of every 100, so six members show it.
    monkeypatch.setattr(milter_mod.outgoing, "send_copies",
                        functools.partial(milter_mod.outgoing.send_copies, every=2))
    s = Session()
    assert s.send("carol@example.net", [lst], post()) == Milter.DISCARD
    assert s.ctx.progress_calls == 3

    def broken():
        raise OSError("MTA went away")
    s = Session()
    monkeypatch.setattr(s.ctx, "progress", broken)
    assert s.send("carol@example.net", [lst], post()) == Milter.DISCARD
    assert len(w.submissions()) == 12
    assert sum("milter progress() failed (MTA went away)" in x for x in log) == 1


# -- store and config failures: 451 4.3.0, never accepted unexpanded ------------------------
def test_a_store_error_at_rcpt_tempfails(world, log):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="members")
    world.break_members_table()
    s = Session()
    assert s.send("m@example.net", [lst], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: list store unavailable; try again later")
    assert any(x.startswith(f"NOQUEUE: to=<{lst}>, status=deferred (") for x in log)


def test_a_store_error_at_end_of_message_tempfails_with_no_edits(world, log):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    original = s.ctx._eom

    def break_then_eom():
        world.break_members_table()
        return original()
    s.ctx._eom = break_then_eom
    assert s.send("carol@example.net", [lst], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: list store unavailable; try again later")
    assert s.ctx.edits == []
    assert any(f"{QUEUE_ID}: from=<carol@example.net>, status=deferred (list store: " in x for x in log)


def test_a_list_deleted_during_the_transaction_tempfails_at_end_of_headers(world, log):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    original = s.ctx._eoh

    def delete_then_eoh():
        world.store.delete_list(lst)
        return original()
    s.ctx._eoh = delete_then_eoh
    assert s.send("carol@example.net", [lst], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: list store unavailable; try again later")
    assert any("vanished during the transaction" in x for x in log)


def test_a_config_that_cannot_be_loaded_tempfails_at_mail(world, log, monkeypatch):
    def broken():
        raise StoreError("database is locked")
    monkeypatch.setattr(world.runtime, "current", broken)
    s = Session()
    assert s.send("carol@example.net", ["dev@example.org"], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: configuration unavailable; try again later")
    assert "NOQUEUE: cannot load config or store" in log
    s.close()
    assert in_flight_is_empty()


def test_while_stopping_new_messages_get_451_and_open_ones_finish(world):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    c = s.ctx
    assert c._envfrom("<carol@example.net>") == Milter.CONTINUE
    assert ListMilter.in_flight.count == 1
    drained = []
    t = threading.Thread(target=lambda: drained.append(ListMilter.in_flight.drain(5)))
    t.start()
    wait_until(lambda: ListMilter.in_flight.stopping, 5, what="the drain to start")
    assert t.is_alive()
    other = Session()
    assert other.send("carol@example.net", [lst], post()) == Milter.TEMPFAIL
    assert other.reply == ("451", "4.3.0", "listmilter: shutting down; try again later")
    # The open message goes on to the end and is expanded.
    assert c._envrcpt(f"<{lst}>") == Milter.CONTINUE
    assert c._data() == Milter.CONTINUE and c._eoh() == Milter.CONTINUE
    assert c._eom() == Milter.ACCEPT and any(e[0] == "addrcpt" for e in c.edits)
    t.join(5)
    assert drained == [0]


def test_abort_and_close_end_the_message_and_the_next_one_starts_clean(world):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    c = s.ctx
    assert c._envfrom("<carol@example.net>") == Milter.CONTINUE and c._envrcpt(f"<{lst}>") == Milter.CONTINUE
    assert ListMilter.in_flight.count == 1
    c._priv.abort()                               # the client said RSET
    assert in_flight_is_empty() and s.milter.recipients == []
    assert s.send("carol@example.net", ["person@example.net"], post()) == Milter.ACCEPT
    assert s.ctx.edits == []
    assert c._envfrom("<carol@example.net>") == Milter.CONTINUE
    s.close()                                    # the connection dropped mid-message
    assert in_flight_is_empty()


# -- an exception in any callback: 451 4.3.0 -------------------------------------------------
def _raise(*a, **kw):
    raise RuntimeError("injected fault")


class Exploding(list):
    """A list whose use raises: the fault for callbacks that only keep data."""

    def __iter__(self):
        raise RuntimeError("injected fault")

    append = __iter__


@pytest.mark.parametrize("callback", ["envfrom", "envrcpt", "data", "eoh", "body", "eom"])
def test_an_exception_in_any_callback_tempfails_with_451_4_3_0(world, log, monkeypatch, callback):
    lst = world.new_list("dev@example.org", ["m@example.net"], posting="open")
    s = Session()
    if callback == "envfrom":
        monkeypatch.setattr(world.runtime, "current", _raise)
    elif callback == "envrcpt":
        monkeypatch.setattr(world.store, "get_list", _raise)
    elif callback == "data":
        real = ListMilter.envrcpt

        def envrcpt_then_fault(self, to, *params):
            rc = real(self, to, *params)
            self.recipients = Exploding(self.recipients)
            return rc
        monkeypatch.setattr(ListMilter, "envrcpt", envrcpt_then_fault)
    elif callback == "eoh":
        monkeypatch.setattr(plan, "loop_reason", _raise)
    elif callback == "body":
        real_eoh = ListMilter.eoh

        def eoh_then_fault(self):
            rc = real_eoh(self)
            self.need_body = True
            self.body_chunks = Exploding()
            return rc
        monkeypatch.setattr(ListMilter, "eoh", eoh_then_fault)
    else:
        monkeypatch.setattr(plan, "expand_list", _raise)
    rc = s.send("carol@example.net", [lst], post())
    assert rc == Milter.TEMPFAIL, (callback, rc, s.answers)
    code, xcode = s.reply[:2]
    assert (code, xcode) == ("451", "4.3.0"), s.reply
    assert s.ctx.edits == []
    # Either the milter caught it and logged why, or pymilter did (to serve's stderr).
    assert log or s.ctx.escaped is not None
    s.close()
    assert in_flight_is_empty()


def test_in_flight_drain_waits_for_the_reply_to_be_sent():
    f = InFlight()
    assert f.begin()
    started = time.monotonic()
    assert f.drain(0.3) == 1 and time.monotonic() - started >= 0.3     # still in flight after the grace
    assert not f.begin()                                                # stopping: no new message
    f.end()
    started = time.monotonic()
    assert f.drain(5) == 0 and time.monotonic() - started >= InFlight.REPLY_SETTLE * 0.9


def test_an_edit_the_mta_no_longer_takes_tempfails_with_one_log_line(world, log, monkeypatch):
    """Sendmail's E: timeout: it stops taking edits while the milter adds recipients."""
    lst = world.new_list("dev@example.org", ["m1@example.net", "m2@example.net"], posting="open")
    s = Session()

    def gone(rcpt, params=None):
        raise Milter.milter.error("cannot add recipient")
    monkeypatch.setattr(s.ctx, "addrcpt", gone)
    assert s.send("carol@example.net", [lst], post()) == Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: the MTA did not take the changes; try again later")
    assert f"{QUEUE_ID}: from=<carol@example.net>, status=deferred (the MTA did not take the changes: " \
           "cannot add recipient; its end-of-message timeout?)" in log
