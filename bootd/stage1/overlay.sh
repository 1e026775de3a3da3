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
# BOOTD_OVERLAY_DIRECT=1 (the stage one, before anything in ROOT runs) unpacks straight into ROOT instead.
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
FILES=0
CHANGED=0
if [ "${BOOTD_OVERLAY_DIRECT:-0}" = 1 ]; then
    # The stage one: nothing runs in ROOT yet, so one tar straight into it is as good as file by file,
    # and a process per file is what costs time on a slow node (seconds under QEMU TCG).
    "$TAR" -C "$ROOT" -xpmf "$TARFILE" 2> "$WORK/tar.err" || failed "unpacking: $(head -c 300 "$WORK/tar.err")"
    FILES=$(grep -c . "$WORK/list")
    CHANGED=$FILES
    : > "$WORK/list"
else
    "$TAR" -C "$WORK/stage" -xpmf "$TARFILE" 2> "$WORK/tar.err" || failed "unpacking: $(head -c 300 "$WORK/tar.err")"
fi
# Which entries differ from what ROOT has (bytes, mode, owner), in a few processes whatever their number:
# a process per file cost a minute per apply under QEMU TCG on a loaded machine. The shell's builtins
# sort the entries; stat and sha256sum take each side's whole list at once (one name a line).
NL='
'
srcs="" dsts="" names="" dsrcs="" ddsts="" dnames="" n=0 nd=0
: > "$WORK/todo"
while IFS= read -r p; do
    p=${p%/}
    [ -n "$p" ] || continue
    FILES=$((FILES + 1))
    src=$WORK/stage/$p
    dst=$ROOT/$p
    if [ -d "$src" ]; then
        if [ -d "$dst" ] && [ ! -L "$dst" ]; then
            dsrcs=$dsrcs$src$NL ddsts=$ddsts$dst$NL dnames=$dnames$p$NL nd=$((nd + 1))
        else
            printf '%s\n' "$p" >> "$WORK/todo"
        fi
    elif [ -f "$dst" ] && [ ! -L "$dst" ]; then
        srcs=$srcs$src$NL dsts=$dsts$dst$NL names=$names$p$NL n=$((n + 1))
    else
        printf '%s\n' "$p" >> "$WORK/todo"
    fi
done < "$WORK/list"

# signatures COUNT NAMES SIDE_A SIDE_B WITH_HASH: appends to todo each name whose signature differs (all of
# them when a listing came out short, e.g. a file that vanished meanwhile: then each is simply rewritten).
signatures() {
    [ "$1" -gt 0 ] || return 0
    old_ifs=$IFS
    IFS=$NL
    set -f
    stat -c '%a:%u:%g' $3 > "$WORK/a.meta" 2>/dev/null
    stat -c '%a:%u:%g' $4 > "$WORK/b.meta" 2>/dev/null
    if [ "$5" = 1 ]; then
        sha256sum $3 > "$WORK/a.sum" 2>/dev/null
        sha256sum $4 > "$WORK/b.sum" 2>/dev/null
    else
        printf '%s' "$2" > "$WORK/a.sum" && cp "$WORK/a.sum" "$WORK/b.sum"
    fi
    set +f
    IFS=$old_ifs
    k=0
    for f in a.meta b.meta a.sum b.sum; do
        c=0
        while IFS= read -r _; do c=$((c + 1)); done < "$WORK/$f"
        [ "$c" = "$1" ] || k=1
    done
    if [ "$k" = 1 ]; then
        printf '%s' "$2" >> "$WORK/todo"
        return 0
    fi
    printf '%s' "$2" | while IFS= read -r name; do
        IFS= read -r am <&3; read -r as _ <&4; IFS= read -r bm <&5; read -r bs _ <&6
        [ "$am $as" = "$bm $bs" ] || printf '%s\n' "$name"
    done 3< "$WORK/a.meta" 4< "$WORK/a.sum" 5< "$WORK/b.meta" 6< "$WORK/b.sum" >> "$WORK/todo"
}
signatures "$n" "$names" "$srcs" "$dsts" 1
signatures "$nd" "$dnames" "$dsrcs" "$ddsts" 0

# What differs: files to a temporary name beside their place, then renamed over it; directories made and
# given the overlay's owner and mode.
while IFS= read -r p; do
    src=$WORK/stage/$p
    dst=$ROOT/$p
    if [ -d "$src" ]; then
        if [ ! -d "$dst" ] || [ -L "$dst" ]; then
            { [ -e "$dst" ] || [ -L "$dst" ]; } && failed "/$p is a file on this node, the overlay makes it a directory"
            mkdir -p "$dst" || failed "cannot create /$p"
        fi
        want=$(stat -c '%a:%u:%g' "$src")
        chown "${want#*:}" "$dst" && chmod "${want%%:*}" "$dst" || failed "cannot set owner and mode of /$p"
    else
        [ -d "$dst" ] && [ ! -L "$dst" ] && failed "/$p is a directory on this node, the overlay writes a file there"
        dir=${dst%/*}
        [ -d "$dir" ] || mkdir -p "$dir" || failed "cannot create the directory of /$p"
        tmp=$dir/.${dst##*/}.bootd-new
        cp -p "$src" "$tmp" && mv -f "$tmp" "$dst" || { rm -f "$tmp"; failed "cannot write /$p"; }
    fi
    CHANGED=$((CHANGED + 1))
done < "$WORK/todo"

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
