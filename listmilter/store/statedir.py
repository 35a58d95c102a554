"""Files root makes in the state folder belong to the folder's owner.

An admin runs the CLI as root, and the test bed runs `serve` as root; the
milter, `serve` and the pipe transport normally run as the folder's owner
(user listmilter). A root-owned database, -shm file, kept bounce or socket
would lock them out.
"""

from __future__ import annotations

import os


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
