#!/usr/bin/env bash
# `make cluster`: three QEMU nodes boot the debian-hpc capsule from bootd in a private network namespace,
# then the master runs MPI across them over ssh as an ordinary user. Arguments go to the run
# (e.g. `make cluster CLUSTER_ARGS="--nodes 2"`, `--keep` to log in afterwards, `--workdir DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "make cluster: needs root (network namespaces, taps, mmdebstrap); try: sudo make cluster" >&2
  exit 1
fi
exec .venv/bin/python -m bootd.lab.cluster "$@"
