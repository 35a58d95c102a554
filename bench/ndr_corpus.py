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


def main() -> int:
    verbose = "-v" in sys.argv
    hard = hard_ok = failed = found = quiet = quiet_bad = extra = 0
    for name, rows in sorted(expected().items()):
        report = read(name)
        got = {f.address.lower(): f.permanent for f in report.failures}
        if rows[0][0] in ("autoreply", "feedback"):
            quiet += 1
            bad = any(got.values())
            quiet_bad += bad
            if bad or verbose and got:
                print(f"{name:<34} {rows[0][0]} read as {report.kind} {sorted(got)}")
            continue
        want = {r[1] for r in rows}
        extra += len(set(got) - want)
        for _kind, address, permanent, is_hard, reason, status, _ in rows:
            failed += 1
            found += address in got
            if is_hard == "yes":
                hard += 1
                hard_ok += got.get(address) is True
            if verbose and (address not in got or (permanent == "yes") != got[address] or set(got) - want):
                print(f"{name:<34} {report.kind:<13} want {address} {reason} {status} "
                      f"got {sorted(got.items())}")
    print(f"hard bounces read as a permanent failure of the right address: {hard_ok}/{hard} "
          f"({100 * hard_ok / hard:.1f}%)")
    print(f"failed addresses found (any reason): {found}/{failed} ({100 * found / failed:.1f}%)")
    print(f"auto-replies and ARF reports read with a permanent failure: {quiet_bad}/{quiet}")
    print(f"addresses read that no label names: {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
