"""The pure core of subscriptions, without an MTA: commands, decisions, tokens, templates,
personal copies, the web app's parsing and the `web:` config keys."""

from __future__ import annotations

import email
import email.policy
import io
import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listmilter import web
from listmilter.app import notices
from listmilter.core import commands, config, headers, plan, subscriptions, tokens
from listmilter.core.keys import Keyring
from listmilter.core.model import MailingList, Member
from listmilter.core.subscriptions import MEMBER, OWNERS, SENDER, Policy, Request, Sent, State
from listmilter.core.tokens import Pending

SECRET = Keyring(((0, b"k" * 32),))
LIST = "dev@example.org"
TOKEN = "abcdefghijklmnopqrstuvwx"
SELF = Request("a@example.net", "A@example.net", "192.0.2.1")     # From: is the envelope sender


# -- commands ---------------------------------------------------------------------
@pytest.mark.parametrize("role, subject, body, kind", [
    ("subscribe", "", "", commands.SUBSCRIBE),
    ("unsubscribe", "whatever", "", commands.UNSUBSCRIBE),
    ("request", "subscribe", "", commands.SUBSCRIBE),
    ("request", "Re: Unsubscribe", "", commands.UNSUBSCRIBE),
    ("request", "", "\n> subscribe\nhelp\n", commands.HELP),
    ("request", "hello", "join please\n", commands.SUBSCRIBE),
    ("request", "", "blah\n-- \nsubscribe\n", commands.HELP),     # signature is not read
    ("request", "question", "what is this?\n", commands.HELP),   # anything else: help
])
def test_command_words(role, subject, body, kind):
    cmd = commands.parse(role, "", "a@example.net", "Ann <ann@example.net>", subject, body)
    assert cmd.kind == kind
    assert (cmd.address, cmd.name) == ("ann@example.net", "Ann")


def test_confirm_token_from_address_subject_or_body():
    cmd = commands.parse("confirm", TOKEN, "a@example.net", None, "Re: x", "")
    assert (cmd.kind, cmd.token, cmd.address) == (commands.CONFIRM, TOKEN, "a@example.net")
    cmd = commands.parse("confirm", "", "a@example.net", None, f"Re: Please confirm (confirm {TOKEN.upper()})", "")
    assert cmd.token == TOKEN
    cmd = commands.parse("request", "", "a@example.net", None, f"Re: Please confirm (confirm {TOKEN})", "")
    assert (cmd.kind, cmd.token) == (commands.CONFIRM, TOKEN)
    assert commands.parse("request", "", "a@example.net", None, "", f"confirm {TOKEN}\n").token == TOKEN


@pytest.mark.parametrize("sender, heads, reason", [
    ("", {}, "null sender"),
    ("a@x.org", {"auto-submitted": ["auto-replied"]}, "auto-submitted: auto-replied"),
    ("a@x.org", {"auto-submitted": ["auto-generated; type=vacation"]}, "auto-submitted"),
    ("a@x.org", {"precedence": ["Bulk"]}, "precedence: Bulk"),
    ("a@x.org", {"precedence": ["junk"]}, "precedence"),
    ("a@x.org", {"precedence": ["list"]}, "precedence"),
    ("a@x.org", {"list-id": ["Dev <dev.example.org>"]}, "mail loop"),
    ("a@x.org", {"x-loop": ["dev@example.org"]}, "mail loop"),
])
def test_ignored_senders(sender, heads, reason):
    assert reason in commands.ignore_reason(sender, heads, "dev.example.org")


def test_not_ignored():
    assert commands.ignore_reason("a@x.org", {"auto-submitted": ["no"], "list-id": ["<other.example.com>"],
                                              "precedence": ["first-class"]}, "dev.example.org") is None


# -- decisions ----------------------------------------------------------------------
def _pending(kind=tokens.CONFIRM, action="subscribe", list_key=LIST, created=None, done=None, days=3):
    created = time.time() if created is None else created
    return Pending(kind, list_key, "a@example.net", "", action, "mail", "<id>", created,
                   created + days * 86400, done, "")


def _templates(outcome):
    return [(m.template, m.to) for m in outcome.mails]


