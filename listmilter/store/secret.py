"""The site secret: HMAC key for ENVIDs (and later tokens and unsubscribe links).

Created on first use, 32 random bytes, mode 0640, in the state folder.
"""

from __future__ import annotations

import os
import secrets

from listmilter.store import statedir

FILE_NAME = "secret"


def load_or_create(state_dir: str) -> bytes:
    path = os.path.join(state_dir, FILE_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    data = secrets.token_bytes(32)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)          # first writer wins; others read its secret
    except FileExistsError:
        os.unlink(tmp)
        with open(path, "rb") as f:
            return f.read()
    os.unlink(tmp)
    statedir.adopt(state_dir, path)
    return data
