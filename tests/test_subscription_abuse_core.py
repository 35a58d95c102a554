"""Subscription abuse, the pure core: who is trusted to change an address at once, the
daily limits and their two budgets, the client address from Received:, the counters.
The same through the real Postfix: tests/test_subscription_abuse.py."""

from __future__ import annotations

import ipaddress
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listmilter.app import notices
from listmilter.core import commands, config, subscriptions, tokens
from listmilter.core.subscriptions import MEMBER, OWN, OWNERS, SENDER, UNVERIFIED, Policy, Request, Sent, State
from listmilter.core.tokens import Pending
from listmilter.store.pending import PendingDB

LIST = "dev@example.org"
SELF = Request("ann@example.net", "Ann@Example.NET", "192.0.2.7")        # From: is the envelope sender
FORGED = Request("spammer@example.com", "victim@example.net", "192.0.2.66")
DMARC = Request("bounces@esp.example", "ann@example.net", "192.0.2.7", dmarc_pass=True)
NEW, MEMBER_STATE = State(is_member=False), State(is_member=True)


def _mails(outcome):
    return [(m.template, m.to) for m in outcome.mails]


# -- who is trusted -------------------------------------------------------------------
def test_trust_is_from_matching_the_envelope_sender_or_dmarc():
    assert SELF.trusted                      # address keys: case does not matter
    assert not FORGED.trusted
    assert DMARC.trusted                     # the seam: an edge that checked DMARC for From:
    assert not Request("a@example.net", "a@example.net.evil.example").trusted
    assert not Request("", "victim@example.net").trusted


@pytest.mark.parametrize("policy", subscriptions.POLICIES)
def test_forged_subscribe_only_ever_sends_a_confirmation_to_the_address(policy):
    out = subscriptions.on_command(commands.SUBSCRIBE, Policy(policy), NEW, FORGED)
    assert out.change is None and out.create == (tokens.CONFIRM, "subscribe")
    assert _mails(out) == [("confirm_subscribe", MEMBER)] and out.budget == UNVERIFIED
    # Where the policy would not have asked the address, the log says why it does now.
    assert out.status == ("confirmation sent (From: is not the envelope sender)"
                          if policy in ("open", "moderate") else "confirmation sent")


def test_trusted_subscribe_follows_the_policy():
    table = {"open": ("subscribe", None, [("welcome", MEMBER)]),
             "confirm": (None, (tokens.CONFIRM, "subscribe"), [("confirm_subscribe", MEMBER)]),
             "moderate": (None, (tokens.MODERATE, "subscribe"),
                          [("moderation_waiting", MEMBER), ("moderation_request", OWNERS)]),
             "confirm+moderate": (None, (tokens.CONFIRM, "subscribe"), [("confirm_subscribe", MEMBER)])}
    for request in (SELF, DMARC):
        for policy, (change, create, mails) in table.items():
            out = subscriptions.on_command(commands.SUBSCRIBE, Policy(policy), NEW, request)
            assert (out.change, out.create, _mails(out), out.budget) == (change, create, mails, OWN), policy


@pytest.mark.parametrize("confirm", [True, False])
def test_forged_unsubscribe_removes_nobody_and_asks_the_member(confirm):
    out = subscriptions.on_command(commands.UNSUBSCRIBE, Policy(unsubscribe_confirm=confirm), MEMBER_STATE, FORGED)
    assert out.change is None and out.create == (tokens.CONFIRM, "unsubscribe")
    assert _mails(out) == [("confirm_unsubscribe", MEMBER)] and out.budget == UNVERIFIED
    assert out.status.endswith("(From: is not the envelope sender)") == (not confirm)
    # The member's own request leaves at once where the list says so.
    out = subscriptions.on_command(commands.UNSUBSCRIBE, Policy(unsubscribe_confirm=confirm), MEMBER_STATE, SELF)
    assert (out.change == "unsubscribe") == (not confirm) and out.budget == OWN


def test_a_confirmation_asked_for_by_someone_else_then_follows_the_policy():
    now = time.time()
    pending = Pending(tokens.CONFIRM, LIST, "victim@example.net", "", "subscribe", "mail", "<id>", now,
                      now + 86400, None, "")
    assert subscriptions.on_token(pending, LIST, Policy("open"), now).change == "subscribe"
    assert subscriptions.on_token(pending, LIST, Policy("moderate"), now).create == (tokens.MODERATE, "subscribe")