def test_subscribe_per_policy():
    fresh = State(is_member=False)
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy("confirm"), fresh, SELF)
    assert out.change is None and out.create == (tokens.CONFIRM, "subscribe")
    assert _templates(out) == [("confirm_subscribe", MEMBER)]
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy("open"), fresh, SELF)
    assert out.change == "subscribe" and _templates(out) == [("welcome", MEMBER)]
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy("open", owner_notices=True), fresh, SELF)
    assert _templates(out) == [("welcome", MEMBER), ("owner_joined", OWNERS)]
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy("moderate"), fresh, SELF)
    assert out.change is None and out.create == (tokens.MODERATE, "subscribe")
    assert _templates(out) == [("moderation_waiting", MEMBER), ("moderation_request", OWNERS)]
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy("confirm+moderate"), fresh, SELF)
    assert out.create == (tokens.CONFIRM, "subscribe")
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy("open"), State(is_member=True), SELF)
    assert out.change is None and _templates(out) == [("already_member", MEMBER)]


def test_unsubscribe_confirmed_or_at_once():
    member = State(is_member=True)
    out = subscriptions.on_command(commands.UNSUBSCRIBE, Policy(), member, SELF)
    assert out.change is None and out.create == (tokens.CONFIRM, "unsubscribe")
    out = subscriptions.on_command(commands.UNSUBSCRIBE, Policy(unsubscribe_confirm=False), member, SELF)
    assert out.change == "unsubscribe" and _templates(out) == [("goodbye", MEMBER)]
    out = subscriptions.on_command(commands.UNSUBSCRIBE, Policy(), State(is_member=False), SELF)
    assert out.change is None and _templates(out) == [("not_member", MEMBER)]


def test_nothing_new_while_pending_and_limits():
    pending = State(is_member=False, pending=_pending())
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy(), pending, SELF)
    assert out.ignored and "already pending" in out.status and not out.mails
    moderated = State(is_member=False, pending=_pending(tokens.MODERATE))
    assert "approval already pending" in \
        subscriptions.on_command(commands.SUBSCRIBE, Policy(), moderated, SELF).status
    state = State(False, sent=Sent(to_sender=3, to_address=3))      # more: tests/test_subscription_abuse_core.py
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy(), state, SELF)
    assert out.ignored and out.status.startswith("ignored (limit") and out.create is None
    assert subscriptions.on_command(commands.HELP, Policy(), state, SELF).ignored
    assert not subscriptions.on_command(commands.SUBSCRIBE, Policy(), State(False, sent=Sent(2, 2)), SELF).ignored


def test_tokens_refused():
    now = time.time()
    policy = Policy()
    for pending, reason in ((None, "unknown"), (_pending(list_key="other@example.org"), "mismatch"),
                            (_pending(done=now - 5), "used"), (_pending(created=now - 4 * 86400), "expired")):
        out = subscriptions.on_token(pending, LIST, policy, now)
        assert out.refused and out.reason == reason and out.change is None and out.create is None
        assert _templates(out) == [("token_refused", SENDER)]
        assert reason in subscriptions.REFUSAL_TEXT
    # Refusals are replies to unverified mail: they count toward the limits too.
    assert subscriptions.on_token(None, LIST, policy, now, state=State(False, sent=Sent(to_sender=3))).ignored


def test_tokens_accepted():
    now = time.time()
    out = subscriptions.on_token(_pending(), LIST, Policy(), now)
    assert (out.change, out.close) == ("subscribe", "confirmed")
    out = subscriptions.on_token(_pending(action="unsubscribe"), LIST, Policy(subscribe="moderate"), now)
    assert (out.change, out.close) == ("unsubscribe", "confirmed")      # leaving is never moderated
    out = subscriptions.on_token(_pending(), LIST, Policy("confirm+moderate"), now)
    assert out.change is None and out.create == (tokens.MODERATE, "subscribe") and out.close == "confirmed"
    # Moderation tokens: owners only.
    out = subscriptions.on_token(_pending(tokens.MODERATE), LIST, Policy("moderate"), now)
    assert out.refused and out.reason == "not owner"
    out = subscriptions.on_token(_pending(tokens.MODERATE), LIST, Policy("moderate"), now, sender_is_owner=True)
    assert (out.change, out.close) == ("subscribe", "approved")
    out = subscriptions.on_token(_pending(tokens.MODERATE), LIST, Policy("moderate"), now, sender_is_owner=True,
                                 reject=True)
    assert out.change is None and out.close == "rejected" and _templates(out) == [("rejected", MEMBER)]


