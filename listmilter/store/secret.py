"""The site's keys on disk: `secret` (key 0) and, after a rotation, `secret.keys`.

`state_dir/secret` is what every listmilter has made on first use: 32 random
bytes, mode 0640, owned by the state folder's owner. It is key 0 and is never
rewritten, so an existing installation keeps working unchanged.

`listmilter secret rotate` writes `state_dir/secret.keys` (JSON, mode 0640):

    {"format": 1, "keys": [
      {"id": 2, "created": 1796000000.0, "key": "BASE64"},
      {"id": 1, "created": 1794000000.0, "until": 1798592000.0, "key": "BASE64"},
      {"id": 0, "created": null, "until": 1798592000.0, "key": "BASE64"}]}

The first key is current (it makes everything new); the others are accepted
for checking until `until` (the grace period, 30 days by default). Once the
file exists it is the whole truth: key 0 is copied into it, and `secret` is
left as it was (an older listmilter, if one is started again, still finds it).
A rotation writes a temporary file, fsyncs it and renames it over the old
one, under an flock on the state folder; readers see the old file or the
new one, never half of one. Long-running processes look at the file's inode
and mtime at most once a second (listmilter.app.runtime).

A secret shorter than 32 bytes, a symbolic link, or anything but a regular
file is refused with SecretError, which says what to do.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass

from listmilter.core.errors import TemporaryError
from listmilter.core.keys import LEGACY, MIN_LENGTH, Keyring
from listmilter.store import statedir

FILE_NAME = "secret"
KEYS_NAME = "secret.keys"
DAY = 86400.0
GRACE_DAYS = 30
_MAX_FILE = 1 << 20


class SecretError(TemporaryError):
    """The site's keys cannot be used as they are; the admin must act (the message says how).

    Temporary in the errors.py sense: mail waits (4xx, exit 75) until it is fixed.
    """


@dataclass(frozen=True)
class Key:
    id: int
    secret: bytes
    created: float | None          # None: key 0, made before key ids
    until: float | None = None     # None: current, or no end yet


def _read(path: str) -> bytes:
    """A regular file's bytes, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SecretError(f"{path} is a symbolic link; listmilter reads its keys only from a regular "
                              "file in the state folder: replace the link by the file itself") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"{path} is not a regular file; move it away and start listmilter again "
                              "(it makes a new secret)")
        if st.st_size > _MAX_FILE:
            raise SecretError(f"{path} is larger than {_MAX_FILE} bytes: not a listmilter secret")
        return f.read(_MAX_FILE + 1)


def _check_secret(path: str, data: bytes) -> bytes:
    if len(data) < MIN_LENGTH:
        raise SecretError(
            f"{path} holds {len(data)} bytes; the site secret must be at least {MIN_LENGTH} random bytes. "
            f"Move it away (mv {path} {path}.short) and start listmilter again: it makes a new one "
            "(links and envelope ids made with the old one stop working)")
    return data


def _parse_keys(path: str, data: bytes) -> list[Key]:
    def bad(why: str) -> SecretError:
        return SecretError(f"{path}: {why}; it is written only by `listmilter secret rotate`: "
                           "restore it from a backup")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("keys"), list) \
            or not doc["keys"]:
        raise bad("not a listmilter key file (format 1)")
    out = []
    for item in doc["keys"]:
        try:
            kid = item["id"]
            secret = base64.b64decode(item["key"], validate=True)
            created, until = item.get("created"), item.get("until")
            if type(kid) is not int or not 0 <= kid <= 0xFFFF \
                    or not all(v is None or isinstance(v, (int, float)) for v in (created, until)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"a key entry is damaged: {str(item)[:20]!r}...") from None
        out.append(Key(kid, _check_secret(f"{path} (key {kid})", secret), created, until))
    if len({k.id for k in out}) != len(out):
        raise bad("a key id appears twice")
    return out