def test_which_budget_pays():
    # Replies to the envelope sender are its own: help and token refusals, whoever From: says.
    assert subscriptions.on_command(commands.HELP, Policy(), NEW, FORGED).budget == OWN
    assert subscriptions.on_token(None, LIST, Policy(), time.time(), state=NEW, request=FORGED).budget == OWN
    # "Already a member" / "not a member" for a forged From: goes to a third party.
    assert subscriptions.on_command(commands.SUBSCRIBE, Policy(), MEMBER_STATE, FORGED).budget == UNVERIFIED
    assert subscriptions.on_command(commands.UNSUBSCRIBE, Policy(), NEW, FORGED).budget == UNVERIFIED
    # Nothing sent, nothing counted.
    waiting = State(False, pending=Pending(tokens.CONFIRM, LIST, "victim@example.net", "", "subscribe", "", "",
                                           0, 2e9, None, ""))
    assert subscriptions.on_command(commands.SUBSCRIBE, Policy(), waiting, FORGED).budget is None


# -- the limits -------------------------------------------------------------------------
LIMITS = Policy(limit_address=3, limit_list=100, limit_sender=4, limit_client=10)


@pytest.mark.parametrize("sent, name", [
    (Sent(unverified_to_address=3), "confirm_limit_per_address"),
    (Sent(unverified_sender=4), "confirm_limit_per_sender"),
    (Sent(unverified_client=10), "confirm_limit_per_client"),
    (Sent(unverified_list=100), "confirm_limit_per_list"),
])
def test_each_limit_of_the_unverified_budget(sent, name):
    out = subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=sent), FORGED)
    assert out.ignored and out.limit == name and not out.mails and out.create is None
    assert out.status.startswith(f"ignored (limit {name}: ")
    # One below each limit passes.
    below = Sent(**{k: max(v - 1, 0) for k, v in vars(sent).items()})
    assert not subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=below), FORGED).ignored


def test_limit_status_names_the_limit_and_who():
    out = subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=Sent(unverified_client=10)), FORGED)
    assert out.status == "ignored (limit confirm_limit_per_client: 10 mails to others asked for from 192.0.2.66 today)"
    out = subscriptions.on_command(commands.HELP, LIMITS, State(False, sent=Sent(to_sender=3)), SELF)
    assert out.status == "ignored (limit confirm_limit_per_address: 3 replies to this address today)"


def test_unknown_client_has_no_client_limit_but_the_others_hold():
    local = Request("spammer@example.com", "victim@example.net", "")
    assert not subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=Sent(unverified_client=99)),
                                        local).ignored
    assert subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=Sent(unverified_sender=4)),
                                    local).limit == "confirm_limit_per_sender"


def test_the_own_budget_has_the_per_address_limit_only():
    for kind, state in ((commands.HELP, NEW), (commands.SUBSCRIBE, NEW), (commands.UNSUBSCRIBE, MEMBER_STATE)):
        capped = State(state.is_member, sent=Sent(to_sender=3, to_address=3))
        assert subscriptions.on_command(kind, LIMITS, capped, SELF).limit == "confirm_limit_per_address"
    # DMARC: the reply goes to From:, counted there.
    assert subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=Sent(to_sender=3)), DMARC).budget \
        == OWN
    assert subscriptions.on_command(commands.SUBSCRIBE, LIMITS, State(False, sent=Sent(to_address=3)), DMARC).ignored


def test_a_flood_of_forged_requests_never_delays_a_member_or_a_real_subscriber():
    flooded = Sent(unverified_to_address=10**6, unverified_sender=10**6, unverified_client=10**6,
                   unverified_list=10**6)
    for policy in (Policy("confirm"), Policy("open", unsubscribe_confirm=False), LIMITS):
        leave = subscriptions.on_command(commands.UNSUBSCRIBE, policy, State(True, sent=flooded), SELF)
        join = subscriptions.on_command(commands.SUBSCRIBE, policy, State(False, sent=flooded), SELF)
        assert not leave.ignored and not join.ignored and leave.budget == join.budget == OWN
        assert leave.change == "unsubscribe" or leave.create == (tokens.CONFIRM, "unsubscribe")
        assert join.change == "subscribe" or join.create == (tokens.CONFIRM, "subscribe")
    # ... nor the confirmation itself: a valid token is never limited.
    now = time.time()
    pending = Pending(tokens.CONFIRM, LIST, "ann@example.net", "", "unsubscribe", "", "", now, now + 86400, None, "")
    out = subscriptions.on_token(pending, LIST, Policy(), now, state=State(True, sent=Sent(10**6, 10**6)),
                                 request=SELF)
    assert out.change == "unsubscribe" and out.budget is None
    # And the own budget of one address never stops mail that others asked for elsewhere.
    assert not subscriptions.on_command(commands.SUBSCRIBE, Policy(), State(False, sent=Sent(10**6, 10**6)),
                                        FORGED).ignored


