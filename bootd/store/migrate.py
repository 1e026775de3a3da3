"""Move a SQLite registry into PostgreSQL, row for row (``bootd store migrate --to URL``).

Why it looks like this:
- The source is read in one read transaction, so a daemon still writing to it
  cannot make the copy half old, half new (stop the daemon anyway: what it
  writes after the snapshot is not copied).
- The target is written in one transaction: COPY every table, keep every id
  (event order and node identity survive), move the identity sequences past
  them, then read everything back and compare it with the source before
  COMMIT. A copy that does not match is rolled back, so the target is either
  the whole registry or untouched.
- A target that already holds a registry is refused unless ``force``, which
  empties it inside the same transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bootd.errors import StoreError
from bootd.store import postgres, sqlite
from bootd.store.base import mask_url

# Copy order respects the foreign keys; the columns are the same on both backends.
TABLES: dict[str, tuple[str, ...]] = {
    "groups": ("name", "capsule", "kernel_args", "description"),
    "nodes": ("id", "mac", "name", "idx", "grp", "capsule", "enabled", "approved", "state", "reason",
              "state_since", "ip", "first_contact", "last_contact", "kernel_args", "server"),
    "node_vars": ("node_id", "key", "value"),
    "leases": ("ip", "mac", "expires", "hostname"),
    "events": ("id", "node_id", "ts", "state", "reason", "detail"),
    "credentials": ("node_id", "digest", "issued", "expires", "evidence"),
    "pxe_seen": ("mac", "ts", "address"),
    "group_vars": ("grp", "key", "value"),
}
ORDER = {"groups": "name", "nodes": "id", "node_vars": "node_id, key", "leases": "ip", "events": "id",
         "credentials": "node_id", "pxe_seen": "mac", "group_vars": "grp, key"}
BOOLEANS = {"enabled", "approved"}
Progress = Callable[[str, int, int], None]
Rows = dict[str, list[tuple[Any, ...]]]


@dataclass(frozen=True)
class MigrateResult:
    source: str
    target: str
    counts: dict[str, int]
    replaced: bool


def read_sqlite(path: str | Path) -> Rows:
    """Every row of every table, in a stable order, booleans as booleans (as PostgreSQL returns them)."""
    repo = sqlite.SqliteRepo(path, readonly=True)  # refuses a registry of another schema version
    try:
        repo.db.execute("BEGIN")
        rows: Rows = {}
        for table, columns in TABLES.items():
            cur = repo.db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {ORDER[table]}")
            rows[table] = [_normalize(columns, tuple(r)) for r in cur]
        repo.db.execute("COMMIT")
        return rows
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read node registry {path}: {exc}") from None
    finally:
        repo.close()


def _normalize(columns: tuple[str, ...], row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(bool(v) if c in BOOLEANS else v for c, v in zip(columns, row, strict=True))


async def read_postgres(conn: postgres.Conn) -> Rows:
    rows: Rows = {}
    for table, columns in TABLES.items():
        cur = await conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {ORDER[table]}")
        rows[table] = [tuple(r) for r in await cur.fetchall()]
    return rows


async def to_postgres(source: str | Path, url: str, *, password: str | None = None, default_group: str = "default",
                      force: bool = False, connect_timeout: float = 10.0,
                      progress: Progress | None = None) -> MigrateResult:
    """Copy the SQLite registry at ``source`` into the PostgreSQL database at ``url``; nothing lost, or nothing done."""
    report = progress or (lambda table, done, total: None)
    rows = read_sqlite(source)
    masked = mask_url(url)
    conn = await postgres.connect(url, password=password, connect_timeout=connect_timeout)
    try:
        await postgres.migrate(conn, url)
        async with conn.transaction():
            # Nobody registers or leases while we copy (a server already running on the target waits).
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (postgres.REGISTER_LOCK,))
            await conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN EXCLUSIVE MODE")
            held = await _occupied(conn, default_group)
            if held and not force:
                raise StoreError(f"{masked} already holds a node registry ({held}); "
                                 "use --force to replace it with the copy")
            await conn.execute(f"TRUNCATE {', '.join(reversed(TABLES))}")
            for table, columns in TABLES.items():
                total = len(rows[table])
                report(table, 0, total)
                async with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for done, row in enumerate(rows[table], 1):
                        await copy.write_row(row)
                        if done % 1000 == 0:
                            report(table, done, total)
                report(table, total, total)
            for table in ("nodes", "events"):
                await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                                   f" COALESCE((SELECT max(id) FROM {table}), 0) + 1, false)")
            await conn.execute("INSERT INTO groups(name) VALUES (%s) ON CONFLICT DO NOTHING", (default_group,))
            copied = await read_postgres(conn)
            if default_group not in {g[0] for g in rows["groups"]}:
                copied["groups"] = [g for g in copied["groups"] if g[0] != default_group]
            for table in TABLES:
                if copied[table] != rows[table]:
                    lost = set(rows[table]) - set(copied[table])
                    raise StoreError(f"copy into {masked} does not match the source in table {table} "
                                     f"({len(lost)} row(s) differ, e.g. {sorted(map(str, lost))[:1]}); "
                                     "nothing was written")
    except psycopg.Error as exc:
        raise StoreError(f"cannot migrate into {masked}: {' '.join(str(exc).split())}") from None
    finally:
        await conn.close()
    return MigrateResult(str(source), masked, {t: len(r) for t, r in rows.items()}, replaced=bool(held))


async def _occupied(conn: postgres.Conn, default_group: str) -> str:
    """What the target already holds, in words ("" if it is empty but for the default group)."""
    found = []
    for table in ("nodes", "leases", "events", "node_vars"):
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        row = await cur.fetchone()
        if row and row[0]:
            found.append(f"{row[0]} {table}")
    cur = await conn.execute("SELECT count(*) FROM groups WHERE NOT (name = %s AND capsule IS NULL"
                             " AND kernel_args = '' AND description = '')", (default_group,))
    row = await cur.fetchone()
    if row and row[0]:
        found.append(f"{row[0]} groups")
    return ", ".join(found)
