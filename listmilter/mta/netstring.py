"""Netstrings (`LENGTH:DATA,`), the framing of Postfix's socketmap and of the deliver hand-off.

Imports nothing: `listmilter deliver` uses it before anything else is loaded.
"""

from __future__ import annotations


class Malformed(Exception):
    """The peer sent something that is not a netstring, or one over the limit."""


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def read(f, limit: int) -> bytes | None:
    """The next netstring from a file-like `f` (read(n)); None at a clean end of input."""
    length = b""
    while True:
        c = f.read(1)
        if not c:
            if length:
                raise Malformed("connection closed inside a netstring")
            return None
        if c == b":":
            if not length:
                raise Malformed("malformed netstring length")
            break
        if not c.isdigit() or len(length) > 10:
            raise Malformed("malformed netstring length")
        length += c
    n = int(length)
    if n > limit:
        raise Malformed(f"netstring of {n} bytes, over the limit of {limit}")
    data = f.read(n + 1)
    if len(data) != n + 1 or data[-1:] != b",":
        raise Malformed("malformed netstring")
    return data[:-1]
