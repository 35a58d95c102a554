"""The pure core of nested lists, loop marks and mail that reaches the pipe unexpanded."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listmilter.core import plan

SECRET = b"s" * 32
LS = plan.ListSettings("a@lists.org", "open", "", "", "a.lists.org")


def _expand(lists: dict[str, list[str]], top: str):
    return plan.nested_members(top, lambda a: lists[a.lower()], plan.list_finder(list(lists)))


# -- nested lists ------------------------------------------------------------------
def test_a_list_member_is_replaced_by_its_members_each_address_once():
    lists = {"a@lists.org": ["p1@x.org", "b@lists.org", "both@x.org"],
             "b@lists.org": ["BOTH@x.org", "p2@x.org"]}
    members, nested = _expand(lists, "a@lists.org")
    assert members == [("p1@x.org", "a@lists.org"), ("both@x.org", "a@lists.org"), ("p2@x.org", "b@lists.org")]
    assert nested == ["b@lists.org"]


def test_cycles_are_cut_and_each_list_is_expanded_once():
    lists = {"a@lists.org": ["a1@x.org", "b@lists.org", "both@x.org"],
             "b@lists.org": ["b1@x.org", "A@Lists.org", "both@x.org", "c@lists.org"],
             "c@lists.org": ["b@lists.org", "c1@x.org", "a@lists.org"]}
    for top in lists:
        members, nested = _expand(lists, top)
        assert sorted(m for m, _ in members) == ["a1@x.org", "b1@x.org", "both@x.org", "c1@x.org"]
        assert len(nested) == 2 and top not in nested


def test_role_addresses_extensions_and_other_domains():
    lists = {"a@lists.org": ["b-owner@lists.org", "b+tag@lists.org", "b@other.org", "a-bounces@lists.org"],
             "b@lists.org": ["b1@x.org"]}
    members, nested = _expand(lists, "a@lists.org")
    # -owner@ is an alias, not the list; dev+tag@ is the list (Postfix strips the extension too).
    assert [m for m, _ in members] == ["b-owner@lists.org", "b@other.org", "b1@x.org"]
    assert nested == ["b@lists.org"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f"l{i}@lists.org" for i in range(5)]),
                       st.lists(st.sampled_from([f"l{i}@lists.org" for i in range(5)]
                                                + [f"p{i}@x.org" for i in range(6)]), max_size=8),
                       min_size=1))
def test_any_graph_of_lists_ends_with_each_person_once(graph):
    lists = {k: v for k, v in graph.items()}
    get = lambda a: lists.get(a.lower(), [])  # noqa: E731
    for top in lists:
        members, _ = plan.nested_members(top, get, plan.list_finder(list(lists)))
        people = [m for m, _ in members]
        assert len(people) == len(set(people))
        assert not any(p in lists for p in people)      # a list is never delivered as an address
        # Exactly the people reachable from top.
        reach, todo, seen = set(), [top], {top}
        while todo:
            for m in lists.get(todo.pop(), []):
                if m in lists and m not in seen:
                    seen.add(m)
                    todo.append(m)
                elif m not in lists:
                    reach.add(m)
        assert set(people) == reach


# -- X-BeenThere ---------------------------------------------------------------------
def test_expansion_adds_x_beenthere_and_drops_the_resubmission_marker():
    hdrs = [("Subject", "hi"), ("X-BeenThere", "other@elsewhere.org"),
            ("X-Listmilter-Resubmitted", "a@lists.org; 1000")]
    e = plan.expand_list(LS, ["<a@lists.org>"], ["m@x.org"], hdrs, "Q1", SECRET, 1e9)
    assert ("X-BeenThere", "a@lists.org") in e.add_headers
    assert ("X-Listmilter-Resubmitted", 1) in e.del_headers
    assert not any(n == "X-BeenThere" for n, _ in e.del_headers)   # other lists' marks stay


@pytest.mark.parametrize("value", ["a@lists.org", " A@Lists.ORG ", "<a@lists.org>", "a@lists.org\r\n "])
def test_a_post_that_went_through_the_list_is_a_loop(value):
    assert "X-BeenThere" in plan.loop_reason("s@x.org", [("X-BeenThere", value)], LS)


def test_other_lists_x_beenthere_is_no_loop():
    assert plan.loop_reason("s@x.org", [("X-BeenThere", "b@lists.org"), ("X-BeenThere", "a@other.org")], LS) is None
    assert plan.loop_reason("", [], LS) == "null sender"


# -- the pipe transport and unexpanded mail -------------------------------------------------
NOW = 1_800_000_000.0


def _at_pipe(headers, owner=False, running=True, sender="s@x.org"):
    return plan.unexpanded_at_pipe("a@lists.org", sender, headers, LS, owner, NOW, running)


def test_unexpanded_post_is_resubmitted_when_serve_runs_and_waits_when_it_does_not():
    assert _at_pipe([]).action == plan.RESUBMIT
    waiting = _at_pipe([], running=False)
    assert waiting.action == plan.DEFER and "serve is not running" in waiting.reason


def test_loops_and_bounces_are_discarded_but_the_owner_alias_is_always_resubmitted():
    assert _at_pipe([], sender="").action == plan.DISCARD
    assert _at_pipe([("List-Id", "<a.lists.org>")]).action == plan.DISCARD
    assert _at_pipe([("X-BeenThere", "a@lists.org")]).action == plan.DISCARD
    assert _at_pipe([], owner=True, sender="").action == plan.RESUBMIT


@pytest.mark.parametrize("age, action", [(0, plan.DEFER), (599, plan.DEFER), (600, plan.RESUBMIT),
                                         (86400, plan.RESUBMIT), (-3600, plan.RESUBMIT)])
def test_a_post_back_soon_after_its_resubmission_waits_then_is_tried_again(age, action):
    # A marker from the future (forged, or a clock step) is ignored, never a reason to wait forever.
    marker = ("X-Listmilter-Resubmitted", f"a@lists.org; {int(NOW - age)}")
    assert _at_pipe([marker]).action == action
    assert _at_pipe([("X-Listmilter-Resubmitted", f"b@lists.org; {int(NOW)}")]).action == plan.RESUBMIT
    assert _at_pipe([("X-Listmilter-Resubmitted", "a@lists.org; soon")]).action == plan.RESUBMIT


def test_resubmission_marks_the_message_and_keeps_it_otherwise():
    raw = (b"Return-Path: <s@x.org>\nX-Listmilter-Resubmitted: a@lists.org; 5\nSubject: hi\n"
           b" folded\nX-Listmilter-Resubmitted: b@lists.org; 6\n\nbody\n\nmore\n")
    out = plan.resubmission(raw, "A@lists.org", NOW)
    assert out == (b"X-Listmilter-Resubmitted: A@lists.org; 1800000000\r\nSubject: hi\r\n folded\r\n"
                   b"X-Listmilter-Resubmitted: b@lists.org; 6\r\n\r\nbody\r\n\r\nmore\r\n")
    # What went out is what a second arrival is judged by.
    assert plan.resubmitted_at(plan.header_fields(out), "a@lists.org", NOW) == NOW


@given(st.binary(max_size=400))
def test_resubmission_and_header_fields_take_any_bytes(raw):
    out = plan.resubmission(raw, "a@lists.org", NOW)
    assert out.startswith(b"X-Listmilter-Resubmitted: a@lists.org; ")
    assert b"\n" not in out.replace(b"\r\n", b"")
    fields = plan.header_fields(out)
    assert plan.resubmitted_at(fields, "a@lists.org", NOW) == NOW
    assert _at_pipe(fields).action in (plan.DEFER, plan.DISCARD)


def test_a_second_resubmission_replaces_the_marker():
    out = plan.resubmission(plan.resubmission(b"Subject: x\n\nb\n", "a@lists.org", NOW - 700), "a@lists.org", NOW)
    counts = collections.Counter(n for n, _ in plan.header_fields(out))
    assert counts["X-Listmilter-Resubmitted"] == 1


# -- the order of the edits at end of message ----------------------------------------------
def test_edit_steps_add_every_recipient_before_removing_any_and_headers_last():
    """With milter_default_action = accept an MTA keeps whatever edits were made when the milter
    dies half-way: after any prefix of the steps, either the list address is still there (the pipe
    re-submits: duplicates, never a loss) or every member has been added; and the list's own
    List-Id never appears while the list address is still there (the pipe would take it for a loop)."""
    hdrs = [("Subject", "hi"), ("List-Id", "<up.example>")]
    post = plan.expand_list(LS, ["<a@lists.org>"], [f"m{i}@x.org" for i in range(5)], hdrs, "Q1", SECRET, 1e9)
    owners = plan.expand_owners([plan.Recipient("<b-owner@lists.org>", "b-owner@lists.org", plan.OWNER,
                                                "b@lists.org")], lambda _: ("o@x.org",))
    reinject = plan.Edits(del_rcpts=["<c@lists.org>"])
    steps = list(plan.edit_steps([post, owners, reinject]))
    adds = [s for s in steps if s[0] == plan.ADDRCPT]
    assert len(adds) == 6 and len([s for s in steps if s[0] == plan.DELRCPT]) == 3
    for n in range(len(steps) + 1):
        done = steps[:n]
        rcpts = {a[0] for name, a in done if name == plan.ADDRCPT}
        removed = {a[0] for name, a in done if name == plan.DELRCPT}
        if removed:
            assert len(rcpts) == 6
        if "<a@lists.org>" not in removed:
            assert not any(name == plan.ADDHEADER and a[0] == "List-Id" for name, a in done)
    assert steps[-1] == (plan.ADDHEADER, ("X-BeenThere", "a@lists.org"))
