"""Subscription abuse through the real Postfix, on both stores: command mail whose From:
is not its envelope sender, floods of it, and the budgets that keep a member's
unsubscribe and a real subscriber's confirmation working during one.

Every message goes through the bed's Postfix to the role address, the pipe transport
hands it to `listmilter serve`, and what listmilter sends goes back through Postfix to
the sink, where it is counted. The pure decisions: tests/test_subscription_abuse_core.py.
"""

from __future__ import annotations

import re
import smtplib

from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import message

SPAMMER = "spammer@example.com"


def role(lst: str, name: str) -> str:
    return lst.replace("@", f"-{name}@")


def command(bed, sender: str, from_: str, to: str, subject: str = "", body: str = "",
            client: str = "127.0.0.1") -> None:
    """One command mail: envelope sender `sender`, From: `from_`, from SMTP client `client`."""
    with smtplib.SMTP("127.0.0.1", bed.postfix.port, timeout=60, source_address=(client, 0)) as s:
        s.sendmail(sender, [to], message(subject, from_, to, body=body))


def handled(bed, lst: str) -> list[str]:
    """The deliver log's lines for commands to `lst`."""
    return [line for line in bed.deliver_log().splitlines() if f"list=<{lst}>" in line and "command=" in line]


def wait_handled(bed, lst: str, count: int, timeout: float = 120) -> list[str]:
    return wait_until(lambda: len(handled(bed, lst)) >= count and handled(bed, lst), timeout,
                      what=f"{count} commands to {lst} in the deliver log")


def members(bed, lst: str) -> list[str]:
    return sorted(cli(bed.listmilter.config_path, "members", "ls", lst).stdout.split())


def mail_for(bed, address: str, subject: str, timeout: float = 60):
    return wait_until(lambda: next((m for m in bed.sink.for_recipient(address)
                                    if subject in str(m.message["Subject"])), None),
                      timeout, what=f"mail for {address} with {subject!r} in the subject")


def confirm(bed, address: str, confirmation) -> None:
    """Reply to a confirmation mail as a person does: to its Reply-To, Subject kept."""
    reply_to = confirmation.message["Reply-To"]
    command(bed, address, address, reply_to, f"Re: {confirmation.message['Subject']}", "> quoted\n")


def test_forged_from_flood_sends_the_per_sender_budget_and_members_still_get_through(clean_bed):
    bed = clean_bed
    member, real = "member@example.net", "real@example.net"
    lst = bed.new_list([member], posting="open")
    victims = [f"victim{n}@example.net" for n in range(100)]
    # 100 command mails from one envelope sender, each with a third party's From:, in one session.
    with smtplib.SMTP("127.0.0.1", bed.postfix.port, timeout=60) as s:
        for n, victim in enumerate(victims):
            to = role(lst, "subscribe" if n % 2 else "request")
            s.sendmail(SPAMMER, [to], message("subscribe", victim, to))
    lines = wait_handled(bed, lst, 100)
    bed.settle()
    # Exactly the per-sender budget (confirm_limit_per_sender, 3) of confirmations went out.
    sent = [m for m in bed.sink.messages if set(m.rcpt_tos) & set(victims)]
    assert len(sent) == 3, [m.rcpt_tos for m in sent]
    assert all("Please confirm: join" in str(m.message["Subject"]) for m in sent)
    assert not bed.sink.for_recipient(SPAMMER)
    # Every other one is refused by that limit, on a line that says which limit and who.
    refused = [line for line in lines if "status=ignored (limit confirm_limit_per_sender: 3 mails to others "
               "asked for by this sender today)" in line]
    assert len(refused) == 97
    assert all(f"from=<{SPAMMER}>" in line and "client=127.0.0.1" in line for line in refused)
    assert sum("confirmation sent" in line for line in lines) == 3
    assert members(bed, lst) == [member]

    # The same day: a real subscriber joins, and the member leaves, each by a confirmed reply.
    command(bed, real, real, role(lst, "subscribe"), "join")
    confirm(bed, real, mail_for(bed, real, "Please confirm: join"))
    mail_for(bed, real, "Welcome")
    command(bed, member, member, role(lst, "request"), "unsubscribe")
    confirm(bed, member, mail_for(bed, member, "Please confirm: leave"))
    mail_for(bed, member, "You have left")
    assert members(bed, lst) == [real]
    # The flood goes on meanwhile: still nothing more to third parties.
    command(bed, SPAMMER, "victim100@example.net", role(lst, "subscribe"), "join")
    wait_handled(bed, lst, 105)
    bed.settle()
    assert len([m for m in bed.sink.messages if set(m.rcpt_tos) - {real, member}]) == 3


