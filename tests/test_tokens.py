"""One-click unsubscribe tokens (listmilter.core.tokens) and the keyring they use: what a
token hides, that every edit of one is refused, that only its canonical spelling is read,
and that no input makes a reader raise."""

from __future__ import annotations

import base64
import datetime
import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listmilter.app import bounce_processing
from listmilter.core import config, envid, tokens
from listmilter.core.keys import Keyring, keyring

K0, K1 = b"\x00" * 31 + b"\x01", bytes(range(32, 64))
RING = Keyring(((0, K0),))
ROTATED = Keyring(((1, K1), (0, K0)))
LIST = "dev@example.org"
B64URL = string.ascii_letters + string.digits + "-_"
REFERENCE = json.loads((Path(__file__).parent / "data" / "reference" / "links-and-ids.json").read_text())
U1_TOKENS = [r["token"] for r in REFERENCE["unsubscribe_u1"]]
U1_RING = Keyring(((0, bytes.fromhex(REFERENCE["keys"]["0"])),))

quick = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_a_token_names_one_membership_and_hides_the_address_and_its_length():
    t = tokens.unsubscribe_token(RING, "Dev@example.org", "Ann.Smith@example.net", 1796000000.25)
    assert "ann" not in t.lower() and "example" not in t
    assert tokens.read_unsubscribe_token(RING, t) == \
        tokens.UnsubscribeLink(LIST, "Ann.Smith@example.net", 1796000000.25, tokens.U2, 0)
    assert tokens.unsubscribe_token(RING, LIST, "Ann.Smith@example.net", 1796000000.25) == t   # stable
    assert tokens.unsubscribe_token(RING, LIST, "Ann.Smith@example.net", 1796000000.26) != t   # next membership
    assert tokens.read_unsubscribe_token(Keyring(((0, b"x" * 32),)), t) is None              # another site
    lengths = {len(tokens.unsubscribe_token(RING, LIST, a, 0.0))
               for a in ("a@b.cd", "ann@example.net", "x" * 64 + "@" + "y" * 35 + ".org")}
    assert lengths == {196}            # up to 119 characters of list and address: one length
    long = tokens.unsubscribe_token(RING, LIST, "x" * 64 + "@" + "y" * 100 + ".org", 0.0)
    assert len(long) == 367 and tokens.read_unsubscribe_token(RING, long).address.startswith("x" * 64)


def test_a_token_carries_its_key_id_and_survives_a_rotation():
    before = tokens.unsubscribe_token(RING, LIST, "ann@example.net", 5.0)
    after = tokens.unsubscribe_token(ROTATED, LIST, "ann@example.net", 5.0)
    assert base64.urlsafe_b64decode(after + "=" * (-len(after) % 4))[:3] == b"\x02\x00\x01"
    assert tokens.read_unsubscribe_token(ROTATED, before).key_id == 0       # grace period
    assert tokens.read_unsubscribe_token(ROTATED, after).key_id == 1
    assert tokens.read_unsubscribe_token(Keyring(((1, K1),)), before) is None   # key 0 retired
    assert tokens.read_unsubscribe_token(RING, after) is None                   # key 1 unknown here


def _edits(token: str):
    """Every token one character away: each position changed to every other base64url
    character, each character deleted, every character inserted at each position."""
    for i, old in enumerate(token):
        for c in B64URL:
            if c != old:
                yield token[:i] + c + token[i + 1:]
        yield token[:i] + token[i + 1:]
    for i in range(len(token) + 1):
        for c in B64URL:
            yield token[:i] + c + token[i:]


@pytest.mark.parametrize("ring, token", [
    (RING, tokens.unsubscribe_token(RING, LIST, "ann@example.net", 1796000000.0)),
    (ROTATED, tokens.unsubscribe_token(ROTATED, LIST, "x" * 64 + "@" + "y" * 100 + ".org", 0.0)),
    (U1_RING, U1_TOKENS[0]),        # old format, still read during the transition
    (U1_RING, U1_TOKENS[4]),
], ids=["u2", "u2-long", "u1", "u1-b"])
def test_every_single_character_edit_is_refused(ring, token):
    assert tokens.read_unsubscribe_token(ring, token) is not None
    tried = refused = 0
    for edited in _edits(token):
        if edited == token:       # inserting a character next to the same one
            continue
        tried += 1
        refused += tokens.read_unsubscribe_token(ring, edited) is None
    assert tried > 60 * len(token) and refused == tried


