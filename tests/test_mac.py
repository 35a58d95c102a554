"""core/mac.py: the one MAC of every code listmilter puts in mail (no MTA)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from listmilter.core import mac

KEY = b"k" * 32
fields = st.lists(st.text(max_size=12), max_size=5)


@given(a=fields, b=fields)
def test_different_fields_never_give_the_same_input(a, b):
    # Length prefixes: ("ab", "c") and ("a", "bc"), or ("a\0b",) and ("a", "b"), differ.
    if a != b:
        assert mac.digest(KEY, *a) != mac.digest(KEY, *b)


def test_field_boundaries_cannot_be_moved():
    assert mac.tag(KEY, "ab", "c") != mac.tag(KEY, "a", "bc")
    assert mac.tag(KEY, "a\0b") != mac.tag(KEY, "a", "b")
    assert mac.tag(KEY, "") != mac.tag(KEY)


def test_a_full_tag_is_128_bits_and_more_in_lower_case_base32():
    tag = mac.tag(KEY, "x")
    assert len(tag) == mac.FULL == 26 and set(tag) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert mac.tag(KEY, "x", length=13) == tag[:13]
    assert mac.tag(b"j" * 32, "x") != tag


@given(st.one_of(st.text(), st.none(), st.integers(), st.binary()))
def test_same_takes_anything_from_mail(given_value):
    assert mac.same(given_value, mac.tag(KEY, "x")) is (given_value == mac.tag(KEY, "x"))