def test_settings_give_the_limits():
    cfg = config.parse("defaults:\n  confirm_limit_per_sender: 5\n  confirm_limit_per_client: 7\n")
    policy = subscriptions.policy_from(cfg.list_settings({}))
    assert (policy.limit_address, policy.limit_sender, policy.limit_client, policy.limit_list) == (3, 5, 7, 100)
    for bad in ("0", "-1", "many"):
        with pytest.raises(config.ConfigError):
            config.parse(f"defaults:\n  confirm_limit_per_sender: {bad}\n")


# -- every input ends in a defined outcome ------------------------------------------------
_texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "ann@example.net", "ANN@example.net",
                                                          "victim@example.net", "<>", "a@b@c"]))
_counts = st.integers(min_value=0, max_value=10**9)
_pendings = st.one_of(st.none(), st.builds(
    Pending, st.sampled_from([tokens.CONFIRM, tokens.MODERATE]), st.sampled_from([LIST, "x@example.org"]),
    _texts, st.text(max_size=5), st.sampled_from(["subscribe", "unsubscribe"]), st.just("mail"), st.just(""),
    st.floats(0, 2e9), st.floats(0, 4e9), st.one_of(st.none(), st.floats(0, 2e9)), st.just("")))
_TEMPLATES = subscriptions.LIMITED | {"welcome", "goodbye", "rejected", "moderation_request", "owner_joined",
                                      "owner_left"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([commands.SUBSCRIBE, commands.UNSUBSCRIBE, commands.HELP]),
       request=st.builds(Request, _texts, _texts, st.text(max_size=20), st.booleans()),
       policy=st.builds(Policy, st.one_of(st.sampled_from(subscriptions.POLICIES), st.text(max_size=10)),
                        st.booleans(), st.booleans(), st.integers(1, 30), st.integers(1, 10**6),
                        st.integers(1, 10**6), st.integers(1, 10**6), st.integers(1, 10**6)),
       is_member=st.booleans(), pending=_pendings,
       sent=st.builds(Sent, _counts, _counts, _counts, _counts, _counts, _counts))
def test_decision_never_raises_and_is_always_defined(kind, request, policy, is_member, pending, sent):
    out = subscriptions.on_command(kind, policy, State(is_member, pending, sent), request)
    assert isinstance(out, subscriptions.Outcome) and out.status
    assert out.change in (None, "subscribe", "unsubscribe") and out.budget in (None, OWN, UNVERIFIED)
    assert all(m.template in _TEMPLATES and m.to in (MEMBER, SENDER, OWNERS) for m in out.mails)
    if out.change is not None:               # nothing changes at once for someone else
        assert request.trusted
    if out.ignored:
        assert not out.mails and out.change is None and out.create is None and out.budget is None
    elif out.budget == UNVERIFIED:           # mail to a third party only within every limit
        assert not request.trusted and sent.unverified_to_address < policy.limit_address
        assert sent.unverified_sender < policy.limit_sender and sent.unverified_list < policy.limit_list
        assert not request.client or sent.unverified_client < policy.limit_client
    elif out.budget == OWN:
        assert min(sent.to_sender, sent.to_address) < policy.limit_address
    if out.limit:
        assert out.ignored and out.status.startswith(f"ignored (limit {out.limit}: ")
    # A token (valid or not) presented in the same circumstances: defined as well.
    tok = subscriptions.on_token(pending, LIST, policy, 1e9, sender_is_owner=is_member, state=State(is_member,
                                 pending, sent), request=request)
    assert isinstance(tok, subscriptions.Outcome) and tok.status and tok.budget in (None, OWN)