# -- the pending database ----------------------------------------------------------------
def test_pending_tokens_single_use_expiry_and_counters(state):
    db = state.pending()
    token = db.create(tokens.CONFIRM, "Dev@Example.org", "A@example.net", "subscribe", 3, "Ann")
    assert tokens.TOKEN_RE.fullmatch(token)
    p = db.lookup(token.upper())
    assert (p.list, p.address, p.action, p.name) == (LIST, "A@example.net", "subscribe", "Ann")
    assert db.open_request(LIST, "a@example.net").hash == p.hash
    assert [w.address for w in db.waiting()] == ["A@example.net"] and db.waiting("x@example.org") == []
    assert db.claim(p.hash, "confirmed")
    assert not db.claim(p.hash, "confirmed")           # single use
    assert db.lookup(token).state(time.time()) == "used"
    db.release(p.hash)
    assert db.claim(p.hash, "confirmed")
    old = db.create(tokens.CONFIRM, LIST, "b@example.net", "subscribe", 1, now=time.time() - 2 * 86400)
    assert db.lookup(old).state(time.time()) == "expired"
    assert not db.claim(db.lookup(old).hash, "confirmed")
    assert db.lookup("z" * 24) is None
    db.record_sent(LIST, "a@example.net", "help")
    db.record_sent(LIST, "b@example.net", "help", now=time.time() - 2 * 86400)
    assert db.sent_today(LIST, "A@example.net") == 1 and db.sent_today(LIST) == 1
    db.purge(now=time.time() + 10 * 86400)
    assert db.lookup(token) is None
    db.close()


# One-click tokens: tests/test_tokens.py (and tests/test_reference.py for old links).


# -- templates --------------------------------------------------------------------------
def test_templates_render_and_override(tmp_path):
    subject, text = notices.render(notices.template_text("confirm_subscribe"),
                                   {"list": LIST, "address": "a@example.net", "token": TOKEN, "days": "3",
                                    "confirm_url": ""})
    assert subject == f"Please confirm: join {LIST} (confirm {TOKEN})"
    assert tokens.find_token("Re: " + subject) == TOKEN
    assert "link" not in text and "3 days" in text
    _, text = notices.render(notices.template_text("confirm_subscribe"), {"confirm_url": "https://l/c/x"})
    assert "    https://l/c/x" in text
    (tmp_path / "welcome.txt").write_text("Subject: Hi $list\n\nYo $address, $unknown\n")
    assert notices.render(notices.template_text("welcome", str(tmp_path)), {"list": LIST, "address": "a@b.c"}) \
        == (f"Hi {LIST}", "Yo a@b.c, $unknown\n")
    assert "Goodbye" not in notices.template_text("goodbye", str(tmp_path))     # falls back to the shipped one
    for name in subscriptions.LIMITED | {"welcome", "goodbye", "rejected", "moderation_request",
                                         "owner_joined", "owner_left"}:
        assert notices.template_text(name).startswith("Subject: ")


