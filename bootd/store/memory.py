"""In-memory NodeStore for unit tests of services.

It is the SQLite implementation on ``:memory:`` rather than a second set of
dicts: a fake that shares no code with the real store would let the two drift.
"""

from __future__ import annotations

from bootd.store.sqlite import SqliteNodeStore


def memory_store(default_group: str = "default") -> SqliteNodeStore:
    return SqliteNodeStore(":memory:", default_group=default_group)
