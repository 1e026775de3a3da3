"""One key picks the registry backend: ``[store] url`` (empty: SQLite in the state directory).

The composition root calls ``open_store(config)`` and gets a NodeStore; nothing
else in bootd needs to know which backend is behind it.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

from bootd.config import Config
from bootd.errors import StoreError
from bootd.store.base import NodeStore
from bootd.store.sqlite import SqliteNodeStore, state_dir_writable

log = logging.getLogger("bootd.store")
SQLITE_PREFIX = "sqlite://"


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_path(config: Config) -> Path:
    """The SQLite file the configuration names (the default registry when ``store.url`` is empty)."""
    url = config.store.url
    return Path(url[len(SQLITE_PREFIX):]) if url.startswith(SQLITE_PREFIX) else config.db_path


def read_password(path: Path) -> str:
    """The first line of ``path``; a clear error if it cannot be used. Never logged."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot read store.password_file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("event=password_file_not_private path=%s mode=%o (chmod 600 it)", path, st.st_mode & 0o777)
    password = text.splitlines()[0] if text.strip() else ""
    if not password:
        raise StoreError(f"store.password_file {path} is empty; its first line is the database password")
    return password


async def open_store(config: Config, *, metrics: Any = None, readonly: bool = False) -> NodeStore:
    """Open the configured registry; a StoreError (URL named, password hidden) if it cannot be used.

    ``metrics`` is a prometheus CollectorRegistry for the PostgreSQL outage counters.
    """
    url = config.store.url
    if not url:
        if not readonly:
            state_dir_writable(config.server.state_dir)
        url = SQLITE_PREFIX + str(config.db_path)
    password = read_password(config.store.password_file) if config.store.password_file else None
    return await open_url(url, password=password, default_group=config.registry.default_group,
                          pool_size=config.store.pool_size, connect_timeout=config.store.connect_timeout,
                          retry_for=config.store.retry_for, metrics=metrics, readonly=readonly)


async def open_url(url: str, *, password: str | None = None, default_group: str = "default", pool_size: int = 10,
                   connect_timeout: float = 10.0, retry_for: float = 30.0, metrics: Any = None,
                   readonly: bool = False) -> NodeStore:
    """The registry at ``url`` (sqlite:///PATH or postgresql://...), schema migrated to this bootd's.

    ``readonly`` opens SQLite for reading only (the CLI's list/show work on a read-only state directory);
    PostgreSQL permissions are the database's business.
    """
    if url.startswith(SQLITE_PREFIX):
        return SqliteNodeStore(url[len(SQLITE_PREFIX):], default_group=default_group, readonly=readonly)
    if not is_postgres(url):
        scheme = url.partition("://")[0]
        raise StoreError(f"unknown registry URL scheme {scheme!r}; expected postgresql://... or sqlite:///PATH")
    from bootd.store.postgres import PostgresNodeStore

    return await PostgresNodeStore.open(url, password=password, default_group=default_group, pool_size=pool_size,
                                        connect_timeout=connect_timeout, retry_for=retry_for, metrics=metrics)
