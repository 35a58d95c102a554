"""Kept bounce mail: what reached <list>-bounces@ and scored nobody, one file per message,
state_dir/bounces/FOLDER/SHA256.eml.

FOLDER is `folder_name(list)`: the list address made into one safe path
component, never a path (a list whose local part starts with '/' or holds '..'
stays inside state_dir/bounces/). A file is named by its content's SHA-256, so
the same message kept twice is one file. Files are 0640 in a 0750 folder, like
every state file; a file is at most the list's bounce_kept_max_kb (the rest is
cut), files older than bounce_kept_days go, and the folder stays under
bounce_kept_quota_mb (oldest first): a flood of junk to the bounce address
cannot fill the disk. What to delete is decided by core.bounces.kept_to_delete.
"""

from __future__ import annotations

import hashlib
import os

from listmilter.core import bounces
from listmilter.store import statedir

FOLDER = "bounces"


folder_name = statedir.list_folder_name


def folder(state_dir: str, list_address: str) -> str:
    return os.path.join(state_dir, FOLDER, folder_name(list_address))


def keep(state_dir: str, list_address: str, data: bytes, max_bytes: int) -> tuple[str, bool]:
    """Write `data` (its first `max_bytes`); the file's path and whether it was cut."""
    cut = len(data) > max_bytes
    body = data[:max_bytes]
    base = folder(state_dir, list_address)
    os.makedirs(base, mode=0o750, exist_ok=True)
    path = os.path.join(base, hashlib.sha256(data).hexdigest() + ".eml")
    statedir.write_durably(f"{path}.{os.getpid()}.tmp", path, body)
    statedir.adopt(state_dir, os.path.join(state_dir, FOLDER), base, path)
    return path, cut


def prune(state_dir: str, list_address: str, now: float, retention_days: int, quota_bytes: int,
          keep_path: str = "") -> list[str]:
    """Delete the list's kept files past retention or over quota; the paths deleted."""
    base = folder(state_dir, list_address)
    files: list[tuple[str, int, float]] = []
    try:
        with os.scandir(base) as entries:
            for entry in entries:
                if entry.name.endswith(".eml") and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    files.append((entry.path, st.st_size, st.st_mtime))
    except FileNotFoundError:
        return []
    gone = []
    for path in bounces.kept_to_delete(files, now, retention_days * bounces.DAY, quota_bytes, keep_path):
        try:
            os.unlink(path)
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone
