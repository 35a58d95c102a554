"""What was sent before an upgrade still works: fixed ENVIDs, one-click tokens, owner
decision codes and confirmation hashes, made once by older code for fixed keys
(tests/data/reference/README says how), read and remade by today's code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from listmilter.app import bounce_processing
from listmilter.core import envid, tokens
from listmilter.core.keys import Keyring

DATA = json.loads((Path(__file__).parent / "data" / "reference" / "links-and-ids.json").read_text())
KEY0, KEY1 = (bytes.fromhex(DATA["keys"][k]) for k in ("0", "1"))
RINGS = {0: Keyring(((0, KEY0),)), 1: Keyring(((1, KEY1), (0, KEY0)))}
ONLY_1 = Keyring(((1, KEY1),))          # key 0 past its grace period


def test_the_reference_data_is_all_there():
    # A truncated file would make every loop below pass vacuously.
    counts = {name: len(DATA[name]) for name in
              ("envid_0.1", "envid", "unsubscribe_u1", "unsubscribe_u2", "decision", "confirm_hash")}
    assert counts == {"envid_0.1": 9, "envid": 18, "unsubscribe_u1": 9, "unsubscribe_u2": 54,
                      "decision": 16, "confirm_hash": 3}


@pytest.mark.parametrize("row", DATA["envid_0.1"], ids=lambda r: r["envid"][:30])
def test_envids_of_listmilter_0_1_verify(row):
    for ring in (KEY0, RINGS[0], RINGS[1]):
        assert envid.parse(row["envid"], row["list"], ring) == envid.Post(row["post_id"], None)
    assert envid.parse(row["envid"], row["list"], ONLY_1) is None
    assert envid.parse(row["envid"], "other@example.org", KEY0) is None


@pytest.mark.parametrize("row", DATA["envid"], ids=lambda r: f"key{r['key']}-{r['envid'][:30]}")
def test_envids_with_the_post_time_verify_and_are_made_the_same(row):
    ring = RINGS[row["key"]]
    assert envid.make(row["post_id"], row["list"], ring, row["posted_at"]) == row["envid"]
    post = envid.Post(row["post_id"], float(int(row["posted_at"])))
    assert envid.parse(row["envid"], row["list"], ring) == post
    assert envid.parse(row["envid"], row["list"], RINGS[1]) == post        # after a rotation, in the grace period
    assert envid.parse(row["envid"], row["list"], ONLY_1) == (post if row["key"] == 1 else None)


def u1_token(key0: bytes, list_address: str, address: str) -> str:
    """A one-click token as listmilter made them before key ids, for the real beds' own keys.
    Written from the format's description, not with listmilter's code; the test below
    checks it against the reference tokens made by the old code itself."""
    def key(label):
        return hmac.new(key0, b"listmilter unsubscribe " + label, hashlib.sha256).digest()
    plain = f"{list_address.lower()}\0{address}".encode()
    tag = hmac.new(key(b"mac"), b"u1" + plain, hashlib.sha256).digest()[:16]
    stream = b"".join(hmac.new(key(b"enc"), tag + i.to_bytes(4, "big"), hashlib.sha256).digest()
                      for i in range(len(plain) // 32 + 1))
    sealed = tag + bytes(a ^ b for a, b in zip(plain, stream, strict=False))
    return base64.urlsafe_b64encode(sealed).decode().rstrip("=")


@pytest.mark.parametrize("row", DATA["unsubscribe_u1"], ids=lambda r: r["token"][:20])
def test_old_format_unsubscribe_tokens_are_read(row):
    assert u1_token(KEY0, row["list"], row["address"]) == row["token"]
    link = tokens.UnsubscribeLink(row["list"].lower(), row["address"], None, tokens.U1, 0)
    assert tokens.read_unsubscribe_token(RINGS[0], row["token"]) == link
    assert tokens.read_unsubscribe_token(RINGS[1], row["token"]) == link
    assert tokens.read_unsubscribe_token(ONLY_1, row["token"]) is None


@pytest.mark.parametrize("row", DATA["unsubscribe_u2"], ids=lambda r: f"key{r['key']}-{r['token'][:20]}")
def test_unsubscribe_tokens_are_read_and_made_the_same(row):
    ring = RINGS[row["key"]]
    assert tokens.unsubscribe_token(ring, row["list"], row["address"], row["epoch"]) == row["token"]
    link = tokens.UnsubscribeLink(row["list"].lower(), row["address"], row["epoch"], tokens.U2, row["key"])
    assert tokens.read_unsubscribe_token(ring, row["token"]) == link
    assert tokens.read_unsubscribe_token(RINGS[1], row["token"]) == link
    assert tokens.read_unsubscribe_token(ONLY_1, row["token"]) == (link if row["key"] == 1 else None)


@pytest.mark.parametrize("row", DATA["decision"], ids=lambda r: r["address"][:40])
def test_owner_decision_codes_are_made_the_same_and_accepted(row):
    ring = RINGS[row["key"]]
    assert bounce_processing.decision_address(row["list"], row["member"], row["decision"], ring) == row["address"]
    code = row["address"].split("@")[0].split(f"+{row['decision']}-")[1]
    assert bounce_processing._is_decision_token(code, row["list"], row["member"], row["decision"], RINGS[1])
    assert bounce_processing._is_decision_token(code, row["list"], row["member"], row["decision"], ONLY_1) \
        == (row["key"] == 1)
    other = "keep" if row["decision"] == "remove" else "remove"
    assert not bounce_processing._is_decision_token(code, row["list"], row["member"], other, RINGS[1])


@pytest.mark.parametrize("row", DATA["confirm_hash"], ids=lambda r: r["token"])
def test_confirmation_codes_hash_the_same(row):
    assert tokens.token_hash(row["token"]) == row["hash"]
