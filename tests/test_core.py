"""The pure core, without an MTA: addresses, policy, headers, ENVID, the split, the edits."""

from __future__ import annotations

import pytest

from listmilter.core import addresses, envid, headers, plan, policy
from listmilter.core.model import MailingList
from listmilter.core.plan import LIST, OWNER, PLAIN, REFUSED, Recipient
from listmilter.mta import netstring, socketmap

SECRET = b"s" * 32


@pytest.mark.parametrize("good", ["a@example.org", "first.last+tag@sub.example.co.uk", "o'neil@x.example"])
def test_valid_addresses(good):
    assert addresses.check(good) == good


@pytest.mark.parametrize("bad", ["", "a", "a@b", "a@@b.org", "a b@example.org", "<a@example.org>",
                                 "a.@example.org", "x" * 65 + "@example.org", "a@-x.org"])
def test_invalid_addresses(bad):
    with pytest.raises(addresses.AddressError):
        addresses.check(bad)


def test_role_addresses_and_extensions():
    lists = {"dev@example.org": MailingList("dev@example.org"), "dev-owner@example.org": None}
    get = lambda k: lists.get(k)  # noqa: E731
    assert plan.find_list("DEV@Example.ORG", get)[1] is None
    found, role = plan.find_list("dev-confirm+TOKEN@example.org", get)
    assert found.address == "dev@example.org" and (role.role, role.extension) == ("confirm", "token")
    assert plan.find_list("dev-bounces@example.org", get)[1].role == "bounces"
    assert plan.find_list("dev+x@example.org", get)[1] is None
    assert plan.find_list("devs@example.org", get) == (None, None)


def test_posting_policy():
    assert policy.posting_refusal("open", "l@x.org", "a@b.org", False, ()) is None
    assert policy.posting_refusal("members", "l@x.org", "a@b.org", True, ()) is None
    assert "only members" in policy.posting_refusal("members", "l@x.org", "a@b.org", False, ())
    assert policy.posting_refusal("members", "l@x.org", "Own@B.org", False, ("own@b.org",)) is None
    assert "announcement" in policy.posting_refusal("announce", "l@x.org", "a@b.org", True, ())
    assert policy.posting_refusal("announce", "l@x.org", "own@b.org", False, ("own@b.org",)) is None


def test_null_sender_and_loop_are_not_expanded():
    assert policy.not_expanded_reason("", [], "dev.example.org") == "null sender"
    assert "loop" in policy.not_expanded_reason("a@b.org", ["Dev <DEV.example.org>"], "dev.example.org")
    assert policy.not_expanded_reason("a@b.org", ["<other.example.org>"], "dev.example.org") is None


@pytest.mark.parametrize("raw,expected", [
    ("hello", "[dev] hello"),
    ("Re: [dev] hello", None),
    ("[dev] hello", None),
    ("AW: Re: [DEV] hi", None),
    ("=?utf-8?q?Re=3A_=5Bdev=5D_x?=", None),
    ("=?utf-8?b?w7xiZXI=?=", "[dev] =?utf-8?b?w7xiZXI=?="),
    (None, "[dev] "),
])
def test_subject_prefix(raw, expected):
    assert headers.prefixed_subject(raw, "[dev] ") == expected


def test_non_ascii_prefix_is_encoded_and_decodes_back():
    new = headers.prefixed_subject("hello", "[für] ")
    assert new.isascii()
    assert headers.decode(new) == "[für] hello"
    assert headers.decode(headers.prefixed_subject("=?utf-8?b?w7xiZXI=?=", "[für] ")) == "[für] über"


def test_envid_round_trip_and_forgery():
    e = envid.make("ABC123", "dev@example.org", SECRET, 1_800_000_000.7)
    assert len(e) <= 100 and e.startswith("ABC123.")
    assert envid.parse(e, "dev@example.org", SECRET) == envid.Post("ABC123", 1_800_000_000.0)
    assert envid.parse(e.upper().replace("DEV@EXAMPLE.ORG", "dev@example.org"), "dev@example.org", SECRET) is None
    assert envid.parse(e.replace(".tr", ".ts", 1), "dev@example.org", SECRET) is None
    assert envid.parse(e, "other@example.org", SECRET) is None
    assert envid.parse(e.replace("ABC123", "ABC124"), "dev@example.org", SECRET) is None
    assert envid.parse(e, "dev@example.org", b"x" * 32) is None
    long_list = "a" * 60 + "@" + "b" * 40 + ".org"
    assert len(envid.make("Q1", long_list, SECRET, 0)) <= 100
    assert envid.parse(envid.make("Q1", long_list, SECRET, 0), long_list, SECRET) == envid.Post("Q1", 0.0)
    # ENVIDs of listmilter 0.1 and of older keys: tests/test_reference.py, against fixed data


