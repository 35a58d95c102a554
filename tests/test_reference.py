"""What was sent before an upgrade still works: fixed ENVIDs, one-click tokens, owner
decision codes and confirmation hashes, made once by older code for fixed keys
(tests/data/reference/README says how), read (and, in today's formats, remade) by
today's code. mac-codes.json pins the formats of core/mac.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

from listmilter.app import bounce_processing
from listmilter.core import envid, probes, tokens, verp
from listmilter.core.keys import Keyring

DATA = json.loads((Path(__file__).parent / "data" / "reference" / "links-and-ids.json").read_text())
MAC = json.loads((Path(__file__).parent / "data" / "reference" / "mac-codes.json").read_text())
KEY0, KEY1 = (bytes.fromhex(DATA["keys"][k]) for k in ("0", "1"))
RINGS = {0: Keyring(((0, KEY0),)), 1: Keyring(((1, KEY1), (0, KEY0)))}
ONLY_1 = Keyring(((1, KEY1),))          # key 0 past its grace period


def each(rows: list[dict], name):
    """A test of every row in one (the fast tier pays per test): the check runs for each,
    and a failure names every row that failed, by `name(row)`."""
    def wrap(check):
        def test():
            failed = []
            for row in rows:
                try:
                    check(row)
                except AssertionError as e:
                    failed.append(f"{name(row)}: {e}")
            assert not failed, f"{len(failed)} of {len(rows)} rows:\n" + "\n".join(failed)
        test.__name__, test.__doc__ = check.__name__, check.__doc__
        return test
    return wrap


def test_the_reference_data_is_all_there():
    # A truncated file would make every loop below pass vacuously.
    counts = {name: len(DATA[name]) for name in
              ("envid_0.1", "envid", "unsubscribe_u1", "unsubscribe_u2", "decision", "confirm_hash")}
    assert counts == {"envid_0.1": 9, "envid": 18, "unsubscribe_u1": 9, "unsubscribe_u2": 54,
                      "decision": 16, "confirm_hash": 3}
    assert {name: len(rows) for name, rows in MAC.items()} == {"envid": 18, "decision": 16, "verp": 48,
                                                                "probe": 24, "verp_before_mac": 48}


@each(DATA["envid_0.1"], lambda r: r["envid"][:30])
def test_envids_of_listmilter_0_1_are_no_longer_read(row):
    # They never scored (no post time to check the membership against), and their MAC
    # input could be repeated by the later format (core/envid.py).
    for ring in (KEY0, RINGS[0], RINGS[1]):
        assert envid.parse(row["envid"], row["list"], ring) is None


@each(DATA["envid"], lambda r: f"key{r['key']}-{r['envid'][:30]}")
def test_envids_made_before_core_mac_still_verify(row):
    # Posts sent just before an upgrade: their DSNs come in the days after it.
    post = envid.Post(row["post_id"], float(int(row["posted_at"])))
    assert envid.parse(row["envid"], row["list"], RINGS[row["key"]]) == post
    assert envid.parse(row["envid"], row["list"], RINGS[1]) == post        # after a rotation, in the grace period
    assert envid.parse(row["envid"], row["list"], ONLY_1) == (post if row["key"] == 1 else None)
    assert envid.parse(row["envid"], "other@example.org", RINGS[1]) is None
    assert envid.make(row["post_id"], row["list"], RINGS[row["key"]], row["posted_at"]) != row["envid"]


@each(MAC["envid"], lambda r: f"key{r['key']}-{r['envid'][:30]}")
def test_envids_verify_and_are_made_the_same(row):
    ring = RINGS[row["key"]]
    assert envid.make(row["post_id"], row["list"], ring, row["posted_at"]) == row["envid"]
    post = envid.Post(row["post_id"], float(int(row["posted_at"])))
    assert envid.parse(row["envid"], row["list"], ring) == post
    assert envid.parse(row["envid"], row["list"], RINGS[1]) == post
    assert envid.parse(row["envid"], row["list"], ONLY_1) == (post if row["key"] == 1 else None)
    assert envid.parse(row["envid"], "other@example.org", RINGS[1]) is None


@each(MAC["verp"], lambda r: f"key{r['key']}-{r['use']}-{r['code']}")
def test_verp_and_fanout_codes_are_made_the_same_and_verify(row):
    ring = RINGS[row["key"]]
    assert verp.code(row["list"], row["member"], row["post_id"], row["posted_at"], ring, row["use"]) == row["code"]
    parsed = verp.parse(row["code"])
    assert parsed is not None
    assert verp.verify(parsed, row["list"], row["member"], RINGS[1], row["use"])
    assert verp.verify(parsed, row["list"], row["member"], ONLY_1, row["use"]) == (row["key"] == 1)
    other = "fanout" if row["use"] == "verp" else "verp"
    assert not verp.verify(parsed, row["list"], row["member"], RINGS[1], other)


@each(MAC["verp_before_mac"], lambda r: f"key{r['key']}-{r['use']}-{r['code']}")
def test_verp_and_fanout_codes_made_before_core_mac_still_verify(row):
    # Copies and fan-out posts queued at the upgrade (a fan-out code that fails is discarded).
    parsed = verp.parse(row["code"])
    assert parsed is not None
    assert verp.code(row["list"], row["member"], row["post_id"], row["posted_at"], RINGS[row["key"]],
                     row["use"]) != row["code"]
    assert verp.verify(parsed, row["list"], row["member"], RINGS[1], row["use"])
    assert verp.verify(parsed, row["list"], row["member"], ONLY_1, row["use"]) == (row["key"] == 1)
    other = "fanout" if row["use"] == "verp" else "verp"
    assert not verp.verify(parsed, row["list"], row["member"], RINGS[1], other)
    assert not verp.verify(parsed, row["list"], "zed@example.net", RINGS[1], row["use"])


@each(MAC["probe"], lambda r: f"key{r['key']}-{r['code']}")
def test_probe_codes_are_made_the_same_and_verify(row):
    ring = RINGS[row["key"]]
    assert probes.code(row["list"], row["member"], row["sent_at"], ring) == row["code"]
    bound = probes.Bound(row["member"], float(int(row["sent_at"])))
    assert probes.find(row["code"], row["list"], ["x@example.net", row["member"]], RINGS[1]) == bound
    assert probes.find(row["code"], row["list"], [row["member"]], ONLY_1) == (bound if row["key"] == 1 else None)


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


@each(DATA["unsubscribe_u1"], lambda r: r["token"][:20])
def test_old_format_unsubscribe_tokens_are_read(row):
    assert u1_token(KEY0, row["list"], row["address"]) == row["token"]
    link = tokens.UnsubscribeLink(row["list"].lower(), row["address"], None, tokens.U1, 0)
    assert tokens.read_unsubscribe_token(RINGS[0], row["token"]) == link
    assert tokens.read_unsubscribe_token(RINGS[1], row["token"]) == link
    assert tokens.read_unsubscribe_token(ONLY_1, row["token"]) is None


@each(DATA["unsubscribe_u2"], lambda r: f"key{r['key']}-{r['token'][:20]}")
def test_unsubscribe_tokens_are_read_and_made_the_same(row):
    ring = RINGS[row["key"]]
    assert tokens.unsubscribe_token(ring, row["list"], row["address"], row["epoch"]) == row["token"]
    link = tokens.UnsubscribeLink(row["list"].lower(), row["address"], row["epoch"], tokens.U2, row["key"])
    assert tokens.read_unsubscribe_token(ring, row["token"]) == link
    assert tokens.read_unsubscribe_token(RINGS[1], row["token"]) == link
    assert tokens.read_unsubscribe_token(ONLY_1, row["token"]) == (link if row["key"] == 1 else None)


def _decision_code(row) -> str:
    return row["address"].split("@")[0].split(f"+{row['decision']}-")[1]


@each(DATA["decision"] + MAC["decision"], lambda r: r["address"][:48])
def test_owner_decision_codes_are_accepted(row):
    code = _decision_code(row)
    assert bounce_processing._is_decision_token(code, row["list"], row["member"], row["decision"], RINGS[1])
    assert bounce_processing._is_decision_token(code, row["list"], row["member"], row["decision"], ONLY_1) \
        == (row["key"] == 1)
    other = "keep" if row["decision"] == "remove" else "remove"
    assert not bounce_processing._is_decision_token(code, row["list"], row["member"], other, RINGS[1])
    assert not bounce_processing._is_decision_token(code, row["list"], "zed@example.net", row["decision"], RINGS[1])


@each(MAC["decision"], lambda r: r["address"][:48])
def test_owner_decision_codes_are_made_the_same(row):
    ring = RINGS[row["key"]]
    assert bounce_processing.decision_address(row["list"], row["member"], row["decision"], ring) == row["address"]


@each(DATA["confirm_hash"], lambda r: r["token"])
def test_confirmation_codes_hash_the_same(row):
    assert tokens.token_hash(row["token"]) == row["hash"]
