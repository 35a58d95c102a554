"""`listmilter archive LIST [--since DATE] [--mbox]`: what a list's archive holds, or all of it as an mbox."""

from __future__ import annotations

import sys
from os import EX_USAGE

from listmilter.cli.common import Fail, admin, existing_list, plural


def add_parsers(sub) -> None:
    s = sub.add_parser("archive", help="list a list's archived posts, or export them as an mbox")
    s.set_defaults(handler=admin(_archive))
    s.add_argument("list")
    s.add_argument("--since", metavar="DATE",
                   help="only posts archived from then on: YYYY-MM-DD or YYYY-MM-DDTHH:MM, local time")
    s.add_argument("--mbox", action="store_true",
                   help="write the posts to standard output as one mbox (mboxrd), e.g. for mhonarc")


def _since(text: str | None) -> float:
    if not text:
        return 0.0
    import datetime
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise Fail(f"--since {text!r}: not a date such as 2026-12-01 or 2026-12-01T08:00", EX_USAGE) from None


def _archive(args, cfg, store):
    import email.parser
    import email.policy
    import time

    from listmilter.core import addresses
    from listmilter.store import archive
    mlist = existing_list(store, args.list)
    since = _since(args.since)
    posts = archive.messages(cfg.state_dir, mlist.address, since)
    out = sys.stdout.buffer
    sender = addresses.role_address(mlist.address, "bounces")
    for when, path in posts:
        with open(path, "rb") as f:
            data = f.read()
        if args.mbox:
            out.write(mbox_entry(sender, when, data))
            continue
        head = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(data)
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
        out.write(f"{stamp}\t{head.get('From', '')}\t{head.get('Subject', '')}\t{path}\n"
                  .encode("utf-8", "replace"))
    out.flush()
    if not args.mbox or not posts:
        on = f"{mlist.address}" + (f" since {args.since}" if args.since else "")
        archived = cfg.list_settings(mlist.settings).archive
        print(f"{on}: {plural(len(posts), 'archived post')}"
              + ("" if archived else " (archive is off for this list: `listmilter list set "
                 f"{mlist.address} archive true`)"), file=sys.stderr)


def mbox_entry(sender: str, when: float, data: bytes) -> bytes:
    """One message in mboxrd form: a From_ line, every ^>*From line quoted once more, a blank line."""
    import re
    import time
    data = data.replace(b"\r\n", b"\n")
    data = re.sub(rb"(?m)^(>*From )", rb">\1", data)
    if not data.endswith(b"\n"):
        data += b"\n"
    return f"From {sender} {time.asctime(time.gmtime(when))}\n".encode() + data + b"\n"
