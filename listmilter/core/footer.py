"""The list footer, added to a post, MIME-aware: to each personal copy with its member's
values, or once, in the post itself, when it names nothing of a member's own
(plan.footer_in_place; the milter's body replacement).

A list's `footer` setting is a template with the placeholders in FIELDS
(`{unsubscribe_url}`, `{list_address}`, `{member}`, `{postal_address}`;
`{{` and `}}` for braces). Where it goes:

- text/plain: appended, after a blank line, in the part's charset and
  Content-Transfer-Encoding (decoded, appended, encoded again);
- text/html: inserted before the last `</body>` (at the end without one),
  every value HTML-escaped, the unsubscribe URL as a link;
- multipart/alternative: into each text/plain and text/html alternative;
- multipart/mixed: into its first part if that is text (or an alternative),
  else as a text/plain part of its own at the end;
- multipart/related: into its root part;
- multipart/signed, multipart/encrypted, application/pkcs7-mime: untouched
  (a footer would break the signature or cannot be read), and the note says so.

Anything this module cannot handle (broken MIME, a missing boundary, a charset
that is not ASCII-compatible, a part nested too deep) leaves the message as it
is, with a note for the log: `prepare` never raises.

Memory and time: the message is parsed once per post (`prepare`), into a
Template: the body's bytes cut into the stretches that stay as they are and
the Slots where a footer goes. A slot keeps what it needs to encode the footer
in place: for 7bit/8bit parts nothing; for quoted-printable parts the text on
either side is encoded once and the footer is encoded on its own, joined by
soft line breaks; for base64 parts the part is encoded once up to the last
57-byte line before the footer, and only that tail, the footer and what
follows it are encoded per member. `render` then joins the stretches with each
member's footer: one pass over the body per member, no MIME parsing.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.message
import email.parser
import email.policy
import email.utils
import html
import re
import string
from dataclasses import dataclass, field
from typing import Union

FIELDS = ("unsubscribe_url", "list_address", "member", "postal_address")
MAX_DEPTH = 20          # MIME nesting followed before giving up
MAX_PARTS = 1000        # parts of one multipart looked at
_LINE = 57              # bytes of one 76-character base64 line


class FooterError(ValueError):
    """A footer template that cannot be used (for the setting's check)."""


def check_template(template: str) -> str:
    """The template, if every placeholder is one of FIELDS; else FooterError naming the first other."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise FooterError(f"{e} (write {{{{ and }}}} for a literal brace)") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS:
            raise FooterError(f"unknown placeholder {{{name}}} (known: {', '.join('{' + f + '}' for f in FIELDS)})")
        if spec or conversion:
            raise FooterError(f"placeholder {{{name}}} takes no format or conversion")
    return template


def fields_of(template: str) -> frozenset[str]:
    """The placeholders a (checked) template uses."""
    try:
        return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)
    except ValueError:
        return frozenset()


@dataclass(frozen=True)
class Values:
    """One member's values for the placeholders."""
    unsubscribe_url: str
    list_address: str
    member: str
    postal_address: str = ""


def render_text(template: str, values: Values) -> str:
    return "".join(literal + (getattr(values, name) if name else "")
                   for literal, name, _, _ in string.Formatter().parse(template))


def render_html(template: str, values: Values) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(html.escape(literal))
        if name == "unsubscribe_url" and values.unsubscribe_url.lower().startswith(("https://", "http://")):
            url = html.escape(values.unsubscribe_url)
            out.append(f'<a href="{url}">{url}</a>')
        elif name:
            out.append(html.escape(getattr(values, name)))
    return '<div class="list-footer"><hr>' + "<br>\n".join("".join(out).splitlines()) + "</div>\n"


# -- the template of one post ---------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """Where one member's footer goes, and how to encode it there."""
    html: bool
    encoding: str           # "identity", "qp" or "base64"
    charset: str
    newline: bytes          # line end of the text around it (identity), else CRLF
    lead: bool              # the text before does not end a line: start with one
    tail: bytes = b""       # base64: decoded bytes between the encoded head and the footer
    after: bytes = b""      # base64: decoded bytes after the footer


Piece = Union[bytes, Slot]


@dataclass
class Template:
    """A post's body cut into stretches and footer slots (empty `pieces`: leave it as it is)."""
    pieces: list[Piece] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # for the log: what was done or why not

    @property
    def untouched(self) -> bool:
        return not any(isinstance(p, Slot) for p in self.pieces)


def render(tmpl: Template, body: bytes, template: str, values: Values) -> bytes:
    """The body with this member's footer (`body` itself when the template has no slot)."""
    return b"".join(render_parts(tmpl, body, template, values))


def render_parts(tmpl: Template, body: bytes, template: str, values: Values) -> tuple[bytes, ...]:
    """`render` in pieces: the stretches that stay as they are are the template's own bytes
    objects (the same for every member), the footer's bytes between them."""
    if tmpl.untouched:
        return (body,)
    text, markup = render_text(template, values), render_html(template, values)
    return tuple(p if isinstance(p, bytes) else _fill(p, markup if p.html else text) for p in tmpl.pieces)


def _fill(slot: Slot, footer: str) -> bytes:
    nl = "\n" if slot.encoding == "identity" and slot.newline == b"\n" else "\r\n"
    if slot.html:
        data = footer.replace("\n", nl).encode(slot.charset, "xmlcharrefreplace")
    else:
        lines = [line.rstrip(" \t") for line in footer.splitlines()]   # no trailing space: format=flowed
        data = ((nl if slot.lead else "") + nl + nl.join(lines) + nl).encode(slot.charset, "replace")
    if slot.encoding == "identity":
        return data
    if slot.encoding == "qp":
        return _qp(data)
    return _b64(slot.tail + data + slot.after)


def _qp(data: bytes) -> bytes:
    """Quoted-printable with CRLF line ends; ends with a soft line break if `data` ends mid-line."""
    if not data:
        return b""
    out = binascii.b2a_qp(data.replace(b"\r\n", b"\n"), quotetabs=False, istext=True)
    out = out.replace(b"\n", b"\r\n")
    return out if data.endswith(b"\n") else out + b"=\r\n"


def _b64(data: bytes) -> bytes:
    return b"".join(base64.b64encode(data[i:i + _LINE]) + b"\r\n" for i in range(0, len(data), _LINE))


# -- reading the post once ----------------------------------------------------------
SIGNED = ("multipart/signed", "multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime")


class _Skip(Exception):
    """This part takes no footer (the reason is the message)."""


def prepare(message_headers: list[tuple[str, str]], body: bytes) -> Template:
    """The post's body as a Template (see the module's docstring). Never raises: what
    cannot be handled gives an untouched template with the reason in `notes`."""
    try:
        head = "".join(f"{n}: {v}\n" for n, v in message_headers
                       if n.lower() in ("content-type", "content-transfer-encoding"))
        info = _headers(head.encode("utf-8", "surrogateescape"))
        ctype = info.get_content_type()
        if ctype in SIGNED:
            return Template(notes=[f"no footer: {ctype} (signed or encrypted mail is left untouched)"])
        pieces = _part(info, body, 0)
        return Template(pieces, [f"footer added ({ctype})"])
    except _Skip as e:
        return Template(notes=[f"no footer: {e}"])
    except Exception as e:      # hostile input this module did not foresee: the post goes without a footer
        return Template(notes=[f"no footer: unreadable ({e.__class__.__name__}: {str(e)[:200]})"])


def _headers(block: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(block)


def _param(msg: email.message.Message, name: str) -> str:
    value = msg.get_param(name)
    if isinstance(value, tuple):
        value = email.utils.collapse_rfc2231_value(value)
    return str(value) if value is not None else ""


def _split_part(data: bytes) -> tuple[bytes, bytes]:
    """A body part's header block (with its blank line) and body."""
    m = re.search(rb"\r?\n\r?\n", data)
    if data.startswith((b"\r\n", b"\n")):
        end = 2 if data.startswith(b"\r\n") else 1
        return data[:end], data[end:]
    if m is None:
        return data, b""
    return data[:m.end()], data[m.end():]


def _part(info: email.message.Message, body: bytes, depth: int) -> list[Piece]:
    """The pieces of one part's body with a footer in it; _Skip if none fits."""
    if depth > MAX_DEPTH:
        raise _Skip("MIME nested too deep")
    ctype = info.get_content_type()
    if ctype in SIGNED:
        raise _Skip(f"{ctype} (signed or encrypted) part")
    if ctype in ("text/plain", "text/html"):
        disposition = str(info.get("Content-Disposition", "")).split(";")[0].strip().lower()
        if disposition == "attachment":
            raise _Skip("text part is an attachment")
        return _text(info, body, ctype == "text/html")
    if info.get_content_maintype() != "multipart":
        raise _Skip(f"{ctype}")
    boundary = _param(info, "boundary")
    if not boundary or len(boundary) > 200:
        raise _Skip(f"{ctype} without a usable boundary")
    delim = boundary.encode("utf-8", "surrogateescape")
    starts, close = _delimiters(body, delim)
    if not starts or close is None:
        raise _Skip(f"{ctype} without its boundaries")
    if len(starts) > MAX_PARTS:
        raise _Skip(f"{ctype} with more than {MAX_PARTS} parts")
    # Each part: from the end of its delimiter line to the start of the next delimiter.
    ranges = [(content, nxt) for (_, content), (nxt, _) in zip(starts, starts[1:] + [close], strict=True)]
    parts = []
    for start, end in ranges:
        head, _ = _split_part(body[start:end])
        parts.append((start, start + len(head), end, _headers(head)))
    if ctype == "multipart/alternative":
        out: list[Piece] = []
        pos, done = 0, 0
        for _, body_start, end, sub in parts:
            try:
                inner = _part(sub, body[body_start:end], depth + 1)
            except _Skip:
                continue
            out += [body[pos:body_start], *inner]
            pos, done = end, done + 1
        if not done:
            raise _Skip("no alternative takes a footer")
        return out + [body[pos:]]
    first_start, first_body, first_end, first = parts[0]
    try:
        inner = _part(first, body[first_body:first_end], depth + 1)
        return [body[:first_body], *inner, body[first_end:]]
    except _Skip:
        if ctype != "multipart/mixed":
            raise
    # A part of its own at the end of multipart/mixed, before the close delimiter.
    at = close[0]
    own = (b"\r\n--" + delim + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\nContent-Disposition: inline\r\n\r\n")
    return [body[:at], own, Slot(False, "qp", "utf-8", b"\r\n", False), body[at:]]


def _delimiters(body: bytes, boundary: bytes) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """[(line start, content start)] of each delimiter line, and the close delimiter's (or None).
    A delimiter's line start includes the line end before it, which belongs to the delimiter."""
    pattern = re.compile(rb"(?:\A|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    starts: list[tuple[int, int]] = []
    for m in pattern.finditer(body):
        if m.group(1):
            return starts, (m.start(), m.end())
        starts.append((m.start(), m.end()))
    return starts, None


_INSERT = re.compile(rb"</body\s*>", re.IGNORECASE)


def _text(info: email.message.Message, body: bytes, is_html: bool) -> list[Piece]:
    charset = info.get_content_charset() or "us-ascii"
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        raise _Skip(f"unknown charset {charset!r}") from None
    if name.startswith(("utf-16", "utf-32", "utf_16", "utf_32")) or name in ("utf-7", "cp037", "cp500"):
        raise _Skip(f"charset {charset} is not ASCII-compatible")
    if name == "ascii":
        charset = "us-ascii"
    cte = str(info.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte in ("7bit", "8bit", "binary", ""):
        decoded, encoding = body, "identity"
    elif cte == "quoted-printable":
        decoded, encoding = binascii.a2b_qp(body), "qp"
    elif cte == "base64":
        try:
            # Strict: a part with anything but base64 and white space in it is left alone, never re-encoded
            # without what a lenient decoder would have dropped.
            decoded = base64.b64decode(re.sub(rb"[ \t\r\n]", b"", body), validate=True)
        except (binascii.Error, ValueError):
            raise _Skip("base64 body that does not decode") from None
        encoding = "base64"
    else:
        raise _Skip(f"Content-Transfer-Encoding {cte!r}")
    at = len(decoded)
    if is_html:
        found = [m.start() for m in _INSERT.finditer(decoded)]
        if found:
            at = found[-1]
    before, after = decoded[:at], decoded[at:]
    unix = b"\n" in decoded and b"\r\n" not in decoded      # else CRLF, as SMTP carries it
    newline = b"\n" if unix and encoding == "identity" else b"\r\n"
    lead = bool(before) and not before.endswith(b"\n") and not is_html
    if encoding == "identity":
        if not is_html:
            # Trailing blank lines of the text stay before the footer; whatever follows is none.
            return [before, Slot(False, encoding, charset, newline, lead), after]
        return [before, Slot(True, encoding, charset, newline, False), after]
    if encoding == "qp":
        return [_qp(before), Slot(is_html, encoding, charset, newline, lead), _qp(after)]
    cut = len(before) // _LINE * _LINE
    return [_b64(before[:cut]), Slot(is_html, encoding, charset, newline, lead, before[cut:], after)]
