"""``bootd store``: the node registry's backend (``migrate --to URL`` moves SQLite into PostgreSQL)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from bootd.compose import migrate_store
from bootd.config import Config
from bootd.errors import mask_url


def _migrate(args: argparse.Namespace, config: Config) -> int:
    def progress(table: str, done: int, total: int) -> None:
        if done == total or done % 10_000 == 0:
            print(f"store migrate: {table}: {done}/{total} rows", file=sys.stderr, flush=True)

    print(f"store migrate: copying {args.source or 'the configured SQLite registry'} into {mask_url(args.to)}",
          file=sys.stderr, flush=True)
    result = asyncio.run(migrate_store(config, args.to, source=args.source, password_file=args.password_file,
                                       force=args.force, progress=progress))
    counts = ", ".join(f"{n} {t}" for t, n in result.counts.items())
    print(f"migrated {counts} from {result.source} to {result.target}"
          f"{' (replaced what was there)' if result.replaced else ''}; every row verified")
    print(f"next: set [store] url = \"{result.target}\" and restart bootd")
    return 0


def add_parser(sub: Any) -> None:
    st = sub.add_parser("store", help="the node registry's database (SQLite or PostgreSQL)")
    ssub = st.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    p = ssub.add_parser("migrate", help="copy the SQLite registry into PostgreSQL, every row verified")
    p.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST/DB?sslmode=... "
                   "(password: --password-file, store.password_file, $PGPASSWORD or ~/.pgpass)")
    p.add_argument("--from", dest="source", type=Path, metavar="SQLITE",
                   help="the SQLite registry (default: the configured one, server.state_dir/bootd.sqlite)")
    p.add_argument("--password-file", type=Path, metavar="FILE", help="first line: the database password")
    p.add_argument("--force", action="store_true", help="replace a registry already in the target database")
    p.set_defaults(handler=_migrate)