def R(kind, list_address="", rcpt=None):
    return Recipient(rcpt or f"<{list_address or 'p@x.org'}>", list_address or "p@x.org", kind, list_address)


def test_split_one_list_stays_in_place():
    s = plan.split([R(LIST, "a@x.org")])
    assert (s.in_place_list, s.reinject) == ("a@x.org", ())


def test_split_person_stays_lists_are_resubmitted():
    s = plan.split([R(LIST, "a@x.org"), R(PLAIN), R(LIST, "b@x.org")])
    assert (s.in_place_list, s.reinject) == (None, ("a@x.org", "b@x.org"))


def test_split_two_lists_keep_the_first():
    s = plan.split([R(LIST, "a@x.org"), R(LIST, "b@x.org"), R(LIST, "a@x.org", "<A@x.org>")])
    assert (s.in_place_list, s.reinject) == ("a@x.org", ("b@x.org",))


def test_split_only_refused_rejects_whole_message():
    r = Recipient("l@x.org", "l@x.org", REFUSED, "l@x.org", "only members")
    assert plan.split([r]).reject_reason == "only members"
    s = plan.split([r, R(PLAIN)])
    assert s.reject_reason is None and s.refused == (r,)


def test_unique_members_drops_duplicates_and_the_list_itself():
    out = plan.unique_members("dev@x.org", ["a@y.org", "A@Y.org", "dev@x.org", "dev-bounces@x.org",
                                            "devil@x.org", "b@y.org"])
    assert out == ["a@y.org", "devil@x.org", "b@y.org"]


def test_expand_list_edits():
    ls = plan.ListSettings("dev@x.org", "members", "[dev] ", "", "dev.x.org")
    hdrs = [("Subject", "hi"), ("List-Id", "<up.example>"), ("Precedence", "bulk"), ("List-Id", "<up2>")]
    e = plan.expand_list(ls, ["<dev@x.org>"], ["a@y.org", "b@y.org", "a@y.org"], hdrs, "Q1", SECRET, 1e9)
    assert e.del_rcpts == ["<dev@x.org>"]
    assert e.add_rcpts == [("a@y.org", "NOTIFY=FAILURE ORCPT=rfc822;a@y.org"),
                           ("b@y.org", "NOTIFY=FAILURE ORCPT=rfc822;b@y.org")]
    assert e.sender[0] == "<dev-bounces@x.org>" and e.sender[1].startswith("RET=HDRS ENVID=Q1.")
    assert e.del_headers == [("List-Id", 2), ("List-Id", 1), ("Precedence", 1)]
    assert e.change_headers == [("Subject", 1, "[dev] hi")]
    assert ("List-Id", "<dev.x.org>") in e.add_headers and ("Precedence", "list") in e.add_headers


def test_expand_owners():
    owners = {"a@x.org": ("o1@y.org", "o2@y.org"), "b@x.org": ("o2@y.org",), "c@x.org": ()}
    rs = [R(OWNER, "a@x.org", "<a-owner@x.org>"), R(OWNER, "b@x.org", "<b-owner@x.org>")]
    e = plan.expand_owners(rs, owners.get)
    assert e.del_rcpts == ["<a-owner@x.org>", "<b-owner@x.org>"]
    assert e.add_rcpts == [("o1@y.org", None), ("o2@y.org", None)]


def test_socketmap_answers():
    lists = {"dev@example.org": MailingList("dev@example.org")}
    get = lists.get
    assert socketmap.answer("recipients dev@example.org", get, "listmilter") == "OK dev@example.org"
    assert socketmap.answer("transport dev-bounces@example.org", get, "listmilter") == "OK listmilter:"
    assert socketmap.answer("transport dev-confirm+t@example.org", get, "listmilter") == "OK listmilter:"
    assert socketmap.answer("recipients bob@example.org", get, "listmilter") == "NOTFOUND "
    assert socketmap.answer("transport example.org", get, "listmilter") == "NOTFOUND "
    assert socketmap.answer("virtual dev@example.org", get, "listmilter").startswith("PERM")
    assert socketmap.netstring("OK x") == b"4:OK x,"


@pytest.mark.parametrize("wire", [b":x,", b"3:abc;", b"99999999:", b"12x:", b"5:ab"])
def test_socketmap_refuses_malformed_netstrings(wire):
    import io
    with pytest.raises(netstring.Malformed):
        socketmap.read_netstring(io.BytesIO(wire))


def test_socketmap_reads_requests_and_end_of_stream():
    import io
    f = io.BytesIO(b"15:transport a@b.c,0:,")
    assert socketmap.read_netstring(f) == "transport a@b.c"
    assert socketmap.read_netstring(f) == ""
    assert socketmap.read_netstring(f) is None
