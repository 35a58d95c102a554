"""Moderation, the pure half: who is held and why (core/moderation.py), the settings that say
so (config file and `list set`), the owners' reply, Reply-To, and the held-post records and
decisions (app/held.py) over a stand-in queue. Over the real Postfix: tests/test_moderation_mta.py."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listmilter.app import held
from listmilter.core import config, dmarc, moderation, plan, sendmail_queue, settings
from listmilter.core.moderation import ACCEPT, DISCARD, HOLD, REJECT, Rules
from listmilter.core.plan import DROPPED, LIST, PLAIN, REFUSED, Recipient
from listmilter.store.pending import PendingDB

LIST_ADDRESS = "dev@example.org"


# -- the decision ------------------------------------------------------------------------
@pytest.mark.parametrize("rules, sender, member, size, action, why", [
    (Rules("members"), "m@x.org", True, None, ACCEPT, ""),
    (Rules("members"), "out@x.org", False, None, HOLD, "out@x.org is not a member"),    # the default
    (Rules("members", nonmember_action="reject"), "out@x.org", False, None, REJECT,
     "only members of dev@example.org may post"),
    (Rules("members", nonmember_action="discard"), "out@x.org", False, None, DISCARD, "not a member"),
    (Rules("members", nonmember_action="accept"), "out@x.org", False, None, ACCEPT, ""),
    (Rules("members", accept_nonmembers=("out@x.org",)), "OUT@x.org", False, None, ACCEPT, ""),
    (Rules("members", accept_nonmembers=(r"^.*@partner\.test$",)), "a@partner.test", False, None, ACCEPT, ""),
    (Rules("members", accept_nonmembers=(r"^.*@partner\.test$",)), "a@partner.test.evil", False, None,
     HOLD, "not a member"),
    (Rules("members", moderated=True), "m@x.org", True, None, HOLD, "is moderated"),
    (Rules("members", moderated=True, owners=("boss@x.org",)), "Boss@x.org", False, None, ACCEPT, ""),
    (Rules("members", moderated_members=("m@x.org",)), "m@x.org", True, None, HOLD, "posts from m@x.org"),
    (Rules("members", max_message_size=100), "m@x.org", True, 101, HOLD, "101 bytes, over"),
    (Rules("members", max_message_size=100), "m@x.org", True, 100, ACCEPT, ""),
    (Rules("members", max_message_size=100), "m@x.org", True, None, ACCEPT, ""),   # RCPT: size unknown yet
    (Rules("open", nonmember_action="hold"), "out@x.org", False, None, ACCEPT, ""),
    (Rules("announce", nonmember_action="hold"), "m@x.org", True, None, REJECT, "announcement list"),
    (Rules("members", nonmember_action="hold", moderated=True), "out@x.org", False, None, HOLD, "not a member"),
])
def test_the_decision(rules, sender, member, size, action, why):
    assert Rules("members").nonmember_action == settings.SETTINGS["nonmember_action"].default == "hold"
    d = moderation.decide(rules, LIST_ADDRESS, sender, member, size)
    assert d.action == action and why in d.reason
    assert bool(d.reason) == (action != ACCEPT)


def test_by_default_a_non_members_post_is_held_for_the_owners():
    """nonmember_action defaults to hold (as in Mailman 3): the post waits for an owner instead of
    the poster getting 550; lists made before keep reject (tests/test_upgrade.py)."""
    eff = settings.resolve_all({}, {})
    d = moderation.decide(moderation.rules_of(eff), LIST_ADDRESS, "out@x.org", False)
    assert d == moderation.Decision(HOLD, "out@x.org is not a member of dev@example.org")
    eff = settings.resolve_all({}, {"nonmember_action": "reject"})
    d = moderation.decide(moderation.rules_of(eff), LIST_ADDRESS, "out@x.org", False)
    assert d == moderation.Decision(REJECT, "only members of dev@example.org may post to it; "
                                            "out@x.org is not a member")


addresses_ = st.from_regex(r"[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,10}\.(org|test)", fullmatch=True)
rules_ = st.builds(Rules, st.sampled_from(["open", "members", "announce"]),
                   st.lists(addresses_, max_size=2).map(tuple), st.booleans(),
                   st.sampled_from(["hold", "reject", "discard", "accept"]),
                   st.lists(st.one_of(addresses_, st.text(max_size=12).map(lambda t: "^" + t)), max_size=3).map(tuple),
                   st.lists(addresses_, max_size=2).map(tuple), st.integers(0, 10_000))


@given(rules_, st.one_of(addresses_, st.just(""), st.text(max_size=40)), st.booleans(),
       st.one_of(st.none(), st.integers(0, 20_000)))
@example(Rules("members", accept_nonmembers=("^(",)), "a@b.org", False, None)     # a bad regex: never raises
def test_the_decision_is_total_and_consistent(rules, sender, member, size):
    d = moderation.decide(rules, LIST_ADDRESS, sender, member, size)
    assert d.action in (ACCEPT, HOLD, REJECT, DISCARD)
    # Owners are never held or refused.
    if sender and sender.lower() in {o.lower() for o in rules.owners}:
        assert d.action == ACCEPT
    # Nothing holds a post on a list that has no reason to.
    calm = Rules(rules.posting, rules.owners, nonmember_action="accept")
    if rules.posting != "announce":
        assert moderation.decide(calm, LIST_ADDRESS, sender, member, size).action == ACCEPT
    # Knowing the size can only hold a post that was accepted without it, never free a held one.
    without = moderation.decide(rules, LIST_ADDRESS, sender, member, None)
    if without.action != ACCEPT:
        assert d == without


# -- settings ---------------------------------------------------------------------------------
def test_the_settings_parse():
    assert settings.parse("moderated", "yes") is True
    assert settings.parse("nonmember_action", "hold") == "hold"
    assert settings.parse("accept_nonmembers", "a@x.org, ^.*@partner\\.test$") == ("a@x.org", r"^.*@partner\.test$")
    assert settings.parse("moderated_members", ["m@x.org"]) == ("m@x.org",)
    assert settings.parse("max_message_size", "40000") == 40000
    assert settings.parse("hold_days", 2) == 2
    assert [settings.parse("reply_to", v) for v in ("poster", "list", "team@x.org")] == ["poster", "list",
                                                                                         "team@x.org"]
    for name, bad in [("nonmember_action", "bounce"), ("accept_nonmembers", "^(unclosed"),
                      ("accept_nonmembers", "not an address"), ("reply_to", "everyone"), ("hold_days", 0),
                      ("max_message_size", -1)]:
        with pytest.raises(settings.SettingError):
            settings.parse(name, bad)


def test_a_bad_regex_in_the_config_file_is_reported_with_file_and_line():
    text = ("store: {backend: yaml}\n"
            "lists:\n"
            "  dev@example.org:\n"
            "    nonmember_action: hold\n"
            "    accept_nonmembers:\n"
            "      - boss@partner.test\n"
            "      - ^[a-z+@partner\\.test$\n")
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "/etc/listmilter.yaml")
    assert str(info.value).startswith("/etc/listmilter.yaml:7: lists.dev@example.org.accept_nonmembers: "
                                      "'^[a-z+@partner\\\\.test$' is not a valid regular expression")


def test_the_settings_from_the_config_file():
    cfg = config.parse("store: {backend: yaml}\n"
                       "defaults:\n  hold_days: 7\n"
                       "lists:\n  dev@example.org:\n    moderated: true\n    reply_to: list\n"
                       "    max_message_size: 500000\n")
    eff = cfg.list_settings(cfg.lists["dev@example.org"].settings)
    assert (eff.moderated, eff.reply_to, eff.max_message_size, eff.hold_days, eff.nonmember_action) == \
        (True, "list", 500000, 7, "hold")


# -- the owners' reply -------------------------------------------------------------------------
CODE = "abcdefghijklmnopqrstuvwx"


@pytest.mark.parametrize("subject, body, expected", [
    (f"Re: Held for dev@example.org: hi (approve {CODE})", [], ("approve", CODE)),
    (f"Re: Held for dev@example.org: hi (approve {CODE})", ["reject"], ("reject", CODE)),
    (f"Re: Held for dev@example.org: hi (approve {CODE})", ["Discard."], ("discard", CODE)),
    (f"Re: Held for dev@example.org: hi (approve {CODE})", ["looks fine to me"], ("approve", CODE)),
    ("Re: something", [f"reject {CODE.upper()}"], ("reject", CODE)),
    ("Re: something", ["thanks", f"approve {CODE}"], ("approve", CODE)),
    ("Re: something", ["reject"], None),               # a verb without a code decides nothing
    (f"approve {CODE[:-1]}", [], None),                 # not a code we make
    ("subscribe", [], None),
])
def test_the_reply_decides(subject, body, expected):
    assert moderation.reply_decision(subject, body) == expected


@given(st.text(max_size=200), st.lists(st.text(max_size=100), max_size=6))
def test_any_reply_text_is_read_without_an_exception(subject, body):
    got = moderation.reply_decision(subject, body)
    assert got is None or (got[0] in moderation.VERBS and len(got[1]) == 24)


def test_first_lines_are_printable_and_short():
    lines = moderation.first_lines("\n\n  hello\x1b[31m\n" + "x" * 500 + "\n" + "\n".join(map(str, range(30))))
    assert lines[0] == "  hello [31m" and len(lines[1]) == moderation.SUMMARY_WIDTH
    assert len(lines) == moderation.SUMMARY_LINES


# -- the plan: held posts stay in their message, discards, Reply-To -----------------------------
LS = plan.ListSettings(LIST_ADDRESS, "members", "", "", "dev.example.org")
HEADERS = [("From", "Alice <alice@x.org>"), ("To", LIST_ADDRESS), ("Subject", "hi"),
           ("Reply-To", "a1@x.org"), ("Reply-To", "a2@x.org")]


def _eom(recipients, in_place, url_for=None):
    return plan.end_of_message(recipients, plan.split(recipients), in_place, {}, HEADERS, b"body\r\n", "Q1",
                               b"k" * 32, url_for, 1_700_000_000.0)


def test_a_held_post_is_expanded_in_its_message_and_marked_for_the_hold_queue():
    rcpts = [Recipient(f"<{LIST_ADDRESS}>", LIST_ADDRESS, LIST, LIST_ADDRESS, hold="not a member")]
    todo = _eom(rcpts, plan.InPlace(LS, ["m1@x.org"], True, None, "not a member"), url_for=lambda m: "")
    # Personal copies would be messages of their own, sent before anyone approved: expanded in place.
    assert todo.copies is None and todo.hold == "not a member"
    assert [a for a, _ in todo.edits[0].add_rcpts] == ["m1@x.org"]
    todo = _eom(rcpts, plan.InPlace(LS, ["m1@x.org"], True, None, ""), url_for=lambda m: "")
    assert todo.copies is not None and todo.hold == ""


def test_a_discarding_list_drops_the_post():
    alone = [Recipient(f"<{LIST_ADDRESS}>", LIST_ADDRESS, DROPPED, LIST_ADDRESS, "x is not a member")]
    assert _eom(alone, None).discard
    mixed = alone + [Recipient("<bob@x.org>", "bob@x.org", PLAIN)]
    todo = _eom(mixed, None)
    assert not todo.discard and [e.del_rcpts for e in todo.edits] == [[f"<{LIST_ADDRESS}>"]]
    refused = alone + [Recipient("<o@example.org>", "o@example.org", REFUSED, "o@example.org", "no")]
    assert _eom(refused, None).reject == "no"


@pytest.mark.parametrize("reply_to, expected", [
    ("poster", ["a1@x.org", "a2@x.org"]),
    ("list", [LIST_ADDRESS]),
    ("team@x.org", ["team@x.org"]),
])
def test_reply_to(reply_to, expected):
    from dataclasses import replace
    ls = replace(LS, reply_to=reply_to)
    edits = plan.expand_list(ls, [], ["m@x.org"], HEADERS, "Q1", b"k" * 32, 1_700_000_000.0)
    out = plan.apply_header_edits(HEADERS, edits)
    assert [v for n, v in out if n == "Reply-To"] == expected


def test_reply_to_list_with_a_dmarc_rewrite_keeps_the_poster_reachable():
    from dataclasses import replace
    ls = replace(LS, reply_to="list")
    verdict = dmarc.Verdict("reject", "p=reject")
    edits = plan.expand_list(ls, [], ["m@x.org"], HEADERS, "Q1", b"k" * 32, 1_700_000_000.0, verdict)
    out = plan.apply_header_edits(HEADERS, edits)
    assert [v for n, v in out if n == "Reply-To"] == [f"{LIST_ADDRESS}, \"Alice\" <alice@x.org>"]
    assert [v for n, v in out if n == "From"] == [f'"Alice via dev" <{LIST_ADDRESS}>']


def test_the_personal_copies_get_the_same_reply_to():
    from dataclasses import replace
    ls = replace(LS, reply_to="list")
    copies = plan.personal_copies(ls, ["m@x.org"], HEADERS, b"body\r\n", "Q1", b"k" * 32, lambda m: "",
                                  1_700_000_000.0)
    head = copies.copies[0][2].split(b"\r\n\r\n")[0]
    assert head.count(b"Reply-To:") == 1 and f"Reply-To: {LIST_ADDRESS}".encode() in head


# -- records and decisions, over a stand-in for Postfix's queue ---------------------------------
class FakeQueue:
    def __init__(self, *ids):
        self.ids = set(ids)
        self.released: list[str] = []
        self.deleted: list[str] = []
        self.fail = False

    def held(self):
        return {i: held.QueueEntry(i, 0.0, 100, "x@x.org", 1) for i in self.ids}

    def _take(self, qid):
        if self.fail:
            raise held.QueueError("postsuper: fatal: use of this command is reserved for the superuser")
        if qid not in self.ids:
            return False
        self.ids.discard(qid)
        return True

    def release(self, qid):
        found = self._take(qid)
        self.released += [qid] if found else []
        return found

    def delete(self, qid):
        found = self._take(qid)
        self.deleted += [qid] if found else []
        return found


class Store:
    def __init__(self, lists):
        self.lists = lists
        self.forgotten: list[str] = []      # posts taken out of the delivery report

    def forget_post(self, list_address, post_id):
        self.forgotten.append(post_id)

    def get_list(self, address):
        from listmilter.core.model import MailingList
        return MailingList(address, self.lists[address]) if address in self.lists else None


@pytest.fixture
def env(tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr(held.outgoing, "send", lambda out, sender, rcpts, data: sent.append((sender, rcpts, data)))
    cfg = config.Config(state_dir=str(tmp_path))
    db = PendingDB(str(tmp_path))
    yield cfg, Store({LIST_ADDRESS: {"hold_days": 2}}), db, sent
    db.close()


def test_hold_records_and_tells_the_owners_once(env):
    cfg, store, db, sent = env
    held.hold(cfg, db, "4ABC", LIST_ADDRESS, ("boss@x.org",), "out@x.org", "out@x.org is not a member",
              HEADERS, b"first line\r\nsecond\r\n", 321, 14, "")
    [(sender, rcpts, data)] = sent
    assert sender == "" and rcpts == ["boss@x.org"]
    text = data.decode()
    code = re.search(r"^Subject: Held for dev@example.org: hi \(approve ([a-z2-7]{24})\)\r?$", text, re.M).group(1)
    assert "Reply-To: dev-request@example.org" in text and "listmilter held approve 4ABC" in text
    assert "    first line" in text and "321 bytes" in text and "out@x.org is not a member" in text
    assert db.held_by_code(code).queue_id == "4ABC" and db.held_by_code(code.upper()) is not None


def test_approve_then_a_second_decision_changes_nothing(env):
    cfg, store, db, sent = env
    db.add_held("4ABC", LIST_ADDRESS, "out@x.org", "why", "hi", 10)
    q = FakeQueue("4ABC")
    assert held.decide(cfg, store, db, q, "4ABC", "approve", "cli root") == "4ABC: approved, released"
    assert q.released == ["4ABC"] and not sent and store.forgotten == []       # it went: counted
    assert "already done" in held.decide(cfg, store, db, q, "4ABC", "reject", "cli root")
    assert q.deleted == [] and db.held_posts() == []
    with pytest.raises(held.HeldError):
        held.decide(cfg, store, db, q, "NOSUCH", "approve", "cli root")


def test_reject_deletes_and_tells_the_poster_discard_does_not(env):
    cfg, store, db, sent = env
    db.add_held("4A", LIST_ADDRESS, "out@x.org", "why", "hi", 10)
    db.add_held("4B", LIST_ADDRESS, "out@x.org", "why", "hi", 10)
    q = FakeQueue("4A", "4B")
    assert held.decide(cfg, store, db, q, "4A", "reject", "x") == "4A: rejected, deleted; poster told"
    [(_, rcpts, data)] = sent
    assert rcpts == ["out@x.org"] and b"Subject: Your post to dev@example.org was rejected" in data
    assert held.decide(cfg, store, db, q, "4B", "discard", "x") == "4B: discarded, deleted"
    assert q.deleted == ["4A", "4B"] and len(sent) == 1
    assert store.forgotten == ["4A", "4B"]      # never sent: out of the delivery report


def test_a_queue_that_cannot_be_told_keeps_the_decision_for_the_periodic_run(env):
    cfg, store, db, sent = env
    db.add_held("4A", LIST_ADDRESS, "out@x.org", "why", "hi", 10)
    q = FakeQueue("4A")
    q.fail = True
    assert "approve recorded" in held.decide(cfg, store, db, q, "4A", "approve", "reply from boss@x.org")
    assert db.held_post("4A").decision == "approve" and db.held_post("4A").done is None
    q.fail = False
    assert held.periodic(cfg, store, db, q) == ["4A: approved, released"]
    assert q.released == ["4A"]


def test_expiry_after_hold_days(env):
    cfg, store, db, sent = env
    now = time.time()
    db.add_held("4OLD", LIST_ADDRESS, "out@x.org", "why", "hi", 10, now=now - 2 * 86400 - 1)
    db.add_held("4NEW", LIST_ADDRESS, "out@x.org", "why", "hi", 10, now=now - 2 * 86400 + 60)
    q = FakeQueue("4OLD", "4NEW")
    assert held.periodic(cfg, store, db, q, now) == ["4OLD: expired, deleted; poster told"]
    assert q.deleted == ["4OLD"] and [p.queue_id for p in db.held_posts()] == ["4NEW"]
    [(_, rcpts, data)] = sent
    assert rcpts == ["out@x.org"] and b"waited 2 days" in data and b"Why held: why" in data
    assert held.periodic(cfg, store, db, q, now) == []


def test_a_list_that_is_gone_expires_its_held_posts_at_once(env):
    cfg, store, db, sent = env
    db.add_held("4G", "gone@example.org", "", "why", "hi", 10)
    q = FakeQueue("4G")
    assert held.periodic(cfg, store, db, q) == ["4G: expired, deleted"]     # null sender: nobody to tell
    assert not sent


# -- the docs' exact lines -----------------------------------------------------------------------
DOC = Path(__file__).parents[1] / "docs" / "moderation.md"


def test_the_docs_config_example_parses_to_what_they_say():
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S).group(1)
    cfg = config.parse("store: {backend: yaml}\n" + block, "docs/moderation.md")
    eff = cfg.list_settings(cfg.lists["dev@example.org"].settings)
    assert (eff.nonmember_action, eff.max_message_size, eff.hold_days, eff.reply_to) == ("hold", 2000000, 14, "list")
    rules = moderation.rules_of(eff)
    assert moderation.decide(rules, "dev@example.org", "carol@partner.example", False).action == ACCEPT
    assert moderation.decide(rules, "dev@example.org", "carol@elsewhere.example", False).action == HOLD
    assert moderation.decide(rules, "dev@example.org", "newbie@example.net", True).action == HOLD


def test_the_docs_list_set_lines_work(tmp_path):
    from tests.bed.listmilter import cli
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}\n")
    cli(path, "list", "create", "dev@example.org")
    lines = [line.strip() for line in DOC.read_text().splitlines() if line.strip().startswith("listmilter list set")]
    assert len(lines) == 6
    for line in lines:
        cli(path, *shlex.split(line)[1:])
    show = cli(path, "list", "show", "dev@example.org").stdout
    assert re.search(r"accept_nonmembers\s.*bob@partner\.example", show) and "hold_days = 7" in show
    # listmilter held with nothing held (postqueue is only asked when there is something).
    assert cli(path, "held", "dev@example.org").stdout == "no held posts\n"


# -- the milter, in process (pymilter's TestCtx; tests/test_milter.py's harness) ------------------
@pytest.fixture
def mworld(tmp_path, monkeypatch):
    from tests import test_milter as tm
    monkeypatch.setattr(tm.Ctx, "quarantine", lambda self, reason: self.edits.append(("quarantine", reason)),
                        raising=False)
    w = tm._world(tmp_path, monkeypatch)
    yield w, tm
    w.store.close()


def test_the_milter_expands_a_held_post_then_quarantines_it(mworld):
    w, tm = mworld
    lst = w.new_list("dev@example.org", ["m1@example.com", "m2@example.com"], nonmember_action="hold",
                     owners=["boss@example.com"],
                     footer="-- \nLeave: {unsubscribe_url}\nSent to {member}\n")      # {member}: personal copies
    s = tm.Session()
    assert s.send("out@example.net", [lst], tm.post(to=lst)) == tm.Milter.ACCEPT
    kinds = [e[0] for e in s.ctx.edits]
    # Expanded in this message (not as personal copies: those would go before any approval), then held.
    assert kinds[-1] == "quarantine" and kinds.count("addrcpt") == 2 and "delrcpt" in kinds
    assert "out@example.net is not a member of dev@example.org" in s.ctx.edits[-1][1]
    [(argv, notice)] = w.submissions()          # the owners' notice, and no copy for any member
    assert "boss@example.com" in argv and b"Subject: Held for dev@example.org: hello (approve " in notice
    db = PendingDB(str(w.root / "state"))
    try:
        [row] = db.held_posts()
        assert (row.queue_id, row.sender, row.list) == (tm.QUEUE_ID, "out@example.net", lst)
    finally:
        db.close()
    # A member's post is not held.
    s2 = tm.Session()
    assert s2.send("m1@example.com", [lst], tm.post(sender="m1@example.com", to=lst)) == tm.Milter.DISCARD
    assert not any(e[0] == "quarantine" for e in s2.ctx.edits)


def test_a_notice_that_cannot_be_sent_defers_the_post_and_holds_nothing(mworld):
    w, tm = mworld
    lst = w.new_list("dev@example.org", ["m1@example.com"], moderated=True)
    w.fail_after.write_text("0")
    s = tm.Session()
    assert s.send("m1@example.com", [lst], tm.post(sender="m1@example.com", to=lst)) == tm.Milter.TEMPFAIL
    assert s.reply == ("451", "4.3.0", "listmilter: cannot hold the post; try again later") and s.ctx.edits == []
    db = PendingDB(str(w.root / "state"))
    try:
        assert db.held_posts() == []
    finally:
        db.close()


def test_a_discarding_list_drops_the_post_at_end_of_message(mworld):
    w, tm = mworld
    lst = w.new_list("dev@example.org", ["m1@example.com"], nonmember_action="discard")
    s = tm.Session()
    assert s.send("out@example.net", [lst], tm.post(to=lst)) == tm.Milter.DISCARD
    assert s.ctx.edits == [] and w.submissions() == []


# -- hostile posts: the owners' notice is always written -------------------------------------------
header_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300) | \
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape"))


@given(header_text, header_text, st.binary(max_size=2000))
@example("=?utf-8?b?SGVsbG8K?= $code ${list}", "\"Eve\r\n\" <eve@x.org>", b"\xff\xfe\r\n-- \r\nline\r\n")
@example("(approve aaaaaaaaaaaaaaaaaaaaaaaa) reject bbbbbbbbbbbbbbbbbbbbbbbb", "x@y.org", b"")  # look-alike codes
def test_the_owners_notice_is_written_for_any_post(subject, from_, body):
    import email
    import email.policy
    data = held.owner_notice(LIST_ADDRESS, ("boss@x.org",), "4ABC", CODE, "why", [("From", from_),
                             ("Subject", subject)], body, len(body), 14)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"].endswith(f"(approve {CODE})") and msg["Reply-To"] == "dev-request@example.org"
    assert moderation.reply_decision("Re: " + str(msg["Subject"]), []) == ("approve", CODE)
    assert "listmilter held approve 4ABC" in msg.get_content()


# -- Sendmail's quarantine: its listing (core/sendmail_queue.py) and its files (app/holdqueue.py) ------
MAILQ_QQ = """\
\t\t/var/spool/mqueue (3 requests)
-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------
6B2LbAjB025887      305 Wed Dec  2 21:37 <out@example.net>
     QUARANTINE: listmilter: held for the owners of dev@example.org: out@example.net is not a member
