"""listmilter inside a real, private Postfix: what the sink receives is what a member would.

Every test runs against both stores (the `bed` fixture is parametrized
sqlite / yaml) and asserts on envelopes and headers at the sink.
"""

from __future__ import annotations

import smtplib

import pytest

from tests import scenarios
from tests.bed.net import wait_until
from tests.conftest import message


def test_post_reaches_every_member_once_with_list_envelope_and_headers(clean_bed):
    bed = clean_bed
    lst = scenarios.post_reaches_every_member_once(bed)
    msg = bed.sink.messages[0].message
    assert msg["List-Help"] == f"<mailto:{lst.replace('@', '-request@')}?subject=help>"
    assert msg["List-Subscribe"] == f"<mailto:{lst.replace('@', '-subscribe@')}>"
    assert msg["List-Owner"] == f"<mailto:{lst.replace('@', '-owner@')}>"
    assert "expanded, members=3" in bed.listmilter.log()


def test_subject_prefix_once_on_replies_and_encoded_subjects(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["r1@example.net"], posting="open", subject_prefix="[dev] ")
    subjects = {
        "Re: [dev] hello": "Re: [dev] hello",
        "=?utf-8?q?Re=3A_=5Bdev=5D_gr=C3=BC=C3=9Fe?=": "Re: [dev] grüße",
        "=?utf-8?b?w7xiZXI=?=": "[dev] über",
    }
    for raw in subjects:
        bed.smtp("carol@example.net", [lst], message(raw, "carol@example.net", lst))
    bed.sink.wait_for_recipients(3)
    seen = sorted(str(m.message["Subject"]) for m in bed.sink.messages)
    assert seen == sorted(subjects.values())


def test_members_only_list_refuses_others_with_550_and_takes_members(clean_bed):
    bed = clean_bed
    text = scenarios.members_only_list_refuses_others_with_550(bed)
    assert b"only members" in text
    assert "rejected (only members" in bed.listmilter.log()


def test_announce_list_takes_only_owners(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["reader@example.net"], posting="announce", owners=("boss@example.org",))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        bed.smtp("reader@example.net", [lst], message(to=lst, sender="reader@example.net"))
    assert info.value.recipients[lst][0] == 550
    assert b"announcement list" in info.value.recipients[lst][1]
    bed.smtp("boss@example.org", [lst], message(to=lst, sender="boss@example.org"))
    bed.sink.wait_for_recipients(1)
    assert bed.sink.recipients() == ["reader@example.net"]
    assert bed.sink.messages[0].message["List-Post"] == "NO"


def test_two_lists_and_a_person_over_smtp(clean_bed):
    scenarios.two_lists_and_a_person_in_one_smtp_transaction(clean_bed)


def test_two_lists_and_a_person_with_the_sendmail_command(clean_bed):
    bed = clean_bed
    a, b = scenarios.new_two_lists(bed)
    proc = bed.postfix.sendmail(message("local split", "carol@example.net", f"{a}, {b}"),
                                "carol@example.net", [b, "person@example.net", a])
    assert proc.returncode == 0, proc.stderr
    scenarios.assert_two_lists_and_person(bed, a, b, "local split")


def test_two_lists_without_a_person_keep_one_in_place(clean_bed):
    scenarios.two_lists_without_a_person_keep_one_in_place(clean_bed)


def test_refused_post_with_the_sendmail_command_is_told_to_the_sender(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["m@example.net"], posting="members", nonmember_action="reject")
    # Alone: the whole message is refused, and Postfix bounces it with our reason.
    proc = bed.postfix.sendmail(message(to=lst, sender="outsider@example.net"), "outsider@example.net", [lst])
    assert proc.returncode == 0
    bed.sink.wait_for_recipients(1)
    (rcpt, dsn), = bed.sink.deliveries()
    assert rcpt == "outsider@example.net" and dsn.mail_from == "<>"
    assert b"only members of" in dsn.content
    # Beside a person: the person gets it; the sender gets a notice; members get nothing.
    bed.sink.clear()
    proc = bed.postfix.sendmail(message("mixed", "outsider@example.net", lst), "outsider@example.net",
                                [lst, "person@example.net"])
    assert proc.returncode == 0
    bed.sink.wait_for_recipients(2)
    bed.settle()
    got = bed.sink.by_recipient()
    assert sorted(got) == ["outsider@example.net", "person@example.net"]
    assert got["person@example.net"][0].message["Subject"] == "mixed"
    notice = got["outsider@example.net"][0]
    assert notice.mail_from == "<>"
    assert "only members of" in notice.message.get_content()


