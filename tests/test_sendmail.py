"""listmilter inside a real, private Sendmail (tests/bed/sendmail.py), configured
with the lines docs/sendmail.md gives. The `smbed` fixture runs every test
against both stores; assertions are on what the sink and `listmilter deliver` get.
"""

from __future__ import annotations

import smtplib

import pytest

from tests import scenarios
from tests.bed.net import wait_until
from tests.conftest import crlf, message


def test_post_reaches_every_member_once_with_list_envelope_dsn_and_headers(clean_smbed):
    bed = clean_smbed
    lst = scenarios.post_reaches_every_member_once(bed)
    # The log line is keyed by Sendmail's queue id, as Sendmail's own lines are.
    line = [ln for ln in bed.listmilter.log().splitlines() if f"list=<{lst}>" in ln][-1]
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


def test_custom_list_id_is_in_the_header_and_marks_a_loop(clean_smbed):
    scenarios.custom_list_id_is_in_the_header_and_marks_a_loop(clean_smbed)


def test_null_sender_is_never_expanded(clean_smbed):
    scenarios.null_sender_is_never_expanded(clean_smbed)


def test_a_real_dsn_from_sendmail_reaches_the_bounce_handler(clean_smbed):
    bed = clean_smbed
    lst = bed.new_list(["ok@example.net", "dead@example.net"], posting="open")
    # Mail with a sender (the post, the probe) is refused; the warning, from <>, arrives.
    bed.sink.post_replies["dead@example.net"] = "550 5.1.1 no such user here"
    bed.smtp("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    wait_until(lambda: "role=bounces" in bed.deliver_log(), 60, what="the DSN at listmilter deliver")
    line = [ln for ln in bed.deliver_log().splitlines() if "role=bounces" in ln][-1]
    bounces = lst.replace("@", "-bounces@")
    assert f"to=<{bounces}>, from=<>" in line
    assert line in bed.listmilter.log()       # Sendmail's mailer handed it to serve, too
    # Sendmail keeps ORCPT and ENVID: the DSN names the member and the post. Bound only
    # to the post, it is a suspicion: dead@ gets a probe from a one-time address.
    assert "status=dsn: <dead@example.net> 5.1.1 suspect (probe sent)" in line
    queue_id = line.split("envid=")[1].split(".")[0]
    assert f"{queue_id}: list=<{lst}>" in bed.listmilter.log()
    # Sendmail's DSN of the probe comes back to that address, through the same mailer, and acts.
    wait_until(lambda: "probe-bounced" in bed.deliver_log(), 60, what="the probe's DSN at listmilter deliver")
    probed = [ln for ln in bed.deliver_log().splitlines() if "probe-bounced" in ln][-1]
    assert f"to=<{lst.split('@')[0]}-bounces+probe-" in probed and "from=<>" in probed
    assert "status=probe dsn: <dead@example.net> 5.1.1 probe-bounced" in probed
    assert "member=<dead@example.net>, action=disabled" in bed.listmilter.log()
    bed.settle()
    # The post reached ok@ alone; the owners and dead@ heard of the disabling (from <>).
    got = sorted((r, str(m.message["Subject"])) for r, m in bed.sink.deliveries())
    assert got == [("admin@example.net", f"dead@example.net disabled on {lst} (bounces)"),
                   ("dead@example.net", f"Your membership of {lst} is disabled"),
                   ("ok@example.net", "hello")], got


def _message_id(data: bytes) -> str:
    return next(line.split(b":", 1)[1].strip().decode() for line in data.splitlines()
                if line.lower().startswith(b"message-id:"))


def _each_once(bed, expected: list[str], data: bytes) -> None:
    got = bed.sink.by_recipient()
    assert sorted(got) == sorted(expected), got
    for rcpt, copies in got.items():
        assert [m.message["Message-ID"] for m in copies] == [_message_id(data)], (rcpt, len(copies))


def test_listmilter_down_gives_451_4_3_2_and_the_retry_is_delivered_exactly_once(own_smbed):
    bed = own_smbed
    lst = bed.new_list(["d1@example.net", "d2@example.net"], posting="open")
    data = message(to=lst, sender="carol@example.net")
    bed.listmilter.stop()
    reply = bed.submit("carol@example.net", [lst], data)
    # F=T (docs/sendmail.md says why Sendmail keeps it): Sendmail's own tempfail while the milter is unreachable.
    assert (reply.stage, reply.code, reply.text) == ("MAIL", 451, "4.3.2 Please try again later"), reply
    bed.settle()
    assert bed.sink.deliveries() == []
    bed.listmilter.start()
    assert bed.submit("carol@example.net", [lst], data).code == 250       # the same message again
    bed.sink.wait_for_recipients(2)
    bed.settle()
    _each_once(bed, ["d1@example.net", "d2@example.net"], data)


def test_the_sendmail_command_re_run_after_451_delivers_once(own_smbed):
    """A program submitting with `sendmail -bs` gets the milter's tempfail and runs the
    same command again later; the list gets the post once."""
    bed = own_smbed
    lst = bed.new_list(["c1@example.net", "c2@example.net"], posting="open")
    data = crlf(message("by command", "carol@example.net", lst))
    session = [b"EHLO client.example.net\r\n", b"MAIL FROM:<carol@example.net>\r\n",
               f"RCPT TO:<{lst}>\r\n".encode(), b"DATA\r\n", data + b".\r\n", b"QUIT\r\n"]
    bed.listmilter.stop()
    replies = bed.sendmail.bs_session(session[:3] + session[-1:])
    assert replies[2] == (451, "4.3.2 Please try again later"), replies
    bed.settle()
    assert bed.sink.deliveries() == []
    bed.listmilter.start()
    replies = bed.sendmail.bs_session(session)
    assert [code for code, _ in replies] == [220, 250, 250, 250, 354, 250, 221], replies
    bed.sink.wait_for_recipients(2)
    bed.settle()
    _each_once(bed, ["c1@example.net", "c2@example.net"], data)
    assert f"list=<{lst}>, from=<carol@example.net>, client=localhost[None], status=expanded, members=2" \
        in bed.listmilter.log()


@pytest.mark.parametrize("own_smbed", [{"eom_timeout": "1s"}], indirect=True)
def test_a_list_too_big_for_the_E_timeout_gets_4xx_and_nothing_is_delivered(own_smbed):
    # Sendmail needs several seconds for 30,000 added recipients (its cost grows
    # faster than linearly), far past E:1s: the post must be refused for now, whole.
    bed = own_smbed
    lst = bed.new_list([f"t{i:05d}@example.net" for i in range(30000)], posting="open")
    reply = bed.submit("carol@example.net", [lst], message(to=lst, sender="carol@example.net"))
    assert (reply.stage, reply.code, reply.text) == ("END", 451, "4.3.2 Please try again later"), reply
    # The milter learns it when its next edit fails: one line, no traceback (teardown checks).
    bed.settle("status=deferred (the MTA did not take the changes: ")
    assert bed.sink.deliveries() == []
