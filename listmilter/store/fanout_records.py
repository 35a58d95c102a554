"""Fan-out progress records, one small file per post in state_dir/fanout/ (core/fanout.py).

Written durably (statedir.write_durably: whole or absent after a crash) after each
batch of copies the MTA has taken. A post's fan-out holds an flock on its own
`.lock` file, so a second delivery attempt of the same post (the MTA retried
while serve still works on it) waits for the next retry instead of sending twice.
The records live on the host whose MTA queue holds the post: with several MX
hosts on one PostgreSQL store each fans out what its own queue holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from listmilter.core import fanout
from listmilter.store import statedir

FOLDER = "fanout"


class Busy(Exception):
    """Another process fans this post out now."""


def folder(state_dir: str) -> str:
    return os.path.join(state_dir, FOLDER)


def _path(state_dir: str, key: str) -> str:
    return os.path.join(folder(state_dir), key)


@contextlib.contextmanager
def locked(state_dir: str, key: str) -> Iterator[None]:
    """Hold the post's lock (raise Busy when another process holds it)."""
    base = folder(state_dir)
    os.makedirs(base, mode=0o750, exist_ok=True)
    statedir.adopt(state_dir, base)
    fd = statedir.open_private(_path(state_dir, key) + ".lock")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise Busy(key) from e
        yield
    finally:
        os.close(fd)        # releases the lock


def read(state_dir: str, key: str) -> fanout.Progress | None:
    try:
        with open(_path(state_dir, key), "rb") as f:
            return fanout.loads(f.read(4096))
    except FileNotFoundError:
        return None


def write(state_dir: str, key: str, progress: fanout.Progress) -> None:
    path = _path(state_dir, key)
    statedir.write_durably(path + ".tmp", path, progress.dumps())
    statedir.adopt(state_dir, path)


def every(state_dir: str) -> list[tuple[str, fanout.Progress]]:
    """(key, record) of every readable record, oldest post first."""
    try:
        names = os.listdir(folder(state_dir))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith((".lock", ".tmp")):
            continue
        record = read(state_dir, name)
        if record is not None:
            out.append((name, record))
    return sorted(out, key=lambda item: (item[1].posted_at, item[0]))


def expire(state_dir: str, before: float) -> int:
    """Remove the records (and lock files) of posts older than `before`: their fan-out
    codes no longer verify (core/verp.py MAX_AGE), so no delivery can ask for them."""
    removed = 0
    for key, record in every(state_dir):
        if record.posted_at < before:
            for path in (_path(state_dir, key), _path(state_dir, key) + ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed += 1
    return removed
