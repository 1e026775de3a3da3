#!/bin/sh
# Fetch a Debian kernel without installing it, cache it, and print where it is.
#
#   capsules/kernel/fetch.sh CACHE_DIR            -> prints KERNEL_VERSION=, VMLINUZ=, MODULES=
#   KFLAVOUR=amd64 capsules/kernel/fetch.sh DIR   (default cloud-amd64: LZ4, boots ~2x faster under TCG)
#
# Output lines are shell assignments, so callers can `eval "$(capsules/kernel/fetch.sh DIR)"`.
# Needs apt (Debian package lists; runs `apt-get update` once if the package is unknown)
# only when the cache is cold (or KERNEL_REFRESH=1),
# and dpkg-deb. Nothing is installed: the .deb is downloaded and only the kernel image and
# the network/virtio/block modules are unpacked into CACHE_DIR/<package>/.
# Re-running with a warm cache does no network access.
set -eu

CACHE=${1:?usage: fetch.sh CACHE_DIR}
KFLAVOUR=${KFLAVOUR:-cloud-amd64}
META=linux-image-$KFLAVOUR

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

resolve() {
    apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
# A warm cache is used as is (no apt call, works offline); KERNEL_REFRESH=1 asks apt for
# the newest kernel of the flavour.
PKG=
cached=$(ls -d "$CACHE"/linux-image-*-"$KFLAVOUR" 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$cached" ] && [ "${KERNEL_REFRESH:-0}" != 1 ]; then
    PKG=$(basename "$cached")
else
    PKG=$(resolve || true)
    if [ -z "$PKG" ]; then
        apt-get update -qq >&2
        PKG=$(resolve || true)
    fi
fi
[ -n "$PKG" ] || { echo "fetch.sh: cannot resolve $META to a kernel package" >&2; exit 1; }

DEST=$CACHE/$PKG
if ! ls "$DEST"/boot/vmlinuz-* >/dev/null 2>&1; then
    WORK=$(mktemp -d "$CACHE/.fetch.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    (cd "$WORK" && apt-get download -q "$PKG" >&2)
    mkdir -p "$WORK/unpack"
    dpkg-deb --fsys-tarfile "$WORK"/*.deb | tar -x -C "$WORK/unpack" --wildcards \
        './boot/vmlinuz-*' './boot/config-*' \
        './lib/modules/*/modules.*' \
        './lib/modules/*/kernel/drivers/virtio/*' \
        './lib/modules/*/kernel/drivers/net/*' \
        './lib/modules/*/kernel/drivers/block/*' \
        './lib/modules/*/kernel/net/core/*' 2>/dev/null || true
    ls "$WORK"/unpack/boot/vmlinuz-* >/dev/null 2>&1 || { echo "fetch.sh: no vmlinuz in $PKG" >&2; exit 1; }
    rm -rf "$DEST"
    mv "$WORK/unpack" "$DEST"  # appears complete or not at all
fi

VMLINUZ=$(ls "$DEST"/boot/vmlinuz-* | sort -V | tail -n 1)
VERSION=${VMLINUZ##*/vmlinuz-}
echo "KERNEL_PACKAGE=$PKG"
echo "KERNEL_VERSION=$VERSION"
echo "VMLINUZ=$VMLINUZ"
echo "MODULES=$DEST/lib/modules/$VERSION"
