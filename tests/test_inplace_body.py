"""A post's body edited in place by the milter (pymilter replacebody): a footer the same for every
member, and dmarc_mitigation: wrap_message. The pure half (core/plan.py, core/footer.py,
core/dmarc.py) and the milter in process; over the real Postfix and Sendmail:
tests/test_inplace_mta.py."""

from __future__ import annotations

import base64
import email
import email.policy
import time

import Milter
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listmilter.core import dmarc, footer, plan, settings
from listmilter.core.keys import keyring
from tests.test_fuzz import hostile_bytes, hostile_text, scaled
from tests.test_milter import log  # noqa: F401 (the fixture)

LIST = "dev@example.org"
SECRET = keyring(b"k" * 32)
NOW = 1_700_000_000.0
SHARED = "The {list_address} list\nTo leave: {unsubscribe_url}\n{postal_address}"
PERSONAL = SHARED + "\nSent to {member}."
MAILTO = "mailto:dev-unsubscribe@example.org"
SHARED_TEXT = f"The {LIST} list\r\nTo leave: {MAILTO}\r\n1 Main St & Co\r\n"


def ls(footer_: str = SHARED, **kw) -> plan.ListSettings:
    return plan.ListSettings(LIST, "open", "[dev] ", "Developers", "dev.example.org", footer_, "1 Main St & Co", **kw)


def eom(headers: list[tuple[str, str]], body: bytes, settings_: plan.ListSettings | None = None,
        personal: bool = False, verdict: dmarc.Verdict | None = None) -> plan.EndOfMessage:
    rcpts = [plan.Recipient(f"<{LIST}>", LIST, plan.LIST, LIST)]
    in_place = plan.InPlace(settings_ or ls(), ["a@example.net", "b@example.com"], personal, verdict)
    return plan.end_of_message(rcpts, plan.split(rcpts), in_place, {}, headers, body, "Q1", SECRET, None, NOW)


def sent(headers: list[tuple[str, str]], body: bytes, todo: plan.EndOfMessage) -> tuple[bytes, email.message.Message]:
    """The message as the MTA would deliver it: header and body edits applied."""
    (post,) = todo.edits
    out = plan.apply_header_edits(headers, post)
    data = "".join(f"{n}: {v}\r\n" for n, v in out).encode("utf-8", "surrogateescape") + b"\r\n" + \
        (body if post.body is None else post.body)
    return data, email.message_from_bytes(data, policy=email.policy.default)


def texts(msg: email.message.Message) -> list[tuple[str, str]]:
    return [(p.get_content_type(), p.get_content()) for p in msg.walk()
            if not p.is_multipart() and p.get_content_maintype() == "text"]


# -- when a footer goes in place ----------------------------------------------------------------
def _s(**kw) -> settings.ListSettings:
    return settings.resolve_all(kw, {})


@pytest.mark.parametrize("template, base_url, one_click, personal", [
    ("", None, True, False),
    ("", "https://l.example", True, True),                          # one-click links: personal, no footer
    ("{list_address} {postal_address}", None, True, False),         # list-wide: in place
    ("{list_address} {postal_address}", "https://l.example", True, True),    # personal for the link
    ("Leave: {unsubscribe_url}", None, True, False),                # the list's mailto: for all
    ("Leave: {unsubscribe_url}", "https://l.example", False, False),   # one_click off: mailto: for all
    ("Leave: {unsubscribe_url}", "https://l.example", True, True),     # each member's own link
    ("Sent to {member}", None, True, True),                          # each member's own address
    ("Sent to {member}", "https://l.example", False, True),
    ("Literal {{member}} braces", None, True, False),
])
def test_the_rule_footer_in_place_or_per_member(template, base_url, one_click, personal):
    s = _s(footer=template, one_click=one_click)
    assert plan.personal(base_url, s) is personal
    assert plan.footer_in_place(base_url, s) is (bool(template) and not personal)


def test_the_fields_a_template_uses():
    assert footer.fields_of("{{member}} {list_address}\n{postal_address}") == {"list_address", "postal_address"}
    assert footer.fields_of("{member") == frozenset()       # (never a checked template)


