#!/usr/bin/env bash
# `make demo`: boot a QEMU node from bootd in a private network namespace and show its timeline.
# Arguments go to the demo (e.g. `make demo DEMO_ARGS="--nodes 2"`, `--firmware uefi`, `--keep`).
# It needs no configuration file: the demo writes its own into a temporary state directory.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bootd demo: needs root (network namespaces, taps); try: sudo make demo" >&2
  exit 1
fi
exec .venv/bin/python -m bootd.lab.demo "$@"
