"""The running config, store and keys, reloaded when the config file (or the key file) changes.

A broken edit keeps the last good config running; the error is logged once
with its file and line. The same holds for `state_dir/secret.keys`
(`listmilter secret rotate`), looked at once a second like the config.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

from listmilter.core import config as config_mod
from listmilter.log import logger, setup
from listmilter.store import Store, key_source, open_store
from listmilter.store import secret as secret_mod

CHECK_INTERVAL = 1.0


class Runtime:
    def __init__(self, path: str | None, explicit: bool = True):
        self.path = path
        self.explicit = explicit
        self.config = config_mod.load(path, explicit)
        # The hand-off socket and kept bounces live here, also when the state is in PostgreSQL.
        os.makedirs(self.config.state_dir, mode=0o750, exist_ok=True)
        self.store: Store = open_store(self.config)
        self._keys = key_source(self.config)
        self.secret = self._keys.keyring
        self._lock = threading.Lock()
        self._next_check = time.monotonic() + CHECK_INTERVAL
        self._failed_mtime: float | None = None

    def current(self) -> tuple[config_mod.Config, Store]:
        """The config and store to use now; picks up a changed config file first."""
        now = time.monotonic()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + CHECK_INTERVAL
                self._maybe_reload()
            finally:
                self._lock.release()
        return self.config, self.store

    def watch(self) -> threading.Thread:
        """Look at the config file every CHECK_INTERVAL in the background (`serve`), so a
        change is picked up and logged within a second, not only at the next message."""
        def loop() -> None:
            while True:
                time.sleep(CHECK_INTERVAL)
                self.current()      # a failed reload is logged there and never raises
        thread = threading.Thread(target=loop, name="config-watch", daemon=True)
        thread.start()
        return thread

    def _mtime(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime if self.path else None
        except OSError:
            return None

    def _refresh_keys(self) -> None:
        try:
            self.secret = self._keys.refresh()
        except (secret_mod.SecretError, OSError) as e:
            logger.error("warning: keys not reloaded, still using those read before: %s", e)

    def _maybe_reload(self) -> None:
        self._refresh_keys()
        mtime = self._mtime()
        if mtime == self.config.mtime or mtime == self._failed_mtime:
            return
        self.reload(mtime)

    def reload_now(self) -> bool:
        """Re-read the config at once (SIGUSR1, `systemctl reload`), changed or not."""
        with self._lock:
            self._next_check = time.monotonic() + CHECK_INTERVAL
            self._refresh_keys()
            ok = self.reload()
            if ok:
                # Also reopens a log file, for logrotate.
                setup(self.config.log_target, self.config.log_facility)
            return ok

    def reload(self, mtime: float | None = None) -> bool:
        try:
            new = config_mod.load(self.path, self.explicit)
            store = self.store
            where = lambda c: (c.backend, c.store_path, c.dsn, c.password_file)  # noqa: E731
            if where(new) != where(self.config) or new.backend == "yaml":
                store = open_store(new)
            keys = self._keys
            if (new.dsn, new.password_file, new.state_dir) != (self.config.dsn, self.config.password_file,
                                                               self.config.state_dir):
                keys = key_source(new)      # the keys live with the state
        except Exception as e:  # a broken edit must never stop the running milter
            self._failed_mtime = mtime if mtime is not None else self._mtime()
            logger.error("warning: config reload failed, still running on the last good config: %s", e)
            return False
        for key, name in (("milter_socket", "milter.socket"), ("socketmap_socket", "socketmap.socket")):
            if getattr(new, key) != getattr(self.config, key):
                logger.warning("warning: %s: %s changed to %s; it takes effect at the next restart",
                               self.path, name, getattr(new, key))
        if (new.log_target, new.log_facility) != (self.config.log_target, self.config.log_facility):
            setup(new.log_target, new.log_facility)
        old, self.config, self.store = self.store, new, store
        self._keys, self.secret = keys, keys.keyring
        self._failed_mtime = None
        if old is not store and old.backend == "sqlite":
            old.close()
        logger.info("config reloaded from %s: backend=%s, lists=%d", self.path, new.backend,
                    len(store.all_lists()))
        return True


def every(runtime: Runtime, name: str, period: float, first: float,
          job: Callable[[config_mod.Config, Store], Iterable[str]]) -> threading.Thread:
    """Run job(config, store) with the running config every `period` seconds, the first time
    after `first`, in a thread of its own (serve's periodic work: bounces, held posts). Each
    line it yields is logged as `NAME: periodic: LINE`; a failure (a busy store or MTA) is
    logged and tried again next time."""
    def loop() -> None:
        delay = first
        while True:
            time.sleep(delay)
            delay = period
            try:
                config, store = runtime.current()
                for line in job(config, store):
                    logger.info("%s: periodic: %s", name, line)
            except Exception as e:
                logger.error("warning: %s: periodic run failed, will retry: %s", name, e)
    thread = threading.Thread(target=loop, name=f"{name}-periodic", daemon=True)
    thread.start()
    return thread