def test_a_text_post_gets_the_footer_in_place_and_stays_one_message():
    headers = [("From", "carol@example.net"), ("Subject", "hi"), ("Content-Type", "text/plain; charset=utf-8")]
    todo = eom(headers, b"Hello\r\nall\r\n")
    assert todo.copies is None and todo.fanout is None and len(todo.edits) == 1
    (post,) = todo.edits
    assert [a for a, _ in post.add_rcpts] == ["a@example.net", "b@example.com"]
    assert post.body == b"Hello\r\nall\r\n\r\n" + SHARED_TEXT.encode()
    assert todo.notes == ("footer added (text/plain)",)
    steps = list(plan.edit_steps(todo.edits))
    assert steps[-1] == (plan.REPLACEBODY, (post.body,))
    assert [s for s, _ in steps].count(plan.REPLACEBODY) == 1


def test_no_footer_setting_no_body_edit():
    todo = eom([("Subject", "hi")], b"Hello\r\n", ls(""))
    assert todo.edits[0].body is None and todo.notes == ()
    assert plan.REPLACEBODY not in [s for s, _ in plan.edit_steps(todo.edits)]
    assert not plan.body_needed(ls(""), False) and plan.body_needed(ls(), False) and not plan.body_needed(ls(), True)


def test_a_personal_list_held_in_place_gets_no_shared_footer():
    # (Held without a fan-out: expanded in place, as one message for all; its footer is a member's.)
    todo = eom([("Subject", "hi")], b"Hello\r\n", ls(PERSONAL), personal=True)
    assert todo.copies is None and todo.edits[0].body is None and todo.notes == ()


HTML = b"<html><body><p>Caf\xc3\xa9</p></body></html>\r\n"
ALTERNATIVE = (b"--ALT\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
               b"\r\nCaf=C3=A9 tonight.\r\n--ALT\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + HTML
               + b"--ALT--\r\n")
PDF = base64.encodebytes(b"%PDF-1.4\n\xff\x00" * 40)
MIXED = (b"--MIX\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
         + base64.encodebytes("Here is the report, Grüße.\r\n".encode()) +
         b"--MIX\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Disposition: attachment; filename=r.pdf\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\n" + PDF + b"--MIX--\r\n")
SIGNED = (b"--SIG\r\nContent-Type: text/plain\r\n\r\nSigned words.\r\n--SIG\r\nContent-Type: "
          b"application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\n--SIG--\r\n")
SAMPLES = {
    "text": ([("Content-Type", "text/plain; charset=utf-8")], b"Hello\r\n"),
    "8bit": ([("Content-Type", "text/plain; charset=iso-8859-1"), ("Content-Transfer-Encoding", "8bit")],
             "Grüße aus Köln\n".encode("iso-8859-1")),
    "base64": ([("Content-Type", "text/plain; charset=utf-8"), ("Content-Transfer-Encoding", "base64")],
               base64.encodebytes(("Grüße " * 50).encode())),
    "html": ([("Content-Type", "text/html; charset=utf-8")], HTML),
    "alternative": ([("MIME-Version", "1.0"), ("Content-Type", 'multipart/alternative; boundary="ALT"')], ALTERNATIVE),
    "mixed": ([("MIME-Version", "1.0"), ("Content-Type", 'multipart/mixed; boundary="MIX"')], MIXED),
    "signed": ([("Content-Type", 'multipart/signed; protocol="application/pgp-signature"; boundary="SIG"')], SIGNED),
    "encrypted": ([("Content-Type", 'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="SIG"')],
                  SIGNED),
}