# -- the client address: the topmost Received: header ---------------------------------------
POSTFIX = (b"Return-Path: <spammer@example.com>\n"
           b"Received: from [6.6.6.6] (mail.example.com [192.0.2.66])\n"
           b"\tby mx.example.test (Postfix) with ESMTP id 4Fx2Q1Z0D3\n"
           b"\tfor <dev-subscribe@example.org>; Wed,  2 Dec 2026 01:01:38 +0000 (UTC)\n"
           b"Received: from forged ([10.9.9.9]) by elsewhere\n"
           b"From: victim@example.net\n\nbody [1.1.1.1]\n")


@pytest.mark.parametrize("data, client", [
    (POSTFIX, "192.0.2.66"),                  # the last [ADDR] of the first line: not the HELO
    (POSTFIX.replace(b"\n", b"\r\n"), "192.0.2.66"),
    (b"Received: from h (unknown [IPv6:2001:DB8::0:1])\n\tby mx\nSubject: x\n\nb", "2001:db8::1"),
    (b"Received: from h (h [127.0.0.2] (may be forged))\n\tby mx (8.17.1.9/8.17.1.9/Debian-2)\n\nb", "127.0.0.2"),
    (b"Received: by mx.example.test (Postfix, from userid 0)\n\tid X\nReceived: from x (x [192.0.2.1])\n\nb", ""),
    (b"Subject: no received\n\nReceived: from x (x [192.0.2.1])\n", ""),
    (b"Received: from x (x [999.1.1.1])\n\n", ""),
    (b"", ""),
    (b"Received: from \xff\xfe ( [192.0.2.9])\n\n", "192.0.2.9"),
])
def test_received_client(data, client):
    assert commands.received_client(data) == client


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_received_client_never_raises(data):
    got = commands.received_client(b"Received: from " + data)
    assert got == "" or ipaddress.ip_address(got)
    assert commands.received_client(data) == "" or ipaddress.ip_address(commands.received_client(data))


# -- the counters ------------------------------------------------------------------------
def test_counters_per_budget_sender_and_client(state):
    db = state.pending()
    now = time.time()
    for n in range(3):
        db.record_sent(LIST, f"third{n}@example.net", "confirm_subscribe", budget=UNVERIFIED,
                       sender="Spammer@example.com", client="192.0.2.66")
    db.record_sent(LIST, "victim@example.net", "confirm_subscribe", budget=UNVERIFIED, sender="other@example.com",
                   client="192.0.2.66")
    db.record_sent(LIST, "ann@example.net", "help", sender="ann@example.net", client="192.0.2.66")
    db.record_sent("other@example.org", "victim@example.net", "help", budget=UNVERIFIED,
                   sender="spammer@example.com")
    db.record_sent(LIST, "victim@example.net", "help", budget=UNVERIFIED, sender="spammer@example.com",
                   now=now - 2 * 86400)       # older than a day
    assert db.sent_counts(LIST, FORGED) == Sent(to_sender=0, to_address=0, unverified_to_address=1,
                                                unverified_sender=3, unverified_client=4, unverified_list=4)
    assert db.sent_counts(LIST, SELF) == Sent(1, 1, 0, 0, 0, 4)
    assert db.sent_counts(LIST, Request("spammer@example.com", "victim@example.net", "")).unverified_client == 0
    db.close()


def test_an_old_counter_table_gets_the_new_columns(tmp_path):
    old = sqlite3.connect(tmp_path / "pending.sqlite")
    old.executescript("CREATE TABLE sent (list TEXT NOT NULL, key TEXT NOT NULL, what TEXT NOT NULL, "
                      "at REAL NOT NULL);")
    old.execute("INSERT INTO sent VALUES (?, ?, ?, ?)", (LIST, "ann@example.net", "help", time.time()))
    old.commit()
    old.close()
    db = PendingDB(str(tmp_path))
    assert db.sent_counts(LIST, SELF).to_sender == 1          # counted as the address's own
    db.record_sent(LIST, "v@example.net", "help", budget=UNVERIFIED, sender="ann@example.net", client="192.0.2.7")
    assert db.sent_counts(LIST, SELF).unverified_sender == 1
    db.close()
    assert PendingDB(str(tmp_path)).sent_counts(LIST, SELF).to_sender == 1   # opening again changes nothing


def test_templates_of_every_outcome_exist():
    for name in _TEMPLATES:
        assert notices.template_text(name).startswith("Subject: ")
