"""``bootd power``, ``bootd console`` and ``bootd bmc``: the nodes' BMCs from the shell.

The same service as ``POST /api/v1/power`` (bootd.service.power), built in
this process: a power job from the CLI needs no running daemon.  One line a
node as each BMC answers (that is the progress of a long job), a summary on
stderr, exit code 1 if any node failed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

from bootd.cli.node import _run
from bootd.config import Config
from bootd.hostlist import HostlistError, compress, expand
from bootd.service.audit import cli_user
from bootd.service.checks import Invalid
from bootd.service.power import ACTIONS, PowerResult, SolConsole, check_password

ESCAPE = b"~"


def _width(hostlist: str) -> int:
    try:
        return max((len(n) for n in expand(hostlist)), default=8)
    except HostlistError:
        return 8


def power(args: argparse.Namespace, config: Config) -> int:
    width = _width(args.nodes)
    started = time.monotonic()

    def progress(r: PowerResult) -> None:
        if not args.json:
            print(f"{r.node:<{width}}  {'ok' if r.ok else 'FAILED':6}  {r.state or '-':3}  {r.message}", flush=True)

    results = _run(config, lambda s: s.power.run(args.nodes, args.action, who=cli_user(), pxe=args.pxe,
                                                  stagger=args.stagger, parallel=args.parallel, progress=progress),
                   write=args.action != "status")
    failed = [r.node for r in results if not r.ok]
    if args.json:
        json.dump([r.as_json() for r in results], sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    print(f"bootd: power {args.action}: {len(results) - len(failed)} ok, {len(failed)} failed"
          + (f" ({compress(failed)})" if failed else "") + f" in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    return 1 if failed else 0


# -- console -----------------------------------------------------------------------------------
def console(args: argparse.Namespace, config: Config) -> int:
    target = _run(config, lambda s: s.power.console_target(args.node), write=False)
    out = sys.stdout.buffer

    def output(data: bytes) -> None:
        out.write(data)
        out.flush()

    fd = sys.stdin.fileno()
    interactive = os.isatty(fd)
    print(f"bootd: console of {target.node} over IPMI Serial-over-LAN ({target.where}); "
          f"type {ESCAPE.decode()}. at the start of a line to leave", file=sys.stderr)
    sol = SolConsole(target, output, timeout=config.power.timeout)
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setraw(fd)
    try:
        _attach(sol, fd, args.linger)
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sol.close()
    if sol.error is not None:
        print(f"\nbootd: error: console of {target.node}: {sol.error}", file=sys.stderr)
        return 1
    return 0


def _attach(sol: SolConsole, fd: int, linger: float) -> None:
    """Keystrokes to the BMC, its output to stdout, until ``~.``, the end of stdin (then ``linger`` s
    for what is still on its way), or the session breaks."""
    line_start, escaped = True, False
    eof_at: float | None = None
    while not sol.broken:
        sol.pump(0.02)
        if eof_at is not None:
            if time.monotonic() - eof_at > linger:
                return
            continue
        ready, _, _ = select.select([fd], [], [], 0.03)
        if not ready:
            continue
        data = os.read(fd, 1024)
        if not data:
            eof_at = time.monotonic()
            continue
        send = bytearray()
        for byte in data:
            ch = bytes([byte])
            if escaped:
                escaped = False
                if ch == b".":
                    if send:
                        sol.send(bytes(send))
                    return
                send += ESCAPE
            elif line_start and ch == ESCAPE:
                escaped = True
                continue
            send += ch
            line_start = ch in (b"\r", b"\n")
        if send:
            sol.send(bytes(send))


# -- bmc ---------------------------------------------------------------------------------------
def _read_password(args: argparse.Namespace) -> str:
    if args.file is not None:
        text = Path(args.file).read_text()
    elif os.isatty(sys.stdin.fileno()):
        text = getpass.getpass(f"BMC password for {args.target}: ")
        if getpass.getpass("again: ") != text:
            raise Invalid("the two passwords differ; nothing was changed")
    else:
        text = sys.stdin.read()
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    check_password(password)
    return password


def bmc_set_password(args: argparse.Namespace, config: Config) -> int:
    password = _read_password(args)
    what = _run(config, lambda s: s.power.set_password(args.target, password, who=cli_user()))
    print(f"set the BMC password of {what}")
    return 0


def bmc_clear_password(args: argparse.Namespace, config: Config) -> int:
    removed = _run(config, lambda s: s.power.delete_password(args.target, who=cli_user()))
    print(f"{'removed' if removed else 'there was no'} BMC password of {args.target}")
    return 0


def bmc_show(args: argparse.Namespace, config: Config) -> int:
    rows: list[dict[str, Any]] = _run(config, lambda s: s.power.describe(args.nodes), write=False)
    if args.json:
        json.dump(rows, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    from bootd.cli.node import table

    print(table([(r["node"], r["address"] and f"{r['address']}:{r['port']}", r["user"],
                   f"set ({r['password']})" if r["password"] else "missing", r["problem"]) for r in rows],
                ("NODE", "BMC", "USER", "PASSWORD", "PROBLEM")))
    return 0


def add_parser(sub: Any) -> None:
    hostlist_help = "nodes as a hostlist, e.g. n[0000-0015],n0020"
    p = sub.add_parser("power", help="power nodes on, off, cycle or reset through their BMCs (IPMI)",
                       description="One line per node; exit code 1 if any failed. A node's BMC: its (or its "
                                   "group's) variables bmc.address, bmc.user, bmc.port; the password: "
                                   "`bootd bmc set-password`.")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("nodes", help=hostlist_help)
    p.add_argument("--pxe", action="store_true", help="boot from the network next time (on, cycle, reset)")
    p.add_argument("--stagger", type=float, metavar="N",
                   help="at most N power-ons a second (default: power.stagger, 0 = no limit)")
    p.add_argument("--parallel", type=int, metavar="N", help="BMCs at once (default: power.parallel)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per node)")
    p.set_defaults(handler=power)

    p = sub.add_parser("console", help="attach to a node's serial console (IPMI Serial-over-LAN)")
    p.add_argument("node")
    p.add_argument("--linger", type=float, default=1.0, metavar="S",
                   help="when stdin ends, seconds to keep printing what the node still sends (default 1)")
    p.set_defaults(handler=console)

    bmc = sub.add_parser("bmc", help="the nodes' BMC settings and passwords")
    bsub = bmc.add_subparsers(dest="bmc_command", metavar="ACTION", required=True)
    p = bsub.add_parser("set-password", help="set the BMC password of a node, or of a group (@GROUP)",
                        description="Reads the password from --file, else from stdin (asked twice, without "
                                    "echo, on a terminal). Stored 0600 under state_dir/bmc; never shown back.")
    p.add_argument("target", metavar="NODE|@GROUP")
    p.add_argument("--file", help="read the password from this file (one line)")
    p.set_defaults(handler=bmc_set_password)
    p = bsub.add_parser("clear-password", help="remove the BMC password of a node or a group (@GROUP)")
    p.add_argument("target", metavar="NODE|@GROUP")
    p.set_defaults(handler=bmc_clear_password)
    p = bsub.add_parser("show", help="where each node's BMC is and where its password comes from (not the password)")
    p.add_argument("nodes", help=hostlist_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=bmc_show)