def test_each_mime_shape_gets_the_footer_where_a_personal_copy_does():
    got = {}
    for name, (headers, body) in SAMPLES.items():
        headers = [("From", "carol@example.net"), ("Subject", name)] + headers
        _, msg = sent(headers, body, todo := eom(headers, body))
        got[name] = (todo, msg)
    assert texts(got["text"][1]) == [("text/plain", "Hello\r\n\r\n" + SHARED_TEXT)]
    # 8-bit Latin-1 with Unix line ends: the footer in that charset and those line ends.
    assert got["8bit"][0].edits[0].body == "Grüße aus Köln\n\n".encode("iso-8859-1") + \
        SHARED_TEXT.replace("\r\n", "\n").encode("iso-8859-1")
    ((_, b64),) = texts(got["base64"][1])
    assert b64 == "Grüße " * 50 + "\r\n\r\n" + SHARED_TEXT
    assert all(len(line) <= 76 for line in got["base64"][0].edits[0].body.split(b"\r\n"))
    ((_, html),) = texts(got["html"][1])
    assert html.startswith("<html><body><p>Café</p><div class=\"list-footer\"><hr>")
    assert "1 Main St &amp; Co" in html and html.endswith("</div>\r\n</body></html>\r\n")
    (_, plain), (_, alt_html) = texts(got["alternative"][1])
    assert plain == "Café tonight.\r\n\r\n" + SHARED_TEXT and "list-footer" in alt_html
    text, pdf = [p for p in got["mixed"][1].walk() if not p.is_multipart()]
    assert text.get_content() == "Here is the report, Grüße.\r\n\r\n" + SHARED_TEXT
    assert pdf.get_content() == b"%PDF-1.4\n\xff\x00" * 40 and PDF in got["mixed"][0].edits[0].body
    for name in ("signed", "encrypted"):
        todo, _ = got[name]
        assert todo.edits[0].body is None
        assert todo.notes[0].startswith("no footer: multipart/") and "left untouched" in todo.notes[0]
        assert plan.REPLACEBODY not in [s for s, _ in plan.edit_steps(todo.edits)]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_in_place_body_is_a_personal_copy_s_body_byte_for_byte(name):
    """The same footer code: a personal copy (no one-click link) of a footer without member
    values has exactly the body the milter puts in place."""
    headers, body = SAMPLES[name]
    headers = [("From", "carol@example.net"), ("Subject", name)] + headers
    todo = eom(headers, body)
    copies = plan.personal_copies(ls(), ["a@example.net"], headers, body, "Q1", SECRET, lambda m: "", NOW)
    (_, _, data), = copies.copies
    in_place = body if todo.edits[0].body is None else todo.edits[0].body
    assert data.partition(b"\r\n\r\n")[2] == in_place
    assert copies.notes == todo.notes


def test_a_huge_post_is_read_once_and_only_its_end_changes():
    big = b"".join(b"line %07d of a long post\r\n" % i for i in range(400_000))     # ~10 MB
    headers = [("Content-Type", "text/plain")]
    started = time.monotonic()
    todo = eom(headers, big)
    assert time.monotonic() - started < 5
    new = todo.edits[0].body
    assert new[:len(big)] == big and new[len(big):] == b"\r\n" + SHARED_TEXT.encode()


@scaled(0.5)
@given(ctype=st.sampled_from(["text/plain", "text/html", "multipart/mixed; boundary=B", "multipart/signed; boundary=B",
                              "multipart/alternative; boundary=\"--B\"", "text/plain; charset=\"\\xff\""]),
       cte=st.sampled_from(["", "8bit", "quoted-printable", "base64", "\udcff"]),
       body=hostile_bytes, extra=hostile_text, wrap=st.booleans())
@example(ctype="multipart/mixed; boundary=B", cte="", body=b"--B\r\n\r\n--B--", extra="", wrap=True)
def test_hostile_posts_never_raise_and_keep_their_bytes(ctype, cte, body, extra, wrap):
    headers = [("From", "carol@reject.test"), ("Content-Type", ctype)] + \
        ([("Content-Transfer-Encoding", cte)] if cte else []) + [("X-Extra", extra)]
    settings_ = ls(dmarc_mitigation="wrap_message") if wrap else ls()
    todo = eom(headers, body, settings_, verdict=dmarc.Verdict("reject", "") if wrap else None)
    new = todo.edits[0].body
    if wrap:
        assert new is not None and dmarc.original_message(headers, body) in new
    elif new is None:
        assert todo.notes[0].startswith("no footer: ")
    else:
        assert todo.notes == (f"footer added ({ctype.split(';')[0]})",) and new != body


