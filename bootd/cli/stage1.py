"""``bootd stage1 build`` and ``bootd demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bootd.config import Config


def _build(args: argparse.Namespace, config: Config) -> int:
    from bootd.stage1.build import DEFAULT_KERNEL_PACKAGE, build

    out = args.output or config.boot.stage1_dir
    # Stage1Error is a BootdError: the CLI prints it and exits 1.
    result = build(
        out,
        cache_dir=args.cache_dir,
        kernel_package=args.kernel_package or DEFAULT_KERNEL_PACKAGE,
        kernel_deb=args.kernel_deb,
        extra_kernel_packages=args.also_kernel_package or (),
        extra_kernel_debs=args.also_kernel_deb or (),
        with_openssl=False if args.no_openssl else None,
        log=(lambda m: None) if args.json else print,
    )
    if args.json:
        print(json.dumps(result.info, indent=2, sort_keys=True))
    return 0


def _demo(args: argparse.Namespace, config: Config) -> int:
    from bootd.lab.demo import run_from_args

    return run_from_args(args)


def add_parser(sub: Any) -> None:
    s1 = sub.add_parser("stage1", help="the stage one (kernel + initramfs) that nodes boot first")
    ssub = s1.add_subparsers(dest="stage1_command", metavar="ACTION", required=True)
    p = ssub.add_parser("build", help="build initramfs.img + vmlinuz into boot.stage1_dir, reproducibly")
    p.add_argument("--output", type=Path, help="directory (default: boot.stage1_dir)")
    p.add_argument("--kernel-package", help="Debian linux-image package or metapackage "
                                            "(default: linux-image-amd64, the generic kernel with real "
                                            "server NIC drivers; linux-image-cloud-amd64 boots faster in VMs)")
    p.add_argument("--kernel-deb", type=Path, help="use this linux-image .deb instead of apt-get download")
    p.add_argument("--also-kernel-package", action="append", metavar="PACKAGE",
                   help="also ship NIC modules for this kernel (capsules whose /boot has it); repeatable")
    p.add_argument("--also-kernel-deb", action="append", type=Path, metavar="DEB",
                   help="the same from a local linux-image .deb; repeatable")
    p.add_argument("--cache-dir", type=Path, help="download cache (default: $BOOTD_CACHE_DIR or ~/.cache/bootd)")
    p.add_argument(
        "--no-openssl",
        action="store_true",
        help="hash with busybox only (2 MB smaller image, several times slower hashing)",
    )
    p.add_argument("--json", action="store_true", help="print the build record (hashes, versions) as JSON")
    p.set_defaults(handler=_build)

    from bootd.lab.demo import add_arguments

    p = sub.add_parser("demo", help="boot QEMU node(s) from bootd in a private network namespace, end to end")
    add_arguments(p)
    p.set_defaults(handler=_demo, needs_config=False)  # the demo writes its own configuration
