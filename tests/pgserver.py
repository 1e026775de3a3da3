"""A real, private PostgreSQL server for the store tests (and later the multi-server drill).

Debian's ``postgresql`` binaries, ``initdb`` into a fresh temporary directory
owned by an unprivileged user (PostgreSQL refuses to run as root), listening on
a Unix socket in that directory only (``listen_addresses = ''``): nothing on
the network, nothing shared with a system cluster. Each test gets its own
database; the server is stopped (``pg_ctl stop``, which signals the PID in
postmaster.pid) and its directory removed at the end of the session.

Roles: ``postgres`` (superuser, trust on the socket: the fixture's own admin
work) and ``bootd`` (the store's role, password required: scram-sha-256), so
the password paths of bootd are tested against real authentication.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest


def _pg_bin() -> Path:
    """$BOOTD_PG_BIN, else the newest Debian server (/usr/lib/postgresql/N/bin; 15 on bookworm)."""
    if os.environ.get("BOOTD_PG_BIN"):
        return Path(os.environ["BOOTD_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
ROLE = "bootd"


def _run_as() -> list[str]:
    """The prefix that runs a command as an unprivileged user when we are root (else as ourselves)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


class PgServer:
    def __init__(self) -> None:
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / b).exists()]
        if missing:
            raise FileNotFoundError(
                f"PostgreSQL server binaries missing in {PG_BIN} ({', '.join(missing)}): install the Debian "
                "package postgresql (tools/setup.sh does), or set BOOTD_PG_BIN to their directory")
        self.prefix = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="bootd-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.password = secrets.token_urlsafe(16)
        self._names = itertools.count()
        self.running = False
        self._admin: dict[str, Any] = {}
        if self.prefix:
            user = self.prefix[2]
            pw = pwd.getpwnam(user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)

    def _pg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
        return proc

    def init(self) -> None:
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                 "--auth-local=trust", "--auth-host=reject", "--no-instructions", "--no-sync")
        # The admin role keeps trust on the socket; everyone else must give a password.
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\nlocal all all scram-sha-256\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.dir}'\n"
                       "max_connections = 200\nshared_buffers = 32MB\n")
        self.start()
        self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{self.password}'")
        self.admin(f"CREATE DATABASE {ROLE} OWNER {ROLE}")

    def start(self) -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        for conn in self._admin.values():
            conn.close()
        self._admin.clear()
        if self.running:
            self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def admin(self, sql: str, db: str = "postgres") -> None:
        """One statement as the superuser over a kept connection (a psql process costs ~0.2 s a call)."""
        import psycopg

        conn = self._admin.get(db)
        if conn is None or conn.closed or conn.broken:
            conn = self._admin[db] = psycopg.connect(host=str(self.dir), user="postgres", dbname=db,
                                                     autocommit=True)
        conn.execute(sql.encode())

    def url(self, db: str, **params: str) -> str:
        query = "&".join(f"{k}={quote(v)}" for k, v in {"host": str(self.dir), **params}.items())
        return f"postgresql://{ROLE}@/{db}?{query}"

    def new_database(self) -> str:
        """A fresh empty database owned by the bootd role; its name (slower than new_schema_url)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name

    def new_schema_url(self) -> str:
        """A URL whose tables land in a fresh empty schema (libpq's ``options`` sets the search_path).

        A schema per test costs milliseconds where CREATE DATABASE costs a third of a second.
        """
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE SCHEMA {name} AUTHORIZATION {ROLE}", db=ROLE)
        return self.url(ROLE, options=f"-csearch_path={name}")

    def cleanup(self) -> None:
        try:
            self.stop("immediate")  # the directory goes next: no shutdown checkpoint needed
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """Fails (never skips) when PostgreSQL is missing: a skip would hide half the store tests."""
    try:
        server = PgServer()
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.fail(str(exc))
    try:
        server.init()
        yield server
    finally:
        server.cleanup()