# -- wrap_message --------------------------------------------------------------------------------
POST_HEADERS = [("Received", "from mx.reject.test by mx.example.org"),
                ("DKIM-Signature", "v=1; a=rsa-sha256; d=reject.test; s=s1; h=from:subject; bh=x; b=y"),
                ("From", "Alice Example <alice@reject.test>"), ("To", LIST), ("Cc", "bob@example.com"),
                ("Subject", "wrapped"), ("Date", "Wed, 02 Dec 2026 21:00:00 +0000"),
                ("Message-ID", "<w1@reject.test>"), ("In-Reply-To", "<w0@reject.test>"),
                ("Sender", "bounce@reject.test"), ("MIME-Version", "1.0"),
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Transfer-Encoding", "8bit"),
                ("List-Id", "<other.lists.test>"), (plan.RESUBMITTED, f"{LIST}; 1")]
POST_BODY = "Grüße, list.\r\n".encode()
REJECT = dmarc.Verdict("reject", "p=reject at _dmarc.reject.test")


def wrapped(body: bytes = POST_BODY, headers=None, **kw) -> tuple[plan.EndOfMessage, bytes, email.message.Message]:
    headers = POST_HEADERS if headers is None else headers
    todo = eom(headers, body, ls(kw.pop("footer_", ""), dmarc_mitigation="wrap_message", **kw), verdict=REJECT)
    data, msg = sent(headers, body, todo)
    return todo, data, msg


def test_wrap_message_sends_the_post_attached_whole_from_the_list():
    todo, data, msg = wrapped()
    head = data.partition(b"\r\n\r\n")[0].decode()
    assert '\r\nFrom: "Alice Example via Developers" <dev@example.org>\r\n' in head
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["alice@reject.test"]
    assert msg["X-Original-From"] == "Alice Example <alice@reject.test>"
    assert msg["Subject"] == "[dev] wrapped" and msg["Message-ID"] == "<w1@reject.test>"
    assert msg["In-Reply-To"] == "<w0@reject.test>" and msg["Cc"] == "bob@example.com"
    assert msg["Received"] == "from mx.reject.test by mx.example.org"
    assert msg["List-Id"] == "Developers <dev.example.org>"
    # Nothing of the poster's that would fail or mislead on the wrapper.
    for gone in ("DKIM-Signature", "Sender", plan.RESUBMITTED):
        assert f"\r\n{gone}:" not in "\r\n" + head, gone
    assert msg.get_content_type() == "multipart/mixed" and msg["MIME-Version"] == "1.0"
    assert msg["Content-Transfer-Encoding"] == "8bit"       # the original has 8-bit bytes
    (part,) = msg.iter_parts()
    assert part.get_content_type() == "message/rfc822" and part["Content-Disposition"] == "inline"
    # The original, byte for byte (less listmilter's own marker): its DKIM signature still verifies.
    original = dmarc.original_message([h for h in POST_HEADERS if h[0] != plan.RESUBMITTED], POST_BODY)
    part_head, _, rest = todo.edits[0].body.partition(b"\r\n\r\n")
    assert rest.rpartition(b"\r\n--=_listmilter.Q1.0--\r\n") == (original, b"\r\n--=_listmilter.Q1.0--\r\n", b"")
    inner = part.get_content()
    assert inner["From"] == "Alice Example <alice@reject.test>" and inner["DKIM-Signature"].startswith("v=1;")
    assert inner["Subject"] == "wrapped" and inner["List-Id"] == "<other.lists.test>"


def test_wrap_message_follows_reply_to_and_keeps_the_poster_s_reply_to():
    headers = POST_HEADERS + [("Reply-To", "team@elsewhere.test")]
    _, _, msg = wrapped(headers=headers)
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["team@elsewhere.test", "alice@reject.test"]
    _, _, msg = wrapped(headers=headers, reply_to="list")
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == [LIST, "alice@reject.test"]
    assert len(msg.get_all("Reply-To")) == 1