def test_null_sender_is_never_expanded(clean_bed):
    scenarios.null_sender_is_never_expanded(clean_bed)


def test_custom_list_id_is_in_the_header_and_marks_a_loop(clean_bed):
    scenarios.custom_list_id_is_in_the_header_and_marks_a_loop(clean_bed)


def test_message_carrying_the_lists_own_list_id_is_not_expanded(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["l1@example.net"], posting="open")
    looped = message(to=lst, sender="l1@example.net", extra=f"List-Id: <{lst.replace('@', '.')}>\r\n")
    bed.smtp("l1@example.net", [lst], looped)
    wait_until(lambda: f"to=<{lst}>" in bed.deliver_log(), 30, what="the pipe transport")
    bed.settle()
    assert bed.sink.deliveries() == []
    assert "not expanded (mail loop" in bed.listmilter.log()


def test_other_lists_headers_are_replaced_not_stacked(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["h1@example.net"], posting="open")
    upstream = message(to=lst, sender="carol@example.net",
                       extra="List-Id: <other.example.com>\r\nList-Post: <mailto:other@example.com>\r\n"
                             "Precedence: bulk\r\n")
    bed.smtp("carol@example.net", [lst], upstream)
    bed.sink.wait_for_recipients(1)
    msg = bed.sink.messages[0].message
    assert msg.get_all("List-Id") == [f"<{lst.replace('@', '.')}>"]
    assert msg.get_all("List-Post") == [f"<mailto:{lst}>"]
    assert msg.get_all("Precedence") == ["list"]


def test_owner_address_reaches_the_owners(clean_bed):
    scenarios.owner_address_reaches_the_owners(clean_bed)


def test_owner_address_of_a_list_without_owners_reaches_the_site_admin(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["o1@example.net"])
    owner = lst.replace("@", "-owner@")
    bed.smtp("stranger@example.net", [owner], message("hello?", "stranger@example.net", owner))
    bed.sink.wait_for_recipients(1)
    assert bed.sink.recipients() == ["admin@example.net"]


def test_role_addresses_reach_the_pipe_transport_and_unknown_ones_are_refused(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["p1@example.net"])
    request = lst.replace("@", "-request@")
    confirm = lst.replace("@", "-confirm+abc123@")
    bed.smtp("carol@example.net", [request, confirm], message("subscribe", "carol@example.net", request))
    wait_until(lambda: f"to=<{request}>" in (log := bed.deliver_log()) and f"to=<{confirm}>" in log,
               30, what="both deliveries through the pipe transport")
    log = bed.deliver_log()
    assert f"to=<{request}>, from=<carol@example.net>" in log
    assert "role=request, client=127.0.0.1, command=subscribe" in log
    assert f"to=<{confirm}>" in log
    # Both are answered (a confirmation; a refusal of the made-up token): wait for them here.
    wait_until(lambda: len(bed.sink.for_recipient("carol@example.net")) >= 2, 30, what="the replies")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        bed.smtp("carol@example.net", ["nolist@example.org"], message(to="nolist@example.org"))
    assert info.value.recipients["nolist@example.org"][0] == 550


def test_list_create_notify_mails_the_site_admin_through_postfix(clean_bed):
    bed = clean_bed
    from tests.bed.listmilter import cli
    if bed.listmilter.backend == "yaml":
        # The yaml store is edited in the file: the CLI refuses, and mails nobody.
        proc = cli(bed.listmilter.config_path, "list", "create", "announce9@example.org", "--notify",
                   check=False)
        assert proc.returncode == 64 and "edited in" in proc.stderr
        bed.settle()
        assert bed.sink.deliveries() == []
        return
    out = cli(bed.listmilter.config_path, "list", "create", "announce9@example.org", "--owner",
              "boss@example.org", "--notify")
    assert "notified admin@example.net" in out.stdout
    bed.sink.wait_for_recipients(1)
    (rcpt, m), = bed.sink.deliveries()
    assert rcpt == "admin@example.net"
    assert m.message["Subject"] == "New mailing list: announce9@example.org"
    assert "boss@example.org" in m.message.get_content()
