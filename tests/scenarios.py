"""What a post must do whatever the MTA: scenarios test_postfix.py and test_sendmail.py both run.

Each takes a started bed (tests/conftest.py: Bed or SendmailBed), sends
through its MTA and asserts on what the sink got; the MTA's own test adds
what only that MTA shows (its queue ids, its extra headers, its refusals).
"""

from __future__ import annotations

import smtplib

import pytest

from tests.bed.net import wait_until
from tests.conftest import message


def post_reaches_every_member_once(bed) -> str:
    """A post with duplicate, differently cased members; returns the list address."""
    members = ["m1@example.net", "M2@example.com", "m1@EXAMPLE.NET", "m3@example.net"]
    lst = bed.new_list(members, posting="open", subject_prefix="[dev] ", description="Dev talk")
    # The list address matches case-insensitively, local part too.
    bed.smtp("carol@example.net", [lst.upper()], message("hello", "carol@example.net", lst))
    bed.sink.wait_for_recipients(3)
    bed.settle()
    got = bed.sink.by_recipient()
    assert sorted(got) == ["m1@example.net", "m2@example.com", "m3@example.net"]
    assert all(len(v) == 1 for v in got.values()), got
    for rcpt, received in bed.sink.deliveries():
        assert received.mail_from == lst.replace("@", "-bounces@")
        opts = received.rcpt_options[received.rcpt_tos.index(rcpt)]
        assert "NOTIFY=FAILURE" in opts
        assert f"ORCPT=RFC822;{rcpt.upper()}" in opts
        mail_opts = " ".join(received.mail_options)
        assert "RET=HDRS" in mail_opts
        assert "ENVID=" in mail_opts and lst.upper() in mail_opts
    msg = bed.sink.messages[0].message
    lid = lst.replace("@", ".")
    assert msg["List-Id"] == f"Dev talk <{lid}>"
    assert msg["List-Post"] == f"<mailto:{lst}>"
    assert msg["List-Unsubscribe"] == f"<mailto:{lst.replace('@', '-unsubscribe@')}>"
    assert msg["Precedence"] == "list"
    assert msg["Subject"] == "[dev] hello"
    return lst


def members_only_list_refuses_others_with_550(bed) -> bytes:
    """A stranger gets 550 at RCPT, a member (any case) reaches all; returns the refusal text."""
    lst = bed.new_list(["member@example.net", "other@example.net"], posting="members", nonmember_action="reject")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        bed.smtp("stranger@example.net", [lst], message(to=lst, sender="stranger@example.net"))
    code, text = info.value.recipients[lst]
    assert code == 550
    assert b"5.7.1" in text and b"stranger@example.net is not a member" in text
    bed.smtp("Member@Example.NET", [lst], message(to=lst, sender="member@example.net"))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert sorted(r.lower() for r in bed.sink.recipients()) == ["member@example.net", "other@example.net"]
    return text


def new_two_lists(bed, beta_prefix: str | None = None) -> tuple[str, str]:
    """alpha and beta, each with a member of its own and both@ on both."""
    a = bed.new_list(["a1@example.net", "both@example.net"], posting="open", name="alpha")
    extra = {"subject_prefix": beta_prefix} if beta_prefix else {}
    b = bed.new_list(["b1@example.net", "both@example.net"], posting="open", name="beta", **extra)
    return a, b