# -- posts: headers and personal copies ---------------------------------------------------
def test_list_unsubscribe_headers():
    plain = dict(headers.list_headers(LIST, "dev.example.org", "", "members"))
    assert plain["List-Unsubscribe"] == "<mailto:dev-unsubscribe@example.org>"
    assert "List-Unsubscribe-Post" not in plain
    personal = dict(headers.list_headers(LIST, "dev.example.org", "", "members", "https://l/u/T"))
    assert personal["List-Unsubscribe"] == "<https://l/u/T>, <mailto:dev-unsubscribe@example.org>"
    assert personal["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_personal_copies():
    ls = plan.ListSettings(LIST, "open", "[dev] ", "", "dev.example.org")
    head = [("From", "carol@example.net"), ("Subject", "hi"), ("List-Unsubscribe", "<mailto:x@y.z>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
    copies = plan.personal_copies(ls, ["a+b@example.net", "A+B@example.net", "c@example.com", LIST],
                                  head, b"body\r\n", "QID1", SECRET, lambda m: f"https://l/u/{m}", 1e9)
    assert copies.sender == "dev-bounces@example.org"
    assert copies.mail_options[0] == "RET=HDRS" and copies.mail_options[1] == f"ENVID={copies.envid}"
    assert [c[0] for c in copies.copies] == ["a+b@example.net", "c@example.com"]     # once each, never the list
    rcpt, options, data = copies.copies[0]
    assert options == ("NOTIFY=FAILURE", "ORCPT=rfc822;a+2Bb@example.net")           # xtext
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "[dev] hi"
    assert msg.get_all("List-Unsubscribe") == ["<https://l/u/a+b@example.net>, <mailto:dev-unsubscribe@example.org>"]
    assert msg.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    assert msg["List-Id"] == "<dev.example.org>" and msg.get_content().strip() == "body"
    assert b"\r\n\r\nbody\r\n" in data and b"\n\n" not in data.replace(b"\r\n", b"")


# -- the web app ------------------------------------------------------------------------
def test_client_address_behind_a_trusted_proxy():
    env = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9, 198.51.100.2"}
    assert web.client_address(env, ()) == "127.0.0.1"               # not trusted: X-F-F ignored
    assert web.client_address(env, ("127.0.0.1",)) == "198.51.100.2"
    assert web.client_address(env, ("127.0.0.1", "198.51.100.2")) == "203.0.113.9"
    assert web.client_address({**env, "HTTP_X_FORWARDED_FOR": "junk"}, ("127.0.0.1",)) == "127.0.0.1"
    # ip_address() reads any text after an IPv6 "%" as a zone: not an address of a client.
    forged = {**env, "HTTP_X_FORWARDED_FOR": "fe80::1%x status=unsubscribed (admin)"}
    assert web.client_address(forged, ("127.0.0.1",)) == "127.0.0.1"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.ip_addresses().map(str),
                          st.ip_addresses(v=6).map(lambda a: f"{a}%eth0 x=y")), max_size=4))
def test_the_client_recorded_is_an_address(chain):
    env = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": ", ".join(chain)}
    client = web.client_address(env, ("127.0.0.1",))
    assert client == "127.0.0.1" or (ipaddress.ip_address(client) and "%" not in client)


class _Runtime:
    def __init__(self, tmp_path):
        self.config = config.parse(f"state_dir: {tmp_path}\nweb:\n  base_url: https://l.example\n")
        self.secret = SECRET
        self._next_check = 0

        class Store:      # one list, one member who joined at time 5
            def get_list(self, address):
                return MailingList(LIST) if address == LIST else None

            def member(self, list_address, address):
                return Member(address, added=5.0) if address == "a@example.net" else None

            def release(self):
                pass
        self.store = Store()

    def current(self):
        return self.config, self.store


def _call(app, method, path, body=b""):
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": "192.0.2.1",
           "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    got = {}
    out = b"".join(app(env, lambda status, hdrs: got.update(status=status)))
    return int(got["status"].split()[0]), out.decode()


def test_web_routes(tmp_path):
    app = web.App(_Runtime(tmp_path))
    t = tokens.unsubscribe_token(SECRET, LIST, "a@example.net", 5.0)
    status, page = _call(app, "GET", f"/u/{t}")
    assert status == 200 and 'name="List-Unsubscribe" value="One-Click"' in page and "a@example.net" not in page
    assert _call(app, "HEAD", f"/u/{t}") == (200, "")
    assert _call(app, "POST", f"/u/{t}", b"")[0] == 400                              # not a one-click POST
    gone = tokens.unsubscribe_token(SECRET, "gone@example.org", "a@example.net", 5.0)
    status, page = _call(app, "GET", f"/u/{gone}")
    assert status == 404 and "does not exist" in page
    assert _call(app, "POST", f"/u/{gone}", b"List-Unsubscribe=One-Click")[0] == 404
    # A link of an earlier membership (the address left and joined again at time 5).
    earlier = tokens.unsubscribe_token(SECRET, LIST, "a@example.net", 4.0)
    for method, body in (("GET", None), ("POST", b"List-Unsubscribe=One-Click")):
        status, page = _call(app, method, f"/u/{earlier}", body or b"")
        assert status == 410 and "earlier subscription" in page and "dev-unsubscribe@example.org" in page
    assert _call(app, "POST", "/u/forged", b"List-Unsubscribe=One-Click")[0] == 400
    assert _call(app, "GET", "/u/forged")[0] == 400
    assert _call(app, "GET", f"/confirm/{TOKEN}")[0] == 404
    assert _call(app, "GET", "/")[0] == 404
    assert _call(app, "DELETE", f"/u/{t}")[0] == 405
    assert _call(app, "POST", f"/u/{t}", b"x" * 5000)[0] == 413