def test_only_posts_the_policy_names_are_wrapped():
    for verdict in (None, dmarc.Verdict("none", ""), dmarc.Verdict(dmarc.NO_POLICY, "")):
        todo = eom(POST_HEADERS, POST_BODY, ls("", dmarc_mitigation="wrap_message"), verdict=verdict)
        assert todo.edits[0].body is None
    todo = eom(POST_HEADERS, POST_BODY, ls("", dmarc_mitigation="wrap_message"),
               verdict=dmarc.Verdict(dmarc.UNKNOWN, "DNS lookup failed"))
    assert todo.edits[0].body is not None        # the safe side
    assert plan.body_needed(ls("", dmarc_mitigation="wrap_message"), True)
    assert not plan.body_needed(ls("", dmarc_mitigation="wrap_message", dmarc_policies=()), False)


def test_a_wrapped_post_with_a_shared_footer_gets_it_as_a_part_of_its_own():
    todo, _, msg = wrapped(footer_=SHARED)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["message/rfc822", "text/plain"]
    assert parts[1].get_content() == "\r\n" + SHARED_TEXT and todo.notes == ("footer added (multipart/mixed)",)


def test_personal_copies_are_wrapped_and_carry_their_own_footer_after_the_original():
    settings_ = ls(PERSONAL, dmarc_mitigation="wrap_message")
    copies = plan.personal_copies(settings_, ["a@example.net", "b@example.com"], POST_HEADERS, POST_BODY, "Q1",
                                  SECRET, lambda m: f"https://l.example/u/{m[0]}", NOW, REJECT)
    original = dmarc.original_message([h for h in POST_HEADERS if h[0] != plan.RESUBMITTED], POST_BODY)
    for member, _, data in copies.copies:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert data.startswith(b'Received: from mx.reject.test by mx.example.org\r\n'
                               b'From: "Alice Example via Developers" <dev@example.org>\r\n')
        assert msg["List-Unsubscribe"].startswith(f"<https://l.example/u/{member[0]}>")
        inner, own = msg.iter_parts()
        assert original in data and inner.get_content_type() == "message/rfc822"
        assert own.get_content().endswith(f"Sent to {member}.\r\n")


def test_the_archive_keeps_the_post_as_sent():
    data = plan.archived_copy(ls(SHARED, dmarc_mitigation="wrap_message"), POST_HEADERS, POST_BODY, "Q1", SECRET,
                              NOW, REJECT, in_place_footer=True)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/mixed" and b"\r\n" not in data
    assert [p.get_content_type() for p in msg.iter_parts()] == ["message/rfc822", "text/plain"]
    text = plan.archived_copy(ls(SHARED), [("Subject", "s")], b"Hi\r\n", "Q1", SECRET, NOW, None, in_place_footer=True)
    assert text.endswith(b"Hi\n\n" + SHARED_TEXT.replace("\r\n", "\n").encode())
    assert plan.archived_copy(ls(SHARED), [("Subject", "s")], b"Hi\r\n", "Q1", SECRET, NOW).endswith(b"\n\nHi\n")


def test_the_boundary_never_occurs_in_the_original():
    first = dmarc.wrap_message([("Subject", "s")], b"x\r\n", "Q1").add[1][1]
    boundary = first.split('"')[1]
    body = f"--{boundary}\r\nquoting an earlier wrapper\r\n".encode()
    other = dmarc.wrap_message([("Subject", "s")], body, "Q1")
    assert other.add[1][1] != first and other.body.count(b"--" + other.add[1][1].split('"')[1].encode()) == 2
    assert "Content-Transfer-Encoding" not in dict(other.add)      # all 7-bit


def test_wrap_needs_the_body():
    with pytest.raises(ValueError, match="needs the post's body"):
        plan.expand_list(ls("", dmarc_mitigation="wrap_message"), [], [], POST_HEADERS, "Q1", SECRET, NOW, REJECT)


