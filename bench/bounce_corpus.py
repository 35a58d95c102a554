"""How well listmilter reads the 116 real bounces of flufl.bounce's sample corpus.

    PYTHONPATH=CHECKOUT .venv/bin/python bench/bounce_corpus.py

reads tests/data/flufl-bounce/ with the listmilter found on PYTHONPATH (so an
older checkout gives the "before" figures) and prints, per message and in total:
- right: the addresses flufl.bounce's own tests expect (expected.tsv), each
  exactly as permanent or temporary, and no other; from the null sender, and
  from a non-null one (some MTAs send their reports from MAILER-DAEMON@host);
- as DSN: read from the delivery report's own fields (a status code, the ORCPT),
  out of the messages that hold a message/delivery-status part;
- envid: with `Original-Envelope-Id: <ours>` written into the report's
  per-message fields (as a listmilter post's DSN carries it), the failures come
  come back with that ENVID (kept), and as kind `dsn` with it (what scoring
  needs today).
No MTA, no store: the pure reading only, as `listmilter bounces --explain` does it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from listmilter.core import bounces

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "flufl-bounce"
ENVID = b"4XyZ1s2B3c.t4k2x1.9f2a61c0d4e5b6a7.dev@example.org"
_REPORTING = re.compile(rb"^(Reporting-MTA:)", re.IGNORECASE | re.MULTILINE)


def _read(data: bytes, null_sender: bool = True) -> bounces.Report:
    if hasattr(bounces, "read_bytes"):
        return bounces.read_bytes(data, null_sender=null_sender)
    from listmilter.core import mailparse  # listmilter before issue 14
    return bounces.read(mailparse.parse(data), null_sender=null_sender)


def _addresses(report: bounces.Report) -> tuple[set[str], set[str]]:
    return ({f.address for f in report.failures if f.permanent},
            {f.address for f in report.failures if not f.permanent})


def main() -> int:
    right = dsn_parts = as_dsn = envid_ok = kept = total = right_sender = 0
    for line in (DATA / "expected.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, _, permanent, temporary = line.split("\t")
        data = (DATA / name).read_bytes()
        total += 1
        report = _read(data)
        expected = (set(permanent.split()), set(temporary.split()))
        ok = _addresses(report) == expected
        right += ok
        # Every sample's Return-Path names a real sender (a list's -admin@, MAILER-DAEMON@host):
        # read as from that sender, as an MTA that sends its NDRs from one would deliver it.
        right_sender += _addresses(_read(data, null_sender=False)) == expected
        has_part = re.search(rb"^Content-Type:\s*message/(global-)?delivery-status", data,
                             re.IGNORECASE | re.MULTILINE) is not None
        marks = []
        if has_part:
            dsn_parts += 1
            if report.kind == "dsn" and report.failures:
                as_dsn += 1
                marks.append("dsn")
            if _REPORTING.search(data):
                with_envid = _read(_REPORTING.sub(b"Original-Envelope-Id: " + ENVID + b"\n\\1", data, count=1))
                if with_envid.failures and with_envid.envid == ENVID.decode():
                    kept += 1
                    marks.append("envid-kept")
                    if with_envid.kind == "dsn":
                        envid_ok += 1
                        marks.append("envid-dsn")
        print(f"{name:<20} {report.kind:<13} {'right' if ok else 'WRONG':<6} {' '.join(marks)}")
    print(f"\nright addresses and permanence: {right}/{total}")
    print(f"the same, read as from a non-null sender: {right_sender}/{total}")
    print(f"read as a DSN (of {dsn_parts} with a delivery-status part): {as_dsn}")
    print(f"failures kept with the inserted ENVID: {kept}/{dsn_parts}, read as a DSN with it: {envid_ok}/{dsn_parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
