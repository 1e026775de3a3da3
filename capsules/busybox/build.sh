#!/bin/sh
# Build the busybox capsule: a tiny runnable root tree plus a deterministic tarball of it.
#
#   capsules/busybox/build.sh OUT_DIR [--no-kernel | --kernel PATH] [--kernel-cache DIR]
#
# Produces OUT_DIR/root/ (the tree) and OUT_DIR/busybox.tar (sorted, numeric owner 0,
# fixed mtimes, so every build of the same inputs has the same bootd version id). Import:
#   bootd capsule import busybox OUT_DIR/busybox.tar
# Needs: busybox-static (installed with apt-get if missing and running as root), GNU tar,
# and for the kernel apt-get/dpkg-deb (capsules/kernel/fetch.sh, cached in --kernel-cache,
# default $BOOTD_KERNEL_CACHE or /var/tmp/bootd-kernel-cache). No other network access.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build.sh OUT_DIR [--no-kernel | --kernel PATH] [--kernel-cache DIR]}
shift
KERNEL=
WANT_KERNEL=1
KCACHE=${BOOTD_KERNEL_CACHE:-/var/tmp/bootd-kernel-cache}
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
while [ $# -gt 0 ]; do
    case $1 in
        --no-kernel) WANT_KERNEL=0 ;;
        --kernel) KERNEL=${2:?--kernel needs a path}; shift ;;
        --kernel-cache) KCACHE=${2:?--kernel-cache needs a directory}; shift ;;
        *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

BUSYBOX=${BUSYBOX:-/bin/busybox}
is_static() { [ -x "$1" ] && ! grep -q /lib64/ld-linux "$1"; }  # busybox-static names ld-linux without /lib64
if ! is_static "$BUSYBOX"; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q --no-install-recommends busybox-static >&2
        BUSYBOX=/bin/busybox
    fi
    is_static "$BUSYBOX" || { echo "build.sh: need a static busybox (apt-get install busybox-static)" >&2; exit 1; }
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$OUT/root
rm -rf "$ROOT"
mkdir -p "$ROOT"
cd "$ROOT"
mkdir -p bin sbin usr/bin usr/sbin usr/lib/bootd etc/bootd boot dev proc sys run tmp root var/log mnt
chmod 1777 tmp
chmod 0700 root

cp "$BUSYBOX" bin/busybox
chmod 0755 bin/busybox
for applet in $(bin/busybox --list); do
    case $applet in busybox|init|linuxrc) continue ;; esac
    ln -s busybox "bin/$applet"
done
ln -s ../../bin/busybox usr/bin/env

cp -R "$HERE/files/." "$ROOT/"
rm -f etc/bootd/.keep
chmod 0755 sbin/init etc/udhcpc/default.script
chmod 0644 usr/lib/bootd/report.sh etc/passwd etc/group etc/hosts etc/profile etc/os-release
echo bootd-node >etc/hostname

if [ "$(id -u)" = 0 ]; then
    # Before devtmpfs is mounted the kernel and init need these two.
    mknod -m 600 dev/console c 5 1
    mknod -m 666 dev/null c 1 3
fi

if [ -n "$KERNEL" ]; then
    cp "$KERNEL" "boot/$(basename "$KERNEL")"
elif [ "$WANT_KERNEL" = 1 ]; then
    eval "$("$HERE/../kernel/fetch.sh" "$KCACHE")"
    cp "$VMLINUZ" "boot/vmlinuz-$KERNEL_VERSION"
fi

tar --sort=name --format=pax --numeric-owner --owner=0 --group=0 --mtime="@$EPOCH" \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$ROOT" -cf "$OUT/busybox.tar.tmp" .
mv "$OUT/busybox.tar.tmp" "$OUT/busybox.tar"
echo "ROOT=$ROOT"
echo "TARBALL=$OUT/busybox.tar"
