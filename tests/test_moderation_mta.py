"""Held posts over the real Postfix: the milter expands a post and quarantines it, the owners
get one notice, and `listmilter held` or a reply releases or deletes it on Postfix's own hold
queue. The pure half: tests/test_moderation.py."""

from __future__ import annotations

import re
import sqlite3
import subprocess

import pytest

from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import Bed, _clean, _finish, message

pytestmark = pytest.mark.mta

POSTER = "out@example.net"


@pytest.fixture(scope="module", params=["sqlite", "yaml"])
def held_bed(request):
    b = Bed(request.param)
    # Postfix's commands (postqueue, postsuper) find this private instance as postconf does.
    b.env = {"MAIL_CONFIG": str(b.postfix.dir)}
    b.listmilter.env.update(b.env, LISTMILTER_PERIODIC_INTERVAL="2")
    b.listmilter.stop()
    b.listmilter.start()
    yield b
    _finish(b, keep_files=bool(request.session.testsfailed))


@pytest.fixture
def bed(held_bed):
    clean = _clean(held_bed)
    yield next(clean)
    # A test that failed half-way may leave a held post: the queue would never drain.
    subprocess.run(["postsuper", "-c", str(held_bed.postfix.dir), "-d", "ALL", "hold"], capture_output=True)
    next(clean, None)


def logged(bed, line: str) -> None:
    """Wait for a line in listmilter's logs (bed.settle waits for an empty queue: not while a post is held)."""
    wait_until(lambda: line in bed.deliver_log(), 60, interval=0.1, what=f"{line!r} in listmilter's logs")


def held_cli(bed, *args, check=True):
    return cli(bed.listmilter.config_path, "held", *args, env=bed.env, check=check)


def hold_queue(bed) -> str:
    return subprocess.run(["postqueue", "-c", str(bed.postfix.dir), "-p"], capture_output=True, text=True).stdout


def post_held(bed, list_address: str, owner: str, subject: str = "a question", sender: str = POSTER):
    """Post as a non-member; return (queue id, the owners' notice)."""
    reply = bed.submit(sender, [list_address], message(subject, sender, list_address,
                                                       body="First line of the post.\nSecond line.\n"))
    assert reply.code == 250, str(reply)
    queue_id = re.search(r"queued as (\w+)", reply.text).group(1)
    wait_until(lambda: bed.sink.for_recipient(owner), 60, what="the owners' notice")
    wait_until(lambda: f"{queue_id}!" in hold_queue(bed), 30, what="the post on the hold queue")
    return queue_id, bed.sink.for_recipient(owner)[-1]


def new_list(bed, owner, members, **settings):
    """A members list (the default posting); a non-member's post is held by default."""
    return bed.new_list(members, owners=[owner], name="mod", **settings)


def test_a_non_member_post_is_held_and_an_approval_by_the_cli_sends_it_to_the_members_once(bed, owner):
    member = "m-approve@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, notice = post_held(bed, lst, owner)
    text = notice.content.decode()
    assert re.search(rf"^Subject: Held for {re.escape(lst)}: a question \(approve [a-z2-7]{{24}}\)\r?$", text, re.M)
    assert f"{POSTER} is not a member of {lst}" in text and "    First line of the post." in text
    assert f"Queue id:  {queue_id}" in text and f"listmilter held approve {queue_id}" in text
    assert len(bed.sink.for_recipient(owner)) == 1 and not bed.sink.for_recipient(member)
    log = bed.listmilter.log()
    assert re.search(rf"{queue_id}: list=<{re.escape(lst)}>, from=<{POSTER}>, .*status=held \({POSTER} is not a "
                     "member", log), log[-2000:]

    listing = held_cli(bed, lst).stdout
    assert queue_id in listing and POSTER in listing and "is not a member" in listing

    assert held_cli(bed, "approve", queue_id).stdout == f"{queue_id}: approved, released\n"
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the approved post")
    bed.settle()
    [got] = bed.sink.for_recipient(member)
    assert got.message["Subject"] == "a question" and got.message["List-Id"]
    assert not bed.sink.for_recipient(POSTER)
    assert held_cli(bed, lst).stdout == "no held posts\n"
    # A second decision on the same post changes nothing.
    assert "already done" in held_cli(bed, "reject", queue_id).stdout


def test_reject_deletes_the_post_and_tells_the_poster(bed, owner):
    member = "m-reject@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, _ = post_held(bed, lst, owner, "spam, probably")
    assert held_cli(bed, "reject", queue_id).stdout == f"{queue_id}: rejected, deleted; poster told\n"
    wait_until(lambda: bed.sink.for_recipient(POSTER), 60, what="the poster's notice")
    bed.settle()
    [told] = bed.sink.for_recipient(POSTER)
    assert told.message["Subject"] == f"Your post to {lst} was rejected"
    assert "spam, probably" in told.message.get_content()
    assert not bed.sink.for_recipient(member) and f"{queue_id}" not in hold_queue(bed)


def test_discard_deletes_the_post_silently(bed, owner):
    member = "m-discard@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, _ = post_held(bed, lst, owner)
    assert held_cli(bed, "discard", queue_id).stdout == f"{queue_id}: discarded, deleted\n"
    bed.settle()
    assert not bed.sink.for_recipient(member) and not bed.sink.for_recipient(POSTER)


