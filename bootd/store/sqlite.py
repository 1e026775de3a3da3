"""SQLite node registry: the embedded default.

Why it looks like this:
- WAL, so the CLI can read while the daemon writes.
- Every write runs in ``BEGIN IMMEDIATE``: the write lock is taken before the
  first read of the transaction, so two writers never both read "n0041 is
  free" and race (Warewulf wrote its node DB under a read lock; we do not).
- The async wrapper sends every call to one dedicated thread: one writer, no
  blocking of the event loop, and registration is serialised for free. The one
  exception is the group commit of the DHCP path (leases, registrations), run
  on the event loop's own thread when the connection is free: see ``_flush``.
- Schema changes are numbered migrations keyed on ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar, cast

from mypy_extensions import mypyc_attr

from bootd.errors import Conflict, NotFound, RegistryFull, StateChanged, StoreError
from bootd.model import Group, Lease, Node, State, normalize_mac
from bootd.store.base import NODE_FIELDS, Credential, Event, NewNode, ServerRecord, StoreStatus

log = logging.getLogger("bootd.store")

CHECKPOINT_EVERY = 1.0  # seconds between the daemon's background WAL checkpoints
WAL_LIMIT: Final = 64 * 1024 * 1024  # bytes of WAL past which the checkpointer makes the writer rewind it
WAL_RESET_WAIT_MS: Final = 250  # how long that checkpoint waits for the writer lock (between two group commits)
WAL_FRAME_HEADER: Final = 24  # bytes before each page in the WAL file
BUSY_TIMEOUT_MS: Final = 10000  # how long a write waits for another connection's write lock (the database thread only)
WRITE_BATCH: Final = 256  # writes per group commit at most: one transaction stays short for the other writers
P = ParamSpec("P")


class Busy(Exception):
    """Another connection holds the write lock, and the caller asked not to wait for it."""


R = TypeVar("R")

MIGRATIONS: tuple[str, ...] = (
    # 1: nodes, groups, per-node key/values, leases
    """
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        capsule TEXT,
        kernel_args TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE nodes (
        id INTEGER PRIMARY KEY,
        mac TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        idx INTEGER UNIQUE,
        grp TEXT NOT NULL REFERENCES groups(name),
        capsule TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        approved INTEGER NOT NULL DEFAULT 1,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        state_since REAL NOT NULL,
        ip TEXT,
        first_contact REAL NOT NULL,
        last_contact REAL NOT NULL,
        kernel_args TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE node_vars (
        node_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (node_id, key)
    );
    CREATE TABLE leases (
        ip TEXT PRIMARY KEY,
        mac TEXT NOT NULL UNIQUE,
        expires REAL NOT NULL,
        hostname TEXT
    );
    """,
    # 2: the lifecycle event log behind `bootd node show` timelines
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        node_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        ts REAL NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_node_ts ON events(node_id, ts);
    """,
    # 3: per-boot node credentials (only a digest is stored) and proxy-mode PXE evidence
    """
    CREATE TABLE credentials (
        node_id INTEGER PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        issued REAL NOT NULL,
        expires REAL NOT NULL,
        evidence TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE pxe_seen (
        mac TEXT PRIMARY KEY,
        ts REAL NOT NULL,
        address TEXT
    );
    """,
    # 4: group variables, inherited by the group's nodes
    """
    CREATE TABLE group_vars (
        grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (grp, key)
    );
    """,
    # 5: several servers on one registry: who is alive, which server booted a node, one sweeper at a time,
    # and a node's own address unique across servers (a duplicate left by an older bootd is cleared first)
    """
    CREATE TABLE servers (
        id TEXT PRIMARY KEY,
        addresses TEXT NOT NULL DEFAULT '',
        public_url TEXT NOT NULL DEFAULT '',
        admin_url TEXT NOT NULL DEFAULT '',
        pid INTEGER NOT NULL DEFAULT 0,
        started REAL NOT NULL,
        heartbeat REAL NOT NULL,
        load REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE cluster_locks (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires REAL NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN server TEXT;
    UPDATE nodes SET ip = NULL WHERE ip IS NOT NULL
        AND id <> (SELECT MIN(o.id) FROM nodes o WHERE o.ip = nodes.ip);
    CREATE UNIQUE INDEX nodes_ip ON nodes(ip) WHERE ip IS NOT NULL;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
EVENTS_KEPT_PER_NODE: Final = 200


IN_LIMIT: Final = 500  # values per IN (...) list (512 once _padded): well under SQLite's 32766 bound parameters


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    """The values of an IN (...) list, IN_LIMIT at a time, each part _padded."""
    for i in range(0, len(values), IN_LIMIT):
        yield _padded(values[i:i + IN_LIMIT])


def _padded(values: list[Any]) -> list[Any]:
    """An IN list's values padded to a power of two with copies of the last (IN ignores repeats), so a few statements
    serve every length and stay in the connection's statement cache. A DHCP batch's own size made a new statement
    each time, prepared again: 1.5% of the serving daemon's time (perf, bench/dhcp with perfdhcp)."""
    size = 1
    while size < len(values):
        size <<= 1
    return values + [values[-1]] * (size - len(values)) if values else values


def _marks(values: list[Any]) -> str:
    return ",".join("?" * len(values))


ROWS_MAX: Final = 64  # rows per multi-row statement: 256 bound parameters at most (a row has 4 values at most)
_ROWS_SQL: dict[tuple[str, int, int, str], str] = {}


def _rows(db: sqlite3.Connection, head: str, width: int, rows: list[tuple[Any, ...]], tail: str = "",
          lead: tuple[Any, ...] = ()) -> int:
    """``head VALUES (?,..),(?,..),.. tail`` for ``rows`` of ``width`` values (``lead``: the values of head's own
    marks): executemany's effect in fewer steps. Returns the rows changed.

    Why: executemany steps its statement once per row, and every step releases and takes back the GIL and SQLite's
    own mutex; one statement of many rows steps once. The DHCP batch's statements (nodes, first events, leases, the
    nodes' addresses) cost 0.3-0.7 us less a row this way. Slices are powers of two (at most ROWS_MAX), so a few
    statements are compiled and cached whatever the batch size. A statement is atomic: a row that trips a
    constraint undoes its slice, and the caller's savepoint the rest.
    """
    changed = 0
    i, n = 0, len(rows)
    while i < n:
        size = ROWS_MAX
        while size > n - i:
            size >>= 1
        key = (head, width, size, tail)
        sql = _ROWS_SQL.get(key)
        if sql is None:
            one = "(" + ",".join("?" * width) + ")"
            sql = _ROWS_SQL[key] = f"{head} VALUES {','.join([one] * size)} {tail}".rstrip()
        changed += db.execute(sql, [*lead, *(v for row in rows[i:i + size] for v in row)]).rowcount
        i += size
    return changed


def _node(row: sqlite3.Row, vars_: dict[str, str]) -> Node:
    return Node(
        mac=row["mac"], name=row["name"], group=row["grp"], capsule=row["capsule"],
        enabled=bool(row["enabled"]), approved=bool(row["approved"]), state=State(row["state"]),
        reason=row["reason"], state_since=row["state_since"], ip=row["ip"],
        first_contact=row["first_contact"], last_contact=row["last_contact"],
        kernel_args=row["kernel_args"], vars=vars_, server=row["server"],
    )


def _server(row: sqlite3.Row) -> ServerRecord:
    return ServerRecord(id=row["id"], addresses=tuple(x for x in row["addresses"].split(",") if x),
                        public_url=row["public_url"], admin_url=row["admin_url"], pid=row["pid"],
                        started=row["started"], heartbeat=row["heartbeat"], load=row["load"], nodes=row["nodes"])


def diagnose(path: str | Path) -> str:
    """Why a write under ``path`` fails, in words an administrator can act on ("" if unknown)."""
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return f"{directory} is on a read-only filesystem"
    if not os.access(directory, os.W_OK):
        return f"{directory} is not writable by this user"
    if st.f_bavail * st.f_frsize < 256 * 1024:
        return f"the filesystem of {directory} is full"
    return ""


def _explain(exc: BaseException, path: str) -> str:
    hint = diagnose(path) if path != ":memory:" else ""
    return f"{exc} ({hint})" if hint else str(exc)


# Compiled with the DHCP path (tools/compile.py), as a regular Python class with compiled methods: the tests replace
# methods on an instance to watch the group commit, which a native class forbids.
@mypyc_attr(native_class=False)
class SqliteRepo:
    """Synchronous repository; used directly by the CLI, through SqliteNodeStore by the daemon.

    ``readonly`` opens for reading only (the CLI's list/show), which also works
    when the state directory is on a read-only filesystem.
    """

    def __init__(self, path: str | Path, *, default_group: str = "default", readonly: bool = False) -> None:
        self.path = str(path)
        self.readonly = readonly
        if self.path != ":memory:" and not readonly:
            parent = Path(self.path).parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create state directory {parent}: {exc.strerror}") from None
        try:
            if readonly:
                if not Path(self.path).exists():
                    raise StoreError(f"no node registry at {self.path} (bootd serve or a CLI write creates it)")
                flags = "mode=ro" + ("&immutable=1" if diagnose(self.path).endswith("read-only filesystem") else "")
                self.db = sqlite3.connect(f"file:{self.path}?{flags}", uri=True, isolation_level=None,
                                          check_same_thread=False, timeout=10.0)
            else:
                self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._timeout = BUSY_TIMEOUT_MS  # the connection's busy timeout now (see waits)
            if readonly:
                if self.schema_version() != SCHEMA_VERSION:
                    raise StoreError(f"node registry {self.path} has schema {self.schema_version()}, this bootd "
                                     f"reads {SCHEMA_VERSION}; start bootd serve once to migrate it")
            else:
                if self.path != ":memory:":
                    self.db.execute("PRAGMA journal_mode = WAL")
                    self.db.execute("PRAGMA synchronous = NORMAL")
                self.migrate()
                with self.write():
                    self.db.execute("INSERT OR IGNORE INTO groups(name) VALUES (?)", (default_group,))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open node registry {self.path}: {_explain(exc, self.path)}") from None
        self.default_group = default_group

    # -- plumbing -----------------------------------------------------------------
    @contextlib.contextmanager
    def write(self, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, lock taken up front (BEGIN IMMEDIATE).

        ``wait=False``: raise Busy at once, instead of waiting up to the busy timeout, when another
        connection (the CLI, another process) holds the write lock: the event loop's thread must not wait.
        """
        if self.readonly:
            raise StoreError(f"node registry {self.path} was opened read-only")
        try:
            self.waits(wait)
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not wait and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                raise Busy(str(exc)) from None
            raise StoreError(f"node registry {self.path} is locked or read-only: {_explain(exc, self.path)}") from None
        try:
            yield self.db
        except sqlite3.Error as exc:
            self.db.execute("ROLLBACK")
            raise StoreError(f"cannot write node registry {self.path}: {_explain(exc, self.path)}") from None
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                self.db.execute("ROLLBACK")
                raise StoreError(f"cannot write node registry {self.path}: {_explain(exc, self.path)}") from None

    def waits(self, wait: bool) -> None:
        """Whether the connection's next statements wait for another connection's lock (up to BUSY_TIMEOUT_MS) or
        fail at once (the event loop's thread, which must not wait). Set only when it changes: a PRAGMA each way
        around every one of the DHCP path's transactions was a tenth of a small batch's cost."""
        timeout = BUSY_TIMEOUT_MS if wait else 0
        if self._timeout != timeout:
            self.db.execute(f"PRAGMA busy_timeout = {timeout}")
            self._timeout = timeout

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"node registry {self.path} has schema version {current}, newer than this bootd "
                f"understands ({SCHEMA_VERSION}); upgrade bootd"
            )
        for version in range(current + 1, target + 1):
            with self.write() as db:
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")

    def close(self) -> None:
        self.db.close()

    def _vars(self, node_id: int) -> dict[str, str]:
        rows = self.db.execute("SELECT key, value FROM node_vars WHERE node_id = ? ORDER BY key", (node_id,))
        return {r["key"]: r["value"] for r in rows}

    def _row(self, where: str, arg: object) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(f"SELECT * FROM nodes WHERE {where} = ?", (arg,)).fetchone()
        return row

    def _require(self, name: str) -> sqlite3.Row:
        row = self._row("name", name)
        if row is None:
            raise NotFound(f"no node named {name!r}")
        return row

    def _load(self, row: sqlite3.Row) -> Node:
        return _node(row, self._vars(row["id"]))

    # -- nodes --------------------------------------------------------------------
    def get_node(self, name: str) -> Node | None:
        row = self._row("name", name)
        return None if row is None else self._load(row)

    def get_node_by_mac(self, mac: str) -> Node | None:
        row = self._row("mac", normalize_mac(mac))
        return None if row is None else self._load(row)

    def list_nodes(self) -> list[Node]:
        rows = self.db.execute("SELECT * FROM nodes ORDER BY name").fetchall()
        allvars: dict[int, dict[str, str]] = {}
        for r in self.db.execute("SELECT node_id, key, value FROM node_vars ORDER BY key"):
            allvars.setdefault(r["node_id"], {})[r["key"]] = r["value"]
        return [_node(r, allvars.get(r["id"], {})) for r in rows]

    def register(self, mac: str, *, name_pattern: str, first_index: int, group: str, approved: bool,
                 now: float, max_nodes: int = 0) -> tuple[Node, bool]:
        with self.write() as db:
            return self._register(db, mac, name_pattern=name_pattern, first_index=first_index, group=group,
                                  approved=approved, now=now, max_nodes=max_nodes)

    def _register(self, db: sqlite3.Connection, mac: str, *, name_pattern: str, first_index: int, group: str,
                  approved: bool, now: float, max_nodes: int) -> tuple[Node, bool]:
        result = self._register_many(db, [mac], name_pattern=name_pattern, first_index=first_index, group=group,
                                     approved=approved, now=now, max_nodes=max_nodes)[0]
        if isinstance(result, RegistryFull):
            raise result
        return result

    def _register_many(self, db: sqlite3.Connection, macs: list[str], *, name_pattern: str, first_index: int,
                       group: str, approved: bool, now: float,
                       max_nodes: int) -> list[tuple[Node, bool] | RegistryFull]:
        """Each MAC's node, registering the unknown ones, in order (a MAC twice: registered once, then known).

        One call for a DHCP read batch, set-based: one query finds the known nodes (and one their variables), one
        statement records their contacts; the new nodes share the checks (the group exists, the highest index, the
        size bound, which pattern names are taken) and go in with one statement for the rows and one for their
        first events, where a node at a time took seven statements.
        """
        wanted = [normalize_mac(m) for m in macs]
        unique = list(dict.fromkeys(wanted))
        known: dict[str, sqlite3.Row] = {}
        for part in _chunks(unique):
            for row in db.execute(f"SELECT * FROM nodes WHERE mac IN ({_marks(part)})", part):
                known[row["mac"]] = row
        found: dict[str, tuple[Node, bool] | RegistryFull] = {}
        if known:
            allvars: dict[int, dict[str, str]] = {}
            ids = [r["id"] for r in known.values()]
            for part in _chunks(ids):
                for v in db.execute(f"SELECT node_id, key, value FROM node_vars WHERE node_id IN ({_marks(part)})"
                                    " ORDER BY key", part):
                    allvars.setdefault(v["node_id"], {})[v["key"]] = v["value"]
            # Their contact, recorded in the same trip (at most once a second).
            stale = [(now, r["id"]) for r in known.values() if now - r["last_contact"] >= 1.0]
            if stale:
                db.executemany("UPDATE nodes SET last_contact = ? WHERE id = ?", stale)
            for mac, row in known.items():
                found[mac] = (_node(row, allvars.get(row["id"], {})), False)
        new = [mac for mac in unique if mac not in known]
        top_id = top_idx = None
        if new:
            room = len(new)
            # Two probes in one statement (MAX of two columns in one SELECT would scan the table).
            top_id, top_idx = db.execute("SELECT (SELECT MAX(id) FROM nodes), (SELECT MAX(idx) FROM nodes)").fetchone()
            # COUNT(*) reads every row (O(nodes)); the largest id bounds the count from above and costs one index
            # probe, so the count is only taken near the limit.
            if max_nodes:
                bound = top_id or 0
                if bound + len(new) > max_nodes:
                    count = db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
                    room = max(0, min(len(new), max_nodes - count))
            for mac in new[room:]:
                found[mac] = RegistryFull(f"the registry holds registry.max_nodes = {max_nodes} nodes; {mac} is not "
                                          "registered (raise the limit, or delete nodes)")
            new = new[:room]
        if new:
            self._ensure_group(group)
            index = first_index if top_idx is None else max(first_index, top_idx + 1)
            names: list[tuple[int, str]] = []
            while len(names) < len(new):
                # A manually added node may already carry a name from the pattern: skip over it.
                span = [(i, name_pattern.format(index=i)) for i in range(index, index + len(new) - len(names))]
                index += len(span)
                part = _padded([name for _, name in span])
                taken = {r[0] for r in db.execute(f"SELECT name FROM nodes WHERE name IN ({_marks(part)})", part)}
                names += [(i, name) for i, name in span if name not in taken]
            # The rows' ids are given, as SQLite would choose them (the largest + 1), so their first events need no
            # lookup of each new node by MAC (a quarter of a registration's statement time).
            first_id = (top_id or 0) + 1
            discovered = State.DISCOVERED.value
            # What the batch's nodes share is bound once, not once a row (a bound value costs about as much as a
            # row's share of the statement): 0.6 us less an exchange, a tenth of the batch's registration SQL.
            _rows(
                db, "INSERT INTO nodes(id, mac, name, idx, grp, approved, state, state_since, first_contact,"
                " last_contact) SELECT column1, column2, column3, column4, ?, ?, ?, ?, ?, ? FROM (", 4,
                [(first_id + k, mac, name, i) for k, (mac, (i, name)) in enumerate(zip(new, names, strict=True))],
                ")", (group, int(approved), discovered, now, now, now))
            db.execute("WITH RECURSIVE ids(n) AS (SELECT ? UNION ALL SELECT n + 1 FROM ids WHERE n < ?)"
                       " INSERT INTO events(node_id, ts, state, reason) SELECT n, ?, ?, 'first contact' FROM ids",
                       (first_id, first_id + len(new) - 1, now, discovered))
            for mac, (_, name) in zip(new, names, strict=True):
                # Built from the values just inserted (the column defaults for the rest, no variables yet) rather
                # than read back: a first contact is on the DHCP path.
                found[mac] = (Node(mac=mac, name=name, group=group, approved=approved, state=State.DISCOVERED,
                                   state_since=now, first_contact=now, last_contact=now), True)
        out: list[tuple[Node, bool] | RegistryFull] = []
        seen: set[str] = set()
        for mac in wanted:
            one = found[mac]
            if isinstance(one, tuple) and one[1] and mac in seen:
                one = (one[0], False)  # the same MAC again in the batch: registered by its first ask
            seen.add(mac)
            out.append(one)
        return out

    def _ensure_group(self, group: str) -> None:
        if self.db.execute("SELECT 1 FROM groups WHERE name = ?", (group,)).fetchone() is None:
            raise NotFound(f"no group named {group!r} (create it with `bootd group add {group}`)")

    def add_node(self, mac: str, name: str, *, group: str, now: float, **fields: Any) -> Node:
        mac = normalize_mac(mac)
        with self.write() as db:
            self._ensure_group(group)
            if self._row("mac", mac) is not None:
                raise Conflict(f"MAC {mac} is already registered as {self._row('mac', mac)['name']}")  # type: ignore[index]
            if self._row("name", name) is not None:
                raise Conflict(f"a node named {name!r} already exists")
            db.execute(
                "INSERT INTO nodes(mac, name, grp, state, state_since, first_contact, last_contact)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (mac, name, group, State.DISCOVERED.value, now, 0.0, 0.0),
            )
        return self.update_node(name, **fields) if fields else self._load(self._require(name))

    def add_nodes(self, nodes: list[NewNode], *, now: float) -> int:
        with self.write() as db:
            for group in sorted({n.group for n in nodes}):
                self._ensure_group(group)
            for n in nodes:
                other = self._row("mac", n.mac)
                if other is not None:
                    raise Conflict(f"line {n.line}: MAC {n.mac} is already registered as {other['name']}")
                if self._row("name", n.name) is not None:
                    raise Conflict(f"line {n.line}: a node named {n.name!r} already exists")
                if n.ip is not None and (other := self._row("ip", n.ip)) is not None:
                    raise Conflict(f"line {n.line}: address {n.ip} is already {other['name']}'s")
                cur = db.execute(
                    "INSERT INTO nodes(mac, name, grp, capsule, ip, kernel_args, state, state_since,"
                    " first_contact, last_contact) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (n.mac, n.name, n.group, n.capsule, n.ip, n.kernel_args, State.DISCOVERED.value, now, 0.0, 0.0),
                )
                db.executemany("INSERT INTO node_vars(node_id, key, value) VALUES (?, ?, ?)",
                               [(cur.lastrowid, k, v) for k, v in n.vars.items()])
        return len(nodes)

    def update_node(self, name: str, **fields: Any) -> Node:
        for key in fields:
            if key not in NODE_FIELDS:
                raise StoreError(f"cannot set {key!r}; settable fields: {', '.join(NODE_FIELDS)}")
        with self.write() as db:
            row = self._require(name)
            values = dict(fields)
            if "group" in values:
                self._ensure_group(values["group"])
                values["grp"] = values.pop("group")
            if "mac" in values:
                values["mac"] = normalize_mac(values["mac"])
                other = self._row("mac", values["mac"])
                if other is not None and other["id"] != row["id"]:
                    raise Conflict(f"MAC {values['mac']} is already registered as {other['name']}")
            if "name" in values:
                other = self._row("name", values["name"])
                if other is not None and other["id"] != row["id"]:
                    raise Conflict(f"a node named {values['name']!r} already exists")
            if values.get("ip") is not None:
                other = self._row("ip", values["ip"])
                if other is not None and other["id"] != row["id"]:
                    raise Conflict(f"address {values['ip']} is already node {other['name']}'s")
            for key in ("enabled", "approved"):
                if key in values:
                    values[key] = int(bool(values[key]))
            if values:
                assignments = ", ".join(f"{k} = ?" for k in values)
                db.execute(f"UPDATE nodes SET {assignments} WHERE id = ?", (*values.values(), row["id"]))
            new = db.execute("SELECT * FROM nodes WHERE id = ?", (row["id"],)).fetchone()
            return self._load(new)

    def rename_node(self, name: str, new: str) -> Node:
        with self.write() as db:
            row = self._require(name)
            if self._row("name", new) is not None:
                raise Conflict(f"a node named {new!r} already exists")
            db.execute("UPDATE nodes SET name = ? WHERE id = ?", (new, row["id"]))
            return self._load(db.execute("SELECT * FROM nodes WHERE id = ?", (row["id"],)).fetchone())

    def set_vars(self, name: str, values: dict[str, str], unset: tuple[str, ...] = ()) -> Node:
        with self.write() as db:
            row = self._require(name)
            for key, value in values.items():
                db.execute("INSERT OR REPLACE INTO node_vars(node_id, key, value) VALUES (?, ?, ?)",
                           (row["id"], key, value))
            for key in unset:
                db.execute("DELETE FROM node_vars WHERE node_id = ? AND key = ?", (row["id"], key))
            return self._load(row)

    def delete_node(self, name: str) -> None:
        with self.write() as db:
            row = self._require(name)
            db.execute("DELETE FROM leases WHERE mac = ?", (row["mac"],))
            db.execute("DELETE FROM nodes WHERE id = ?", (row["id"],))

    def set_state(self, name: str, state: State, reason: str = "", *, now: float, detail: str = "",
                  expect: State | None = None) -> Node:
        with self.write() as db:
            row = self._require(name)
            if expect is not None and row["state"] != expect.value:
                raise StateChanged(name, expect.value, row["state"])
            if row["state"] != state.value or row["reason"] != reason:
                db.execute("UPDATE nodes SET state = ?, reason = ?, state_since = ? WHERE id = ?",
                           (state.value, reason, now, row["id"]))
            db.execute("UPDATE nodes SET last_contact = ? WHERE id = ?", (now, row["id"]))
            self._event(db, row["id"], now, state.value, reason, detail)
            return self._load(db.execute("SELECT * FROM nodes WHERE id = ?", (row["id"],)).fetchone())

    @staticmethod
    def _event(db: sqlite3.Connection, node_id: int, ts: float, state: str, reason: str, detail: str) -> None:
        db.execute("INSERT INTO events(node_id, ts, state, reason, detail) VALUES (?, ?, ?, ?, ?)",
                   (node_id, ts, state, reason, detail))
        db.execute(
            "DELETE FROM events WHERE node_id = ? AND id NOT IN "
            "(SELECT id FROM events WHERE node_id = ? ORDER BY id DESC LIMIT ?)",
            (node_id, node_id, EVENTS_KEPT_PER_NODE),
        )

    def record_event(self, name: str, ts: float, state: str, reason: str = "", detail: str = "") -> None:
        with self.write() as db:
            self._event(db, self._require(name)["id"], ts, state, reason, detail)

    # -- credentials ----------------------------------------------------------------
    def put_credential(self, cred: Credential) -> None:
        """Replace the node's credential (a new boot revokes the previous one)."""
        with self.write() as db:
            row = self._require(cred.node)
            db.execute("INSERT OR REPLACE INTO credentials(node_id, digest, issued, expires, evidence) "
                       "VALUES (?, ?, ?, ?, ?)", (row["id"], cred.digest, cred.issued, cred.expires, cred.evidence))

    def get_credential(self, name: str) -> Credential | None:
        r = self.db.execute("SELECT c.* FROM credentials c JOIN nodes n ON n.id = c.node_id WHERE n.name = ?",
                            (name,)).fetchone()
        return None if r is None else Credential(name, r["digest"], r["issued"], r["expires"], r["evidence"])

    def extend_credential(self, name: str, digest: str, expires: float) -> None:
        """Slide the expiry of a credential still in use (only if it is still the current one)."""
        with self.write() as db:
            db.execute("UPDATE credentials SET expires = ? WHERE digest = ? AND node_id = "
                       "(SELECT id FROM nodes WHERE name = ?)", (expires, digest, name))

    def note_pxe(self, mac: str, ts: float, address: str | None) -> None:
        with self.write() as db:
            db.execute("INSERT OR REPLACE INTO pxe_seen(mac, ts, address) VALUES (?, ?, ?)",
                       (normalize_mac(mac), ts, address))

    def pxe_seen(self, mac: str) -> tuple[float, str | None] | None:
        r = self.db.execute("SELECT ts, address FROM pxe_seen WHERE mac = ?", (normalize_mac(mac),)).fetchone()
        return None if r is None else (r["ts"], r["address"])

    def touch(self, name: str, now: float) -> None:
        with self.write() as db:
            db.execute("UPDATE nodes SET last_contact = ? WHERE name = ?", (now, name))

    def events(self, name: str, limit: int = 100) -> list[Event]:
        row = self._require(name)
        rows = self.db.execute(
            "SELECT * FROM (SELECT * FROM events WHERE node_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            (row["id"], limit),
        )
        return [Event(name, r["ts"], r["state"], r["reason"], r["detail"]) for r in rows]

    # -- groups -------------------------------------------------------------------
    def _group_vars(self, name: str | None = None) -> dict[str, dict[str, str]]:
        query = "SELECT grp, key, value FROM group_vars" + (" WHERE grp = ?" if name else "") + " ORDER BY key"
        out: dict[str, dict[str, str]] = {}
        for r in self.db.execute(query, (name,) if name else ()):
            out.setdefault(r["grp"], {})[r["key"]] = r["value"]
        return out

    def list_groups(self) -> list[Group]:
        rows = self.db.execute("SELECT * FROM groups ORDER BY name").fetchall()
        gv = self._group_vars()
        return [Group(r["name"], r["capsule"], r["kernel_args"], r["description"], gv.get(r["name"], {}))
                for r in rows]

    def get_group(self, name: str) -> Group | None:
        r = self.db.execute("SELECT * FROM groups WHERE name = ?", (name,)).fetchone()
        return None if r is None else Group(r["name"], r["capsule"], r["kernel_args"], r["description"],
                                            self._group_vars(name).get(name, {}))

    def put_group(self, group: Group) -> Group:
        """Create or replace a group, its variables included (in one transaction)."""
        with self.write() as db:
            db.execute(
                "INSERT INTO groups(name, capsule, kernel_args, description) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET capsule = excluded.capsule, "
                "kernel_args = excluded.kernel_args, description = excluded.description",
                (group.name, group.capsule, group.kernel_args, group.description),
            )
            db.execute("DELETE FROM group_vars WHERE grp = ?", (group.name,))
            db.executemany("INSERT INTO group_vars(grp, key, value) VALUES (?, ?, ?)",
                           [(group.name, k, v) for k, v in group.vars.items()])
        return group

    def delete_group(self, name: str) -> None:
        with self.write() as db:
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no group named {name!r}")
            count = db.execute("SELECT COUNT(*) FROM nodes WHERE grp = ?", (name,)).fetchone()[0]
            if count:
                raise Conflict(f"group {name!r} still has {count} node(s); move them first")
            if name == self.default_group:
                raise Conflict(f"group {name!r} is the default group for new nodes (registry.default_group)")
            db.execute("DELETE FROM groups WHERE name = ?", (name,))

    # -- leases -------------------------------------------------------------------
    @staticmethod
    def _lease(r: sqlite3.Row | None) -> Lease | None:
        return None if r is None else Lease(r["ip"], r["mac"], r["expires"], r["hostname"])

    def get_lease_by_mac(self, mac: str) -> Lease | None:
        return self._lease(self.db.execute("SELECT * FROM leases WHERE mac = ?", (normalize_mac(mac),)).fetchone())

    def get_lease_by_ip(self, ip: str) -> Lease | None:
        return self._lease(self.db.execute("SELECT * FROM leases WHERE ip = ?", (ip,)).fetchone())

    def list_leases(self) -> list[Lease]:
        rows = self.db.execute("SELECT * FROM leases ORDER BY ip").fetchall()
        return [Lease(r["ip"], r["mac"], r["expires"], r["hostname"]) for r in rows]

    def put_lease(self, lease: Lease, *, now: float | None = None, server: str | None = None) -> None:
        with self.write() as db:
            self._put_lease(db, lease, time.time() if now is None else now, server)

    def batch(self, ops: list[Callable[[sqlite3.Connection], Any]], *, wait: bool = True) -> list[tuple[bool, Any]]:
        """Several writes in one transaction (group commit): one COMMIT, one WAL append for the whole batch.

        Each write runs under its own savepoint, so one that fails (a Conflict, a full registry) is undone
        alone and its exception returned in its slot, as (False, exc); the others are kept, as (True, result).
        Nothing is committed until all have run: a failing COMMIT raises, and fails them all.
        """
        # Optimistic first: without a savepoint around each write (two statements per write saved). Writes
        # rarely fail; when one does, the whole transaction is rolled back and the batch runs again, each write
        # under its savepoint. Running a write twice is safe: each is a function of the database alone, and the
        # first run's effects were rolled back.
        if len(ops) == 1:
            # One write: its own transaction is its savepoint (a failure rolls back only it), so no SAVEPOINT.
            try:
                with self.write(wait=wait) as db:
                    return [(True, ops[0](db))]
            except Busy:
                raise
            except Exception as exc:
                return [(False, exc)]
        if len(ops) > 1:
            try:
                with self.write(wait=wait) as db:
                    return [(True, op(db)) for op in ops]
            except Busy:
                raise
            except Exception:  # retried below, where each failure is reported in its slot
                pass
        results: list[tuple[bool, Any]] = []
        with self.write(wait=wait) as db:
            for op in ops:
                db.execute("SAVEPOINT op")
                try:
                    results.append((True, op(db)))
                except sqlite3.Error as exc:
                    db.execute("ROLLBACK TO op")
                    results.append((False, StoreError(f"cannot write node registry {self.path}: "
                                                      f"{_explain(exc, self.path)}")))
                except Exception as exc:
                    db.execute("ROLLBACK TO op")
                    results.append((False, exc))
                db.execute("RELEASE op")
        return results

    def _put_leases(self, db: sqlite3.Connection, leases: list[Lease], now: float,
                    server: str | None) -> list[Exception | None]:
        """Several leases in the caller's transaction, each refused alone (its slot holds the Conflict).

        A DHCP batch's leases are nearly always distinct clients on free addresses or their own: then two statements
        (of up to ROWS_MAX rows each, _rows) store them all, the checks being the constraints. A client's earlier
        lease is replaced in place (the upsert on its MAC), as _put_lease's DELETE by MAC would; an address held by
        another MAC, even expired, trips the key on the address. Then, or when a MAC or an address comes twice, they
        are undone together and stored one by one, each under a savepoint, where an expired lease of another MAC is
        taken over.
        """
        macs = [normalize_mac(x.mac) for x in leases]
        if len(leases) > 1 and len(set(macs)) == len(leases) and len({x.ip for x in leases}) == len(leases):
            db.execute("SAVEPOINT leases")
            try:
                # One statement where a DELETE by MAC and an INSERT were two: 1.0-1.4 us less a lease, a seventh of
                # the batch's lease SQL (20,000 leases in batches of 128, sequential and random MACs).
                _rows(db, "INSERT INTO leases(ip, mac, expires, hostname)", 4,
                      [(x.ip, mac, x.expires, x.hostname) for mac, x in zip(macs, leases, strict=True)],
                      "ON CONFLICT(mac) DO UPDATE SET ip = excluded.ip, expires = excluded.expires,"
                      " hostname = excluded.hostname")
                pairs = [(x.ip, mac) for mac, x in zip(macs, leases, strict=True)]
                if server is None:
                    updated = _rows(db, "UPDATE nodes SET ip = v.column1 FROM (", 2, pairs,
                                    ") AS v WHERE nodes.mac = v.column2")
                else:
                    updated = _rows(db, "UPDATE nodes SET ip = v.column1, server = ? FROM (", 2, pairs,
                                    ") AS v WHERE nodes.mac = v.column2", (server,))
                done = updated == len(leases)  # else a lease of a MAC with no node: checked one by one below
            except sqlite3.IntegrityError:
                done = False
            if done:
                db.execute("RELEASE leases")
                return [None] * len(leases)
            db.execute("ROLLBACK TO leases")
            db.execute("RELEASE leases")
        out: list[Exception | None] = []
        for lease in leases:
            db.execute("SAVEPOINT lease")
            try:
                self._put_lease(db, lease, now, server)
            except Conflict as exc:
                db.execute("ROLLBACK TO lease")
                out.append(exc)
            else:
                out.append(None)
            db.execute("RELEASE lease")
        return out

    @staticmethod
    def _put_lease(db: sqlite3.Connection, lease: Lease, now: float, server: str | None) -> None:
        mac = normalize_mac(lease.mac)
        # One lease per MAC (its previous one goes) and one MAC per address: an expired lease of another
        # MAC is taken over, a live one or another node's own address is a Conflict. The primary key on
        # leases.ip and the unique index on nodes.ip hold even if these checks had a bug.
        # On every ACK, so the common case is three statements: the checks are the constraints themselves (a
        # failing statement is undone alone, the transaction goes on), and the holder is read only to say who.
        db.execute("DELETE FROM leases WHERE mac = ? OR (ip = ? AND expires <= ?)", (mac, lease.ip, now))
        try:
            db.execute("INSERT INTO leases(ip, mac, expires, hostname) VALUES (?, ?, ?, ?)",
                       (lease.ip, mac, lease.expires, lease.hostname))
        except sqlite3.IntegrityError:
            held = db.execute("SELECT mac FROM leases WHERE ip = ?", (lease.ip,)).fetchone()
            raise Conflict(f"address {lease.ip} is leased to {held['mac'] if held else 'another client'}") from None
        try:
            if server is None:
                updated = db.execute("UPDATE nodes SET ip = ? WHERE mac = ?", (lease.ip, mac)).rowcount
            else:
                updated = db.execute("UPDATE nodes SET ip = ?, server = ? WHERE mac = ?",
                                     (lease.ip, server, mac)).rowcount
        except sqlite3.IntegrityError:
            updated = 0  # the unique index on nodes.ip: another node's own address (named below)
        if not updated:
            owner = db.execute("SELECT name FROM nodes WHERE ip = ? AND mac <> ?", (lease.ip, mac)).fetchone()
            if owner is not None:
                raise Conflict(f"address {lease.ip} is node {owner['name']}'s own address")

    # -- servers sharing this registry ---------------------------------------------
    def beat(self, server: ServerRecord) -> list[ServerRecord]:
        with self.write() as db:
            db.execute(
                "INSERT INTO servers(id, addresses, public_url, admin_url, pid, started, heartbeat, load)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET addresses = excluded.addresses,"
                " public_url = excluded.public_url, admin_url = excluded.admin_url, pid = excluded.pid,"
                " started = excluded.started, heartbeat = excluded.heartbeat, load = excluded.load",
                (server.id, ",".join(server.addresses), server.public_url, server.admin_url, server.pid,
                 server.started, server.heartbeat, server.load))
            return [_server(r) for r in db.execute("SELECT *, 0 AS nodes FROM servers ORDER BY id")]

    def list_servers(self) -> list[ServerRecord]:
        rows = self.db.execute("SELECT s.*, (SELECT COUNT(*) FROM nodes n WHERE n.server = s.id) AS nodes"
                               " FROM servers s ORDER BY s.id")
        return [_server(r) for r in rows]

    def drop_server(self, server_id: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM servers WHERE id = ?", (server_id,))
            db.execute("DELETE FROM cluster_locks WHERE holder = ?", (server_id,))

    def take_lock(self, name: str, holder: str, now: float, ttl: float) -> bool:
        with self.write() as db:
            db.execute(
                "INSERT INTO cluster_locks(name, holder, expires) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE"
                " SET holder = excluded.holder, expires = excluded.expires"
                " WHERE cluster_locks.holder = excluded.holder OR cluster_locks.expires <= ?",
                (name, holder, now + ttl, now))
            row = db.execute("SELECT holder FROM cluster_locks WHERE name = ?", (name,)).fetchone()
            return row is not None and row["holder"] == holder

    def release_lease(self, ip: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM leases WHERE ip = ?", (ip,))

    def dump(self) -> str:
        """A JSON snapshot of nodes and leases, for tests comparing before/after a crash."""
        return json.dumps({
            "nodes": [[n.mac, n.name, n.group, n.capsule, n.ip] for n in self.list_nodes()],
            "leases": [[x.ip, x.mac] for x in self.list_leases()],
        }, sort_keys=True)


class _Checkpointer:
    """Copies the WAL into the database file on a thread and connection of its own, once a second, and keeps
    the WAL file from growing without bound.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses 1000 WAL pages, and with
    ``synchronous = NORMAL`` it fsyncs the database file there: the writer (every DHCP ACK waits on it)
    stalls for the fsync, 80 ms and more on a busy disk. A PASSIVE checkpoint on another connection
    never blocks the writer, so the daemon turns the automatic one off and runs this instead. Durability
    is unchanged: a commit is in the WAL when it returns, as before, and a power loss still loses at most
    what was not yet checkpointed (and fsynced).

    Why the RESTART past ``wal_limit``: a writer rewinds the WAL to its start only when a checkpoint has copied
    every frame before the writer began, and under sustained writes (a rack renewing its leases) the next group
    commit always comes first, so the file grows for as long as the load lasts (DHCP at 1,000 exchanges/s: 1.7 GB
    in a minute). Past the limit this checkpoint takes the writer lock between two group commits (waiting at
    most ``WAL_RESET_WAIT_MS``), copies the few frames the PASSIVE one left, and makes the next writer
    rewind: the file stops growing (the writer waited 4-10 ms here, once per ``wal_limit`` of writes). The
    event loop's group commit yields to it (``wanted``): back-to-back commits otherwise hold the lock nearly all
    the time, SQLite's busy handler polls and can miss every gap for the whole wait, and the WAL grows by another
    wait's worth of writes each time (seen under CPU contention: past 16 MB with a 1 MB limit). TRUNCATE,
    which also gives the space back, costs 3-4 times that wait, so it runs only when a round saw no write and
    every frame is copied (nobody waits then).
    """

    def __init__(self, path: str, every: float, wal_limit: int = WAL_LIMIT) -> None:
        self.path = path
        self.every = every
        self.wal_limit = wal_limit
        self.resets = 0  # how often the WAL was rewound or emptied (tests read it)
        self.wanted = threading.Event()  # set while a RESTART/TRUNCATE waits for the writer lock: writers hold back
        self._stop = threading.Event()
        # Not `_thread`: compiled (tools/compile.py), the C field would be `__thread`, a C keyword.
        self._worker = threading.Thread(target=self._loop, name="bootd-db-checkpoint", daemon=True)
        self._worker.start()

    def _wal_size(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:
            return 0

    def _loop(self) -> None:
        failing = False
        seen = -1  # the WAL's frame count at the last round
        page = 4096
        db: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self.every):
                try:
                    if db is None:
                        # The busy timeout only matters to RESTART and TRUNCATE: PASSIVE never waits for anyone.
                        db = sqlite3.connect(self.path, isolation_level=None, timeout=WAL_RESET_WAIT_MS / 1000)
                        page = int(db.execute("PRAGMA page_size").fetchone()[0])
                    _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    quiet, seen = frames == copied == seen, frames
                    mode = ""
                    if frames * (page + WAL_FRAME_HEADER) > self.wal_limit:
                        mode = "RESTART"
                    elif quiet and self._wal_size() > self.wal_limit // 8:
                        mode = "TRUNCATE"
                    if mode:
                        self.wanted.set()
                        try:
                            busy = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
                        finally:
                            self.wanted.clear()
                        if busy:  # the writer never let go within the wait: try again next round
                            log.info("event=sqlite-wal-large path=%s frames=%d limit=%d (the writer kept the lock; "
                                     "retrying)", self.path, frames, self.wal_limit)
                        else:
                            self.resets += 1
                    failing = False
                except sqlite3.Error as exc:
                    if not failing:  # once per failure streak, not once a second
                        log.warning("event=sqlite-checkpoint-failed path=%s error=%r (retrying every %gs)",
                                    self.path, str(exc), self.every)
                    failing = True
        finally:
            if db is not None:
                db.close()

    def stop(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10)


@mypyc_attr(native_class=False)  # as SqliteRepo
class SqliteNodeStore:
    """The async NodeStore: every call runs on one dedicated thread (the single writer)."""

    def __init__(self, path: str | Path, *, default_group: str = "default", readonly: bool = False,
                 wal_limit: int = WAL_LIMIT) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bootd-db")
        # Who uses the connection now: the database thread (every _run call), or the event loop's group commit.
        self._busy = threading.Lock()
        self._closed = False
        # Writes waiting for the next group commit (see _batched), and whether a flush task is writing one now.
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flushing = False
        self._flush_task: asyncio.Task[None] | None = None
        self._group_reads: dict[str, asyncio.Future[Any]] = {}  # group reads waiting in _pending, by name
        try:
            self.repo: SqliteRepo = self._pool.submit(SqliteRepo, path, default_group=default_group,
                                                      readonly=readonly).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        self._checkpointer: _Checkpointer | None = None
        if not readonly and self.repo.path != ":memory:":
            self._pool.submit(self.repo.db.execute, "PRAGMA wal_autocheckpoint = 0").result()
            self._checkpointer = _Checkpointer(self.repo.path, CHECKPOINT_EVERY, wal_limit)

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._exclusive(fn, *args, **kwargs))

    def _exclusive(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        with self._busy:
            self.repo.waits(True)  # the database thread may wait; the event loop's thread left it at 0
            return fn(*args, **kwargs)

    async def get_node(self, name: str) -> Node | None:
        return await self._run(self.repo.get_node, name)

    async def get_node_by_mac(self, mac: str) -> Node | None:
        return await self._run(self.repo.get_node_by_mac, mac)

    async def list_nodes(self) -> list[Node]:
        return await self._run(self.repo.list_nodes)

    async def register(self, mac: str, *, name_pattern: str, first_index: int, group: str, approved: bool,
                       now: float, max_nodes: int = 0) -> tuple[Node, bool]:
        return await self._batched(lambda db: self.repo._register(
            db, mac, name_pattern=name_pattern, first_index=first_index, group=group, approved=approved, now=now,
            max_nodes=max_nodes))

    async def register_many(self, macs: list[str], *, name_pattern: str, first_index: int, group: str,
                            approved: bool, now: float, max_nodes: int = 0) -> list[tuple[Node, bool] | RegistryFull]:
        return await self._batched(lambda db: self.repo._register_many(
            db, macs, name_pattern=name_pattern, first_index=first_index, group=group, approved=approved, now=now,
            max_nodes=max_nodes), group=True)

    async def add_node(self, mac: str, name: str, *, group: str, now: float, **fields: Any) -> Node:
        return await self._run(self.repo.add_node, mac, name, group=group, now=now, **fields)

    async def add_nodes(self, nodes: list[NewNode], *, now: float) -> int:
        return await self._run(self.repo.add_nodes, nodes, now=now)

    async def update_node(self, name: str, **fields: Any) -> Node:
        return await self._run(self.repo.update_node, name, **fields)

    async def rename_node(self, name: str, new: str) -> Node:
        return await self._run(self.repo.rename_node, name, new)

    async def set_vars(self, name: str, values: dict[str, str], unset: tuple[str, ...] = ()) -> Node:
        return await self._run(self.repo.set_vars, name, values, unset)

    async def delete_node(self, name: str) -> None:
        await self._run(self.repo.delete_node, name)

    async def set_state(self, name: str, state: State, reason: str = "", *, now: float, detail: str = "",
                        expect: State | None = None) -> Node:
        return await self._run(self.repo.set_state, name, state, reason, now=now, detail=detail, expect=expect)

    async def touch(self, name: str, now: float) -> None:
        await self._run(self.repo.touch, name, now)

    async def record_event(self, name: str, ts: float, state: str, reason: str = "", detail: str = "") -> None:
        await self._run(self.repo.record_event, name, ts, state, reason, detail)

    async def put_credential(self, cred: Credential) -> None:
        await self._run(self.repo.put_credential, cred)

    async def get_credential(self, name: str) -> Credential | None:
        return await self._run(self.repo.get_credential, name)

    async def extend_credential(self, name: str, digest: str, expires: float) -> None:
        await self._run(self.repo.extend_credential, name, digest, expires)

    async def note_pxe(self, mac: str, ts: float, address: str | None) -> None:
        await self._run(self.repo.note_pxe, mac, ts, address)

    async def pxe_seen(self, mac: str) -> tuple[float, str | None] | None:
        return await self._run(self.repo.pxe_seen, mac)

    async def events(self, name: str, limit: int = 100) -> list[Event]:
        return await self._run(self.repo.events, name, limit)

    async def list_groups(self) -> list[Group]:
        return await self._run(self.repo.list_groups)

    async def get_group(self, name: str) -> Group | None:
        # Read on every DHCP exchange (the registry's answer carries the group): it rides the next group
        # commit's trip to the database thread instead of taking a trip of its own.
        if self.repo.readonly:  # a read-only CLI store has no write transaction to ride: read directly
            return await self._run(self.repo.get_group, name)
        done, group = self._read_inline(lambda: self.repo.get_group(name))
        if done:
            return cast(Group | None, group)
        # Every DISCOVER reads the default group: those waiting for the same batch share one read of it (same
        # transaction, same answer). Shielded: one reader cancelled must not cancel the others' read.
        shared = self._group_reads.get(name)
        if shared is None:
            shared = self._group_reads[name] = self._submit(lambda db: self.repo.get_group(name))
        return cast(Group | None, await asyncio.shield(shared))

    async def put_group(self, group: Group) -> Group:
        return await self._run(self.repo.put_group, group)

    async def delete_group(self, name: str) -> None:
        await self._run(self.repo.delete_group, name)

    async def get_lease_by_mac(self, mac: str) -> Lease | None:
        return await self._run(self.repo.get_lease_by_mac, mac)

    async def get_lease_by_ip(self, ip: str) -> Lease | None:
        return await self._run(self.repo.get_lease_by_ip, ip)

    async def list_leases(self) -> list[Lease]:
        return await self._run(self.repo.list_leases)

    async def put_lease(self, lease: Lease, *, now: float | None = None, server: str | None = None) -> None:
        # Returns once the lease is committed: the caller's ACK may name it then.
        at = time.time() if now is None else now
        await self._batched(lambda db: self.repo._put_lease(db, lease, at, server))

    async def put_leases(self, leases: list[Lease], *, now: float | None = None,
                         server: str | None = None) -> list[Exception | None]:
        # One write in the next group commit: the batch's leases share its COMMIT, a refused one fails alone.
        at = time.time() if now is None else now
        return await self._batched(lambda db: self.repo._put_leases(db, leases, at, server), group=True)

    async def _batched(self, op: Callable[[sqlite3.Connection], R], *, group: bool = False) -> R:
        """Run one write (or a read on the DHCP path) in the next group commit; its result once committed.

        ``group``: the write is a group already (a DHCP read batch's registrations or leases): run it at once
        when nothing waits before it (_inline). Otherwise writes that arrive while a batch is being written wait
        for the next batch, which takes all of them in one transaction. An idle store writes a lone write at once
        (no added delay); under load the commit cost (the WAL append, the checkpoints it brings) is shared by the
        batch. Durability is unchanged: nobody hears of a write before the COMMIT that holds it.
        """
        if group:
            done, value = self._inline(op)
            if done:
                return cast(R, value)
        return cast(R, await self._submit(op))

    def _inline(self, op: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
        """Run ``op`` in a transaction of its own now, on the event loop's thread, when nothing is queued before it
        and the connection is free: (True, its result), or its exception raised. (False, None): the caller queues
        it for the next group commit.

        Why: the DHCP path's batches are already groups (a read batch of the transport: one registration trip and
        one lease commit for all of them), and every trip through the queue costs turns of the event loop, each
        behind whatever else is ready then; most of an exchange's delay at a few thousand a second was those
        turns, not work (bench/dhcp: light client, do_ms and ra_ms). Nobody hears of a write before its COMMIT,
        as before.
        """
        cp = self._checkpointer
        if self._pending or self._flushing or (cp is not None and cp.wanted.is_set()):
            return False, None
        if not self._busy.acquire(blocking=False):
            return False, None
        try:
            ok, value = self.repo.batch([op], wait=False)[0]
        except Busy:
            return False, None  # another process writes: wait for it on the database thread, through the queue
        finally:
            self._busy.release()
        if not ok:
            raise value
        return True, value

    def _read_inline(self, read: Callable[[], Any]) -> tuple[bool, Any]:
        """As _inline, for a read: at once, on the event loop's thread, in a read transaction of its own (a WAL
        reader waits for no writer), when the connection is free and no write is queued before it (those are read
        after their commit). (False, None): the caller queues it.

        Why: the default group, read for every DHCP registration batch, took a write transaction of its own (a
        BEGIN IMMEDIATE and a COMMIT) through _inline: an eighth of a small batch's cost.
        """
        if self._pending or self._flushing or not self._busy.acquire(blocking=False):
            return False, None
        try:
            self.repo.waits(False)
            return True, read()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                return False, None  # rare for a WAL reader (a recovery): wait on the database thread instead
            raise StoreError(f"cannot read node registry {self.repo.path}: {_explain(exc, self.repo.path)}") from None
        finally:
            self._busy.release()

    def _submit(self, op: Callable[[sqlite3.Connection], Any]) -> asyncio.Future[Any]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, done))
        if not self._flushing:
            self._flushing = True
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())  # held: not GC'd
        return done

    async def _flush(self) -> None:
        """Write the waiting batches, on the event loop's thread when the connection is free.

        Why not on the database thread like every other call: a batch is short (WAL, ``synchronous = NORMAL``:
        the COMMIT appends to the WAL without an fsync, and the checkpoint runs on a thread of its own), while the
        trip there and back costs two thread wake-ups and, worse, a wait for the GIL each way (up to the 5 ms
        switch interval while the other thread runs Python): most of an exchange's delay under load was that
        trip (bench/dhcp). When the database thread holds the connection (a long read for the CLI or HTTP),
        the batch takes the trip as before instead of stalling the loop.
        """
        try:
            while self._pending:
                await self._yield_to_checkpoint()
                batch, self._pending = self._pending[:WRITE_BATCH], self._pending[WRITE_BATCH:]
                self._group_reads.clear()  # a read asked for from now on sees this batch's writes
                ops = [op for op, _ in batch]
                try:
                    inline: list[tuple[bool, Any]] | None = None
                    if self._busy.acquire(blocking=False):
                        try:
                            inline = self.repo.batch(ops, wait=False)
                        except Busy:
                            pass  # another process writes: wait for it on the database thread, not here
                        finally:
                            self._busy.release()
                    results = inline if inline is not None else await self._run(self.repo.batch, ops)
                except BaseException as exc:  # the transaction rolled back: nothing of the batch is stored
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc if isinstance(exc, Exception) else StoreError(repr(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), (ok, value) in zip(batch, results, strict=True):
                    if fut.done():  # its waiter was cancelled; the write is committed all the same
                        continue
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
        finally:
            self._flushing = False

    async def _yield_to_checkpoint(self) -> None:
        """Hold the next group commit back while the checkpointer waits to rewind the WAL (at most its wait):
        writes arriving meanwhile join that commit, so nothing is lost but a few milliseconds, once per limit."""
        cp = self._checkpointer
        if cp is None or not cp.wanted.is_set():
            return
        deadline = time.monotonic() + WAL_RESET_WAIT_MS / 1000
        while cp.wanted.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    async def beat(self, server: ServerRecord) -> list[ServerRecord]:
        return await self._run(self.repo.beat, server)

    async def list_servers(self) -> list[ServerRecord]:
        return await self._run(self.repo.list_servers)

    async def drop_server(self, server_id: str) -> None:
        await self._run(self.repo.drop_server, server_id)

    async def take_lock(self, name: str, holder: str, now: float, ttl: float) -> bool:
        return await self._run(self.repo.take_lock, name, holder, now, ttl)

    async def release_lease(self, ip: str) -> None:
        await self._run(self.repo.release_lease, ip)

    async def probe(self, timeout: float = 2.0) -> StoreStatus:
        await self._run(self.repo.db.execute, "SELECT 1")
        return self.status()

    def status(self) -> StoreStatus:
        # An embedded file has no connection to lose: a failing write raises StoreError per call.
        return StoreStatus("sqlite", self.repo.path, healthy=not self._closed)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._checkpointer is not None:
                # First, so the writer's close is the last connection's: it checkpoints and removes the WAL.
                await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.stop)
            await self._run(self.repo.close)
            self._pool.shutdown(wait=True)


def state_dir_writable(path: Path) -> None:
    """Fail early, with the path in the message, when the state directory cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create state directory {path}: {exc.strerror}") from None
    problem = diagnose(path)
    if problem:
        raise StoreError(f"state directory {path} is not usable: {problem}")
