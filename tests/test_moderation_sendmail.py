"""Held posts over the real Sendmail: the milter expands a post and quarantines it (Sendmail's
quarantine: the control file becomes hf<ID>, `mailq -qQ` lists it), the owners get one notice,
and `listmilter held` or a reply releases it (`sendmail -qQ -qI<ID> -Q`) or removes its queue
files. The same outcomes as tests/test_moderation_mta.py on Postfix; the pure half of the
Sendmail side (its listing) is in tests/test_moderation.py."""

from __future__ import annotations

import re
import sqlite3

import pytest

from listmilter.app import holdqueue
from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import SendmailBed, _clean, _finish, message

pytestmark = pytest.mark.mta

POSTER = "out@example.net"


@pytest.fixture(scope="module")
def held_smbed(request):
    # One store is enough here: what differs from Postfix is the queue, not the store.
    b = SendmailBed("sqlite")
    b.listmilter.env.update(LISTMILTER_PERIODIC_INTERVAL="2")
    b.listmilter.stop()
    b.listmilter.start()
    yield b
    _finish(b, keep_files=bool(request.session.testsfailed))


@pytest.fixture
def bed(held_smbed):
    clean = _clean(held_smbed)
    yield next(clean)
    # A test that failed half-way may leave a post in the quarantine: the next would see it.
    for entry in quarantine(held_smbed):
        holdqueue.remove_quarantined(entry.folder, entry.queue_id)
    next(clean, None)


def quarantine(bed) -> list:
    return list(holdqueue.SendmailQueue(str(bed.sendmail.command))._entries())


def quarantined(bed, queue_id: str) -> bool:
    return any(e.queue_id == queue_id for e in quarantine(bed))


def queue_files(bed, queue_id: str) -> list[str]:
    return sorted(p.name for p in (bed.sendmail.dir / "queue").iterdir() if p.name.endswith(queue_id))


def held_cli(bed, *args, check=True):
    return cli(bed.listmilter.config_path, "held", *args, check=check)


def post_held(bed, list_address: str, owner: str, subject: str = "a question", sender: str = POSTER):
    """Post as a non-member; return (queue id, the owners' notice)."""
    reply = bed.submit(sender, [list_address], message(subject, sender, list_address,
                                                       body="First line of the post.\nSecond line.\n"))
    assert reply.code == 250, str(reply)
    queue_id = re.search(r"(\w{14}) Message accepted", reply.text).group(1)
    wait_until(lambda: bed.sink.for_recipient(owner), 60, what="the owners' notice")
    wait_until(lambda: quarantined(bed, queue_id), 30, what="the post in the quarantine")
    return queue_id, bed.sink.for_recipient(owner)[-1]


def new_list(bed, owner, members, **settings):
    """A members list (the default posting); a non-member's post is held by default."""
    return bed.new_list(members, owners=[owner], name="mod", **settings)


def test_a_held_post_is_quarantined_and_an_approval_by_the_cli_sends_it_to_the_members_once(bed, owner):
    members = ["m-approve1@example.com", "m-approve2@example.com"]
    lst = new_list(bed, owner, members)
    queue_id, notice = post_held(bed, lst, owner)
    text = notice.content.decode()
    assert f"{POSTER} is not a member of {lst}" in text and f"Queue id:  {queue_id}" in text
    [entry] = [e for e in quarantine(bed) if e.queue_id == queue_id]
    # Expanded before it was quarantined: the members are its recipients, the reason is listmilter's.
    assert entry.recipients == 2 and entry.reason.startswith(f"listmilter: held for the owners of {lst}: ")
    assert queue_files(bed, queue_id) == [f"df{queue_id}", f"hf{queue_id}"]
    bed.settle()        # the plain queue drains; the quarantined post stays
    assert not any(bed.sink.for_recipient(m) for m in members) and quarantined(bed, queue_id)
    assert re.search(rf"{queue_id}: list=<{re.escape(lst)}>, from=<{POSTER}>, .*status=held \({POSTER} is not a "
                     "member", bed.listmilter.log())

    listing = held_cli(bed, lst).stdout
    assert queue_id in listing and POSTER in listing and "not on the hold queue" not in listing

    assert held_cli(bed, "approve", queue_id).stdout == f"{queue_id}: approved, released\n"
    wait_until(lambda: all(bed.sink.for_recipient(m) for m in members), 60, what="the approved post")
    bed.settle()
    for m in members:
        [got] = bed.sink.for_recipient(m)
        assert got.message["Subject"] == "a question" and got.message["List-Id"]
    assert not bed.sink.for_recipient(POSTER) and queue_files(bed, queue_id) == []
    assert held_cli(bed, lst).stdout == "no held posts\n"
    assert "already done" in held_cli(bed, "reject", queue_id).stdout