def test_the_setting_and_the_log_wording():
    assert settings.parse("dmarc_mitigation", "wrap_message") == "wrap_message"
    with pytest.raises(settings.SettingError, match="munge_from, wrap_message, none"):
        settings.parse("dmarc_mitigation", "wrap")
    assert dmarc.log_status(REJECT, "wrap_message", ("reject",)) == "DMARC p=reject at _dmarc.reject.test; post wrapped"
    assert dmarc.log_status(dmarc.Verdict(dmarc.UNKNOWN, "timeout"), "wrap_message", ("reject",)) == \
        "DMARC policy unknown (timeout); post wrapped to be safe"
    assert dmarc.log_status(dmarc.Verdict(dmarc.UNKNOWN, "timeout"), "none", ("reject",)) is None


@scaled(0.5)
@given(headers=st.lists(st.tuples(st.sampled_from(["From", "Reply-To", "Content-Type", "DKIM-Signature", "X-A",
                                                   "Subject", "List-Id"]), hostile_text), max_size=8),
       body=hostile_bytes)
def test_hostile_posts_wrap_without_raising_and_keep_the_original(headers, body):
    todo = eom(headers, body, ls("", dmarc_mitigation="wrap_message"), verdict=REJECT)
    (post,) = todo.edits
    assert post.body is not None and dmarc.original_message(headers, body) in post.body
    out = plan.apply_header_edits(headers, post)
    assert [n for n, _ in out].count("Content-Type") == 1 and [n for n, _ in out].count("From") == 1


# -- the milter, in process ----------------------------------------------------------------------
def test_the_milter_replaces_the_body_of_a_footer_post_and_keeps_one_message(tmp_path, monkeypatch, log):  # noqa: F811
    from tests import test_milter as tm
    w = tm._world(tmp_path, monkeypatch)
    try:
        lst = w.new_list(LIST, ["p1@example.net", "p2@example.com"], posting="open", footer=SHARED,
                         postal_address="1 Main St & Co")
        s = tm.Session()
        assert s.send("carol@example.net", [lst], tm.post(body="Hello, list.\r\n")) == Milter.ACCEPT
        assert s.answers["body"] == Milter.CONTINUE and w.submissions() == []       # no copy of its own
        kinds = [e[0] for e in s.ctx.edits]
        assert kinds.count("addrcpt") == 2 and kinds[-1] == "replacebody"
        # (The harness feeds the body with Unix line ends: the footer follows them.)
        assert s.ctx.edits[-1][1] == b"Hello, list.\n\n" + SHARED_TEXT.replace("\r\n", "\n").encode()
        assert any(f"list=<{lst}>, from=<carol@example.net>, status=footer added (text/plain)" in x for x in log)
        # A post the footer cannot go into: no body edit, the reason in the log.
        s = tm.Session()
        signed = tm.post(extra='Content-Type: multipart/signed; boundary="SIG"\r\n', body=SIGNED.decode())
        assert s.send("carol@example.net", [lst], signed) == Milter.ACCEPT
        assert "replacebody" not in [e[0] for e in s.ctx.edits]
        assert any("status=no footer: multipart/signed (signed or encrypted mail is left untouched)" in x for x in log)
    finally:
        w.store.close()


def test_the_milter_wraps_a_post_from_a_strict_domain(tmp_path, monkeypatch, log):  # noqa: F811
    from listmilter.app import dmarc_lookup
    from tests import test_milter as tm
    monkeypatch.setattr(dmarc_lookup, "post_verdict", lambda nameservers, headers: REJECT)
    w = tm._world(tmp_path, monkeypatch)
    try:
        lst = w.new_list(LIST, ["p1@example.net"], posting="open", dmarc_mitigation="wrap_message")
        s = tm.Session()
        data = tm.post(sender="alice@reject.test", body="Hi.\r\n")
        assert s.send("alice@reject.test", [lst], data) == Milter.ACCEPT
        edits = s.ctx.edits
        assert ("chgheader", "From", 1, '"alice via Developers" <dev@example.org>') not in edits      # no description
        assert ("chgheader", "From", 1, '"alice via dev" <dev@example.org>') in edits
        assert edits[-1][0] == "replacebody" and b"\r\n\r\nHi.\n\r\n--=_listmilter." in edits[-1][1]
        assert ("addheader", "MIME-Version", "1.0") in edits
        assert any("status=DMARC p=reject at _dmarc.reject.test; post wrapped" in x for x in log)
    finally:
        w.store.close()
