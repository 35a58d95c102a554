"""The yaml store: lists and members as written under `lists:` in the config file.

It is a read-only view of one loaded Config for the admin's tools; the milter
swaps in a new one when the file changes (see listmilter.app.runtime).

What people and bounces change at run time (someone subscribes by mail,
leaves by one click, is disabled by bounces) goes to an overlay database,
state_dir/state.sqlite, laid over the file's members: the file says who is
invited, the overlay says who joined, left or is disabled since, with the
consent record for each change. With `store.dsn` the overlay lives in that
PostgreSQL database instead (the same tables), so every host sees it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, NoReturn

from listmilter.core import addresses
from listmilter.core.model import (
    ACTIVE,
    DISABLED,
    Event,
    MailingList,
    Member,
    NoSuchList,
)
from listmilter.store import ReadOnlyStore
from listmilter.store.sqlite import UNSUBSCRIBED, SQLiteStore

OVERLAY_NAME = "state.sqlite"


class YAMLStore:
    backend = "yaml"

    def __init__(self, config):
        self.path = config.path
        self._lists = {
            key: MailingList(key, dict(d.settings), f"{config.path}:{d.line}")
            for key, d in config.lists.items()
        }
        self._members = {key: list(d.members) for key, d in config.lists.items()}
        # key -> address as written, per list
        self._member_keys = {key: {addresses.key(m): m for m in d.members} for key, d in config.lists.items()}
        self.overlay_path = os.path.join(config.state_dir, OVERLAY_NAME)
        self._state: SQLiteStore | None = None
        if config.dsn:     # the overlay in the PostgreSQL database every host shares
            from listmilter.store.postgresql import db, stores
            self._state = stores.PgStore(db.target_of(config), stores.LISTS_YAML, "yaml overlay")
            self.overlay_path = self._state.describe

    def _overlay_store(self, create: bool) -> SQLiteStore | None:
        if self._state is None and (create or os.path.exists(self.overlay_path)):
            self._state = SQLiteStore(self.overlay_path, name="yaml overlay")
        return self._state

    def _writable_overlay(self) -> SQLiteStore:
        state = self._overlay_store(create=True)
        assert state is not None
        return state

    def _overlay(self, key: str) -> dict[str, Member]:
        state = self._overlay_store(create=False)
        return state.overlay(key) if state else {}

    def _list_key(self, address: str) -> str:
        key = addresses.key(address)
        if key not in self._lists:
            raise NoSuchList(address)
        return key

    def get_list(self, address: str) -> MailingList | None:
        return self._lists.get(addresses.key(address))

    def all_lists(self) -> list[MailingList]:
        return [self._lists[k] for k in sorted(self._lists)]

    def members(self, list_address: str) -> list[Member]:
        """The file's members with their run-time status, then those who joined at run time."""
        key = self._list_key(list_address)
        overlay = self._overlay(key)
        if not overlay:
            return [Member(a) for a in self._members[key]]
        in_file = self._member_keys[key]
        out = []
        for a in self._members[key]:
            m = overlay.get(addresses.key(a))
            if m is None:
                out.append(Member(a))
            elif m.status != UNSUBSCRIBED:
                out.append(Member(a, m.name, m.attributes, m.status, m.added))
        out.extend(m for k, m in overlay.items() if k not in in_file and m.status != UNSUBSCRIBED)
        return out

    def recipients(self, list_address: str) -> list[str]:
        key = self._list_key(list_address)
        if not self._overlay(key):
            return list(self._members[key])
        return [m.address for m in self.members(key) if m.status == ACTIVE]

    def member(self, list_address: str, address: str) -> Member | None:
        key = self._list_key(list_address)
        m = self._overlay(key).get(addresses.key(address))
        if m is not None:
            return None if m.status == UNSUBSCRIBED else m
        written = self._member_keys[key].get(addresses.key(address))
        return Member(written) if written is not None else None

    def is_member(self, list_address: str, address: str) -> bool:
        return self.member(list_address, address) is not None

    def member_count(self, list_address: str) -> int:
        return len(self.members(list_address))

    def history(self, list_address: str, address: str | None = None) -> list[Event]:
        self._list_key(list_address)
        state = self._overlay_store(create=False)
        return state.history(list_address, address) if state else []

    def subscribe(self, list_address: str, member: Member, how: str, who: str = "",
                  detail: str = "") -> bool:
        key = self._list_key(list_address)
        current = self.member(key, member.address)
        if current is not None:
            return False
        self._writable_overlay().set_overlay(key, member, ACTIVE, "subscribed", how, who, detail)
        return True

    def unsubscribe(self, list_address: str, address: str, how: str, who: str = "",
                    detail: str = "") -> bool:
        key = self._list_key(list_address)
        current = self.member(key, address)
        if current is None:
            return False
        # The row stays as a mask over the file's entry, which only the admin may delete.
        self._writable_overlay().set_overlay(key, current, UNSUBSCRIBED, "unsubscribed",
                                                     how, who, detail)
        return True

    def set_status(self, list_address: str, address: str, status: str, how: str,
                   who: str = "", detail: str = "") -> bool:
        if status not in (ACTIVE, DISABLED):
            raise ValueError(f"unknown member status {status!r}")
        key = self._list_key(list_address)
        current = self.member(key, address)
        if current is None or current.status == status:
            return False
        self._writable_overlay().set_overlay(
            key, current, status, "enabled" if status == ACTIVE else "disabled", how, who, detail)
        return True

    # Delivery reports: kept in the overlay beside the run-time changes.
    def record_post(self, list_address: str, post_id: str, at: float, recipients: int, refused: int = 0) -> None:
        self._writable_overlay().record_post(self._list_key(list_address), post_id, at, recipients, refused)

    def forget_post(self, list_address: str, post_id: str) -> None:
        key = self._list_key(list_address)
        state = self._overlay_store(create=False)
        if state:
            state.forget_post(key, post_id)

    def posts(self, list_address: str, since: float = 0) -> list[tuple[str, float, int, int]]:
        key = self._list_key(list_address)
        state = self._overlay_store(create=False)
        return state.posts(key, since) if state else []

    def report_sent(self, list_address: str) -> float | None:
        key = self._list_key(list_address)
        state = self._overlay_store(create=False)
        return state.report_sent(key) if state else None

    def claim_report(self, list_address: str, now: float, last_before: float) -> bool:
        return self._writable_overlay().claim_report(self._list_key(list_address), now, last_before)

    def unclaim_report(self, list_address: str, previous: float | None) -> None:
        self._writable_overlay().unclaim_report(self._list_key(list_address), previous)

    def _read_only(self, *args: Any, **kw: Any) -> NoReturn:
        raise ReadOnlyStore(f"lists in the yaml store are edited in {self.path} (under lists:); "
                            "listmilter picks up the change by itself")

    create_list = delete_list = set_setting = unset_setting = _read_only

    def add_members(self, list_address: str, members: Iterable[Member],
                    how: str = "cli", who: str = "", detail: str = "") -> tuple[int, int]:
        self._read_only()

    def remove_members(self, list_address: str, addrs: Iterable[str],
                       how: str = "cli", who: str = "", detail: str = "") -> tuple[int, list[str]]:
        self._read_only()

    def check(self) -> list[str]:
        state = self._overlay_store(create=False)
        return state.check() if state else []

    def release(self) -> None:
        if self._state is not None:
            self._state.release()

    def close(self) -> None:
        if self._state is not None:
            self._state.close()