def test_rotating_senders_meet_the_per_client_limit_read_from_received(clean_bed):
    bed = clean_bed
    lst = bed.new_list([], posting="open", confirm_limit_per_client="4")
    targets = [f"t{n}@example.net" for n in range(8)]
    for n, target in enumerate(targets):               # one client, a new envelope sender each time
        command(bed, f"s{n}@example.com", target, role(lst, "subscribe"), "join")
    lines = wait_handled(bed, lst, 8)
    bed.settle()
    assert len([r for r in bed.sink.recipients() if r in targets]) == 4
    assert sum("ignored (limit confirm_limit_per_client: 4 mails to others asked for from 127.0.0.1 today)"
               in line for line in lines) == 4
    # Another client (its address is what our Postfix wrote in Received:) has its own count.
    command(bed, "s9@example.com", "t9@example.net", role(lst, "subscribe"), "join", client="127.0.0.2")
    mail_for(bed, "t9@example.net", "Please confirm: join")
    (line,) = [line for line in wait_handled(bed, lst, 9) if "address=<t9@example.net>" in line]
    assert "client=127.0.0.2" in line and line.endswith("status=confirmation sent")
    assert members(bed, lst) == []


def test_forged_unsubscribe_with_unsubscribe_confirm_false_asks_the_member(clean_bed):
    bed = clean_bed
    alice, bob = "alice@example.net", "bob@example.net"
    lst = bed.new_list([alice, bob], posting="open", unsubscribe_confirm="false")
    command(bed, SPAMMER, alice, role(lst, "unsubscribe"), "bye")
    confirmation = mail_for(bed, alice, "Please confirm: leave")
    line = wait_handled(bed, lst, 1)[-1]
    assert "status=confirmation sent (From: is not the envelope sender)" in line
    assert members(bed, lst) == [alice, bob]
    assert not bed.sink.for_recipient(SPAMMER)
    # Her own request (envelope sender = From:) leaves at once, as the list says.
    command(bed, bob, bob, role(lst, "unsubscribe"), "bye")
    mail_for(bed, bob, "You have left")
    assert members(bed, lst) == [alice]
    # The confirmation the forger caused works for Alice, should she want it.
    confirm(bed, alice, confirmation)
    mail_for(bed, alice, "You have left")
    assert members(bed, lst) == []


def test_forged_subscribe_to_an_open_list_adds_nobody_at_once(clean_bed):
    bed = clean_bed
    lst = bed.new_list([], posting="open", subscribe_policy="open")
    victim, self_ = "victim@example.net", "self@example.net"
    command(bed, SPAMMER, victim, role(lst, "subscribe"), "join")
    confirmation = mail_for(bed, victim, "Please confirm: join")
    assert re.search(r"confirm [a-z2-7]{24}", str(confirmation.message["Subject"]))
    line = wait_handled(bed, lst, 1)[-1]
    assert "status=confirmation sent (From: is not the envelope sender)" in line
    assert members(bed, lst) == []
    assert f"{victim}\tsubscribe\tawaiting-confirmation" in cli(bed.listmilter.config_path, "pending", lst).stdout
    # Someone asking for themselves joins at once; the victim only by confirming.
    command(bed, self_, self_, role(lst, "subscribe"), "join")
    mail_for(bed, self_, "Welcome")
    assert members(bed, lst) == [self_]
    confirm(bed, victim, confirmation)
    mail_for(bed, victim, "Welcome")
    assert members(bed, lst) == [self_, victim]
