"""How well listmilter reads real bounces of many MTAs and mailbox providers beyond flufl.bounce's.

    PYTHONPATH=CHECKOUT .venv/bin/python bench/ndr_corpus.py [-v]

reads tests/data/sisimai/ (real bounces from Sisimai's set-of-emails, labelled
as its README says) with the listmilter found on PYTHONPATH (so an older
checkout gives the "before" figures), each message as from the null sender,
and prints the three figures of issue 14:
- hard bounces (unknown user, unknown host or domain) read as a permanent
  failure of the right address;
- failed addresses found at all (any reason, permanent or temporary);
- auto-replies and ARF reports read with a permanent failure (must be 0).
It also counts the addresses read that the labels do not name (a failure
pinned on the wrong address). -v prints every message that misses.
No MTA, no store: the pure reading only, as `listmilter bounces --explain` does it.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from listmilter.core import bounces

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "sisimai"


def expected() -> dict[str, list[list[str]]]:
    """file -> its rows of expected.tsv (kind, address, permanent, hard, reason, status, label)."""
    rows: dict[str, list[list[str]]] = defaultdict(list)
    for line in (DATA / "expected.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, *fields = line.split("\t")
            rows[name].append(fields)
    return rows


def read(name: str) -> bounces.Report:
    return bounces.read_bytes((DATA / name).read_bytes(), null_sender=True)


def got(report: bounces.Report) -> dict[str, bool]:
    """address (lower case) -> permanent, of each failure read."""
    return {f.address.lower(): f.permanent for f in report.failures}


@dataclass
class Figures:
    hard: int = 0            # hard bounces labelled
    hard_ok: int = 0         # ...read as a permanent failure of the right address
    failed: int = 0          # failed addresses labelled
    found: int = 0           # ...read at all
    quiet: int = 0           # auto-replies and ARF reports
    quiet_bad: int = 0       # ...read with a permanent failure
    extra: int = 0           # addresses read that no label names
    loud: list[str] = field(default_factory=list)      # a line for each auto-reply or ARF report read so
    misses: list[str] = field(default_factory=list)    # a line for each bounce read not as labelled


def figures(verbose: bool = False) -> Figures:
    """Issue 14's figures on the corpus (tests/test_ndr_corpus.py holds them as floors);
    `verbose` also lists auto-replies and ARF reports read with any address."""
    out = Figures()
    for name, rows in sorted(expected().items()):
        report = read(name)
        read_now = got(report)
        if rows[0][0] in ("autoreply", "feedback"):
            out.quiet += 1
            bad = any(read_now.values())
            out.quiet_bad += bad
            if bad or verbose and read_now:
                out.loud.append(f"{name:<34} {rows[0][0]} read as {report.kind} {sorted(read_now)}")
            continue
        want = {r[1] for r in rows}
        out.extra += len(set(read_now) - want)
        for _kind, address, permanent, is_hard, reason, status, _ in rows:
            out.failed += 1
            out.found += address in read_now
            if is_hard == "yes":
                out.hard += 1
                out.hard_ok += read_now.get(address) is True
            if address not in read_now or (permanent == "yes") != read_now[address] or set(read_now) - want:
                out.misses.append(f"{name:<34} {report.kind:<13} want {address} {reason} {status} "
                                  f"got {sorted(read_now.items())}")
    return out


def main() -> int:
    verbose = "-v" in sys.argv
    f = figures(verbose)
    for line in f.loud + (f.misses if verbose else []):
        print(line)
    print(f"hard bounces read as a permanent failure of the right address: {f.hard_ok}/{f.hard} "
          f"({100 * f.hard_ok / f.hard:.1f}%)")
    print(f"failed addresses found (any reason): {f.found}/{f.failed} ({100 * f.found / f.failed:.1f}%)")
    print(f"auto-replies and ARF reports read with a permanent failure: {f.quiet_bad}/{f.quiet}")
    print(f"addresses read that no label names: {f.extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
