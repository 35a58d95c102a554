"""Mail addresses: syntax checks, comparison keys, and the list's role addresses.

A list `dev@example.org` owns a few role addresses beside it:
`dev-bounces@`, `dev-request@`, `dev-subscribe@`, `dev-unsubscribe@`,
`dev-owner@` and `dev-confirm+TOKEN@` (the token after Postfix's
recipient_delimiter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from listmilter.core.errors import PermanentError

ROLES = ("bounces", "request", "subscribe", "unsubscribe", "confirm", "owner", "fanout")
DELIMITER = "+"

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf"{_ATEXT}(?:\.{_ATEXT})*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})+"
_ADDRESS = re.compile(rf"({_LOCAL})@({_DOMAIN})")


class AddressError(PermanentError, ValueError):
    pass


def strip_brackets(address: str) -> str:
    """`<a@b>` -> `a@b`, as milters receive envelope addresses from Postfix's smtpd."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def check(address: str) -> str:
    """Return the address if it is a plain dot-atom `local@domain`, else raise AddressError."""
    if len(address) > 254:
        raise AddressError(f"address longer than 254 characters: {address[:40]}...")
    match = _ADDRESS.fullmatch(address)
    if not match:
        raise AddressError(f"not a valid mail address: {address!r}")
    if len(match.group(1)) > 64:
        raise AddressError(f"local part longer than 64 characters: {address!r}")
    return address


def is_valid(address: str) -> bool:
    try:
        check(address)
    except AddressError:
        return False
    return True


def key(address: str) -> str:
    """Comparison key: admins expect addresses to match case-insensitively, local part too."""
    return address.lower()


@dataclass(frozen=True)
class RoleAddress:
    list_key: str        # key of the list this role belongs to, e.g. "dev@example.org"
    role: str            # one of ROLES
    extension: str       # text after the delimiter, e.g. the confirmation token ("" if none)


def candidates(address: str) -> list[tuple[str, RoleAddress | None]]:
    """Possible readings of an address, most specific first.

    Each entry is (list key to look up, role or None). `dev@x` reads as the
    list itself; `dev-bounces@x` as the role `bounces` of list `dev@x` (unless
    a list of that exact name exists, which the caller checks first);
    `dev+ext@x` as the list `dev@x`, as Postfix's own lookups strip the
    extension.
    """
    local, _, domain = key(address).rpartition("@")
    if not local or not domain:
        return []
    out: list[tuple[str, RoleAddress | None]] = [(f"{local}@{domain}", None)]
    base, delim, extension = local.partition(DELIMITER)
    if delim and base:
        out.append((f"{base}@{domain}", None))
    for role in ROLES:
        suffix = "-" + role
        if base.endswith(suffix) and len(base) > len(suffix):
            list_key = f"{base[: -len(suffix)]}@{domain}"
            out.append((list_key, RoleAddress(list_key, role, extension)))
    return out


def role_address(list_address: str, role: str, extension: str = "") -> str:
    local, _, domain = list_address.rpartition("@")
    ext = f"{DELIMITER}{extension}" if extension else ""
    return f"{local}-{role}{ext}@{domain}"