\t\t\t\t\t <m1@example.com>
\t\t\t\t\t <m2@example.com>
6B2LbAjB025888*       3 Tue Dec  1 09:05 <>
     QUARANTINE: another filter's reason
\t\t\t\t\t <x@example.com>
6B2LbAjB025889     1000 Thu Dec 31 23:59 <a@example.net>
                 (Deferred: Connection refused by [127.0.0.1])
\t\t\t\t\t <y@example.com>
\t\tTotal requests: 3
\t\t/var/spool/mqueue/q2 is empty
"""


def test_the_sendmail_quarantine_listing_is_read_entry_by_entry():
    now = time.mktime((2026, 12, 2, 22, 0, 0, 0, 0, -1))
    entries = sendmail_queue.parse_listing(MAILQ_QQ, now)
    assert [(e.queue_id, e.folder, e.size, e.sender, e.recipients) for e in entries] == [
        ("6B2LbAjB025887", "/var/spool/mqueue", 305, "out@example.net", 2),
        ("6B2LbAjB025888", "/var/spool/mqueue", 3, "", 1),
        ("6B2LbAjB025889", "/var/spool/mqueue", 1000, "a@example.net", 1)]
    assert entries[0].reason.startswith("listmilter: held for the owners of dev@example.org: out@")
    assert entries[1].reason == "another filter's reason" and entries[2].reason == ""
    # No year in the listing: the latest such moment, so 31 December is last year's.
    assert entries[0].arrival == time.mktime((2026, 12, 2, 21, 37, 0, 0, 0, -1))
    assert entries[2].arrival == time.mktime((2025, 12, 31, 23, 59, 0, 0, 0, -1))
    assert sendmail_queue.parse_listing("/var/spool/mqueue is empty\n\t\tTotal requests: 0\n", now) == []


@given(st.text(max_size=2000), st.floats(min_value=0, max_value=4e9))
@example(MAILQ_QQ.replace("Dec  2", "Feb 29"), 1.7e9)
@example(MAILQ_QQ.replace("305", "9" * 40), 1.7e9)
def test_any_listing_is_read_without_an_exception(text, now):
    for e in sendmail_queue.parse_listing(text, now):
        assert sendmail_queue.valid_id(e.queue_id) and e.size >= 0 and e.recipients >= 0


@pytest.mark.parametrize("queue_id, ok", [("6B2LbAjB025887", True), ("../../etc/passwd", False), ("", False),
                                          ("6B2LbAjB02588/", False), ("*", False), ("6B2LbAjB025887\n", False)])
def test_only_a_plain_queue_id_names_files(queue_id, ok):
    assert sendmail_queue.valid_id(queue_id) is ok


def test_removing_a_quarantined_entry_takes_its_files_and_waits_for_no_lock(tmp_path, monkeypatch):
    import subprocess
    import sys

    from listmilter.app import holdqueue
    qid = "6B2LbAjB025887"
    for name in (f"hf{qid}", f"df{qid}", f"xf{qid}", "qf6B2LbAjB025888", "df6B2LbAjB025888"):
        (tmp_path / name).write_text("x")
    monkeypatch.setattr(holdqueue, "LOCK_WAIT", 0.3)
    # Another process working on the entry (Sendmail locks its control file meanwhile).
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time\n"
                               f"f=open({str(tmp_path / ('hf' + qid))!r});fcntl.flock(f,fcntl.LOCK_SH)\n"
                               "print('locked',flush=True);time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(holdqueue.QueueError, match="locked by a Sendmail queue run"):
            holdqueue.remove_quarantined(str(tmp_path), qid)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / f"df{qid}").exists()            # nothing removed while it was locked
    assert holdqueue.remove_quarantined(str(tmp_path), qid) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["df6B2LbAjB025888", "qf6B2LbAjB025888"]
    assert holdqueue.remove_quarantined(str(tmp_path), qid) is False        # gone already
    assert holdqueue.remove_quarantined(str(tmp_path), "6B2LbAjB025888") is False   # not quarantined: a qf
    assert holdqueue.remove_quarantined(str(tmp_path), "../x") is False


def test_the_mta_key_chooses_the_queue(tmp_path):
    from listmilter.app import holdqueue
    cfg = config.parse("mta:\n  type: sendmail\n  sendmail: /usr/local/bin/sm\n")
    queue = holdqueue.queue_for(cfg)
    assert isinstance(queue, holdqueue.SendmailQueue) and queue.program == "/usr/local/bin/sm"
    assert isinstance(holdqueue.queue_for(config.parse("")), holdqueue.PostfixQueue)
    assert config.parse("mta:\n  type: sendmail\n").sendmail_program == "/usr/sbin/sendmail"
    for text, error in [("mta:\n  type: exim\n", "<string>:2: mta.type must be postfix or sendmail"),
                        ("mta:\n  sendmail: /usr/sbin/sendmail\n", "<string>:2: mta.sendmail is Sendmail's program; "
                                                                   "it needs mta.type: sendmail"),
                        ("mta:\n  type: sendmail\n  sendmail: sendmail\n", "<string>:3: mta.sendmail must be an "
                                                                             "absolute path"),
                        ("mta:\n  kind: sendmail\n", "<string>:2: unknown key 'kind' in mta")]:
        with pytest.raises(config.ConfigError) as info:
            config.parse(text)
        assert str(info.value).startswith(error), str(info.value)
