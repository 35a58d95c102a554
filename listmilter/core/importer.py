"""Reading member files: one address per line, or CSV with a header row.

Every bad line is reported with its number, and nothing is imported unless
all lines are good (the caller writes the result in one transaction).

Plain format: one address per line, or `Name <address>`; blank lines and
lines starting with # are skipped. CSV (the first line holds a comma): the
header row names the columns; `address` (or `email`) is required, `name` is
the member's name, every other column is kept as an attribute.
"""

from __future__ import annotations

import csv
import email.utils
import io
from dataclasses import dataclass, field
from typing import Callable, Iterable

from listmilter.core import addresses
from listmilter.core.model import Member

ADDRESS_COLUMNS = ("address", "email", "e-mail", "mail")


@dataclass
class Parsed:
    members: list[Member] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)   # (line number, message)
    duplicates: int = 0


Progress = Callable[[int], None]


def parse(lines: Iterable[str], progress: Progress | None = None) -> Parsed:
    lines = list(lines)
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    if "," in first and "<" not in first:
        return _parse_csv(lines, progress)
    return _parse_plain(lines, progress)


def _add(result: Parsed, seen: set[str], number: int, address: str, name: str = "",
         attributes: dict[str, str] | None = None) -> None:
    try:
        addresses.check(address)
    except addresses.AddressError as e:
        result.errors.append((number, str(e)))
        return
    k = addresses.key(address)
    if k in seen:
        result.duplicates += 1
        return
    seen.add(k)
    result.members.append(Member(address, name, attributes or {}))


def _parse_plain(lines: list[str], progress: Progress | None) -> Parsed:
    result, seen = Parsed(), set[str]()
    for number, line in enumerate(lines, 1):
        if progress and number % 5000 == 0:
            progress(number)
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "<" in text:
            name, address = email.utils.parseaddr(text)
            if not address:
                result.errors.append((number, f"not a valid mail address: {text!r}"))
                continue
            _add(result, seen, number, address, name)
        else:
            _add(result, seen, number, text)
    return result


def _parse_csv(lines: list[str], progress: Progress | None) -> Parsed:
    result, seen = Parsed(), set[str]()
    reader = csv.reader(io.StringIO("".join(line if line.endswith("\n") else line + "\n" for line in lines)))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return result
    column = next((header.index(c) for c in ADDRESS_COLUMNS if c in header), None)
    if column is None:
        result.errors.append((1, f"CSV header has no address column (one of {', '.join(ADDRESS_COLUMNS)})"))
        return result
    name_col = header.index("name") if "name" in header else None
    try:
        for row in reader:
            number = reader.line_num
            if progress and number % 5000 == 0:
                progress(number)
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                result.errors.append((number, f"{len(row)} columns, the header has {len(header)}"))
                continue
            attributes = {header[i]: row[i].strip() for i in range(len(row))
                          if i not in (column, name_col) and header[i]}
            _add(result, seen, number, row[column].strip(),
                 row[name_col].strip() if name_col is not None else "", attributes)
    except csv.Error as e:
        result.errors.append((reader.line_num, f"CSV error: {e}"))
    return result