# -- config -------------------------------------------------------------------------------
def test_web_config():
    cfg = config.parse('web:\n  listen: "127.0.0.1:8025"\n  base_url: "https://lists.example.org/"\n'
                       '  trusted_proxies: [127.0.0.1, "::1"]\n')
    assert cfg.web.listen == "127.0.0.1:8025" and cfg.web.base_url == "https://lists.example.org"
    assert cfg.web.trusted_proxies == ("127.0.0.1", "::1")
    assert config.parse("").web.base_url is None
    for text, error in (("web:\n  listen: 8025\n", ":2: web.listen must be HOST:PORT"),
                        ("web:\n  base_url: ftp://x\n", ":2: web.base_url must be an http(s) URL"),
                        ("web:\n  trusted_proxies: [nope]\n", ":2: web.trusted_proxies: not an IP"),
                        ("web:\n  port: 1\n", ":2: unknown key 'port' in web")):
        with pytest.raises(config.ConfigError) as info:
            config.parse(text, "c.yaml")
        assert error in str(info.value) and str(info.value).startswith("c.yaml:")


def test_subscription_settings():
    cfg = config.parse("defaults:\n  subscribe_policy: confirm+moderate\n  unsubscribe_confirm: false\n")
    assert subscriptions.policy_from(cfg.list_settings({})) == Policy("confirm+moderate", False, False, 3, 3, 100)
    for text in ("defaults:\n  subscribe_policy: maybe\n", "defaults:\n  templates: relative/dir\n",
                 "defaults:\n  confirm_days: 0\n"):
        with pytest.raises(config.ConfigError):
            config.parse(text)


@pytest.mark.mta      # starts the SMTP sink
def test_send_copies_skips_permanent_refusals_and_fails_on_temporary_ones():
    from listmilter.app import outgoing
    from listmilter.core.config import Outgoing
    from tests.bed.sink import Sink
    with Sink() as sink:
        out = Outgoing(smtp_host="127.0.0.1", smtp_port=sink.port)
        sink.replies["gone@example.net"] = "550 5.1.1 no such user"
        sink.replies["busy@example.net"] = "450 4.2.1 try later"
        copy = lambda a: (a, ("NOTIFY=FAILURE", f"ORCPT=rfc822;{a}"), b"Subject: x\r\n\r\nx\r\n")  # noqa: E731
        refused = outgoing.send_copies(out, "dev-bounces@example.org", ("RET=HDRS", "ENVID=x.y"), "x.y",
                                       [copy("a@example.net"), copy("gone@example.net"), copy("b@example.net")])
        assert list(refused) == ["gone@example.net"] and refused["gone@example.net"].startswith("550")
        assert sink.recipients() == ["a@example.net", "b@example.net"]
        assert "ENVID=X.Y" in sink.messages[0].mail_options     # aiosmtpd upper-cases parameters
        assert "NOTIFY=FAILURE" in sink.messages[0].rcpt_options[0]
        with pytest.raises(outgoing.OutgoingError):
            outgoing.send_copies(out, "dev-bounces@example.org", (), "x.y", [copy("busy@example.net")])


def test_check_reports_the_web_keys(tmp_path, monkeypatch):
    from listmilter.cli import check
    from tests.bed.postfix import backdate
    # An empty Postfix config, so postconf answers at once (a missing one costs its 1 s fatal sleep).
    (tmp_path / "main.cf").write_text("")
    (tmp_path / "master.cf").write_text("")
    backdate(tmp_path)
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path}/s\nweb:\n  listen: 127.0.0.1:8025\n  base_url: http://l.example\n")
    report = check.run(str(path), True)
    assert any(n.startswith("web: base_url=http://l.example, listen=127.0.0.1:8025") for n in report.notes)
    assert any("is not https" in w for w in report.warnings)
    path.write_text(f"state_dir: {tmp_path}/s\nweb:\n  listen: 127.0.0.1:8025\n")
    assert any("without web.base_url" in w for w in check.run(str(path), True).warnings)
