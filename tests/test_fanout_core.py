"""The fan-out's pure parts, without an MTA: the fan-out address and its code, the progress
record, the order members are done in, the queued post as the pipe gives it, DATA stuffing,
the config keys, and the milter's plan for a personal post with a re-injection listener."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listmilter.app.fanout import POST_ID_HEADER, queued_post
from listmilter.app.reinject import Stuffer
from listmilter.core import addresses, config, fanout, plan
from listmilter.core.config import ConfigError

SECRET = b"k" * 32
LIST = "dev@example.org"
NOW = 1_790_000_000.0


def test_a_fan_out_address_names_its_list_and_verifies_only_for_it():
    address = fanout.address(LIST, "4Fx2Q1Z0D3", NOW, SECRET)
    local, _, domain = address.partition("@")
    assert domain == "example.org" and local.startswith("dev-fanout+4fx2q1z0d3-")
    ((_, none), (_, none2), (list_key, role)) = addresses.candidates(address)
    assert none is None and none2 is None and list_key == LIST and role.role == fanout.ROLE
    code = fanout.verified(LIST, role.extension, SECRET, NOW + 60)
    assert code is not None and code.post_id == "4fx2q1z0d3" and code.posted_at == int(NOW)
    # Another list, another key, a VERP code of the same post, or too old: nothing.
    assert fanout.verified("ops@example.org", role.extension, SECRET, NOW) is None
    assert fanout.verified(LIST, role.extension, b"x" * 32, NOW) is None
    assert fanout.verified(LIST, role.extension, SECRET, NOW + 40 * 86400) is None
    from listmilter.core import verp
    verp_code = verp.code(LIST, "", "4Fx2Q1Z0D3", NOW, SECRET)
    assert fanout.verified(LIST, verp_code, SECRET, NOW) is None


@given(st.text(max_size=200))
def test_any_extension_is_refused_or_verified_never_raises(extension):
    assert fanout.verified(LIST, extension, SECRET, NOW) is None


def test_the_record_survives_a_round_trip_and_a_torn_one_reads_as_none():
    record = fanout.Progress(LIST, "4Fx2Q1Z0D3", NOW, NOW + 1).advanced("B@Example.net", 10, 1, NOW + 2)
    record = fanout.Progress(**{**record.__dict__, "members": 20, "attempts": 2})
    assert fanout.loads(record.dumps()) == record
    assert record.after == addresses.key("B@Example.net") and record.left == 9
    assert fanout.loads(record.dumps()[:40]) is None


@given(st.binary(max_size=400))
def test_any_bytes_read_as_a_record_or_none(data):
    got = fanout.loads(data)
    assert got is None or isinstance(got, fanout.Progress)


@given(st.lists(st.emails(), unique_by=addresses.key, max_size=40), st.integers(min_value=0, max_value=40))
def test_resuming_after_any_member_leaves_exactly_those_after_it(members, cut):
    found = [(m, LIST) for m in members]
    order = list(fanout.in_order(found, ""))
    assert sorted(order) == sorted((m, LIST) for m in members)
    assert [addresses.key(m) for m, _ in order] == sorted(addresses.key(m) for m in members)
    if cut < len(order):
        after = addresses.key(order[cut][0])
        assert fanout.in_order(list(found), after) == order[cut + 1:]
    # Members who joined meanwhile are sent the post only if they sort after the mark.
    last = addresses.key(order[-1][0]) if order else ""
    late = [("zzzz@late.example", LIST), ("0000@early.example", LIST)]
    assert [m for m, _ in fanout.in_order(found + late, last)] == sorted(
        (m for m, _ in late if addresses.key(m) > last), key=addresses.key)


def test_the_queued_post_loses_what_delivery_added_and_keeps_folds():
    data = (b"Return-Path: <carol@example.net>\n" + POST_ID_HEADER.encode() + b": 4Fx2Q1Z0D3\n"
            b"Subject: a folded\n\tsubject\nFrom: carol@example.net\n\nline\n.dot\n")
    headers, body, marks = queued_post(data)
    assert headers == [("Subject", "a folded\n\tsubject"), ("From", "carol@example.net")]
    assert marks == ["4Fx2Q1Z0D3"]
    assert body == b"line\r\n.dot\r\n"


@given(st.binary(max_size=500))
def test_any_queued_post_splits_without_raising(data):
    headers, body, marks = queued_post(data)
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in headers)
    assert all(isinstance(m, str) for m in marks)
    assert b"\n" not in body.replace(b"\r\n", b"")


def stuffed(message: bytes) -> bytes:
    """A message as DATA content, stuffed whole (one part)."""
    return b"".join(Stuffer().parts((message,)))


@given(st.binary(max_size=300))
def test_stuffed_data_never_holds_the_end_of_data_line(body):
    message = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
    out = stuffed(message)
    assert (out == b"" or out.endswith(b"\r\n")) and b"\r\n.\r\n" not in out and not out.startswith(b".\r\n")
    # Undoing the stuffing gives the message back.
    undone = (b"\r\n" + out).replace(b"\r\n..", b"\r\n.")[2:]
    assert undone == (message if not message or message.endswith(b"\r\n") else message + b"\r\n")


@given(st.lists(st.sampled_from([b".", b"\r\n", b"..x", b"a", b"\n", b"." * 5000, b"\r\n." * 3000]),
                max_size=12), st.data())
def test_a_copy_stuffed_in_parts_is_the_message_stuffed_whole(pieces, data):
    """Parts may begin mid-line (a footer inside a line): only a dot at a line's start doubles,
    and a big part stuffed once from the cache is the same as stuffed afresh."""
    shared = Stuffer()
    for _ in range(2):      # the second time from the cache
        cut = sorted(data.draw(st.lists(st.integers(0, len(b"".join(pieces))), max_size=5)))
        whole = b"".join(pieces)
        parts = tuple(whole[a:b] for a, b in zip([0, *cut], [*cut, len(whole)], strict=True))
        assert b"".join(shared.parts(parts)) == stuffed(whole)
        assert b"".join(shared.parts(tuple(pieces))) == stuffed(whole)


def _load(tmp_path, text: str):
    path = tmp_path / "listmilter.yaml"
    path.write_text(text)
    return config.load(str(path))


def test_outgoing_reinject_and_sessions(tmp_path):
    cfg = _load(tmp_path, "outgoing:\n  smtp: 127.0.0.1:25\n  reinject: 127.0.0.1:10025\n  sessions: 4\n")
    assert cfg.outgoing.reinject == "127.0.0.1:10025" and cfg.outgoing.sessions == 4
    assert _load(tmp_path, "outgoing:\n  smtp: 127.0.0.1:25\n").outgoing.reinject is None
    for bad, why in (("reinject: here", "outgoing.reinject must be HOST:PORT"),
                     ("sessions: 0", "outgoing.sessions must be a number from 1 to 64"),
                     ("sessions: many", "outgoing.sessions must be a number from 1 to 64")):
        with pytest.raises(ConfigError) as e:
            _load(tmp_path, f"outgoing:\n  smtp: 127.0.0.1:25\n  {bad}\n")
        assert why in str(e.value) and "listmilter.yaml:3" in str(e.value)


def test_with_a_listener_the_plan_for_a_personal_post_only_swaps_its_recipients():
    ls = plan.ListSettings(LIST, "open", "[dev] ", "", "dev.example.org")
    rcpts = [plan.Recipient("<dev@example.org>", LIST, plan.LIST, LIST)]
    split = plan.split(rcpts)
    to = fanout.address(LIST, "4Fx2Q1Z0D3", NOW, SECRET)
    todo = plan.end_of_message(rcpts, split, plan.InPlace(ls, [], True), {}, [("Subject", "hi")], b"",
                               "4Fx2Q1Z0D3", SECRET, None, NOW, to)
    assert todo.fanout == to and todo.copies is None and todo.expanded == ()
    (edits,) = todo.edits
    assert edits.del_rcpts == ["<dev@example.org>"] and edits.add_rcpts == [(to, None)]
    assert edits.sender is None and not edits.add_headers and not edits.change_headers


@pytest.mark.mta       # starts a server (the sink), though no MTA
def test_pipelined_sessions_send_each_copy_whole_and_skip_what_the_server_refuses():
    """app/reinject.py against a real SMTP server (the test sink, aiosmtpd), no MTA: copies
    shared among 3 pipelined sessions arrive byte for byte, a dot at a line start survives,
    a 550 at RCPT is reported and the session goes on, and an address that would inject
    a command is never sent."""
    from listmilter.app.reinject import Pool
    from listmilter.core.plan import Copy
    from tests.bed.sink import Sink

    big = b"line\r\n" * 2000 + b".starts with a dot\r\n"       # a shared part past Stuffer.BIG
    head = b"Subject: t\r\n"
    members = [f"r{i}@example.net" for i in range(20)] + ["bad\r\nRSET@example.net"]

    def make(member: str) -> Copy:
        return Copy(member, ("NOTIFY=FAILURE",), "dev-bounces@example.org",
                    (head, f"X-Member: {member}\r\n\r\n".encode(), big, b".footer " + member.encode() + b"\r\n"))
    with Sink() as sink:
        sink.replies["r3@example.net"] = "550 5.1.1 no such user"
        pool = Pool("127.0.0.1", sink.port, 3)
        try:
            sent = pool.send(members, make, ("RET=HDRS",))
        finally:
            pool.close()
        assert sorted(sent.refused) == ["bad\r\nRSET@example.net", "r3@example.net"]
        assert sent.refused["r3@example.net"].startswith("550 5.1.1")
        assert len(sent.queued) == 19
        got = {m.rcpt_tos[0]: m for m in sink.messages}
        assert sorted(got) == sorted(m for m in members[:20] if m != "r3@example.net")
        for member, m in got.items():
            assert m.content.replace(b"\r\n", b"\n") == make(member).message.replace(b"\r\n", b"\n")
            assert m.mail_from == "dev-bounces@example.org" and m.mail_options == ["RET=HDRS"]
