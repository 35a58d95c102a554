"""Files root makes in the state folder belong to the folder's owner.

An admin runs the CLI as root, and the test bed runs `serve` as root; the
milter, `serve` and the pipe transport normally run as the folder's owner
(user listmilter). A root-owned database, -shm file, kept bounce or socket
would lock them out.
"""

from __future__ import annotations

import os
import urllib.parse

from listmilter.core import addresses


def adopt(folder: str, *paths: str) -> None:
    """As root, give `paths` (those that exist) to the owner of `folder`; otherwise nothing."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(folder)
    except OSError:
        return
    if owner.st_uid == 0:
        return
    for path in paths:
        try:
            st = os.stat(path)
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(path, owner.st_uid, owner.st_gid)
        except OSError:
            pass


def list_folder_name(list_address: str) -> str:
    """One path component for a list's folder (kept bounces, archives): its address,
    %-encoded but for letters, digits and @+=_.-, and a leading dot encoded too. Never a
    path: a list whose local part starts with '/' or holds '..' stays inside its folder."""
    name = urllib.parse.quote(addresses.key(list_address), safe="@+=_.-")
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name[:200] or "%00"


def open_private(path: str, flags: int = os.O_RDWR, mode: int = 0o640) -> int:
    """os.open that creates `path` if missing, with exactly `mode` whatever the umask.

    Never by changing the umask: it is one setting for the whole process, and two
    threads that set and restore it at once can leave it changed for good (every
    later file and folder of the process then gets the wrong mode)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.fchmod(fd, mode)
    return fd


def create_private(path: str, mode: int = 0o640) -> None:
    """Create `path`, empty, with exactly `mode`, if it does not exist; never open one that does.

    For a database file: closing any descriptor of a file drops every POSIX lock the
    process holds on it, so opening SQLite's file next to its live connections would
    let another process take it for unused (and checkpoint away its WAL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_durably(tmp: str, path: str, data: bytes) -> None:
    """Write `data` to `tmp` (0640 whatever the umask, never through a link), fsync it, rename
    it to `path` and fsync that folder: after a crash `path` is whole or absent."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        os.fchmod(fd, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