def test_an_owner_approves_by_replying_to_the_notice(bed, owner):
    member = "m-reply@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, notice = post_held(bed, lst, owner)
    request = notice.message["Reply-To"]
    assert request == lst.replace("@", "-request@")
    # Someone else who saw the code (a forwarded notice) cannot decide.
    reply = (f"From: someone@example.net\r\nTo: {request}\r\nSubject: Re: {notice.message['Subject']}\r\n\r\n"
             "reject\r\n").encode()
    assert bed.submit("someone@example.net", [request], reply).code == 250
    logged(bed, "status=refused (the reply is not from an owner)")
    assert f"{queue_id}!" in hold_queue(bed)
    reply = (f"From: {owner}\r\nTo: {request}\r\nSubject: Re: {notice.message['Subject']}\r\n\r\n"
             "Fine by me.\r\n").encode()
    assert bed.submit(owner, [request], reply).code == 250
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the post approved by reply")
    bed.settle(f"{queue_id}: approved, released")
    assert len(bed.sink.for_recipient(member)) == 1


def test_an_owner_rejects_by_replying_with_reject(bed, owner):
    member = "m-reply-reject@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, notice = post_held(bed, lst, owner)
    request = notice.message["Reply-To"]
    reply = (f"From: {owner}\r\nTo: {request}\r\nSubject: Re: {notice.message['Subject']}\r\n\r\n"
             "reject\r\n\r\n> quoted notice\r\n").encode()
    assert bed.submit(owner, [request], reply).code == 250
    wait_until(lambda: bed.sink.for_recipient(POSTER), 60, what="the poster's notice")
    bed.settle()
    assert not bed.sink.for_recipient(member) and queue_id not in hold_queue(bed)


def test_a_held_post_survives_a_restart_of_postfix_and_of_serve(bed, owner):
    member = "m-restart@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, _ = post_held(bed, lst, owner)
    bed.postfix.stop()
    bed.listmilter.stop()
    bed.listmilter.start()
    bed.postfix.start()
    assert f"{queue_id}!" in hold_queue(bed)
    assert held_cli(bed, "approve", queue_id).stdout == f"{queue_id}: approved, released\n"
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the post approved after the restart")
    bed.settle()
    assert len(bed.sink.for_recipient(member)) == 1


def test_a_post_nobody_decides_on_expires_after_hold_days(bed, owner):
    member = "m-expire@example.com"
    lst = new_list(bed, owner, [member], hold_days=1)
    queue_id, _ = post_held(bed, lst, owner, "forgotten")
    # A day and a bit later, as serve's periodic run sees it.
    with sqlite3.connect(bed.listmilter.state_dir / "pending.sqlite") as db:
        db.execute("UPDATE held SET held = held - 86400 - 60 WHERE queue_id = ?", (queue_id,))
    wait_until(lambda: bed.sink.for_recipient(POSTER), 60, what="the poster's expiry notice")
    bed.settle(f"held: periodic: {queue_id}: expired, deleted; poster told")
    [told] = bed.sink.for_recipient(POSTER)
    assert told.message["Subject"] == f"Your post to {lst} was not sent"
    assert not bed.sink.for_recipient(member)


def test_moderated_and_size_and_discard(bed, owner):
    member = "m-settings@example.com"
    moderated = new_list(bed, owner, [member], moderated="true")
    reply = bed.submit(member, [moderated], message("from a member", member, moderated))
    assert reply.code == 250
    wait_until(lambda: bed.sink.for_recipient(owner), 60, what="the owners' notice")
    assert "is moderated: every post waits for an owner" in bed.sink.for_recipient(owner)[-1].content.decode()
    held_cli(bed, "discard", re.search(r"queued as (\w+)", reply.text).group(1))

    big = new_list(bed, owner, [member], max_message_size="2000")
    assert bed.submit(member, [big], message("small", member, big)).code == 250
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the small post")
    reply = bed.submit(member, [big], message("big", member, big, body="x" * 3000 + "\n"))
    wait_until(lambda: len(bed.sink.for_recipient(owner)) == 2, 60, what="the notice for the big post")
    assert "over the list's max_message_size of 2000" in bed.sink.for_recipient(owner)[-1].content.decode()
    held_cli(bed, "discard", re.search(r"queued as (\w+)", reply.text).group(1))

    dropping = new_list(bed, owner, [member], nonmember_action="discard")
    assert bed.submit(POSTER, [dropping], message("dropped", POSTER, dropping)).code == 250
    bed.settle(f"list=<{dropping}>, from=<{POSTER}>, client=")
    assert [m.message["Subject"] for m in bed.sink.for_recipient(member)] == ["small"]
    assert "status=discarded (out@example.net is not a member" in bed.listmilter.log()


def test_a_held_post_to_a_list_with_a_footer_goes_out_once_approved(bed, owner):
    """A list that sends one copy per member (its footer) holds the post expanded in place: once
    approved, each member gets it once (as one copy for all; docs/moderation.md, "Limits")."""
    members = ["m-foot1@example.com", "m-foot2@example.com"]
    lst = new_list(bed, owner, members, footer="-- \nLeave: {unsubscribe_url}\nSent to {member}\n")
    queue_id, _ = post_held(bed, lst, owner, "to a footer list")
    assert not any(bed.sink.for_recipient(m) for m in members)
    assert held_cli(bed, "approve", queue_id).stdout == f"{queue_id}: approved, released\n"
    wait_until(lambda: all(bed.sink.for_recipient(m) for m in members), 60, what="the approved post")
    bed.settle()
    assert [len(bed.sink.for_recipient(m)) for m in members] == [1, 1]


def test_reply_to_list_and_an_accepted_non_member(bed, owner):
    member = "m-replyto@example.com"
    lst = new_list(bed, owner, [member], reply_to="list", accept_nonmembers=r"^.*@partner\.example$")
    poster = "carol@partner.example"
    assert bed.submit(poster, [lst], message("from a partner", poster, lst, extra="Reply-To: me@else.example\r\n")
                      ).code == 250
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the post")
    bed.settle()
    [got] = bed.sink.for_recipient(member)
    assert got.message.get_all("Reply-To") == [lst] and not bed.sink.for_recipient(owner)
