"""Run only bootd's HTTP server over an existing capsule store, for the benchmark.

Usage: python bench/http/serve_bootd.py CAPSULE_DIR STATE_DIR PORT [plain]
("plain": no inline sendfile/TCP_CORK fast path, only loop.sendfile, for A/B comparisons)
Prints "READY <port>" on stdout once listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from bootd import compose
from bootd.config import from_dict
from bootd.net.http.app import HttpServer
from bootd.store.memory import memory_store


async def main(capsule_dir: Path, state_dir: Path, port: int, fast: bool) -> None:
    config = from_dict({
        "server": {"state_dir": str(state_dir), "address": "127.0.0.1"},
        # All benchmark clients come from 127.0.0.1 (many nodes in one host): exempt from per-source caps.
        "http": {"listen": "127.0.0.1", "port": port, "trusted": ["127.0.0.1"]},
        "capsule": {"dir": str(capsule_dir)},
    })
    store = memory_store()
    _, services = compose.services(config, store=store)
    server = HttpServer(config, services, fast_sendfile=fast)
    await server.start()
    print(f"READY {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:5] != ["plain"]))
