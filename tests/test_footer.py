"""core/footer.py: the list footer in each MIME shape, and hostile input that never raises."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listmilter.core import config, footer, plan, settings
from listmilter.core.keys import keyring
from tests.test_fuzz import hostile_bytes, hostile_text, scaled

TEMPLATE = "Leave: {unsubscribe_url}\nYou get {list_address} as {member}.\n{postal_address}"
VALUES = footer.Values("https://lists.example.org/u/AbC_1", "dev@example.org", "bob@example.net",
                       "Rue <Haute> & 1, Genève")


def add(headers: list[tuple[str, str]], body: bytes, values: footer.Values = VALUES,
        template: str = TEMPLATE) -> tuple[footer.Template, email.message.EmailMessage, bytes]:
    tmpl = footer.prepare(headers, body)
    out = footer.render(tmpl, body, template, values)
    raw = "".join(f"{n}: {v}\r\n" for n, v in headers).encode() + b"\r\n" + out
    return tmpl, email.message_from_bytes(raw, policy=email.policy.default), out


def texts(msg: email.message.EmailMessage) -> list[tuple[str, str]]:
    return [(p.get_content_type(), p.get_content()) for p in msg.walk()
            if not p.is_multipart() and p.get_content_maintype() == "text"]


PLAIN_FOOTER = ("Leave: https://lists.example.org/u/AbC_1\r\nYou get dev@example.org as bob@example.net.\r\n"
                "Rue <Haute> & 1, Genève\r\n")


def test_plain_text_gets_the_footer_after_a_blank_line():
    tmpl, msg, out = add([("Content-Type", "text/plain; charset=utf-8")], b"Hello\r\nall\r\n")
    assert out == b"Hello\r\nall\r\n\r\n" + PLAIN_FOOTER.encode()
    assert tmpl.notes == ["footer added (text/plain)"]
    # No Content-Type at all is text/plain in US-ASCII: what does not fit becomes '?'.
    _, msg, out = add([], b"Hi")
    assert out.startswith(b"Hi\r\n\r\nLeave: https://") and out.endswith(b"Rue <Haute> & 1, Gen?ve\r\n")


def test_eight_bit_text_in_its_own_charset_and_unix_line_ends_kept():
    body = "Grüße\naus Köln\n".encode("iso-8859-1")
    _, msg, out = add([("Content-Type", "text/plain; charset=iso-8859-1; format=flowed"),
                       ("Content-Transfer-Encoding", "8bit")], body)
    assert out.startswith(body) and b"\r\n" not in out
    assert texts(msg) == [("text/plain", "Grüße\naus Köln\n\n" + PLAIN_FOOTER.replace("\r\n", "\n"))]


def test_quoted_printable_is_decoded_appended_and_encoded_again():
    body = b"Caf=C3=A9 au lait, a long line that goes on and =\r\non after a soft break=\r\n"
    tmpl, msg, out = add([("Content-Type", "text/plain; charset=utf-8"),
                          ("Content-Transfer-Encoding", "quoted-printable")], body)
    ((_, text),) = texts(msg)
    assert text == "Café au lait, a long line that goes on and on after a soft break\r\n\r\n" + PLAIN_FOOTER
    assert all(len(line) <= 76 for line in out.split(b"\r\n")) and max(out) < 128


def test_base64_text_and_html_are_re_encoded_with_the_footer():
    html = ("<html><body><p>" + "Grüße " * 40 + "</p></BODY></html>").encode()
    tmpl, msg, out = add([("Content-Type", "text/html; charset=utf-8"), ("Content-Transfer-Encoding", "base64")],
                         base64.encodebytes(html))
    ((_, text),) = texts(msg)
    assert text.startswith("<html><body><p>Grüße") and text.endswith("</div>\r\n</BODY></html>")
    # Values are escaped; the URL is a link.
    assert '<a href="https://lists.example.org/u/AbC_1">https://lists.example.org/u/AbC_1</a>' in text
    assert "Rue &lt;Haute&gt; &amp; 1, Genève" in text and "<Haute>" not in text
    assert all(len(line) <= 76 for line in out.split(b"\r\n"))
    plain = base64.encodebytes(b"x" * 500)
    _, msg, _ = add([("Content-Type", "text/plain"), ("Content-Transfer-Encoding", "base64")], plain)
    ((_, text),) = texts(msg)
    assert text.startswith("x" * 500 + "\r\n\r\nLeave: ")


def test_html_without_body_tag_gets_it_at_the_end_and_last_body_tag_wins():
    _, msg, _ = add([("Content-Type", "text/html")], b"<p>a</p>")
    ((_, text),) = texts(msg)
    assert text.startswith("<p>a</p><div class=\"list-footer\">")
    _, msg, _ = add([("Content-Type", "text/html")], b"<pre>&lt;/body&gt; </body> x</body >\r\n</html>")
    ((_, text),) = texts(msg)
    assert text.index("list-footer") > text.index("x") and text.endswith("</body >\r\n</html>")


ALTERNATIVE = (b"--ALT\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlain words\r\n"
               b"--ALT\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
               b"\r\n<html><body>Rich =C3=A9 words</body></html>\r\n--ALT--\r\n")


def test_multipart_alternative_gets_it_in_both_parts():
    tmpl, msg, _ = add([("Content-Type", 'multipart/alternative; boundary="ALT"')], ALTERNATIVE)
    (plain_type, plain), (html_type, html) = texts(msg)
    assert (plain_type, html_type) == ("text/plain", "text/html")
    assert plain == "Plain words\r\n\r\n" + PLAIN_FOOTER
    assert html.startswith("<html><body>Rich é words<div") and html.endswith("</div>\r\n</body></html>")
    assert "bob@example.net" in html


def test_multipart_mixed_first_text_part_or_a_part_of_its_own_and_the_attachment_untouched():
    pdf = base64.encodebytes(b"%PDF-1.4 binary \xff\x00" * 20)
    mixed = (b"This is a MIME message.\r\n--MIX\r\nContent-Type: multipart/alternative; boundary=\"ALT\"\r\n\r\n"
             + ALTERNATIVE + b"\r\n--MIX\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n" + pdf + b"--MIX--\r\n")
    _, msg, out = add([("Content-Type", 'multipart/mixed; boundary="MIX"')], mixed)
    assert [t for t, _ in texts(msg)] == ["text/plain", "text/html"]
    assert all("bob@example.net" in text for _, text in texts(msg))
    assert pdf in out and out.startswith(b"This is a MIME message.\r\n")
    attachment = [p for p in msg.walk() if p.get_content_type() == "application/pdf"][0]
    assert attachment.get_content() == b"%PDF-1.4 binary \xff\x00" * 20
    # The first part an attachment: the footer goes as a text/plain part of its own, last.
    only_pdf = (b"--MIX\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + pdf
                + b"--MIX--\r\n")
    _, msg, out = add([("Content-Type", 'multipart/mixed; boundary="MIX"')], only_pdf)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/pdf", "text/plain"]
    assert parts[1].get_content().strip() == PLAIN_FOOTER.strip()
    assert out.startswith(only_pdf[:-len(b"\n--MIX--\r\n")]) and out.endswith(b"\n--MIX--\r\n")


@pytest.mark.parametrize("ctype", ["multipart/signed; protocol=\"application/pgp-signature\"; boundary=\"S\"",
                                   "multipart/encrypted; boundary=\"S\"",
                                   "application/pkcs7-mime; smime-type=enveloped-data"])
def test_signed_and_encrypted_mail_is_left_untouched_and_says_so(ctype):
    body = b"--S\r\nContent-Type: text/plain\r\n\r\nsigned words\r\n" \
           b"--S\r\nContent-Type: application/pgp-signature\r\n" \
           b"\r\n-----BEGIN PGP SIGNATURE-----\r\n--S--\r\n"
    tmpl, _, out = add([("Content-Type", ctype)], body)
    assert out is body and tmpl.untouched
    assert tmpl.notes == [f"no footer: {ctype.split(';')[0]} (signed or encrypted mail is left untouched)"]


@pytest.mark.parametrize("headers, body, why", [
    ([("Content-Type", "multipart/mixed; boundary=\"X\"")], b"--Y\r\nno boundary here\r\n", "without its boundaries"),
    ([("Content-Type", "multipart/mixed")], b"--X\r\n\r\nx\r\n--X--\r\n", "without a usable boundary"),
    ([("Content-Type", "text/plain; charset=utf-16")], "hi".encode("utf-16"), "not ASCII-compatible"),
    ([("Content-Type", "text/plain; charset=x-no-such")], b"hi", "unknown charset"),
    ([("Content-Type", "text/plain"), ("Content-Transfer-Encoding", "base64")], b"!!!=", "does not decode"),
    ([("Content-Type", "image/png")], b"\x89PNG", "image/png"),
])
def test_what_cannot_take_a_footer_is_left_as_it_is_with_the_reason(headers, body, why):
    tmpl, _, out = add(headers, body)
    assert out is body and tmpl.untouched and why in tmpl.notes[0] and tmpl.notes[0].startswith("no footer: ")


def test_deep_nesting_is_refused_not_recursed_forever():
    body = b""
    for depth in range(60):
        body = (f"--B{depth}\r\nContent-Type: multipart/mixed; boundary=\"B{depth + 1}\"\r\n\r\n").encode() + body
    tmpl = footer.prepare([("Content-Type", 'multipart/mixed; boundary="B0"')], body)
    assert tmpl.untouched


@scaled(0.5)
@given(ctype=st.sampled_from(["text/plain", "text/html", "multipart/mixed; boundary=B",
                              "multipart/alternative; boundary=\"--B\"", "text/plain; charset=\"\\xff\"",
                              "multipart/related; boundary=B", "text/html; charset=iso-2022-jp"]),
       cte=st.sampled_from(["", "7bit", "8bit", "quoted-printable", "base64", "x-uuencode", "\udcff"]),
       body=hostile_bytes, extra=hostile_text)
@example(ctype="multipart/mixed; boundary=B", cte="", body=b"--B\r\n\r\n--B--", extra="")
@example(ctype="multipart/alternative; boundary=\"--B\"", cte="base64", body=b"----B\r\nContent-Type: text/html\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\nPGJvZHk+\r\n----B--", extra="")
def test_hostile_posts_never_raise_and_a_footer_keeps_the_rest(ctype, cte, body, extra):
    headers = [("Content-Type", ctype)] + ([("Content-Transfer-Encoding", cte)] if cte else []) + \
        [("X-Extra", extra)]
    tmpl = footer.prepare(headers, body)
    out = footer.render(tmpl, body, TEMPLATE, VALUES)
    if tmpl.untouched:
        assert out is body and tmpl.notes[0].startswith("no footer: ")
    else:
        # Nothing but white space (line ends, base64 line breaks) is ever lost; the footer is there.
        assert len(out) >= len(body.translate(None, b" \t\r\n")) // 2 and out != body
        assert tmpl.notes == [f"footer added ({ctype.split(';')[0]})"]


@scaled(0.5)
@given(template=hostile_text)
def test_the_setting_refuses_unknown_placeholders_and_takes_what_renders(template):
    try:
        checked = settings.parse("footer", template)
    except settings.SettingError as e:
        assert "placeholder" in str(e) or "brace" in str(e) or "must be a string" in str(e)
        return
    # What the setting takes renders with any member's values, as text and as HTML.
    footer.render_text(checked, VALUES)
    footer.render_html(checked, VALUES)


def test_unknown_placeholders_are_refused_by_name():
    with pytest.raises(settings.SettingError, match=r"unknown placeholder \{name\}"):
        settings.parse("footer", "Dear {name}")
    with pytest.raises(settings.SettingError, match="takes no format"):
        settings.parse("footer", "{member!r}")
    assert settings.parse("footer", "Braces {{like this}}\r\nand {member}") == "Braces {{like this}}\nand {member}"
    assert footer.render_text("{{x}} {member}", VALUES) == "{x} bob@example.net"


def test_personal_copies_each_carry_their_members_footer_from_one_reading():
    ls = plan.ListSettings("dev@example.org", "open", "", "", "dev.example.org", TEMPLATE, "1 Main St")
    calls = []
    real = footer.prepare

    def counting(*args):
        calls.append(1)
        return real(*args)
    footer.prepare = counting
    try:
        copies = plan.personal_copies(ls, ["a@example.net", "b@example.net"], [("Subject", "s")], b"Body\r\n",
                                      "Q1", keyring(b"k" * 32), lambda m: f"https://l.example/u/{m[0]}", 1.8e9)
    finally:
        footer.prepare = real
    assert len(calls) == 1
    for (member, _, data), letter in zip(copies.copies, "ab", strict=True):
        assert data.endswith(f"Body\r\n\r\nLeave: https://l.example/u/{letter}\r\nYou get dev@example.org as "
                             f"{member}.\r\n1 Main St\r\n".encode())
    assert copies.notes == ("footer added (text/plain)",)


def test_a_footer_with_an_unknown_placeholder_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "listmilter.yaml"
    head = f"state_dir: {tmp_path}\nstore: {{backend: yaml}}\nlists:\n  news@example.org:\n    postal_address: Org\n"
    path.write_text(head + "    footer: |\n      Dear {name},\n      bye\n")
    with pytest.raises(config.ConfigError, match=rf"^{path}:6: lists.news@example.org.footer: unknown placeholder "
                                                 r"\{name\} \(known: \{unsubscribe_url\}, "):
        config.load(str(path))
    path.write_text(head + "    footer: |\n      {member} on {list_address}: {unsubscribe_url}\n"
                           "      {postal_address}\n")
    cfg = config.load(str(path))
    assert cfg.list_settings(cfg.lists["news@example.org"].settings).footer == \
        "{member} on {list_address}: {unsubscribe_url}\n{postal_address}\n"


@scaled(0.5)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=400),
       cte=st.sampled_from(["8bit", "quoted-printable", "base64"]), is_html=st.booleans())
@example(text="ends mid-line with spaces   ", cte="quoted-printable", is_html=False)
@example(text="=\n=3D\t\n" + "x" * 200, cte="quoted-printable", is_html=False)
@example(text="<p>a</p></body></html>", cte="base64", is_html=True)
def test_the_decoded_part_is_the_original_text_then_the_footer(text, cte, is_html):
    raw = text.replace("\n", "\r\n").encode()
    if cte == "quoted-printable":
        import quopri
        body = quopri.encodestring(raw)
    elif cte == "base64":
        body = base64.encodebytes(raw)
    else:
        body = raw
    ctype = "text/html" if is_html else "text/plain"
    _, msg, out = add([("Content-Type", f"{ctype}; charset=utf-8"), ("Content-Transfer-Encoding", cte)], body)
    decoded = msg.get_payload(decode=True).decode()
    if cte != "8bit":
        assert all(len(line) <= 78 for line in out.split(b"\r\n")) and max(out, default=0) < 128
    original = text.replace("\n", "\r\n")
    if is_html:
        at = original.lower().rfind("</body>")
        at = len(original) if at < 0 else at
        assert decoded.startswith(original[:at] + '<div class="list-footer">')
        assert decoded.endswith("</div>\r\n" + original[at:])
    else:
        assert decoded.startswith(original) and decoded.endswith(PLAIN_FOOTER)
        assert decoded[len(original):-len(PLAIN_FOOTER)] in ("\r\n", "\r\n\r\n")
