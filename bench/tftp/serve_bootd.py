"""Run bootd's TftpServer alone in this process (own GIL) for the benchmark.

Prints the bound port on stdout, then serves until SIGTERM/SIGINT, then prints
the server's counters as one JSON line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from bootd.net.tftp import TftpServer


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-sessions", type=int, default=1000)
    ap.add_argument("--max-window-bytes", type=int, default=65536)
    ap.add_argument("--no-gso", action="store_true")
    args = ap.parse_args()
    server = TftpServer(
        args.host,
        args.port,
        [args.root],
        max_sessions=args.max_sessions,
        max_sessions_per_source=args.max_sessions,  # every benchmark client is 127.0.0.1
        max_window_bytes=args.max_window_bytes,
        use_gso=not args.no_gso,
    )
    await server.start()
    print(server.port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    print(json.dumps(dict(server.stats)), file=sys.stderr, flush=True)


if __name__ == "__main__":
    if "--uvloop" in sys.argv:  # informative only: uvloop is not a bootd dependency
        sys.argv.remove("--uvloop")
        import uvloop

        uvloop.install()
    asyncio.run(main())