def test_reject_removes_the_queue_files_and_tells_the_poster(bed, owner):
    member = "m-reject@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, _ = post_held(bed, lst, owner, "spam, probably")
    assert held_cli(bed, "reject", queue_id).stdout == f"{queue_id}: rejected, deleted; poster told\n"
    assert queue_files(bed, queue_id) == [] and not quarantined(bed, queue_id)
    wait_until(lambda: bed.sink.for_recipient(POSTER), 60, what="the poster's notice")
    bed.settle()
    [told] = bed.sink.for_recipient(POSTER)
    assert told.message["Subject"] == f"Your post to {lst} was rejected"
    assert not bed.sink.for_recipient(member)
    # Sendmail saw nothing amiss: no "bogus queue file" or orphaned data file left behind.
    assert sorted(p.name[:2] for p in (bed.sendmail.dir / "queue").iterdir()) == []


def test_discard_removes_it_silently(bed, owner):
    member = "m-discard@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, _ = post_held(bed, lst, owner)
    assert held_cli(bed, "discard", queue_id).stdout == f"{queue_id}: discarded, deleted\n"
    bed.settle()
    assert queue_files(bed, queue_id) == []
    assert not bed.sink.for_recipient(member) and not bed.sink.for_recipient(POSTER)


def test_a_decision_on_a_post_gone_from_the_quarantine_says_so(bed, owner):
    lst = new_list(bed, owner, ["m-gone@example.com"])
    queue_id, _ = post_held(bed, lst, owner)
    for entry in quarantine(bed):
        holdqueue.remove_quarantined(entry.folder, entry.queue_id)
    assert held_cli(bed, lst).stdout.rstrip().endswith("[not on the hold queue]")
    done = held_cli(bed, "approve", queue_id)
    assert done.stdout == f"{queue_id}: not on the hold queue any more\n"
    assert f"{queue_id}: list=<{lst}>, status=approve: not on the hold queue" in done.stderr
    bed.settle()


def test_an_owner_approves_by_replying_to_the_notice(bed, owner):
    member = "m-reply@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, notice = post_held(bed, lst, owner)
    request = notice.message["Reply-To"]
    reply = (f"From: {owner}\r\nTo: {request}\r\nSubject: Re: {notice.message['Subject']}\r\n\r\n"
             "Fine by me.\r\n").encode()
    assert bed.submit(owner, [request], reply).code == 250
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the post approved by reply")
    bed.settle(f"{queue_id}: approved, released")
    assert len(bed.sink.for_recipient(member)) == 1 and not quarantined(bed, queue_id)


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
    assert not bed.sink.for_recipient(member) and queue_files(bed, queue_id) == []


def test_a_held_post_survives_a_restart_of_sendmail_and_of_serve(bed, owner):
    member = "m-restart@example.com"
    lst = new_list(bed, owner, [member])
    queue_id, _ = post_held(bed, lst, owner)
    bed.sendmail.stop()
    bed.listmilter.stop()
    bed.listmilter.start()
    bed.sendmail.start()
    assert quarantined(bed, queue_id)
    bed.settle()        # queue runs after the restart leave it where it is
    assert quarantined(bed, queue_id) and not bed.sink.for_recipient(member)
    assert held_cli(bed, "approve", queue_id).stdout == f"{queue_id}: approved, released\n"
    wait_until(lambda: bed.sink.for_recipient(member), 60, what="the post approved after the restart")
    bed.settle()
    assert len(bed.sink.for_recipient(member)) == 1


def test_a_post_nobody_decides_on_expires_after_hold_days(bed, owner):
    member = "m-expire@example.com"
    lst = new_list(bed, owner, [member], hold_days=1)
    queue_id, _ = post_held(bed, lst, owner, "forgotten")
    with sqlite3.connect(bed.listmilter.state_dir / "pending.sqlite") as db:
        db.execute("UPDATE held SET held = held - 86400 - 60 WHERE queue_id = ?", (queue_id,))
    wait_until(lambda: bed.sink.for_recipient(POSTER), 60, what="the poster's expiry notice")
    bed.settle(f"held: periodic: {queue_id}: expired, deleted; poster told")
    [told] = bed.sink.for_recipient(POSTER)
    assert told.message["Subject"] == f"Your post to {lst} was not sent"
    assert not bed.sink.for_recipient(member) and queue_files(bed, queue_id) == []


@pytest.mark.parametrize("own_smbed", [{"reinject": True}], indirect=True)
def test_a_held_post_of_a_list_with_a_footer_fans_out_once_approved(own_smbed, owner):
    """With outgoing.reinject the quarantined message is the post queued for its fan-out: once
    released, serve sends each member a copy of their own, footer included (docs/moderation.md)."""
    bed = own_smbed
    members = ["m-foot1@example.com", "m-foot2@example.com"]
    lst = new_list(bed, owner, members, footer="-- \nthe footer of the list\n")
    queue_id, _ = post_held(bed, lst, owner, "to a footer list")
    bed.settle()
    assert not any(bed.sink.for_recipient(m) for m in members)
    assert cli(bed.listmilter.config_path, "held", "approve", queue_id).stdout == f"{queue_id}: approved, released\n"
    wait_until(lambda: all(bed.sink.for_recipient(m) for m in members), 60, what="the members' copies")
    bed.settle()
    for m in members:
        [got] = bed.sink.for_recipient(m)
        assert "the footer of the list" in got.message.get_body(("plain",)).get_content()
