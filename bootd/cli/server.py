"""``bootd server list``: the bootd servers sharing this registry, their last heartbeat, load and share.

Read from the registry like every CLI command (works with the daemon stopped); the admin API's
GET /api/v1/servers answers the same through the same service (bootd.service.servers.ServerAdmin).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bootd.cli.node import _ago, _run, table
from bootd.config import Config
from bootd.service.servers import ServerView
from bootd.service.services import Services


def _list(args: argparse.Namespace, config: Config) -> int:
    now = time.time()

    async def job(s: Services) -> list[ServerView]:
        return await s.servers.list(now)

    views = _run(config, job, write=False)
    if args.json:
        print(json.dumps([v.as_json() for v in views], indent=2, sort_keys=True))
        return 0
    if not views:
        print("no server has heartbeat into this registry yet (bootd serve writes one every cluster.heartbeat s)")
        return 0
    rows = [(v.id, "alive" if v.alive else "DEAD", _ago(v.heartbeat, now), f"{v.load:g}/s",
             f"{v.buckets}/256 ({v.buckets / 2.56:.0f}%)", v.nodes, ",".join(v.addresses), v.public_url)
            for v in views]
    print(table(rows, ("SERVER", "STATUS", "HEARTBEAT", "LOAD", "SHARE", "NODES", "ADDRESSES", "URL")))
    return 0


def add_parser(sub: Any) -> None:
    srv = sub.add_parser("server", help="the bootd servers sharing this registry")
    ssub = srv.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    p = ssub.add_parser("list", help="servers, their last heartbeat, load, share of the clients and nodes booted")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_list)
