#!/bin/sh
# bootd overlay applier: fetch this node's rendered overlays of one kind and write them over a root.
#
#   overlay KIND ROOT       (KIND: system or runtime; BOOTD_URL, BOOTD_NODE, BOOTD_TOKEN in the environment)
#
# The stage one runs it before switch_root (ROOT=/newroot, system then runtime); the node agent runs it
# every BOOTD_OVERLAY_INTERVAL seconds for the runtime kind (ROOT=/). One copy of the logic for both, in
# POSIX sh with what busybox and a Debian minbase root both have (tar, cmp, stat, cp, mv).
#
# Why file by file: the runtime overlay replaces files that running programs read (/etc/hosts, passwd,
# authorized_keys), so each changed file is written to a temporary name in its own directory and renamed
# over the old one: a reader sees the old file or the new one, never a half-written one. The tar is first
# unpacked into a private staging directory (modes and owners as the tar says; names map through the
# passwd of the root this runs in), files whose bytes, mode and owner already match are left alone, and
# then the hooks in ROOT/usr/lib/bootd/apply.d/ run in name order with BOOTD_ROOT=ROOT.
#
# The ETag of what was applied is kept in ROOT/var/lib/bootd/overlay-KIND.etag and sent as If-None-Match,
# so an unchanged overlay costs one request answered by 304 (with bootd-fetch; busybox wget cannot send a
# conditional request usefully, so without bootd-fetch the tar is fetched and compared by its ETag).
#
# Exit: 0 applied (one line on stdout: "applied etag=... files=N changed=M hooks=H bytes=B ms=T"),
# 4 unchanged ("unchanged etag=... ms=T"), 5 refused by bootd (403/404/500: the reason on stderr names it), 1 no usable reply (try
# again later), 3 could not be applied (unpack, write or a hook failed; the reason on stderr).
set -u
PATH=/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}
KIND=${1:-}
ROOT=${2:-}
case "$KIND" in system|runtime) ;; *) echo "usage: overlay system|runtime ROOT" >&2; exit 2 ;; esac
[ -n "$ROOT" ] && [ -d "$ROOT" ] || { echo "overlay: root directory '$ROOT' does not exist" >&2; exit 2; }
[ -n "${BOOTD_URL:-}" ] && [ -n "${BOOTD_NODE:-}" ] || { echo "overlay: BOOTD_URL and BOOTD_NODE are not set" >&2; exit 2; }
ROOT=${ROOT%/}
FETCH=${BOOTD_FETCH-/usr/lib/bootd/bootd-fetch}
TAR=${BOOTD_TAR:-tar}
WORK=${BOOTD_OVERLAY_WORK:-/run/bootd}/overlay-$KIND
STATE=$ROOT/var/lib/bootd
TIMEOUT=${BOOTD_OVERLAY_TIMEOUT:-30}

now_ms() { # centiseconds from /proc/uptime; no 10#: dash (Debian's /bin/sh) lacks it
    read -r up _ < /proc/uptime
    cs=${up#*.}
    echo $(( ${up%.*} * 1000 + ${cs#0} * 10 ))
}
T0=$(now_ms)

old_etag=""
[ -r "$STATE/overlay-$KIND.etag" ] && read -r old_etag < "$STATE/overlay-$KIND.etag"
rm -rf "$WORK"
( umask 077; mkdir -p "$WORK/stage" ) || { echo "overlay: cannot create $WORK" >&2; exit 3; }
TARFILE=$WORK/overlay.tar

# fetch -> ETAG set; returns like bootd-fetch -g (0 new, 4 unchanged, 5 refused, 1 retry later).
if [ -n "$FETCH" ] && [ -x "$FETCH" ] && "$FETCH" -c -u "$BOOTD_URL" 2>/dev/null; then
    ETAG=$(BOOTD_TOKEN=${BOOTD_TOKEN:-} "$FETCH" -g "$KIND" -o "$TARFILE" -u "$BOOTD_URL" -n "$BOOTD_NODE" \
           -t "$TIMEOUT" ${old_etag:+-e "$old_etag"})
    rc=$?
    case $rc in 0|4) ;; *) rm -rf "$WORK"; exit "$rc" ;; esac
else
    timeout "$TIMEOUT" wget -q -S -O "$TARFILE" --header "X-Bootd-Token: ${BOOTD_TOKEN:-}" \
        "$BOOTD_URL/api/v1/nodes/$BOOTD_NODE/overlay/$KIND" 2> "$WORK/wget.err"
    rc=$?
    if [ "$rc" != 0 ]; then
        err=$(grep -v '^  ' "$WORK/wget.err" | tr '\n' ' ')
        echo "overlay: GET overlay/$KIND: ${err:-timed out}" >&2
        rm -rf "$WORK"
        case "$err" in *" 403 "*|*" 404 "*|*" 410 "*|*" 500 "*) exit 5 ;; esac
        exit 1
    fi
    ETAG=$(sed -n 's/^ *[Ee][Tt][Aa][Gg]: *\("[0-9A-Za-z]*"\).*/\1/p' "$WORK/wget.err" | head -n 1)
    [ -n "$ETAG" ] && [ "$ETAG" = "$old_etag" ] && rc=4
fi
if [ "$rc" = 4 ]; then
    rm -rf "$WORK"
    echo "unchanged etag=$old_etag ms=$(( $(now_ms) - T0 ))"
    exit 4
fi
BYTES=$(wc -c < "$TARFILE")

failed() { echo "overlay $KIND: $*" >&2; rm -rf "$WORK"; exit 3; }

# Paths come from bootd's renderer, which refuses anything but plain relative names; refused here too.
"$TAR" -tf "$TARFILE" > "$WORK/list" 2> "$WORK/tar.err" || failed "not a tar: $(head -c 300 "$WORK/tar.err")"
while IFS= read -r p; do
    case "/$p/" in *"/../"*|*"/./"*|"//"*) failed "refusing the path '$p'" ;; esac
