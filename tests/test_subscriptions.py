"""Subscriptions through the real Postfix and a real `listmilter web`, on both stores.

The bed's listmilter gets a `web:` section, so list posts go out as personal
copies with one-click List-Unsubscribe URLs pointing at the `listmilter web`
this module starts (as the pipe transport's user, as in production).
"""

from __future__ import annotations

import base64
import datetime
import re
import signal
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from tests.bed.listmilter import cli
from tests.bed.net import free_port, wait_until
from tests.conftest import message
from tests.test_reference import u1_token


@pytest.fixture(scope="module")
def web(bed):
    """`listmilter web` on a free 127.0.0.1 port, configured as web.listen and web.base_url."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    lm = bed.listmilter
    lm.extra["web"] = {"listen": f"127.0.0.1:{port}", "base_url": base}
    mark = len(lm.log())
    lm.write_config()
    # serve looks at the file's mtime at most once a second, when asked something: ask until it has.
    wait_until(lambda: lm.knows("nobody@example.org") is False and "config reloaded" in lm.log()[mark:],
               15, interval=0.2, what="serve to read the web: section")
    try:
        with bed.listmilter.web(port):
            bed.web_log = bed.listmilter.web_log
            yield base
    finally:
        del bed.listmilter.extra["web"]
        bed.listmilter.write_config()


@pytest.fixture
def sbed(clean_bed, web):
    clean_bed.web = web
    return clean_bed


def admin(bed, *args, check=True):
    """The CLI as root, as an admin runs it (the files it touches stay usable by the
    pipe and web user: listmilter hands them over itself, nothing here chowns them)."""
    return cli(bed.listmilter.config_path, *args, check=check)


def role(lst: str, name: str) -> str:
    return lst.replace("@", f"-{name}@")


def mail_to(bed, address: str, subject: str = "", timeout: float = 60):
    """Wait for a message at the sink for `address` whose Subject contains `subject`
    and that no earlier call returned; return it."""
    seen = bed.__dict__.setdefault("seen", set())

    def find():
        for m in bed.sink.for_recipient(address):
            if hash(m.content) not in seen and subject in str(m.message["Subject"]):
                return m
        return None
    found = wait_until(find, timeout, what=f"mail for {address} with {subject!r} in the subject")
    seen.add(hash(found.content))
    return found


def wait_log(bed, text: str, timeout: float = 60):
    wait_until(lambda: text in bed.deliver_log(), timeout, what=f"{text!r} in the deliver log")


def http(url: str, data: bytes | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(bed, lst: str, subject: str, sender: str = "carol@example.net"):
    bed.smtp(sender, [lst], message(subject, sender, lst))


def one_click_url(received) -> str:
    value = received.message["List-Unsubscribe"]
    return re.match(r"<(https?://[^>]+)>", value).group(1)


def _token(received) -> str:
    return re.search(r"confirm ([a-z2-7]{24})", str(received.message["Subject"])).group(1)


def history(bed, lst: str, address: str) -> list[list[str]]:
    out = cli(bed.listmilter.config_path, "members", "history", lst, address, "--csv").stdout
    return [line.split(",") for line in out.splitlines()[1:]]


ONE_CLICK = b"List-Unsubscribe=One-Click"


def test_subscribe_by_mail_confirm_by_reply_then_one_click_unsubscribe(sbed, owner):
    bed = sbed
    lst = bed.new_list(["old@example.net"], posting="open", owner_notices="true", owners=(owner,))
    new = "new@example.net"

    # 1. Any message to -subscribe@: a confirmation, and no change yet (double opt-in).
    bed.smtp(new, [role(lst, "subscribe")], message("please", new, role(lst, "subscribe")))
    confirmation = mail_to(bed, new, "Please confirm")
    subject = str(confirmation.message["Subject"])
    token = re.search(r"confirm ([a-z2-7]{24})", subject).group(1)
    assert confirmation.message["Reply-To"] == role(lst, f"confirm+{token}")
    assert confirmation.message["Auto-Submitted"] == "auto-replied"
    assert f"{bed.web}/confirm/{token}" in confirmation.message.get_content()
    assert "new@example.net" not in cli(bed.listmilter.config_path, "members", "ls", lst).stdout
    assert f"{lst}\t{new}\tsubscribe\tawaiting-confirmation" in \
        cli(bed.listmilter.config_path, "pending", lst).stdout

    # 2. A plain reply (to the Reply-To, subject kept) subscribes; welcome and owner notice follow.
    reply = message(f"Re: {subject}", new, role(lst, f"confirm+{token}"), body="> quoted\n")
    bed.smtp(new, [role(lst, f"confirm+{token}")], reply)
    welcome = mail_to(bed, new, "Welcome")
    assert str(welcome.message["Subject"]) == f"Welcome to {lst}"
    assert "/u/" in welcome.message.get_content()          # their own one-click link
    mail_to(bed, owner, f"{new} joined")
    record = history(bed, lst, new)
    assert record[-1][2:4] == ["subscribed", "mail"] and record[-1][4].startswith("<")

    # 3. The next post reaches them: a copy of their own, with a one-click URL of their own.
    post(bed, lst, "first post")
    got = mail_to(bed, new, "first post")
    old = mail_to(bed, "old@example.net", "first post")
    assert got.message["Subject"] == "first post"
    assert got.rcpt_tos == [new] and old.rcpt_tos == ["old@example.net"]
    # From their own VERP sender, <list>-bounces+CODE@ (docs/bounces.md).
    assert got.mail_from.startswith(role(lst, "bounces").partition("@")[0] + "+") and old.mail_from != got.mail_from
    assert "NOTIFY=FAILURE" in got.rcpt_options[0] and f"ORCPT=RFC822;{new.upper()}" in got.rcpt_options[0]
    assert "RET=HDRS" in got.mail_options and any(o.startswith("ENVID=") for o in got.mail_options)
    assert got.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got.message["List-Unsubscribe"].endswith(f"<mailto:{role(lst, 'unsubscribe')}>")
    url = one_click_url(got)
    assert url.startswith(f"{bed.web}/u/") and "new" not in url and "example.net" not in url
    assert url != one_click_url(old)
    assert "fanned out (personal copies)" in bed.deliver_log()

    # 4. GET (a link scanner) shows a button and unsubscribes nobody.
    status, body = http(url)
    assert status == 200 and 'method="post"' in body and "One-Click" in body
    assert new in cli(bed.listmilter.config_path, "members", "ls", lst).stdout

    # 5. The RFC 8058 POST unsubscribes at once; the next post does not reach them.
    status, body = http(url, ONE_CLICK)
    assert status == 200 and "unsubscribed" in body
    assert new not in cli(bed.listmilter.config_path, "members", "ls", lst).stdout
    assert history(bed, lst, new)[-1][2:5] == ["unsubscribed", "web", "127.0.0.1"]
    assert http(url, ONE_CLICK)[0] == 200               # again: nothing left to do, no error
    bed.sink.clear()
    post(bed, lst, "second post")
    mail_to(bed, "old@example.net", "second post")
    bed.settle()
    assert [r for r in bed.sink.recipients() if r != owner] == ["old@example.net"]


def test_forged_reused_and_expired_tokens_change_nothing(sbed):
    bed = sbed
    lst = bed.new_list(["x@example.net", "leaver@example.net", "leaver2@example.net"], posting="open")
    # The web: a forged and a tampered one-click link, a made-up confirmation link.
    assert http(f"{bed.web}/u/not-a-real-token", ONE_CLICK)[0] == 400
    post(bed, lst, "for a real link")
    url = one_click_url(mail_to(bed, "x@example.net", "for a real link"))
    tampered = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    assert http(tampered, ONE_CLICK)[0] == 400
    assert http(f"{bed.web}/confirm/{'a' * 24}", b"")[0] == 404
    assert http(f"{bed.web}/confirm/{'a' * 24}")[0] == 404
    assert "x@example.net" in cli(bed.listmilter.config_path, "members", "ls", lst).stdout

    # Mail: a made-up token is refused with a clear reply.
    f = "forger@example.net"
    bed.smtp(f, [role(lst, "confirm+" + "b" * 24)], message("confirm", f, role(lst, "confirm")))
    refusal = mail_to(bed, f, "Not confirmed")
    assert "not one we issued" in refusal.message.get_content()

    # A real token: used once (on the web this time), then refused as reused.
    joiner = "joiner@example.net"
    bed.smtp(joiner, [role(lst, "request")], message("subscribe", joiner, role(lst, "request")))
    token = _token(mail_to(bed, joiner, "Please confirm: join"))
    status, body = http(f"{bed.web}/confirm/{token}")           # GET: a button, no change
    assert status == 200 and "join" in body
    assert joiner not in cli(bed.listmilter.config_path, "members", "ls", lst).stdout
    status, body = http(f"{bed.web}/confirm/{token}", b"")
    assert status == 200 and "now subscribed" in body
    assert history(bed, lst, joiner)[-1][2:5] == ["subscribed", "web", "127.0.0.1"]
    mail_to(bed, joiner, "Welcome")                                         # welcome
    bed.smtp(joiner, [role(lst, f"confirm+{token}")], message(f"Re: confirm {token}", joiner, lst))
    assert "already used" in mail_to(bed, joiner, "Not confirmed").message.get_content()
    assert http(f"{bed.web}/confirm/{token}", b"")[0] == 400

    # An expired token (made old in pending.sqlite) is refused; the leave does not happen.
    leaver = "leaver@example.net"
    bed.smtp(leaver, [role(lst, "unsubscribe")], message("bye", leaver, role(lst, "unsubscribe")))
    token = _token(mail_to(bed, leaver, "Please confirm: leave"))
    db = sqlite3.connect(bed.listmilter.state_dir / "pending.sqlite", timeout=10)
    with db:
        db.execute("UPDATE pending SET expires=? WHERE done IS NULL AND key=?", (time.time() - 1, leaver))
    db.close()
    bed.smtp(leaver, [role(lst, f"confirm+{token}")], message(f"Re: confirm {token}", leaver, lst))
    assert "expired" in mail_to(bed, leaver, "Not confirmed").message.get_content()
    # A token of this list used at another list's confirm address is refused too.
    other = bed.new_list([], posting="open")
    leaver2 = "leaver2@example.net"
    bed.smtp(leaver2, [role(lst, "unsubscribe")], message("bye", leaver2, role(lst, "unsubscribe")))
    token = _token(mail_to(bed, leaver2, "Please confirm: leave"))
    bed.smtp(leaver2, [role(other, f"confirm+{token}")], message(f"Re: confirm {token}", leaver2, other))
    assert "does not belong to this list" in mail_to(bed, leaver2, "Not confirmed").message.get_content()
    bed.settle()
    assert sorted(cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split()) == \
        sorted([joiner, leaver, leaver2, "x@example.net"])
    # Asked again, leaving works: a reply that lost the +TOKEN (sent to -request@) still
    # carries the code in its Subject.
    bed.smtp(leaver, [role(lst, "request")], message("unsubscribe", leaver, role(lst, "request")))
    confirmation = mail_to(bed, leaver, "Please confirm: leave")
    bed.smtp(leaver, [role(lst, "request")],
             message(f"Re: {confirmation.message['Subject']}", leaver, role(lst, "request")))
    assert "no longer subscribed" in mail_to(bed, leaver, "You have left").message.get_content()
    assert history(bed, lst, leaver)[-1][2:4] == ["unsubscribed", "mail"]
    assert leaver not in cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split()
    log = bed.deliver_log()
    for reason in ("token unknown", "token used", "token expired", "token mismatch"):
        assert f"status=refused ({reason})" in log
    assert "refused (forged or damaged unsubscribe link)" in bed.web_log.read_text()


def test_bombing_limits_and_ignored_senders(sbed):
    bed = sbed
    lst = bed.new_list([], posting="open", confirm_limit_per_address="2")
    victim = "victim@example.net"
    # Three requests: one confirmation, the others wait for it (no new one while pending).
    for _ in range(3):
        bed.smtp(victim, [role(lst, "subscribe")], message("join", victim, role(lst, "subscribe")))
    wait_until(lambda: bed.deliver_log().count("ignored (confirmation already pending)") >= 2, 60,
               what="the repeated requests")
    # Help requests: the second reply reaches the per-address limit of 2; the third is not sent.
    for _ in range(2):
        bed.smtp(victim, [role(lst, "request")], message("help", victim, role(lst, "request")))
    wait_log(bed, "ignored (limit confirm_limit_per_address: 2 replies to this address today)")
    # Null sender, auto-responders, bulk mail and our own list's mail: ignored, not answered.
    bed.smtp("", [role(lst, "subscribe")], message("join", "mailer-daemon@example.net", role(lst, "subscribe")))
    bed.smtp("vacation@example.net", [role(lst, "subscribe")],
             message("Re: join", "vacation@example.net", role(lst, "subscribe"),
                     extra="Auto-Submitted: auto-replied\r\n"))
    bed.smtp("bulk@example.net", [role(lst, "request")],
             message("subscribe", "bulk@example.net", role(lst, "request"), extra="Precedence: bulk\r\n"))
    bed.smtp("loop@example.net", [role(lst, "request")],
             message("subscribe", "loop@example.net", role(lst, "request"),
                     extra=f"List-Id: <{lst.replace('@', '.')}>\r\n"))
    bed.smtp("xloop@example.net", [role(lst, "request")],
             message("subscribe", "xloop@example.net", role(lst, "request"), extra=f"X-Loop: {lst}\r\n"))
    # Mail from one of the list's own addresses (a notice of ours coming back) is never answered.
    bed.smtp(role(lst, "bounces"), [role(lst, "request")],
             message("subscribe", role(lst, "bounces"), role(lst, "request")))
    for reason in ("null sender", "auto-submitted: auto-replied", "precedence: bulk",
                   "mail loop: the message carries this list's List-Id", "mail loop: X-Loop",
                   "mail from this list's own addresses"):
        wait_log(bed, f"status=ignored ({reason}")
    bed.settle()
    got = sorted(str(m.message["Subject"]).split(":")[0] for m in bed.sink.for_recipient(victim))
    assert got == ["Help for " + lst, "Please confirm"], got
    assert not [r for r in bed.sink.recipients() if r != victim]
    assert "victim@example.net" not in cli(bed.listmilter.config_path, "members", "ls", lst).stdout


def test_moderated_list_owner_decides_with_the_cli_or_by_reply_and_nobody_else_can(sbed, owner):
    bed = sbed
    lst = bed.new_list([], posting="open", subscribe_policy="moderate", owners=(owner,))
    a, b, c, d = "a@example.net", "b@example.net", "c@example.net", "d@example.net"
    for who in (a, b, c, d):
        bed.smtp(who, [role(lst, "subscribe")], message("join", who, role(lst, "subscribe")))
        assert "awaits approval" in str(mail_to(bed, who, "awaits approval").message["Subject"])
    wait_until(lambda: len(bed.sink.for_recipient(owner)) >= 4, 60, what="four owner notices")
    notices = {re.search(r"Approve: (\S+)", str(m.message["Subject"])).group(1): m
               for m in bed.sink.for_recipient(owner)}
    out = cli(bed.listmilter.config_path, "pending", lst).stdout
    for who in (a, b, c, d):
        assert f"{who}\tsubscribe\tawaiting-approval" in out
    # The CLI approves a.
    proc = admin(bed, "approve", lst, a)
    assert "subscribed (approved)" in proc.stdout
    assert str(mail_to(bed, a, "Welcome").message["Subject"]) == f"Welcome to {lst}"
    assert history(bed, lst, a)[-1][2:4] == ["subscribed", "owner"]
    # The owner rejects b by replying to the notice.
    reply_to = notices[b].message["Reply-To"]
    bed.smtp(owner, [reply_to], message(f"Re: {notices[b].message['Subject']}", owner, reply_to, body="reject\n"))
    assert "did not approve" in mail_to(bed, b, "Your request").message.get_content()
    # Someone else replying to c's notice (it leaked, or was guessed) changes nothing.
    reply_to = notices[c].message["Reply-To"]
    bed.smtp("mallory@example.net", [reply_to],
             message(f"Re: {notices[c].message['Subject']}", "mallory@example.net", reply_to, body="approve\n"))
    wait_until(lambda: any("from=<mallory@example.net>" in line and f"list=<{lst}>, role=confirm" in line
                           and "status=refused (" in line and "non-owner)" in line
                           for line in bed.deliver_log().splitlines()), 60, what="the refusal")
    assert f"{c}\tsubscribe\tawaiting-approval" in cli(bed.listmilter.config_path, "pending", lst).stdout
    # `listmilter reject`: d is told, and nothing waits any more.
    proc = admin(bed, "reject", lst, d)
    assert proc.returncode == 0 and d in proc.stdout
    assert "did not approve" in mail_to(bed, d, "Your request").message.get_content()
    bed.settle()
    assert cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split() == [a]
    pending = cli(bed.listmilter.config_path, "pending", lst).stdout
    assert c in pending and b not in pending and d not in pending
    assert admin(bed, "approve", lst, b, check=False).returncode == 1
    assert admin(bed, "reject", lst, d, check=False).returncode == 1
    (only,) = bed.sink.for_recipient(c)                  # "awaits approval", and no welcome
    assert "awaits approval" in str(only.message["Subject"])


def test_personal_copies_skip_refused_members_and_one_click_off_stays_in_place(sbed):
    bed = sbed
    # A member the MTA refuses for good (an unknown local user) is logged and skipped.
    lst = bed.new_list(["p1@example.net", "nosuchuser@example.org", "p2@example.com"], posting="open")
    post(bed, lst, "personal")
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert sorted(bed.sink.recipients()) == ["p1@example.net", "p2@example.com"]
    assert all(len(m.rcpt_tos) == 1 for m in bed.sink.messages)
    assert "member refused (550" in bed.deliver_log() and "to=<nosuchuser@example.org>" in bed.deliver_log()
    # one_click: false: one message for all, in place, with the mailto: link only.
    bed.sink.clear()
    lst = bed.new_list(["q1@example.net", "q2@example.com"], posting="open", one_click="false")
    post(bed, lst, "shared")
    bed.sink.wait_for_recipients(2)
    bed.settle()
    (only,) = bed.sink.messages
    assert sorted(only.rcpt_tos) == ["q1@example.net", "q2@example.com"]
    assert only.message["List-Unsubscribe"] == f"<mailto:{role(lst, 'unsubscribe')}>"
    assert only.message["List-Unsubscribe-Post"] is None


def _key_id(url: str) -> int:
    token = url.rsplit("/", 1)[1]
    return int.from_bytes(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[1:3], "big")


def _members(bed, lst: str) -> list[str]:
    return cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split()


def test_one_click_links_across_a_key_rotation_and_a_new_membership(sbed):
    bed = sbed
    ann = "ann@example.net"
    lst = bed.new_list([ann, "bob@example.net"], posting="open")
    post(bed, lst, "before the rotation")
    before = one_click_url(mail_to(bed, ann, "before the rotation"))
    kid = _key_id(before)

    # The admin rotates the secret; serve takes the new key at its next message, or at once on reload.
    proc = admin(bed, "secret", "rotate")
    assert f"key {kid + 1} is now current" in proc.stdout
    shown = cli(bed.listmilter.config_path, "secret", "show").stdout
    assert f"key {kid + 1}: current" in shown and f"key {kid}: accepted until" in shown
    reloads = bed.listmilter.log().count("config reloaded from")
    bed.listmilter.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: bed.listmilter.log().count("config reloaded from") > reloads, 20, what="serve's reload")

    # 1. A link made before the rotation still unsubscribes (the old key is in its grace period).
    status, body = http(before, ONE_CLICK)
    assert status == 200 and "You have been unsubscribed" in body
    assert ann not in _members(bed, lst)

    # 2. Ann joins again: a new membership, with links of its own (made with the new key).
    bed.smtp(ann, [role(lst, "subscribe")], message("join again", ann, role(lst, "subscribe")))
    confirmation = mail_to(bed, ann, "Please confirm")
    token = _token(confirmation)
    bed.smtp(ann, [role(lst, f"confirm+{token}")],
             message(f"Re: {confirmation.message['Subject']}", ann, role(lst, f"confirm+{token}")))
    welcome = mail_to(bed, ann, "Welcome")
    in_welcome = re.search(rf"{re.escape(bed.web)}/u/[A-Za-z0-9_-]+", welcome.message.get_content()).group(0)
    assert ann in _members(bed, lst)

    # 3. The old link belongs to the ended membership: refused (410), explained, logged; Ann stays.
    for data in (None, ONE_CLICK):
        status, body = http(before, data)
        assert status == 410 and "earlier subscription" in body and role(lst, "unsubscribe") in body
    assert ann in _members(bed, lst)
    assert f"list=<{lst}>, address=<{ann}>, client=127.0.0.1, status=refused (link of an ended membership)" \
        in bed.web_log.read_text()

    # 4. Posts now carry the new key's link for the new membership: the welcome mail's link.
    post(bed, lst, "after the rotation")
    after = one_click_url(mail_to(bed, ann, "after the rotation"))
    assert _key_id(after) == kid + 1 and after == in_welcome and after != before
    status, body = http(after, ONE_CLICK)
    assert status == 200 and "You have been unsubscribed" in body
    assert _members(bed, lst) == ["bob@example.net"]
    assert history(bed, lst, ann)[-1][2:5] == ["unsubscribed", "web", "127.0.0.1"]


def test_old_format_links_during_and_after_the_transition(sbed):
    bed = sbed
    carl, dora = "carl@example.net", "dora@example.net"
    lst = bed.new_list([carl, dora], posting="open")
    key0 = (bed.listmilter.state_dir / "secret").read_bytes()      # old links were made with key 0
    old_carl, old_dora = (f"{bed.web}/u/{u1_token(key0, lst, who)}" for who in (carl, dora))
    web = bed.listmilter.extra["web"]
    try:
        # During the transition an old link works as it did: a page, then the unsubscription.
        web["old_links_until"] = datetime.date.today() + datetime.timedelta(days=1)
        bed.listmilter.write_config()
        status, body = http(old_carl)
        assert status == 200 and "One-Click" in body
        status, body = http(old_carl, ONE_CLICK)
        assert status == 200 and "You have been unsubscribed" in body and carl not in _members(bed, lst)
        # After it (here: switched off), old links are refused with a way out, and logged.
        web["old_links_until"] = False
        bed.listmilter.write_config()
        for data in (None, ONE_CLICK):
            status, body = http(old_dora, data)
            assert status == 410 and "too old" in body and role(lst, "unsubscribe") in body
        assert dora in _members(bed, lst)
        assert f"address=<{dora}>, client=127.0.0.1, status=refused (old-format link after web.old_links_until)" \
            in bed.web_log.read_text()
    finally:
        web.pop("old_links_until", None)
        bed.listmilter.write_config()
