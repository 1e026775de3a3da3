#!/usr/bin/env bash
# Installs what bootd's tests and demo need, and only what is missing:
# Debian packages with apt-get, Python packages into ./.venv.
# Used by `make test`, `make demo` and .ci/run; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
  qemu-system-x86 ipxe-qemu ovmf seabios ipxe pxelinux syslinux-common  # QEMU nodes and their firmware/NBPs
  busybox-static cpio zstd tar                                           # stage one and capsule build scripts
  squashfs-tools                                                         # the squashfs root mode: mksquashfs makes a version's image
  mmdebstrap umoci                                                       # capsule recipes (build), OCI images (tests)
  gcc libc6-dev libssl-dev                                               # stage one's bootd-fetch (static, libcrypto.a)
  python3-dev                                                            # tools/compile.py (mypyc) with Debian's python3
  dnsmasq-base isc-dhcp-client isc-dhcp-relay udhcpc kea-admin           # DHCP peers (reference, clients, relay, perfdhcp)
  kea-dhcp4-server                                                       # bench/dhcp: Kea as the reference server (bench netns only; no host service)
  atftp tftp-hpa tftpd-hpa curl                                          # TFTP clients and the reference server
  nginx-light wrk                                                        # HTTP reference server and load client for bench/http
  iproute2 libcap2-bin procps python3-venv                               # netns/veth/tap, setcap, ps
  postgresql libpq5                                                      # the PostgreSQL store (tests start a private server); psycopg's libpq
  openssh-client                                                         # ssh-keygen: per-node host keys (overlays)
  chromium chromium-driver                                               # the status page in a real browser (tests)
  ipmitool                                                               # IPMI client (tests check bootd power and the BMC simulator against it)
)

missing=()
for pkg in "${DEBS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install Debian packages (run as root or install them yourself)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # policy-rc.d-free machines would start nginx/tftpd-hpa services: stop them from starting.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.bootd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -U pip
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
# The DHCP path compiled with mypyc (tools/compile.py): nothing to do while its stamp matches the sources. A failed
# build is not fatal: bootd then runs its sources (slower), and says so at start.
.venv/bin/python tools/compile.py || echo "setup: continuing without the compiled DHCP path" >&2