done < "$WORK/list"
"$TAR" -C "$WORK/stage" -xpmf "$TARFILE" 2> "$WORK/tar.err" || failed "unpacking: $(head -c 300 "$WORK/tar.err")"

FILES=0
CHANGED=0
while IFS= read -r p; do
    p=${p%/}
    [ -n "$p" ] || continue
    src=$WORK/stage/$p
    dst=$ROOT/$p
    FILES=$((FILES + 1))
    # "mode:uid:gid" of the staged entry, then of the one in place (absent: one line only).
    meta=$(stat -c '%a:%u:%g' "$src" "$dst" 2>/dev/null)
    want=${meta%%
*}
    have=${meta#*
}
    [ "$have" = "$meta" ] && have=""
    if [ -d "$src" ]; then
        if [ ! -d "$dst" ]; then
            { [ -e "$dst" ] || [ -L "$dst" ]; } && failed "/$p is a file on this node, the overlay makes it a directory"
            mkdir -p "$dst" || failed "cannot create /$p"
        elif [ "$want" = "$have" ]; then
            continue
        fi
        chown "${want#*:}" "$dst" && chmod "${want%%:*}" "$dst" || failed "cannot set owner and mode of /$p"
    else
        [ -d "$dst" ] && [ ! -L "$dst" ] && failed "/$p is a directory on this node, the overlay writes a file there"
        [ "$want" = "$have" ] && [ ! -L "$dst" ] && cmp -s "$src" "$dst" && continue
        dir=${dst%/*}
        [ -d "$dir" ] || mkdir -p "$dir" || failed "cannot create the directory of /$p"
        tmp=$dir/.${dst##*/}.bootd-new
        cp -p "$src" "$tmp" && mv -f "$tmp" "$dst" || { rm -f "$tmp"; failed "cannot write /$p"; }
    fi
    CHANGED=$((CHANGED + 1))
done < "$WORK/list"

HOOKS=0
for h in "$ROOT"/usr/lib/bootd/apply.d/*; do
    [ -f "$h" ] && [ -x "$h" ] || continue
    BOOTD_ROOT=$ROOT "$h" > "$WORK/hook.out" 2>&1 || failed "hook ${h##*/} failed: $(tail -c 300 "$WORK/hook.out" | tr '\n' ' ')"
    HOOKS=$((HOOKS + 1))
done

# Only now is this ETag the node's: after a failure the next round fetches and applies it again.
mkdir -p "$STATE" && printf '%s\n' "$ETAG" > "$STATE/overlay-$KIND.etag.new" && \
    mv -f "$STATE/overlay-$KIND.etag.new" "$STATE/overlay-$KIND.etag" || failed "cannot record the ETag in $STATE"
rm -rf "$WORK"
echo "applied etag=$ETAG files=$FILES changed=$CHANGED hooks=$HOOKS bytes=$BYTES ms=$(( $(now_ms) - T0 ))"
exit 0
