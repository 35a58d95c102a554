"""Lists as members of lists, in the real Postfix bed (both stores): expanded inline by the
milter, cycles cut, each person one copy; X-BeenThere stops loops through lists elsewhere."""

from __future__ import annotations

import collections
import time

from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.conftest import message
from tests.test_subscriptions import ONE_CLICK, http, one_click_url, sbed, web  # noqa: F401 (fixtures)


def _counts(bed) -> collections.Counter:
    return collections.Counter(r.lower() for r in bed.sink.recipients())


def test_two_lists_subscribed_to_each_other_reach_each_person_once(clean_bed):
    bed = clean_bed
    a_name, b_name = f"ring{time.monotonic_ns()}", f"ring{time.monotonic_ns() + 1}"
    a, b = f"{a_name}@example.org", f"{b_name}@example.org"
    bed.listmilter.create_list(a, ["a1@example.net", "both@example.net", b], posting="open")
    bed.listmilter.create_list(b, ["b1@example.net", "Both@Example.NET", a], posting="open")
    for top, other in ((a, b), (b, a)):
        bed.sink.clear()
        started = time.monotonic()
        assert bed.smtp("carol@example.net", [top], message(f"to {top}", "carol@example.net", top)) == {}
        assert time.monotonic() - started < 5        # 250 at once: no hop through the MTA
        bed.sink.wait_for_recipients(3)
        bed.settle()
        assert _counts(bed) == {"a1@example.net": 1, "both@example.net": 1, "b1@example.net": 1}
        for m in bed.sink.messages:
            assert m.mail_from == top.replace("@", "-bounces@")
            assert m.message["List-Id"] == f"<{top.replace('@', '.')}>"
            assert m.message.get_all("X-BeenThere") == [top]
        line = [x for x in bed.deliver_log().splitlines() if f"list=<{top}>" in x][-1]
        assert "status=expanded, members=3" in line and f"nested=<{other}>" in line
    # Neither list address was ever delivered as an address (no pass through the pipe).
    assert f"to=<{a}>" not in bed.deliver_log() and f"to=<{b}>" not in bed.deliver_log()


def test_a_post_back_from_a_list_elsewhere_with_our_x_beenthere_is_not_expanded(clean_bed):
    bed = clean_bed
    lst = bed.new_list(["l1@example.net"], posting="open")
    # What a Mailman list elsewhere, subscribed to ours, sends back: its own List-Id, our X-BeenThere.
    looped = message(to=lst, sender="other-bounces@elsewhere.example",
                     extra=f"X-BeenThere: {lst}\r\nList-Id: <other.elsewhere.example>\r\n")
    bed.smtp("other-bounces@elsewhere.example", [lst], looped)
    wait_until(lambda: f"to=<{lst}>" in bed.deliver_log(), 30, what="the pipe transport")
    bed.settle()
    assert bed.sink.deliveries() == []
    assert "not expanded (mail loop: the message already carries this list's X-BeenThere)" in bed.deliver_log()
    assert "discarded (not expanded: mail loop" in bed.deliver_log()


# Last in this module: the `web` fixture gives the bed a web: section (personal copies) until the end.
def test_a_nested_lists_member_gets_a_one_click_link_that_leaves_that_list(sbed):  # noqa: F811 (the fixture)
    bed = sbed
    inner = bed.new_list(["b1@example.net"], posting="open", name="inner")
    outer = bed.new_list(["a1@example.net", inner], posting="open", name="outer")
    bed.smtp("carol@example.net", [outer], message("personal", "carol@example.net", outer))
    bed.sink.wait_for_recipients(2)
    bed.settle()
    assert _counts(bed) == {"a1@example.net": 1, "b1@example.net": 1}
    got = bed.sink.for_recipient("b1@example.net")[0]
    assert got.message["List-Id"] == f"<{outer.replace('@', '.')}>"
    assert f"nested=<{inner}>" in bed.deliver_log()
    status, body = http(one_click_url(got), ONE_CLICK)
    assert status == 200 and "unsubscribed" in body
    assert "b1@example.net" not in cli(bed.listmilter.config_path, "members", "ls", inner).stdout
    assert inner in cli(bed.listmilter.config_path, "members", "ls", outer).stdout
