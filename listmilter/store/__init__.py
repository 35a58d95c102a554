"""List stores: where lists and their members live.

Two backends share one interface: `sqlite` (the embedded default; lists
change at run time through the CLI) and `yaml` (lists and members written in
the config file by the admin; read-only for the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol


class StoreError(Exception):
    """The store cannot answer now (locked, missing, corrupt): callers tempfail."""


class ReadOnlyStore(StoreError):
    """A write was asked of a store that the admin edits by hand."""


class NoSuchList(LookupError):
    pass


class ListExists(ValueError):
    pass


@dataclass(frozen=True)
class MailingList:
    address: str                       # canonical, lower case: dev@example.org
    settings: dict[str, Any] = field(default_factory=dict)   # the list's own settings only
    origin: str = ""                   # where it is defined, for `list show`


@dataclass(frozen=True)
class Member:
    address: str
    name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


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
    def add_members(self, list_address: str, members: Iterable[Member]) -> tuple[int, int]: ...
    def remove_members(self, list_address: str, addresses: Iterable[str]) -> tuple[int, list[str]]: ...
    def check(self) -> list[str]: ...
    def close(self) -> None: ...


def open_store(config) -> Store:
    if config.backend == "yaml":
        from .yamlstore import YAMLStore
        return YAMLStore(config)
    from .sqlite import SQLiteStore
    return SQLiteStore(config.store_path)
