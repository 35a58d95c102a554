"""List archives: every accepted post of a list with `archive: true`, as it went out,
in a Maildir per list, state_dir/archive/LIST/{tmp,new,cur}.

Crash-safe the Maildir way: a message is written and synced under tmp/, then
renamed into new/, so a reader never sees half a message and a crash leaves
at most a file in tmp/. `serve` writes (the milter), `listmilter archive`
reads; other Maildir readers (public-inbox-watch, mutt -f) can too.
"""

from __future__ import annotations

import os
import socket
import time

from listmilter.store import statedir

FOLDER = "archive"
_SUBFOLDERS = ("tmp", "new", "cur")


def folder(state_dir: str, list_address: str) -> str:
    return os.path.join(state_dir, FOLDER, statedir.list_folder_name(list_address))


def add(state_dir: str, list_address: str, data: bytes, queue_id: str, now: float | None = None) -> str:
    """Store one post; its path in new/. Raises OSError (the caller logs it, the post still goes)."""
    now = time.time() if now is None else now
    base = folder(state_dir, list_address)
    for sub in _SUBFOLDERS:
        os.makedirs(os.path.join(base, sub), mode=0o750, exist_ok=True)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    # Unique without a lock: the queue id is unique per MTA, the microseconds per process.
    name = f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{queue_id}.{host}"
    path = os.path.join(base, "new", name)
    statedir.write_durably(os.path.join(base, "tmp", name), path, data)
    statedir.adopt(state_dir, os.path.join(state_dir, FOLDER), base,
                   *(os.path.join(base, sub) for sub in _SUBFOLDERS), path)
    return path


def messages(state_dir: str, list_address: str, since: float = 0.0) -> list[tuple[float, str]]:
    """(time archived, path) of every stored post from `since` on, oldest first."""
    base = folder(state_dir, list_address)
    out = []
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(base, sub))
        except FileNotFoundError:
            continue
        for name in names:
            head = name.split(".", 1)[0]
            if not head.isdigit():
                continue
            if float(head) >= since:
                out.append((float(head), os.path.join(base, sub, name)))
    return sorted(out)