def assert_two_lists_and_person(bed, a: str, b: str, subject: str) -> None:
    """What a message to lists a and b and to person@ must have become (new_two_lists)."""
    bed.sink.wait_for_recipients(5)
    bed.settle()
    got = bed.sink.by_recipient()
    # Every member of each list gets exactly one copy with that list's headers;
    # both@ is on both lists and so gets one copy from each.
    assert sorted((r, len(v)) for r, v in got.items()) == [
        ("a1@example.net", 1), ("b1@example.net", 1), ("both@example.net", 2), ("person@example.net", 1)]
    ids = sorted(m.message["List-Id"] for m in got["both@example.net"])
    assert ids == sorted([f"<{a.replace('@', '.')}>", f"<{b.replace('@', '.')}>"])
    assert got["a1@example.net"][0].message["List-Id"] == f"<{a.replace('@', '.')}>"
    assert got["a1@example.net"][0].mail_from == a.replace("@", "-bounces@")
    assert got["b1@example.net"][0].message["List-Id"] == f"<{b.replace('@', '.')}>"
    assert got["b1@example.net"][0].mail_from == b.replace("@", "-bounces@")
    # The person gets the message as sent: no list headers, original subject and sender.
    person = got["person@example.net"][0]
    assert person.mail_from == "carol@example.net"
    assert person.message["List-Id"] is None
    assert person.message["Subject"] == subject
    for copies in got.values():
        for m in copies:
            assert m.message.get_content().strip() == "Hello, list."


def two_lists_and_a_person_in_one_smtp_transaction(bed) -> None:
    a, b = new_two_lists(bed, beta_prefix="[beta] ")
    bed.smtp("carol@example.net", [a, "person@example.net", b],
             message("split me", "carol@example.net", f"{a}, {b}, person@example.net"))
    assert_two_lists_and_person(bed, a, b, "split me")
    beta = bed.sink.by_recipient()["b1@example.net"][0]
    assert beta.message["Subject"] == "[beta] split me"
    assert "split (re-submitted" in bed.listmilter.log()


def two_lists_without_a_person_keep_one_in_place(bed) -> None:
    a = bed.new_list(["x1@example.net"], posting="open", name="alpha")
    b = bed.new_list(["x2@example.net"], posting="open", name="beta")
    bed.smtp("carol@example.net", [a, b], message(to=f"{a}, {b}", sender="carol@example.net"))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    got = bed.sink.by_recipient()
    assert sorted((r, len(v)) for r, v in got.items()) == [("x1@example.net", 1), ("x2@example.net", 1)]
    assert got["x1@example.net"][0].message["List-Id"] == f"<{a.replace('@', '.')}>"
    assert got["x2@example.net"][0].message["List-Id"] == f"<{b.replace('@', '.')}>"


def owner_address_reaches_the_owners(bed) -> None:
    lst = bed.new_list(["o1@example.net"], owners=("own1@example.net", "own2@example.com"))
    owner = lst.replace("@", "-owner@")
    bed.smtp("stranger@example.net", [owner], message("for the owners", "stranger@example.net", owner))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert sorted(bed.sink.recipients()) == ["own1@example.net", "own2@example.com"]
    m = bed.sink.messages[0]
    assert m.mail_from == "stranger@example.net" and m.message["List-Id"] is None


def null_sender_is_never_expanded(bed) -> None:
    lst = bed.new_list(["n1@example.net"], posting="open")
    bed.smtp("", [lst], message(to=lst, sender="MAILER-DAEMON@example.net"))
    wait_until(lambda: f"to=<{lst}>" in bed.deliver_log(), 30, what="listmilter deliver")
    bed.settle()
    assert bed.sink.deliveries() == []
    assert "discarded (not expanded: null sender)" in bed.deliver_log()


def custom_list_id_is_in_the_header_and_marks_a_loop(bed) -> None:
    """list_id: the List-Id every copy carries, and what stops a copy that comes back."""
    lst = bed.new_list(["i1@example.net", "i2@example.net"], posting="open",
                       list_id="dev.lists.example.org", description="Dev talk")
    bed.smtp("carol@example.net", [lst], message("first", "carol@example.net", lst))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert {m.message["List-Id"] for m in bed.sink.messages} == {"Dev talk <dev.lists.example.org>"}
    # A member's forwarder sends a copy back to the list: it carries the custom id.
    back = message("Re: first", "i1@example.net", lst, extra="List-Id: Dev talk <DEV.lists.example.org>\r\n")
    bed.smtp("i1@example.net", [lst], back)
    bed.settle(f"list=<{lst}>, status=discarded (not expanded: mail loop")
    assert len(bed.sink.deliveries()) == 2
    assert f"list=<{lst}>, from=<i1@example.net>, status=not expanded (mail loop" in bed.listmilter.log()
