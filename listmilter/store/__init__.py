"""List stores: where lists and their members live.

Three backends share one interface: `sqlite` (the embedded default; lists
change at run time through the CLI), `postgresql` (the same, in a database
several MX hosts share) and `yaml` (lists and members written in the config
file by the admin; read-only for the CLI).

Membership changes made by people and by bounces (subscribe, unsubscribe,
disable) work on both: with the yaml backend they are kept in an overlay
database beside the config (state_dir/state.sqlite), because the admin's file
decides who is invited but anyone must always be able to leave. Every change
is recorded with who, what, when and how (the consent record).
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from listmilter.core.errors import PermanentError, TemporaryError
from listmilter.core.model import Event, MailingList, Member


class StoreError(TemporaryError):
    """The store cannot answer now (locked, missing, corrupt): callers tempfail."""


class ReadOnlyStore(PermanentError):
    """A write was asked of a store that the admin edits by hand."""


class Store(Protocol):
    backend: str

    def get_list(self, address: str) -> MailingList | None: ...
    def all_lists(self) -> list[MailingList]: ...
    def recipients(self, list_address: str) -> list[str]: ...
    def is_member(self, list_address: str, address: str) -> bool: ...
    def members(self, list_address: str) -> list[Member]: ...
    def member_count(self, list_address: str) -> int: ...
    def create_list(self, address: str, list_settings: dict[str, Any]) -> MailingList: ...
    def delete_list(self, address: str) -> None: ...
    def set_setting(self, address: str, name: str, value: Any) -> None: ...
    def unset_setting(self, address: str, name: str) -> None: ...
    def member(self, list_address: str, address: str) -> Member | None: ...
    def add_members(self, list_address: str, members: Iterable[Member],
                    how: str = "cli", who: str = "", detail: str = "") -> tuple[int, int]: ...
    def remove_members(self, list_address: str, addresses: Iterable[str],
                       how: str = "cli", who: str = "", detail: str = "") -> tuple[int, list[str]]: ...
    # Changes a person or a bounce makes; allowed on both backends.
    def subscribe(self, list_address: str, member: Member, how: str, who: str = "",
                  detail: str = "") -> bool: ...
    def unsubscribe(self, list_address: str, address: str, how: str, who: str = "",
                    detail: str = "") -> bool: ...
    def set_status(self, list_address: str, address: str, status: str, how: str,
                   who: str = "", detail: str = "") -> bool: ...
    def history(self, list_address: str, address: str | None = None) -> list[Event]: ...
    # Delivery reports (listmilter.core.report): the posts sent, the weekly mail's last time.
    def record_post(self, list_address: str, post_id: str, at: float, recipients: int,
                    refused: int = 0) -> None: ...
    def forget_post(self, list_address: str, post_id: str) -> None: ...
    def posts(self, list_address: str, since: float = 0) -> list[tuple[str, float, int, int]]: ...
    def report_sent(self, list_address: str) -> float | None: ...
    def claim_report(self, list_address: str, now: float, last_before: float) -> bool: ...
    def unclaim_report(self, list_address: str, previous: float | None) -> None: ...
    def check(self) -> list[str]: ...
    def release(self) -> None: ...      # close the calling thread's connections, if any
    def close(self) -> None: ...


# One factory for each kind of state: SQLite files in state_dir, or, with
# store.dsn, the PostgreSQL database (listmilter.store.postgresql).
def open_store(config) -> Store:
    if config.backend == "yaml":
        from listmilter.store.yamlstore import YAMLStore
        return YAMLStore(config)
    if config.backend == "postgresql":
        from listmilter.store.postgresql import db, stores
        return stores.PgStore(db.target_of(config))
    from listmilter.store.sqlite import SQLiteStore
    return SQLiteStore(config.store_path)


def open_pending(config):
    """Pending requests and reply counters (listmilter.store.pending.PendingDB's interface)."""
    if config.dsn:
        from listmilter.store.postgresql import db, stores
        return stores.PgPendingDB(db.target_of(config))
    from listmilter.store.pending import PendingDB
    return PendingDB(config.state_dir)


def open_bounces(config):
    """Bounce scores and records (listmilter.store.bounce_records.BounceDB's interface)."""
    if config.dsn:
        from listmilter.store.postgresql import db, stores
        return stores.PgBounceDB(db.target_of(config))
    from listmilter.store.bounce_records import BounceDB
    return BounceDB(config.state_dir)


def site_secret(config):
    """The site's keys accepted now, a core.keys.Keyring (key 0 made on first use):
    state_dir/secret and secret.keys, or the database's table of keys."""
    if config.dsn:
        from listmilter.store.postgresql import db, stores
        return stores.PgKeys(db.target_of(config)).load_or_create()
    from listmilter.store import secret
    return secret.load_or_create(config.state_dir)


def key_source(config):
    """The keys for a long-running process, with refresh() (listmilter.store.secret.KeySource)."""
    if config.dsn:
        from listmilter.store.postgresql import db, stores
        return stores.PgKeySource(db.target_of(config))
    from listmilter.store import secret
    return secret.KeySource(config.state_dir)
