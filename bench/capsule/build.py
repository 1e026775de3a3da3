#!/usr/bin/env python3
"""Recipe builds: ``bootd capsule build`` against plain ``mmdebstrap`` + ``tar`` of the same packages.

Usage (as root; run it under ``flock /tmp/bootd-bench.lock``):
    .venv/bin/python bench/capsule/build.py [--recipe capsules/debian-hpc/recipe.toml] [--cache DIR]

Steps, all with the same package cache, so the network is out of the comparison:
1. warm-up: ``bootd capsule build`` once (downloads what the cache lacks; not timed against the peer);
2. the peer: ``mmdebstrap --variant=V --include=<packages + build_packages> SUITE DIR SOURCES`` then
   ``tar -cf`` of DIR (what an administrator would run by hand), timed as one run;
3. bootd: the same recipe again (mmdebstrap to tar, files, commands, purge, hygiene, import), timed;
   a rebuild of an unchanged recipe gives the same version id (SOURCE_DATE_EPOCH, see build.py);
4. the recipe plus one package (``--extra``, default ``tree``): the bytes this version added.
Prints the ratio (bootd s / peer s), the unpacked (tar) and stored sizes, and the one-package bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd.capsule.build import build_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.recipe import load_recipe

MiB = 1 << 20


def plain(recipe_path: Path, cache: Path, work: Path, with_build_packages: bool) -> tuple[float, int]:
    """mmdebstrap into a directory plus tar of it: seconds and tar bytes."""
    r = load_recipe(recipe_path)
    tree, tar = work / "plain-tree", work / "plain.tar"
    c = str(cache)
    cmd = ["mmdebstrap", f"--variant={r.variant}", f"--components={','.join(r.components)}",
           "--skip=download/empty", "--skip=essential/unlink",
           "--include=" + ",".join([*r.packages, *(r.build_packages if with_build_packages else ())]),
           "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives \"$1\"/var/lib/apt/lists",
           f"--setup-hook=sync-in {c}/archives /var/cache/apt/archives/",
           f"--setup-hook=sync-in {c}/lists /var/lib/apt/lists/",
           r.suite, str(tree), *r.sources]
    env = {**os.environ, "TMPDIR": str(work)}
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-cf", str(tar), "."], check=True)
    seconds = time.monotonic() - t0
    size = tar.stat().st_size
    shutil.rmtree(tree)
    tar.unlink()
    return seconds, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="capsules/debian-hpc/recipe.toml")
    ap.add_argument("--cache", default=os.environ.get("BOOTD_BUILD_CACHE", "/var/tmp/bootd-build-cache"))
    ap.add_argument("--extra", default="tree", help="the one package added for the last build (hello adds a "
                    "translation to ~40 locale directories spread over the tree: every one touches a chunk)")
    ap.add_argument("--plain-all", action="store_true", help="the peer also installs build_packages "
                    "(default: only the image's packages, which is less work than the recipe does)")
    ap.add_argument("--log", default="/dev/null", help="where mmdebstrap's output goes")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("build bench: needs root (mmdebstrap root mode, device nodes)", file=sys.stderr)
        return 2
    recipe = load_recipe(args.recipe)
    cache = Path(args.cache)
    with tempfile.TemporaryDirectory(prefix="bootd-bench-build-", dir="/var/tmp") as tmp, \
            open(args.log, "a") as log:
        work = Path(tmp)
        store = CapsuleStore(work / "store")
        t0 = time.monotonic()
        warm = build_capsule(store, "hpc", recipe, cache, log=log, workdir=work)
        print(f"warm-up build: {time.monotonic() - t0:.1f} s, version {warm.result.version[:12]}")
        peer_s, peer_tar = plain(Path(args.recipe), cache, work, args.plain_all)
        what = "packages and build_packages" if args.plain_all else "the image's packages only"
        print(f"plain mmdebstrap + tar: {peer_s:.1f} s, tar {peer_tar / MiB:.1f} MiB ({what}; no files, "
              "commands or purge)")
        t0 = time.monotonic()
        again = build_capsule(store, "hpc", recipe, cache, log=log, workdir=work)
        ours = time.monotonic() - t0
        r = again.result
        same = "same version id" if r.version == warm.result.version else \
            f"NEW version ({r.new_bytes} new bytes, {100 * r.new_bytes / r.stored_size:.2f}%)"
        print(f"bootd capsule build: {ours:.1f} s (mmdebstrap {again.mmdebstrap_seconds:.1f} s, "
              f"import {again.import_seconds:.1f} s); rebuild unchanged: {same}")
        print(f"ratio bootd/plain: {ours / peer_s:.2f}x the time")
        print(f"debian-hpc: tar {again.tar_bytes / MiB:.1f} MiB, archive {r.raw_size / MiB:.1f} MiB "
              f"after hygiene, stored {r.stored_size / MiB:.1f} MiB in {r.chunks} chunks "
              f"(ratio {r.raw_size / r.stored_size:.2f})")
        print("hygiene: " + "; ".join(again.hygiene.summary()))
        plus = replace(recipe, packages=(*recipe.packages, args.extra))
        one = build_capsule(store, "hpc", plus, cache, log=log, workdir=work)
        h = store.history("hpc")[-1]
        print(f"+{args.extra}: version {one.result.version[:12]}, new {h.new_bytes / MiB:.2f} MiB "
              f"({100 * h.new_bytes / h.stored_bytes:.2f}% of {h.stored_bytes / MiB:.1f} MiB stored) "
              f"in {one.result.new_chunks} of {one.result.chunks} chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