def read_keys(state_dir: str) -> list[Key] | None:
    """Every key on disk, the current one first; None when there is no key yet."""
    keys_path = os.path.join(state_dir, KEYS_NAME)
    try:
        return _parse_keys(keys_path, _read(keys_path))
    except FileNotFoundError:
        pass
    path = os.path.join(state_dir, FILE_NAME)
    try:
        return [Key(LEGACY, _check_secret(path, _read(path)), None)]
    except FileNotFoundError:
        return None


def keyring_of(keys: list[Key], now: float) -> Keyring:
    """The keys accepted at `now`: the current one, and the others before their `until`."""
    current, *older = keys
    return Keyring(((current.id, current.secret),) +
                   tuple((k.id, k.secret) for k in older if k.until is None or now < k.until))


def next_change(keys: list[Key], now: float) -> float | None:
    """When a key's grace period ends next (None: never)."""
    ends = [k.until for k in keys[1:] if k.until is not None and k.until > now]
    return min(ends) if ends else None


def load_or_create(state_dir: str, now: float | None = None) -> Keyring:
    """The keys accepted now; makes key 0 (the `secret` file) on first use."""
    now = time.time() if now is None else now
    return keyring_of(_keys_or_create(state_dir), now)


def _keys_or_create(state_dir: str) -> list[Key]:
    """The keys on disk, making key 0 first if there is none yet."""
    keys = read_keys(state_dir)
    if keys is None:
        _create(state_dir)
        keys = read_keys(state_dir)
    if keys is None:
        raise SecretError(f"{state_dir}: no key after making one")
    return keys


def _create(state_dir: str) -> None:
    path = os.path.join(state_dir, FILE_NAME)
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    _write_new(tmp, secrets.token_bytes(32))
    try:
        os.link(tmp, path)          # first writer wins; others read its secret
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    statedir.adopt(state_dir, path)


def _write_new(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rotate(state_dir: str, grace_days: float = GRACE_DAYS, now: float | None = None) -> list[Key]:
    """Make a new current key; the others stay accepted for `grace_days` at most. The keys after."""
    if grace_days < 0:
        raise ValueError("the grace period cannot be negative")
    now = time.time() if now is None else now
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)      # one rotation at a time; readers need no lock
        keys = _keys_or_create(state_dir)
        until = now + grace_days * DAY
        older = [Key(k.id, k.secret, k.created, min(until, k.until if k.until is not None else until))
                 for k in keys]
        older = [k for k in older if k.until is not None and k.until > now]
        new_id = max(k.id for k in keys) + 1
        if new_id > 0xFFFF:
            raise SecretError("no key ids left (65535 rotations)")
        new = [Key(new_id, secrets.token_bytes(32), now)] + older
        doc = {"format": 1, "keys": [
            {"id": k.id, "created": k.created, **({"until": k.until} if k.until is not None else {}),
             "key": base64.b64encode(k.secret).decode()} for k in new]}
        path = os.path.join(state_dir, KEYS_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            _write_new(tmp, (json.dumps(doc, indent=1) + "\n").encode())
            statedir.adopt(state_dir, tmp)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dir_fd)                      # the rename itself survives a crash
        return new
    finally:
        os.close(dir_fd)


class KeySource:
    """The keyring for a long-running process: re-read when `secret.keys` changes or a grace period ends."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self._signature = self._stat()
        self._keys = _keys_or_create(state_dir)          # key 0 on first use
        now = time.time()
        self.keyring = keyring_of(self._keys, now)
        self._change = next_change(self._keys, now)

    def _stat(self):
        try:
            st = os.stat(os.path.join(self.state_dir, KEYS_NAME))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def refresh(self, now: float | None = None) -> Keyring:
        """The current keyring; a damaged key file raises SecretError and the last good keyring stays."""
        now = time.time() if now is None else now
        signature = self._stat()
        if signature != self._signature:
            self._signature = signature       # a damaged file is reported once, not every second
            self._keys = read_keys(self.state_dir) or self._keys
            self._change = 0.0
        if self._change is not None and now >= self._change:
            self.keyring = keyring_of(self._keys, now)
            self._change = next_change(self._keys, now)
        return self.keyring