@pytest.mark.parametrize("token", [t for t in U1_TOKENS if len(t) % 4] +
                         [tokens.unsubscribe_token(RING, LIST, "x" * 64 + "@" + "y" * 100 + ".org", 0.0)])
def test_only_the_canonical_spelling_is_read(token):
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    # base64's last character carries unused bits: other spellings of the same bytes exist...
    twins = [token[:-1] + c for c in B64URL if c != token[-1]
             and base64.urlsafe_b64decode(token[:-1] + c + "=" * (-len(token) % 4)) == raw]
    assert len(twins) in (3, 15)
    # ...and none of them, nor a padded one, is read.
    ring = U1_RING if token in U1_TOKENS else RING
    assert tokens.read_unsubscribe_token(ring, token) is not None
    for other in twins + [token + "=" * (-len(token) % 4), token + "=="]:
        assert tokens.read_unsubscribe_token(ring, other) is None


_any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF))   # surrogates too


@quick
@given(st.one_of(_any_text, st.text(alphabet=B64URL, min_size=150, max_size=400),
                 st.binary(max_size=2000).map(lambda b: b.decode("latin-1")),
                 st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
                 st.integers(0, 200_000).map(lambda n: "A" * n),
                 st.lists(_any_text, min_size=2, max_size=5).map(".".join)))     # ENVID-shaped
def test_readers_refuse_any_text_and_never_raise(text):
    assert tokens.read_unsubscribe_token(ROTATED, text) is None
    assert envid.parse(text, LIST, ROTATED) is None
    assert not bounce_processing._is_decision_token(text, LIST, "ann@example.net", "keep", ROTATED)


def test_readers_refuse_what_is_not_text():
    for value in (None, b"AgAB", 7, ["AgAB"], "A" * 10_000_000):
        assert tokens.read_unsubscribe_token(ROTATED, value) is None


_local = st.text(alphabet=string.ascii_letters + string.digits + "+_-", min_size=1, max_size=64)
_domain = st.lists(st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=20),
                   min_size=2, max_size=4).map(".".join)
_address = st.builds(lambda lp, d: f"{lp}@{d}", _local, _domain)


@quick
@given(_address, _address, st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([RING, ROTATED]))
def test_round_trip_and_length_buckets(list_address, address, epoch, ring):
    token = tokens.unsubscribe_token(ring, list_address, address, epoch)
    assert tokens.read_unsubscribe_token(ring, token) == \
        tokens.UnsubscribeLink(list_address.lower(), address, epoch, tokens.U2, ring.current_id)
    size = 8 + len(list_address) + 1 + len(address)
    assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == 3 + 16 + -(-size // 128) * 128


def test_keyring_derives_one_key_per_use_and_refuses_short_keys():
    assert RING.mac_key(0, "envid") == K0                     # formats before key ids: key 0 as it is
    assert ROTATED.mac_key(1, "envid") not in (K1, ROTATED.mac_key(1, "bounce decision"))
    assert ROTATED.derive(1, "unsubscribe link", 64) != ROTATED.derive(0, "unsubscribe link", 64)
    assert ROTATED.derive(7, "envid") is None and ROTATED.secret(7) is None
    assert keyring(K0) == RING
    for bad in (b"", b"abc", b"x" * 31):
        with pytest.raises(ValueError):
            Keyring(((0, bad),))


def test_old_links_accepted_through_the_configured_day():
    web = config.parse("web:\n  old_links_until: 2027-06-30\n").web
    last = datetime.datetime(2027, 6, 30, 23, 59, 59, tzinfo=datetime.timezone.utc).timestamp()
    assert web.accepts_old_links(last) and not web.accepts_old_links(last + 1)
    assert not config.parse("web:\n  old_links_until: false\n").web.accepts_old_links(0)
    assert config.parse("").web.old_links_until == config.OLD_LINKS_UNTIL
    with pytest.raises(config.ConfigError, match=":2: web.old_links_until must be a date"):
        config.parse("web:\n  old_links_until: soon\n")
