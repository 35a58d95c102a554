"""listmilter inside a real, private Sendmail (tests/bed/sendmail.py), configured
with the lines docs/sendmail.md gives. The `smbed` fixture runs every test
against both stores; assertions are on what the sink and `listmilter deliver` get.
"""

from __future__ import annotations

import collections
import smtplib
import time

import pytest

from tests import scenarios
from tests.bed.net import wait_until
from tests.conftest import SendmailBed, message


def test_post_reaches_every_member_once_with_list_envelope_dsn_and_headers(clean_smbed):
    bed = clean_smbed
    lst = scenarios.post_reaches_every_member_once(bed)
    # The log line is keyed by Sendmail's queue id, as Sendmail's own lines are.
    line = [l for l in bed.listmilter.log().splitlines() if f"list=<{lst}>" in l][-1]
    queue_id = line.split(": list=")[0].rsplit(" ", 1)[-1]
    assert len(queue_id) == 14 and "status=expanded, members=3" in line
    assert f"ENVID={queue_id}.".upper() in " ".join(bed.sink.messages[0].mail_options)


def test_members_only_list_refuses_others_with_550_at_rcpt(clean_smbed):
    scenarios.members_only_list_refuses_others_with_550(clean_smbed)


def test_two_lists_and_a_person_in_one_transaction(clean_smbed):
    scenarios.two_lists_and_a_person_in_one_smtp_transaction(clean_smbed)


def test_two_lists_without_a_person_keep_one_in_place(clean_smbed):
    scenarios.two_lists_without_a_person_keep_one_in_place(clean_smbed)


def test_role_addresses_reach_listmilter_deliver_and_unknown_ones_are_refused(clean_smbed):
    bed = clean_smbed
    lst = bed.new_list(["p1@example.net"])
    request = lst.replace("@", "-request@")
    confirm = lst.replace("@", "-confirm+abc123@")
    subscribe = lst.replace("@", "-subscribe@")
    bed.smtp("carol@example.net", [request, confirm, subscribe],
             message("subscribe", "carol@example.net", request))
    wait_until(lambda: bed.deliver_log().count(f"list=<{lst}>") >= 3, 30, what="listmilter deliver")
    log = bed.deliver_log()
    lines = {to: next(line for line in log.splitlines() if f"to=<{to}>" in line)
             for to in (request, confirm, subscribe)}
    assert "from=<carol@example.net>" in lines[request] and "command=subscribe" in lines[request]
    assert "role=confirm" in lines[confirm]
    assert "role=subscribe" in lines[subscribe] and "command=subscribe" in lines[subscribe]
    # Answered through Sendmail: one confirmation (the second subscribe waits for
    # it) and a refusal of the made-up token. Wait for them here.
    wait_until(lambda: len(bed.sink.for_recipient("carol@example.net")) >= 2, 30, what="the replies")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        bed.smtp("carol@example.net", ["nolist@example.org"], message(to="nolist@example.org"))
    assert info.value.recipients["nolist@example.org"][0] == 550


def test_owner_address_reaches_the_owners(clean_smbed):
    scenarios.owner_address_reaches_the_owners(clean_smbed)


def test_null_sender_is_never_expanded(clean_smbed):
    scenarios.null_sender_is_never_expanded(clean_smbed)


def test_a_real_dsn_from_sendmail_reaches_the_bounce_handler(clean_smbed):
    bed = clean_smbed
    lst = bed.new_list(["ok@example.net", "dead@example.net"], posting="open")
    bed.sink.replies["dead@example.net"] = "550 5.1.1 no such user here"
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    wait_until(lambda: "role=bounces" in bed.deliver_log(), 60, what="the DSN at listmilter deliver")
    line = [l for l in bed.deliver_log().splitlines() if "role=bounces" in l][-1]
    bounces = lst.replace("@", "-bounces@")
    assert f"to=<{bounces}>, from=<>" in line
    assert line in bed.listmilter.log()       # Sendmail's mailer handed it to serve, too
    # Sendmail keeps ORCPT and ENVID: the DSN names the member and the post.
    assert "status=dsn: <dead@example.net> 5.1.1 scored" in line
    queue_id = line.split("envid=")[1].split(".")[0]
    assert f"{queue_id}: list=<{lst}>" in bed.listmilter.log()
    assert bed.sink.recipients() == ["ok@example.net"]


@pytest.fixture
def own_smbed(request):
    b = SendmailBed("sqlite", **getattr(request, "param", {}))
    try:
        yield b
    finally:
        b.stop()
    if not request.session.testsfailed:
        b.remove()


def test_listmilter_down_gives_4xx_then_delivered_exactly_once_after_restart(own_smbed):
    bed = own_smbed
    lst = bed.new_list(["d1@example.net", "d2@example.net"], posting="open")
    bed.listmilter.stop()
    # F=T (docs/sendmail.md says why Sendmail keeps it): every message waits while listmilter is down.
    with pytest.raises(smtplib.SMTPResponseException) as info:
        bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert (info.value.smtp_code, info.value.smtp_error) == (451, b"4.3.2 Please try again later")
    assert bed.sendmail.queue_empty()
    bed.listmilter.start()
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert collections.Counter(bed.sink.recipients()) == {"d1@example.net": 1, "d2@example.net": 1}


@pytest.mark.parametrize("own_smbed", [{"eom_timeout": "1s"}], indirect=True)
def test_a_list_too_big_for_the_E_timeout_gets_4xx_and_nothing_is_delivered(own_smbed):
    # Sendmail needs several seconds for 30,000 added recipients (its cost grows
    # faster than linearly), far past E:1s: the post must be refused for now, whole.
    bed = own_smbed
    lst = bed.new_list([f"t{i:05d}@example.net" for i in range(30000)], posting="open")
    with pytest.raises(smtplib.SMTPDataError) as info:
        bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert 400 <= info.value.smtp_code < 500, info.value
    time.sleep(2)
    assert bed.sendmail.queue_empty() and bed.sink.deliveries() == []
