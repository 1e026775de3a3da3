"""The ``bootd`` command.

Exit codes are a contract for operators' scripts: 0 ok, 1 the operation
failed (the message says why), 2 the command line was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bootd import __version__
from bootd import config as config_mod
from bootd.cli import node as node_cmd
from bootd.errors import BootdError, ConfigError

Handler = Callable[[argparse.Namespace, config_mod.Config], int]

# Command groups that live in their own modules; each has add_parser(subparsers).
_PLUGINS = ("bootd.cli.capsule", "bootd.cli.stage1", "bootd.cli.store", "bootd.cli.overlay", "bootd.cli.helper",
            "bootd.cli.server", "bootd.cli.power")


def _serve(args: argparse.Namespace, config: config_mod.Config) -> int:
    from bootd import daemon

    return daemon.run(config)


def _check_config(args: argparse.Namespace, config: config_mod.Config) -> int:
    data = config.as_dict()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print(f"# effective configuration from {config.path}: OK")
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        print(f"[{section}]")
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootd",
        description="Network boot service for stateless clusters (DHCP/PXE, TFTP, HTTP, VNFS capsules).",
    )
    parser.add_argument("-c", "--config", metavar="CONFIG",
                        help=f"configuration file (default: $BOOTD_CONFIG, then {config_mod.DEFAULT_PATH})")
    parser.add_argument("--version", action="version", version=f"bootd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify)")
    p.set_defaults(handler=_serve)
    p = sub.add_parser("check-config", help="validate the configuration and print the effective values")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_check_config)

    node_cmd.add_parser(sub)
    for module_name in _PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Everything bootd writes (registry, secrets, capsules, logs of jobs) is private unless a file is
    # explicitly opened up; this holds for the daemon (`bootd serve` starts here too) and the CLI.
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="bootd: %(message)s")
    handler: Handler = args.handler
    try:
        config = _load_config(args)
        hand_over = _act_as_state_owner(args, config)
        try:
            return handler(args, config)
        finally:
            hand_over()
    except ConfigError as exc:
        print(f"bootd: configuration error: {exc}", file=sys.stderr)
        return 1
    except BootdError as exc:
        print(f"bootd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bootd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


# Commands that only read or write the registry (and the state directory's audit log and BMC passwords):
# run as root, they become the state directory's owner.
_REGISTRY_COMMANDS = ("node", "group", "lease", "power", "console", "bmc")


def _act_as_state_owner(args: Any, config: config_mod.Config) -> Callable[[], None]:
    """Keep the files of a daemon that runs as its own user (systemd/bootd.service: User=bootd) its own.

    Run as root with a state directory that belongs to another user, registry commands switch to that
    user before they open anything, so SQLite's files (and its -wal) stay the daemon's.  Commands that
    need root (capsule build/import/exec reads any file of an image and chroots) stay root and, when
    they finish, give what they created under the daemon's directories to its owner.  Returns that
    hand-over (a no-op otherwise).
    """
    if os.geteuid() != 0:
        return lambda: None
    try:
        owner = config.server.state_dir.stat()
    except OSError:  # not there yet, or not a directory: the command itself says what is wrong
        return lambda: None
    if owner.st_uid == 0:
        return lambda: None
    if getattr(args, "command", None) in _REGISTRY_COMMANDS:
        os.setgid(owner.st_gid)
        os.setuid(owner.st_uid)
        return lambda: None

    return lambda: hand_over(config, owner.st_uid, owner.st_gid)


def hand_over(config: config_mod.Config, uid: int, gid: int) -> None:
    """Give what root created under the daemon's directories to the daemon's user."""
    for top in (config.server.state_dir, config.capsule.dir, config.boot.stage1_dir):
        if not top.is_dir():
            continue
        for path in (top, *top.rglob("*")):
            with contextlib.suppress(OSError):
                st = path.lstat()
                if st.st_uid == 0:
                    os.lchown(path, uid, gid)


def _load_config(args: Any) -> config_mod.Config:
    """Commands that set needs_config=False (the demo) run with defaults when no file is given."""
    if not getattr(args, "needs_config", True) and args.config is None:
        return config_mod.Config()
    return config_mod.load(args.config)
