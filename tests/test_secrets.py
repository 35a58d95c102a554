"""The site's keys on disk (listmilter.store.secret) and `listmilter secret rotate|show`,
through the real CLI where an admin would use it."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from listmilter.core.keys import Keyring
from listmilter.store import secret
from tests.bed.listmilter import cli
from tests.bed.postfix import PIPE_USER, empty_config

DAY = 86400
KEY = bytes(range(100, 132))


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nmilter:\n  socket: unix:{tmp_path}/m.sock\n"
                    f"socketmap:\n  socket: unix:{tmp_path}/s.sock\nlog:\n  target: {tmp_path}/log\n")
    (tmp_path / "state").mkdir(mode=0o750)
    return path


def _state(cfg):
    return cfg.parent / "state"


def test_an_existing_secret_is_key_0_and_is_never_rewritten(cfg):
    path = _state(cfg) / "secret"
    path.write_bytes(KEY)
    path.chmod(0o640)
    before = os.stat(path)
    assert secret.load_or_create(str(_state(cfg))) == Keyring(((0, KEY),))

    checked = cli(cfg, "check", check=False, env={"MAIL_CONFIG": empty_config(cfg.parent / "postfix")})
    assert "keys: current key 0, 0 older ones on file" in checked.stdout
    proc = cli(cfg, "secret", "rotate")
    assert "key 1 is now current" in proc.stdout and "30 more days" in proc.stdout
    after = os.stat(path)
    assert path.read_bytes() == KEY and (after.st_ino, after.st_mode, after.st_mtime_ns) == \
        (before.st_ino, before.st_mode, before.st_mtime_ns)
    ring = secret.load_or_create(str(_state(cfg)))
    assert ring.ids == (1, 0) and ring.secret(0) == KEY and len(ring.secret(1)) == 32
    assert stat.S_IMODE(os.stat(_state(cfg) / "secret.keys").st_mode) == 0o640

    shown = cli(cfg, "secret", "show").stdout
    assert "key 1: current" in shown and "key 0: accepted until" in shown and "(30 days left)" in shown
    for k in (KEY, ring.secret(1)):                      # never a key, in any spelling
        assert k.hex() not in shown and base64.b64encode(k).decode()[:12] not in shown


@pytest.mark.mta      # runs `listmilter serve` (which must refuse to start)
@pytest.mark.parametrize("data", [b"", b"abc", b"x" * 31], ids=["empty", "3-bytes", "31-bytes"])
def test_a_short_secret_is_refused_with_what_to_do(cfg, data):
    path = _state(cfg) / "secret"
    path.write_bytes(data)
    with pytest.raises(secret.SecretError) as info:
        secret.load_or_create(str(_state(cfg)))
    assert f"{path} holds {len(data)} bytes" in str(info.value) and f"mv {path} {path}.short" in str(info.value)
    for args in (("serve",), ("secret", "show"), ("secret", "rotate")):
        proc = cli(cfg, *args, check=False)
        assert proc.returncode == 78, (args, proc.stderr)
        assert proc.stderr.startswith(f"listmilter: {path} holds {len(data)} bytes; the site secret must be "
                                      "at least 32 random bytes") and "Traceback" not in proc.stderr
    proc = cli(cfg, "check", check=False)             # before an upgrade's restart, as upgrade.md says
    assert proc.returncode == 1 and f"keys: {path} holds {len(data)} bytes" in proc.stderr
    # The pipe transport: 75 with the same words, so Postfix keeps the bounce until it is fixed.
    cli(cfg, "list", "create", "dev@example.org")
    proc = cli(cfg, "deliver", "dev-bounces@example.org", "", input="Subject: x\n\nbounce\n", check=False)
    assert proc.returncode == 75 and f"{path} holds {len(data)} bytes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == data and not (_state(cfg) / "secret.keys").exists()


def test_a_linked_or_special_secret_is_refused(cfg, tmp_path):
    path = _state(cfg) / "secret"
    (tmp_path / "elsewhere").write_bytes(KEY)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(secret.SecretError, match="is a symbolic link"):
        secret.load_or_create(str(_state(cfg)))
    proc = cli(cfg, "secret", "show", check=False)
    assert proc.returncode == 78 and "is a symbolic link" in proc.stderr
    path.unlink()
    os.mkfifo(path)                     # opened without blocking, then refused
    with pytest.raises(secret.SecretError, match="not a regular file"):
        secret.load_or_create(str(_state(cfg)))


def test_new_key_files_are_0640_and_belong_to_the_state_folders_owner(cfg):
    os.chown(_state(cfg), *_ids(PIPE_USER))
    old = os.umask(0o022)
    try:
        secret.load_or_create(str(_state(cfg)))             # as root, like an admin's first CLI call
        cli(cfg, "secret", "rotate")
    finally:
        os.umask(old)
    for name in ("secret", "secret.keys"):
        st = os.stat(_state(cfg) / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (*_ids(PIPE_USER), 0o640), name
    assert [p.name for p in _state(cfg).iterdir() if p.name.endswith(".tmp")] == []


def _ids(user):
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def test_older_keys_are_accepted_for_the_grace_period_only(tmp_path):
    state, t = str(tmp_path), 1_800_000_000.0
    secret.load_or_create(state)
    secret.rotate(state, 30, now=t)
    keys = secret.read_keys(state)
    assert secret.keyring_of(keys, t + 29.9 * DAY).ids == (1, 0)
    assert secret.keyring_of(keys, t + 30 * DAY).ids == (1,)
    secret.rotate(state, 10, now=t + DAY)                 # a shorter grace shortens the older keys' too
    assert [(k.id, k.until) for k in secret.read_keys(state)] == \
        [(2, None), (1, t + 11 * DAY), (0, t + 11 * DAY)]
    secret.rotate(state, 0, now=t + 2 * DAY)              # a leaked key: nothing older is accepted
    assert [k.id for k in secret.read_keys(state)] == [3]
    assert secret.load_or_create(state).ids == (3,)


def test_rotations_at_once_and_readers_meanwhile(tmp_path):
    state = str(tmp_path)
    secret.load_or_create(state)
    errors, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                secret.load_or_create(state)
            except Exception as e:          # a half-written file would land here
                errors.append(e)
    reader = threading.Thread(target=read)
    reader.start()
    code = f"from listmilter.store import secret\nfor _ in range(5): secret.rotate({state!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(6)]
    try:
        assert [p.wait(120) for p in procs] == [0] * 6
    finally:
        done.set()
        reader.join()
    assert errors == []
    keys = secret.read_keys(state)
    assert keys[0].id == 30 and sorted(k.id for k in keys) == list(range(31))


def test_a_running_process_follows_rotations_and_grace_ends(tmp_path):
    state = str(tmp_path)
    source = secret.KeySource(state)
    assert source.refresh().ids == (0,)
    secret.rotate(state, 1)
    assert source.refresh().ids == (1, 0)
    assert source.refresh(now=time.time() + 2 * DAY).ids == (1,)
    good = source.keyring
    tmp = tmp_path / "x.tmp"
    tmp.write_text(json.dumps({"format": 1, "keys": [{"id": 5, "key": "c2hvcnQ="}]}))
    os.replace(tmp, tmp_path / "secret.keys")
    with pytest.raises(secret.SecretError, match=r"secret.keys \(key 5\) holds 5 bytes"):
        source.refresh()
    assert source.refresh(now=time.time() + 2 * DAY) is good         # reported once, last good keys kept
    for damaged in ("not json", '{"format": 2, "keys": []}', '{"format": 1, "keys": [{"id": "x"}]}'):
        (tmp_path / "secret.keys").write_text(damaged)
        with pytest.raises(secret.SecretError, match="restore it from a backup"):
            secret.read_keys(state)
