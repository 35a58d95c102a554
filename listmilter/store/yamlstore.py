"""The yaml store: lists and members as written under `lists:` in the config file.

It is a read-only view of one loaded Config; the milter swaps in a new one
when the file changes (see listmilter.runtime).
"""

from __future__ import annotations

from typing import Any, Iterable

from .. import addresses
from . import MailingList, Member, NoSuchList, ReadOnlyStore


class YAMLStore:
    backend = "yaml"

    def __init__(self, config):
        self.path = config.path
        self._lists = {
            key: MailingList(key, dict(d.settings), f"{config.path}:{d.line}")
            for key, d in config.lists.items()
        }
        self._members = {key: list(d.members) for key, d in config.lists.items()}
        self._member_keys = {key: {addresses.key(m) for m in d.members} for key, d in config.lists.items()}

    def _list_key(self, address: str) -> str:
        key = addresses.key(address)
        if key not in self._lists:
            raise NoSuchList(address)
        return key

    def get_list(self, address: str) -> MailingList | None:
        return self._lists.get(addresses.key(address))

    def all_lists(self) -> list[MailingList]:
        return [self._lists[k] for k in sorted(self._lists)]

    def recipients(self, list_address: str) -> list[str]:
        return list(self._members[self._list_key(list_address)])

    def is_member(self, list_address: str, address: str) -> bool:
        return addresses.key(address) in self._member_keys[self._list_key(list_address)]

    def members(self, list_address: str) -> list[Member]:
        return [Member(a) for a in self._members[self._list_key(list_address)]]

    def member_count(self, list_address: str) -> int:
        return len(self._members[self._list_key(list_address)])

    def _read_only(self, *args: Any, **kw: Any):
        raise ReadOnlyStore(f"lists in the yaml store are edited in {self.path} (under lists:); "
                            "listmilter picks up the change by itself")

    create_list = delete_list = set_setting = unset_setting = _read_only

    def add_members(self, list_address: str, members: Iterable[Member]) -> tuple[int, int]:
        self._read_only()

    def remove_members(self, list_address: str, addrs: Iterable[str]) -> tuple[int, list[str]]:
        self._read_only()

    def check(self) -> list[str]:
        return []

    def close(self) -> None:
        pass
