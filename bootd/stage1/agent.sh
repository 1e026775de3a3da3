#!/bin/sh
# bootd stage-one agent (busybox sh, run as PID 1 by /init via exec).
#
# Why a shell script: it runs in a 3 MB initramfs under whatever kernel the capsule brings, so it must
# need nothing but busybox, GNU tar and zstd. The rules it keeps:
#   * the manifest must hash to the version id on the kernel command line before any of it is believed;
#   * every chunk is hashed (sha256 of the stored bytes) before a single byte reaches zstd/tar;
#   * any failure is reported as `failed` with its reason, nothing unverified is ever switched into,
#     and the machine reboots after a delay so the whole boot is retried from the firmware on.
# Console lines start with "BOOTD-STAGE1 " so tests and operators can follow along on the serial port.
#
# Root modes (bootd.root): "tmpfs" (default) unpacks the capsule into a tmpfs. "squashfs" fetches the
# version's squashfs image named by bootd.image (bootd/capsule/image.py): the image list must hash to
# bootd.image and name bootd.capsule, every image chunk is verified like a capsule chunk before it is
# appended to the image file on a tmpfs, and only a whole, verified image is loop-mounted (read-only) under
# an overlayfs whose upper is on that same tmpfs; that tmpfs is moved to /run/bootd-root in the capsule.
#
# Host mode (BOOTD_HOST_MODE=1, used by tests and bench/boot on the build host): no mounts, no modules,
# no DHCP, no switch_root; the command line is read from BOOTD_CMDLINE_FILE, the tree is unpacked into
# BOOTD_TARGET, and failure exits 1 instead of rebooting.

PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export PATH

HOST_MODE=${BOOTD_HOST_MODE:-0}
CMDLINE_FILE=${BOOTD_CMDLINE_FILE:-/proc/cmdline}
WORK=${BOOTD_WORK:-/run/bootd}
TARGET=${BOOTD_TARGET:-/newroot}
# Full paths: busybox sh prefers its own applets, and busybox tar would silently drop xattrs.
TAR=${BOOTD_TAR:-/usr/bin/tar}
ZSTD=${BOOTD_ZSTD:-/usr/bin/zstd}
# The compiled chunk fetcher (fetch.c); without it the shell workers below do the same job, slower.
FETCH=${BOOTD_FETCH:-/usr/bin/bootd-fetch}
# The overlay applier (overlay.sh), next to this script: /bootd in the initramfs, the sources in host mode.
OVERLAY=${BOOTD_OVERLAY_SH:-${0%/*}/overlay.sh}
# The squashfs root mode's tmpfs: the image file, the overlay's upper and work directories.
RAMDIR=${BOOTD_ROOT_RAM:-/rootram}

say() { echo "BOOTD-STAGE1 $*" >&2; }

now_ms() {
    # /proc/uptime has centiseconds; `date +%s` alone is too coarse for per-step timings.
    read -r up _ < /proc/uptime
    echo $(( ${up%.*} * 1000 + 10#${up#*.} * 10 ))
}

CMDLINE=$(cat "$CMDLINE_FILE" 2>/dev/null)  # read once: a process per argument adds up
arg() {
    for w in $CMDLINE; do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

json_esc() { printf '%s' "$1" | tr -d '\000-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

read_args() {
    URL=$(arg bootd.url)
    NODE=$(arg bootd.node)
    VID=$(arg bootd.capsule)
    TOKEN=$(arg bootd.token)
    MAC=$(arg bootd.mac)
    # PXELINUX's IPAPPEND 2 names the boot NIC as BOOTIF=01-aa-bb-cc-dd-ee-ff (01: Ethernet).
    [ -z "$MAC" ] && MAC=$(arg BOOTIF | sed -n 's/^01-\([0-9a-fA-F-]\{17\}\)$/\1/p' | tr 'A-F-' 'a-f:')
    WORKERS=$(arg bootd.workers || echo 4)
    RETRIES=$(arg bootd.retries || echo 10)
    FAIL_DELAY=$(arg bootd.retry_delay || echo 15)
    WINDOW=$(arg bootd.window || echo 16)
    TIMEOUT=$(arg bootd.timeout || echo 60)
    ROOT_MODE=$(arg bootd.root || echo tmpfs)
    IMAGE=$(arg bootd.image)
}
read_args

post_event() { # event reason done total tries [bytes bytes_total]
    body="{\"event\":\"$1\",\"reason\":\"$(json_esc "$2")\",\"done\":${3:-0},\"total\":${4:-0}"
    [ -n "${7:-}" ] && body="$body,\"bytes\":${6:-0},\"bytes_total\":$7"
    body="$body}"
    tries=${5:-3}
    n=0
    while [ "$n" -lt "$tries" ]; do
        for base in $(sources); do  # a server that died mid-boot: the next one that takes it
            if timeout 10 wget -q -O /dev/null --header "X-Bootd-Token: $TOKEN" \
                --header "Content-Type: application/json" --post-data "$body" \
                "$base/api/v1/nodes/$NODE/events" 2>/dev/null; then
                URL=$base
                return 0
            fi
            [ "$1" = fetching ] && break  # progress is not worth a wait on every source
        done
        n=$((n + 1))
        [ "$n" -lt "$tries" ] && sleep 1
    done
    say "note: could not report '$1' to $URL (continuing)"
    return 1
}

report_inventory() { # commissioning, once per boot: what this machine is (bootd/service/inventory.py)
    sh "${0%/*}/inventory.sh" > "$WORK/inventory.json" 2>/dev/null || return 0
    timeout 10 wget -q -O /dev/null --header "X-Bootd-Token: $TOKEN" --header "Content-Type: application/json" \
        --post-file "$WORK/inventory.json" "$URL/api/v1/nodes/$NODE/inventory" 2>/dev/null ||
        say "note: could not report the inventory to $URL (continuing)"
}

fail() {
    say "FAILED $1"
    touch "$WORK/abort" 2>/dev/null
    [ -n "$WORKER_PIDS" ] && kill $WORKER_PIDS 2>/dev/null
    [ -n "$URL" ] && [ -n "$NODE" ] && post_event failed "$1" 0 0 3
    if [ "$HOST_MODE" = 1 ]; then
        exit 1
    fi
    say "rebooting in ${FAIL_DELAY}s to retry the boot"
    sleep "$FAIL_DELAY"
    sync
    reboot -f
    sleep 5
    echo b > /proc/sysrq-trigger
    exit 1
}

# Backoff with jitter, so nodes that failed together do not come back together: after a 503 with
# Retry-After, wait that long plus up to a quarter more; otherwise 0.5 s * 2^attempt (capped at 8 s)
# times a random factor in [0.5, 1.5).
backoff_sleep() { # attempt [retry_after_seconds]
    if [ -n "$2" ]; then
        ms=$(( $2 * 1000 ))
        [ "$ms" -gt 30000 ] && ms=30000
        ms=$(( ms + RANDOM % (ms / 4 + 1) ))
    else
        ms=500
        a=$1
        while [ "$a" -gt 0 ] && [ "$ms" -lt 8000 ]; do ms=$((ms * 2)); a=$((a - 1)); done
        [ "$ms" -gt 8000 ] && ms=8000
        ms=$(( ms / 2 + (RANDOM % (ms + 1)) ))
    fi
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
}

# A 503 should carry Retry-After, but busybox wget hides the headers of an error reply; ask again with a
# HEAD over nc just to read it. No answer simply means "use the backoff".
retry_after() { # url
    hp=${1#http://}; path=/${hp#*/}; hp=${hp%%/*}
    host=${hp%:*}; port=${hp##*:}
    [ "$port" = "$hp" ] && port=80
    printf 'HEAD %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hp" | timeout 5 nc "$host" "$port" 2>/dev/null \
        | tr -d '\r' | sed -n 's/^[Rr][Ee][Tt][Rr][Yy]-[Aa][Ff][Tt][Ee][Rr]: *\([0-9][0-9]*\).*/\1/p' | head -n 1
}

# fetch URL DEST [expected_size]: retries on refused/dropped connections and 503s, resuming a partial
# download with a Range request when the size is known (chunks), so a restart of bootd costs only the
# unfetched bytes.
fetch() {
    url=$1; dest=$2; size=$3; attempt=0
    while :; do
        cont=""
        if [ -n "$size" ] && [ -s "$dest" ]; then
            have=$(stat -c %s "$dest")
            if [ "$have" -eq "$size" ]; then return 0; fi
            if [ "$have" -lt "$size" ]; then cont="-c"; else rm -f "$dest"; fi
        else
            rm -f "$dest"
        fi
        if timeout "$TIMEOUT" wget -q $cont -O "$dest" "$url" 2>"$dest.err"; then
            rm -f "$dest.err"
            return 0
        fi
        err=$(tr '\n' ' ' < "$dest.err" 2>/dev/null)
        attempt=$((attempt + 1))
        if [ "$attempt" -ge "$RETRIES" ]; then
            FETCH_ERR="$url: ${err:-timed out} (after $attempt attempts)"
            return 1
        fi
        case "$err" in
            *" 404 "*|*" 403 "*|*" 410 "*|*" 500 "*) FETCH_ERR="$url: $err"; return 1 ;;  # 500: bootd found it corrupt
            *" 503 "*) ra=$(retry_after "$url")
                       if [ -n "$ra" ]; then when="${ra}s"; else when="backoff"; fi
                       say "retry $url in $when (server busy, 503)"
                       backoff_sleep "$attempt" "$ra" ;;
            *) say "retry $url (attempt $attempt: ${err:-timeout})"; backoff_sleep "$attempt" ;;
        esac
    done
}

# Where chunks and the manifest may come from, in order: this node's server, then bootd.sources
# (comma-separated base URLs: the other live servers, replicas, plain HTTP copies). Every object is
# verified whichever source sent it; events go to the first server that takes them.
set_sources() { SOURCE_LIST=$(echo "$URL,$(arg bootd.sources)" | tr ',' ' ' | sed 's/ *$//'); }
# The sources with $URL (the server that last took an event) first, each once.
sources() { echo "$URL"; for s in $SOURCE_LIST; do [ "$s" = "$URL" ] || echo "$s"; done; }

# fetch_src PATH DEST [expected_size]: fetch() from each source in turn, in SOURCE_LIST's order.
fetch_src() {
    for base in $SOURCE_LIST; do
        fetch "$base/$1" "$2" "$3" && return 0
        say "no $1 from $base: $FETCH_ERR"
    done
    return 1
}

# OpenSSL's SHA-256 (hand-written assembly, SHA-NI where the CPU has it) is several times faster than
# busybox's C version, and hashing is most of the agent's CPU time; busybox is the fallback.
OPENSSL=""
[ -x "${BOOTD_OPENSSL:-/usr/bin/openssl}" ] && OPENSSL=${BOOTD_OPENSSL:-/usr/bin/openssl}
hash_file() { # FILE -> GOT=<sha256 hex>
    if [ -n "$OPENSSL" ]; then
        set -- $("$OPENSSL" dgst -sha256 -r "$1")
    else
        set -- $(sha256sum "$1")
    fi
    GOT=$1
}

u32() { # file offset -> big-endian unsigned 32-bit integer
    h=$(od -An -v -tx1 -j "$2" -N 4 "$1" | tr -d ' \n')
    [ ${#h} -eq 8 ] || return 1
    echo $((0x$h))
}

# A loader with one static configuration for every node (a site's PXELINUX: pxelinux.cfg/default with
# bootd.url and IPAPPEND 2) cannot carry the node's name, capsule version and per-boot token. The stage
# one then asks bootd for the same per-node script iPXE would get, so the same decision applies
# (registration, approval, capsule, a fresh token), and takes the bootd.* words of its kernel line.
boot_line_from_bootd() {
    script=$WORK/boot.ipxe
    fetch "$URL/boot/$(echo "$MAC" | tr ':' '-').ipxe" "$script" || fail "no boot script for $MAC: $FETCH_ERR"
    line=$(sed -n 's/^kernel //p' "$script" | head -n 1)
    line=${line% || goto failed}
    if [ -z "$line" ]; then
        why=$(sed -n 's/^echo //p' "$script" | head -n 3 | tr '\n' ' ')
        say "bootd has no boot line for $MAC yet: ${why:-$(head -c 200 "$script")}"
        fail "bootd gave $MAC no boot line: ${why:-see the console}"
    fi
    kernel=${line%% *}
    case "$kernel" in */stage1/vmlinuz) ;; *) say "note: bootd boots this node with $kernel; this loader started the stage one's own kernel" ;; esac
    words=""
    for w in ${line#* }; do case "$w" in bootd.*=*) words="$words $w" ;; esac; done
    CMDLINE="$words $CMDLINE"  # bootd's words first: arg() takes the first
    read_args
    say "boot line from $URL/boot: node=$NODE capsule=$VID"
    [ -n "$NODE" ] && [ -n "$VID" ] || fail "bootd's boot line for $MAC lacks bootd.node or bootd.capsule"
}

setup_system() {
    mkdir -p /run /tmp
    mount -t tmpfs -o mode=0755 tmpfs /run 2>/dev/null
    echo 1 > /proc/sys/kernel/printk 2>/dev/null
}

load_modules() {
    kver=$(uname -r)
    dir=/lib/modules/$kver
    if [ ! -f "$dir/load-order" ]; then
        say "no NIC modules for kernel $kver in this stage one (built for: $(ls /lib/modules 2>/dev/null))"
        return 0
    fi
    for m in $(cat "$dir/load-order"); do
        insmod "$dir/$m.ko" 2>/dev/null
    done
}

find_iface() {
    want=$(echo "$MAC" | tr 'A-F-' 'a-f:')
    n=0
    while [ "$n" -lt 50 ]; do
        first=""
        for d in /sys/class/net/*; do
            i=${d##*/}
            [ "$i" = lo ] && continue
            [ -z "$first" ] && first=$i
            if [ -n "$want" ] && [ "$(cat "$d/address" 2>/dev/null)" = "$want" ]; then echo "$i"; return 0; fi
        done
        if [ -n "$first" ] && [ -z "$want" ]; then echo "$first"; return 0; fi
        n=$((n + 1))
        sleep 0.1
    done
    [ -n "$first" ] && { echo "$first"; return 0; }
    return 1
}

# Why no interface appeared, for the console: the PCI network controllers (vendor:device) and what this
# stage one has drivers for. It cannot reach bootd without a network: it says so here, retries the whole
# boot (reboot after bootd.retry_delay), and bootd's lifecycle timeout marks a node that never comes back.
nic_diagnosis() {
    ids=""
    for d in /sys/bus/pci/devices/*; do
        case $(cat "$d/class" 2>/dev/null) in
            0x02*) ids="$ids $(sed 's/^0x//' "$d/vendor"):$(sed 's/^0x//' "$d/device")" ;;
        esac
    done
    have=$(cat "/lib/modules/$(uname -r)/load-order" 2>/dev/null | tr '\n' ' ')
    echo "kernel $(uname -r) has no driver here for PCI NIC(s)${ids:- (none found)}; NIC modules here: ${have:-none (built for: $(ls /lib/modules 2>/dev/null | tr '\n' ' '))}"
}

bring_up_network() {
    load_modules
    IFACE=$(find_iface) || fail "no network interface appeared: $(nic_diagnosis)"
    ip link set lo up
    ip link set "$IFACE" up
    n=0
    while [ "$n" -lt 5 ]; do
        if BOOTD_LEASE=$WORK/lease udhcpc -i "$IFACE" -s /bootd/udhcpc.script -n -q -t 6 -T 2 -A 1 >/dev/null 2>&1; then
            IP=$(ip -4 -o addr show dev "$IFACE" | sed -n 's/.* inet \([0-9.]*\).*/\1/p' | head -n 1)
            say "net $IFACE ip=$IP"
            return 0
        fi
        n=$((n + 1))
    done
    fail "no DHCP lease on $IFACE"
}

# One worker fetches chunks w, w+N, w+2N, ... and never runs more than WINDOW chunks ahead of the
# unpacker, so RAM holds a bounded number of stored chunks however large the capsule is.
worker() { # worker_index
    # Its share of the chunk table, read with the shell's own `read`: per chunk, the only processes
    # started are wget, the hash and mv (process start-up, not hashing, was the agent's main cost).
    while read -r i hash shex _ <&8; do
        while :; do
            [ -e "$WORK/abort" ] && exit 1
            read -r c < "$WORK/consumed"
            [ $((i - ${c:-0})) -lt "$WINDOW" ] && break
            sleep 0.05
        done
        size=$((0x$shex))
        part=$WORK/chunks/$i.part
        tries=0
        while :; do
            if ! fetch_src "chunks/$hash" "$part" "$size"; then
                echo "chunk $hash could not be fetched: $FETCH_ERR" > "$WORK/fail.$i"
                touch "$WORK/abort"
                echo abort > "$WORK/done.fifo"
                exit 1
            fi
            hash_file "$part"
            [ "$GOT" = "$hash" ] && break
            tries=$((tries + 1))
            rm -f "$part"
            if [ "$tries" -ge 2 ]; then
                echo "chunk $hash failed verification (got sha256 $GOT)" > "$WORK/fail.$i"
                touch "$WORK/abort"
                echo abort > "$WORK/done.fifo"
                exit 1
            fi
            say "chunk $hash failed verification, fetching it again"
            case "$SOURCE_LIST" in *" "*) SOURCE_LIST="${SOURCE_LIST#* } ${SOURCE_LIST%% *}" ;; esac  # next source first
        done
        mv "$part" "$WORK/chunks/$i.ok"
        echo "$i" > "$WORK/done.fifo"
    done 8< "$WORK/table.$1"
    exit 0
}

# Streams verified chunks, in order, to stdout (zstd | tar read it). Only files a worker renamed to
# .ok after checking their hash are ever read. Workers announce each finished chunk on a FIFO (fd 7),
# so the wait for the next chunk in order is a blocking read, not a polling loop.
consume() {
    i=0
    got=0
    last_post=0
    while [ "$i" -lt "$COUNT" ]; do
        f=$WORK/chunks/$i.ok
        while [ ! -e "$f" ]; do
            [ -e "$WORK/abort" ] && return 1
            read -r -t 1 _ <&7
        done
        got=$((got + $(stat -c %s "$f")))
        cat "$f" || return 1
        rm -f "$f"
        i=$((i + 1))
        echo "$i" > "$WORK/consumed"  # a reader seeing it half-written reads 0: it waits, harmlessly
        say "fetching $i/$COUNT"
        t=$(now_ms)
        if [ "$i" -lt "$COUNT" ] && [ $((t - last_post)) -ge 1000 ]; then
            post_event fetching "" "$i" "$COUNT" 1 "$got" "$stored" >/dev/null 2>&1
            last_post=$t
        fi
    done
    return 0
}

first_failure() {
    for f in "$WORK"/fail.*; do
        [ -e "$f" ] && { cat "$f"; return 0; }
    done
    echo "$1"
}

# KEY=VALUE -> KEY='VALUE' (single quotes escaped), so capsules can source node.env with `. file`.
shell_assign() { sed -e "s/'/'\\\\''/g" -e "s/=/='/" -e "s/\$/'/"; }

write_node_config() {
    mkdir -p "$TARGET/etc/bootd"
    echo "$NODE" > "$TARGET/etc/hostname"
    env_file=$TARGET/etc/bootd/node.env
    {
        echo "BOOTD_URL=$URL"
        # The node agent's reports fail over like the stage one's events: $URL first, then the others.
        src=$(sources | tr '\n' ',')
        echo "BOOTD_SOURCES=${src%,}"
        echo "BOOTD_NODE=$NODE"
        echo "BOOTD_TOKEN=$TOKEN"
        echo "BOOTD_MAC=$MAC"
        echo "BOOTD_CAPSULE=$VID"
        [ -n "$IP" ] && echo "BOOTD_IP=$IP"
        # The node's key/values, channel 1: bootd.var.KEY=VALUE words on the kernel command line.
        for w in $CMDLINE; do
            case "$w" in bootd.var.*=*) echo "${w#bootd.var.}" ;; esac
        done
    } > "$WORK/node.env"
    # Channel 2: KEY=VALUE lines from bootd's node-facing env route, if this bootd has one.
    if timeout 10 wget -q -O "$WORK/node.vars" --header "X-Bootd-Token: $TOKEN" \
        "$URL/api/v1/nodes/$NODE/env" 2>/dev/null; then
        cat "$WORK/node.vars" >> "$WORK/node.env"
    else
        say "note: no node key/values from $URL/api/v1/nodes/$NODE/env (skipped)"
    fi
    # Only names a shell accepts; values are quoted, so nothing in them is ever executed.
    grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$WORK/node.env" | shell_assign > "$env_file"
    chmod 0600 "$env_file"
}

# The node agent (node-agent.sh + bootd-fetch) goes into the capsule, so a real distribution reports
# `ready` and heartbeats without bootd in its image: started by a systemd unit written and enabled here
# when the capsule runs systemd, else by the capsule's own init (the busybox capsule's does).
install_node_agent() {
    lib=$TARGET/usr/lib/bootd
    mkdir -p "$lib" || { say "note: cannot create $lib: no node agent"; return 1; }
    cp "${BOOTD_NODE_AGENT:-${0%/*}/node-agent.sh}" "$lib/node-agent" && chmod 0755 "$lib/node-agent" &&
        cp "$OVERLAY" "$lib/overlay" && chmod 0755 "$lib/overlay" || \
        { say "note: cannot install the node agent into $lib"; return 1; }
    [ -x "$FETCH" ] && cp "$FETCH" "$lib/bootd-fetch" && chmod 0755 "$lib/bootd-fetch"
    systemd_dir=""
    for d in lib/systemd/system usr/lib/systemd/system; do
        [ -e "$TARGET/$d/systemd-journald.service" ] && { systemd_dir=/$d; break; }
    done
    [ -n "$systemd_dir" ] || return 0
    units=$TARGET/etc/systemd/system
    mkdir -p "$units/multi-user.target.wants"
    cat > "$units/bootd-agent.service" <<UNIT
# Written by the bootd stage one: reports this node's state to bootd and heartbeats.
[Unit]
Description=bootd node agent (reports ready, heartbeats)
After=network.target

[Service]
Type=simple
ExecStart=/usr/lib/bootd/node-agent
Restart=on-failure
RestartSec=5
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
    ln -sfn ../bootd-agent.service "$units/multi-user.target.wants/bootd-agent.service"
    say "node agent: bootd-agent.service enabled in the capsule ($systemd_dir)"
}

# The node's overlays, rendered by bootd for it: the system kind (hostname, machine-id, ssh host keys,
# network, chrony) and the runtime kind (hosts, authorized_keys, users), written over the tree with the
# apply hooks run, before anything in it starts; the node agent then keeps the runtime kind current.
# A node that cannot get them does not boot without them: `failed` with bootd's reason (e.g. the
# template and line that failed to render), as for a bad chunk. Transient failures are retried.
apply_overlays() {
    rm -f "$TARGET"/var/lib/bootd/overlay-*.etag  # an image made from a running node must not say "have it"
    for kind in system runtime; do
        attempt=0
        while :; do
            out=$(BOOTD_URL=$URL BOOTD_NODE=$NODE BOOTD_TOKEN=$TOKEN BOOTD_FETCH=$FETCH BOOTD_TAR=$TAR \
                  BOOTD_OVERLAY_WORK=$WORK BOOTD_OVERLAY_TIMEOUT=$TIMEOUT BOOTD_OVERLAY_DIRECT=1 \
                  /bin/sh "$OVERLAY" "$kind" "$TARGET" \
                  2> "$WORK/overlay.err")
            rc=$?
            err=$(tr '\n' ' ' < "$WORK/overlay.err" | cut -c 1-400)
            case $rc in
                0|4) say "overlay $kind $out"; break ;;
                1) attempt=$((attempt + 1))
                   [ "$attempt" -ge "$RETRIES" ] && fail "overlay $kind could not be fetched: $err (after $attempt attempts)"
                   say "retry overlay $kind (attempt $attempt: $err)"
                   backoff_sleep "$attempt" ;;
                5) fail "overlay $kind refused by bootd: $err" ;;
                *) fail "overlay $kind could not be applied: $err" ;;
            esac
        done
    done
}

# After switch_root the capsule must keep a working address: hand the boot NIC to the capsule's own DHCP
# client (systemd-networkd, else ifupdown), matched by MAC; pin the NIC's name so udev keeps the name the
# stage one used; write resolv.conf from the DHCP reply. An image that configures its network itself
# (a .network or interfaces file naming this MAC or interface) is left alone.
hand_over_network() {
    [ -n "$IFACE" ] || return 0
    mac=$(cat "/sys/class/net/$IFACE/address" 2>/dev/null || echo "$MAC" | tr 'A-F-' 'a-f:')
    LEASE_DNS=""; LEASE_DOMAIN=""
    [ -r "$WORK/lease" ] && . "$WORK/lease"
    net=$TARGET/etc/systemd/network
    sysd=""
    for d in lib/systemd usr/lib/systemd; do [ -x "$TARGET/$d/systemd-networkd" ] && sysd=/$d; done
    if [ -d "$TARGET/etc/systemd" ]; then
        mkdir -p "$net"
        printf '# Written by the bootd stage one: the boot NIC keeps its name.\n[Match]\nMACAddress=%s\n\n[Link]\nNamePolicy=\nName=%s\n' \
            "$mac" "$IFACE" > "$net/10-bootd-boot.link"
    fi
    if [ -n "$sysd" ]; then
        if ! grep -qsi -e "$mac" -e "Name=$IFACE\$" "$net"/*.network "$TARGET$sysd/network"/*.network 2>/dev/null \
            || [ -e "$net/10-bootd-boot.network" ]; then
            cat > "$net/10-bootd-boot.network" <<NET
# Written by the bootd stage one: DHCP on the NIC the node booted from, so its lease is renewed.
[Match]
MACAddress=$mac

[Network]
DHCP=ipv4
KeepConfiguration=yes

[DHCPv4]
ClientIdentifier=mac
UseHostname=no
NET
        fi
        wants=$TARGET/etc/systemd/system
        mkdir -p "$wants/multi-user.target.wants" "$wants/sockets.target.wants"
        ln -sfn "$sysd/system/systemd-networkd.service" "$wants/multi-user.target.wants/systemd-networkd.service"
        [ -e "$TARGET$sysd/system/systemd-networkd.socket" ] && \
            ln -sfn "$sysd/system/systemd-networkd.socket" "$wants/sockets.target.wants/systemd-networkd.socket"
        say "network: $IFACE ($mac) handed to systemd-networkd (DHCP)"
    elif [ -e "$TARGET/etc/network/interfaces" ] && { [ -f "$TARGET/sbin/ifup" ] && [ ! -L "$TARGET/sbin/ifup" ] ||
            [ -f "$TARGET/usr/sbin/ifup" ] && [ ! -L "$TARGET/usr/sbin/ifup" ]; }; then
        # Debian's ifupdown (a regular file; busybox's ifup applet is a link and nothing runs it here).
        if ! grep -qs -e "iface $IFACE " "$TARGET/etc/network/interfaces" "$TARGET/etc/network/interfaces.d"/* 2>/dev/null; then
            mkdir -p "$TARGET/etc/network/interfaces.d"
            printf '# Written by the bootd stage one: DHCP on the boot NIC.\nauto %s\niface %s inet dhcp\n' \
                "$IFACE" "$IFACE" > "$TARGET/etc/network/interfaces.d/bootd-$IFACE"
            grep -qs '^source.*interfaces\.d' "$TARGET/etc/network/interfaces" || \
                echo "source /etc/network/interfaces.d/*" >> "$TARGET/etc/network/interfaces"
        fi
        say "network: $IFACE handed to ifupdown (DHCP)"
    else
        say "network: $IFACE keeps the stage one's address; the capsule has no DHCP client (networkd, ifupdown)"
    fi
    if [ -n "$LEASE_DNS" ] && [ ! -L "$TARGET/etc/resolv.conf" ]; then
        {
            echo "# Written by the bootd stage one from the DHCP reply."
            [ -n "$LEASE_DOMAIN" ] && echo "search $LEASE_DOMAIN"
            for d in $LEASE_DNS; do echo "nameserver $d"; done
        } > "$TARGET/etc/resolv.conf"
    fi
}

# The fallback when the stage one has no bootd-fetch: shell workers and consume().
fetch_with_workers() {
    rm -f "$WORK"/table.*
    awk -v n="$WORKERS" -v d="$WORK" '{ print NR - 1, $0 > (d "/table." ((NR - 1) % n)) }' "$WORK/table"
    w=0
    while [ "$w" -lt "$WORKERS" ]; do touch "$WORK/table.$w"; w=$((w + 1)); done
    echo 0 > "$WORK/consumed"
    rm -f "$WORK/done.fifo"
    mkfifo "$WORK/done.fifo" || fail "cannot create $WORK/done.fifo"
    exec 7<> "$WORK/done.fifo"  # read-write: never blocks on open, never sees EOF
    WORKER_PIDS=""
    w=0
    while [ "$w" -lt "$WORKERS" ]; do
        worker "$w" &
        WORKER_PIDS="$WORKER_PIDS $!"
        w=$((w + 1))
    done
    T1=$(now_ms)
    set -o pipefail
    { consume; echo $? > "$WORK/consume.rc"; } | sink
    rc=$?
    set +o pipefail
}

# The squashfs mode's chunk table: the image list (a chunk named by bootd.image, so verified by its hash),
# whose header must name this capsule version and whose lines are the fetch table of the image's chunks.
load_image_list() {
    case "$IMAGE" in *[!0-9a-f]*|"") fail "bootd.root=squashfs needs bootd.image=<sha256>, got '$IMAGE'" ;; esac
    [ ${#IMAGE} -eq 64 ] || fail "bootd.image is not a sha256: $IMAGE"
    L=$WORK/image.list
    fetch_src "chunks/$IMAGE" "$L" || fail "image list could not be fetched: $FETCH_ERR"
    hash_file "$L"
    [ "$GOT" = "$IMAGE" ] || fail "image list failed verification: sha256 $GOT is not bootd.image $IMAGE"
    set -- $(head -n 1 "$L")
    [ "$1" = BDIMAGE1 ] && [ "$2" = squashfs ] || fail "image list has no 'BDIMAGE1 squashfs' header"
    [ "$3" = "$VID" ] || fail "image list is the image of capsule $3, not of bootd.capsule $VID"
    IMAGE_SIZE=$4
    COUNT=$5
    tail -n +2 "$L" | grep -E '^[0-9a-f]{64} [0-9a-f]{8} [0-9a-f]{8}$' > "$WORK/table"
    [ "$(wc -l < "$WORK/table")" -eq "$COUNT" ] || fail "image list chunk table is malformed"
    stored=$(( 0 $(sed -n 's/^[0-9a-f]* \([0-9a-f]*\) .*/+0x\1/p' "$WORK/table" | tr -d '\n') ))
    [ "$stored" -eq "$IMAGE_SIZE" ] || fail "image list chunks add up to $stored bytes, its header says $IMAGE_SIZE"
    say "image list ok image=$IMAGE chunks=$COUNT size=$IMAGE_SIZE"
}

# Where the verified chunks go, in order: zstd | tar into the tmpfs root, or (squashfs) the image file.
sink() {
    if [ "$ROOT_MODE" = squashfs ]; then
        cat > "$RAMDIR/image.squashfs" 2> "$WORK/tar.err"
    else
        "$ZSTD" -dcq | "$TAR" -C "$TARGET" --xattrs --xattrs-include='*' --numeric-owner -xpf - 2> "$WORK/tar.err"
    fi
}

# Only now, with every chunk verified and the image whole (its size checked), is a byte of it mounted.
mount_image_root() {
    img=$RAMDIR/image.squashfs
    have=$(stat -c %s "$img" 2>/dev/null || echo 0)
    [ "$have" -eq "$IMAGE_SIZE" ] || fail "image file has $have bytes, the image list says $IMAGE_SIZE: not mounted"
    chmod 0400 "$img"
    mkdir -p "$RAMDIR/lower" "$RAMDIR/upper" "$RAMDIR/work"
    if [ "$HOST_MODE" = 1 ]; then
        say "image ok size=$IMAGE_SIZE (host mode: not mounted)"
        return 0
    fi
    # Loaded with the NIC drivers when in load-order; a capsule kernel's module set packed before the
    # squashfs mode existed lacks them there, so load whatever of them this stage one has (built in: none).
    for m in loop squashfs overlay; do
        [ -f "/lib/modules/$(uname -r)/$m.ko" ] && insmod "/lib/modules/$(uname -r)/$m.ko" 2>/dev/null
    done
    mount -t squashfs -o ro,loop "$img" "$RAMDIR/lower" 2> "$WORK/mount.err" || \
        fail "cannot mount the squashfs image: $(tr '\n' ' ' < "$WORK/mount.err") (kernel $(uname -r) needs the" \
             "loop and squashfs modules: re-import a capsule with its own kernel imported before bootd had this mode)"
    mount -t overlay overlay -o "lowerdir=$RAMDIR/lower,upperdir=$RAMDIR/upper,workdir=$RAMDIR/work" "$TARGET" \
        2> "$WORK/mount.err" || fail "cannot mount the overlay root: $(tr '\n' ' ' < "$WORK/mount.err")"
    say "root squashfs image=$IMAGE size=$IMAGE_SIZE under overlayfs"
}

main() {
    T0=$(now_ms)
    if [ "$HOST_MODE" != 1 ]; then
        setup_system
    fi
    mkdir -p "$WORK/chunks" || fail "cannot create $WORK"
    rm -f "$WORK"/abort "$WORK"/fail.* "$WORK"/chunks/*
    say "start kernel=$(uname -r) node=$NODE capsule=$VID"
    [ -n "$URL" ] && { { [ -n "$NODE" ] && [ -n "$VID" ]; } || { [ -z "$NODE$VID" ] && [ -n "$MAC" ]; }; } || \
        fail "kernel command line lacks bootd.url, bootd.node or bootd.capsule (or, from a static loader" \
             "config, bootd.url and bootd.mac or BOOTIF)"

    if [ "$HOST_MODE" != 1 ]; then
        bring_up_network
    else
        IFACE=${BOOTD_TEST_IFACE:-}  # host mode: the interface the network hand-over is written for
    fi
    [ -n "$NODE" ] || boot_line_from_bootd
    case "$VID" in *[!0-9a-f]*|"") fail "bootd.capsule is not a sha256 version id: $VID" ;; esac
    [ ${#VID} -eq 64 ] || fail "bootd.capsule is not a sha256 version id: $VID"
    post_event stage1 "" 0 0 3
    report_inventory &

    M=$WORK/manifest
    set_sources
    fetch_src "capsules/$VID/manifest" "$M" || fail "manifest could not be fetched: $FETCH_ERR"
    hash_file "$M"
    [ "$GOT" = "$VID" ] || fail "manifest failed verification: sha256 $GOT is not the version id $VID"
    [ "$(head -c 8 "$M")" = "BDCAPS01" ] || fail "manifest has no BDCAPS01 magic"
    meta_len=$(u32 "$M" 8) || fail "manifest truncated (meta length)"
    count_off=$((12 + meta_len))
    COUNT=$(u32 "$M" "$count_off") || fail "manifest truncated (chunk count)"
    rec_off=$((count_off + 4))
    msize=$(stat -c %s "$M")
    [ "$msize" -eq $((rec_off + 40 * COUNT)) ] || \
        fail "manifest size $msize does not match $COUNT chunk records"
    # One line per chunk: "<sha256 hex> <stored size hex> <raw size hex>".
    od -An -v -tx1 -w40 -j "$rec_off" "$M" | tr -d ' ' | \
        sed -n 's/^\([0-9a-f]\{64\}\)\([0-9a-f]\{8\}\)\([0-9a-f]\{8\}\)$/\1 \2 \3/p' > "$WORK/table"
    [ "$(wc -l < "$WORK/table")" -eq "$COUNT" ] || fail "manifest chunk table is malformed"
    case "$WORKERS" in ""|*[!0-9]*|0) WORKERS=4 ;; esac
    case "$WINDOW" in ""|*[!0-9]*|0) WINDOW=16 ;; esac
    case "$RETRIES" in ""|*[!0-9]*|0) RETRIES=10 ;; esac
    case "$TIMEOUT" in ""|*[!0-9]*|0) TIMEOUT=60 ;; esac
    stored=0
    # One arithmetic expression: busybox `read` takes a syscall per byte, too slow for big tables.
    stored=$(( 0 $(sed -n 's/^[0-9a-f]* \([0-9a-f]*\) .*/+0x\1/p' "$WORK/table" | tr -d '\n') ))
    say "manifest ok chunks=$COUNT stored=$stored"
    case "$ROOT_MODE" in
        tmpfs) ;;
        squashfs) load_image_list ;;
        *) fail "bootd.root=$ROOT_MODE is not a root mode; expected tmpfs or squashfs" ;;
    esac
    post_event fetching "" 0 "$COUNT" 1 0 "$stored"

    # The tmpfs gets half the RAM (the kernel's default) or, for a large tree, what the tree needs plus
    # 10% and 32 MiB; refuse early and clearly when the machine does not have the RAM for it.
    raw=$(head -c $((12 + meta_len)) "$M" | tail -c "$meta_len" | sed -n 's/.*"raw_size":\([0-9]*\).*/\1/p')
    # The squashfs mode's tmpfs holds the image (its size) and the upper: the same rule with the image size.
    if [ "$ROOT_MODE" = squashfs ]; then
        need_kb=$(( IMAGE_SIZE / 1024 + 32768 ))
        what="its squashfs image needs"
        ram=$RAMDIR
    else
        need_kb=$(( ${raw:-0} / 1024 * 11 / 10 + 32768 ))
        what="capsule needs"
        ram=$TARGET
    fi
    if [ "$HOST_MODE" != 1 ]; then
        mem_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
        if [ "$need_kb" -gt $(( mem_kb * 9 / 10 )) ]; then
            fail "$what $((need_kb / 1024)) MiB of RAM; this node has $((mem_kb / 1024)) MiB"
        fi
        size_kb=$(( mem_kb / 2 ))
        [ "$need_kb" -gt "$size_kb" ] && size_kb=$need_kb
        mkdir -p "$TARGET" "$ram"
        mount -t tmpfs -o "mode=0755,size=${size_kb}k" tmpfs "$ram" || fail "cannot mount a tmpfs on $ram"
    else
        mkdir -p "$TARGET" "$ram"
    fi
    [ "$ROOT_MODE" = squashfs ] && rm -f "$RAMDIR/image.squashfs"

    SOURCES=$(sources | tr '\n' ',')
    SOURCES=${SOURCES%,}
    if [ -x "$FETCH" ] && "$FETCH" -c -u "$SOURCES" 2>/dev/null; then
        say "fetch with bootd-fetch workers=$WORKERS window=$WINDOW"
        # One process: WORKERS keep-alive connections, chunks verified and written in order, progress
        # lines and `fetching` events, a reason naming the chunk in fail.fetch on failure.
        T1=$(now_ms)
        set -o pipefail
        { BOOTD_TOKEN=$TOKEN "$FETCH" -u "$SOURCES" -n "$NODE" -w "$WORKERS" -W "$WINDOW" -r "$RETRIES" \
              -t "$TIMEOUT" -f "$WORK/fail.fetch" "$WORK/table"
          echo $? > "$WORK/consume.rc"; } | sink
        rc=$?
        set +o pipefail
    else
        say "fetch with shell workers=$WORKERS window=$WINDOW"
        fetch_with_workers
    fi
    crc=$(cat "$WORK/consume.rc" 2>/dev/null)
    tar_err=$(tr '\n' ' ' < "$WORK/tar.err" | cut -c 1-300)
    if [ "$crc" != 0 ] || [ -e "$WORK/abort" ] || [ "$rc" != 0 ]; then
        touch "$WORK/abort"
        [ "$ROOT_MODE" = squashfs ] && rm -f "$RAMDIR/image.squashfs"  # a partial image is never mounted
        fail "$(first_failure "unpacking failed: ${tar_err:-zstd or tar stopped (exit $rc)}")"
    fi
    for p in $WORKER_PIDS; do wait "$p" || fail "$(first_failure "a fetch worker failed")"; done
    WORKER_PIDS=""
    T2=$(now_ms)
    say "verified $COUNT/$COUNT chunks stored=$stored seconds=$(( (T2 - T1) / 1000 )).$(printf '%03d' $(( (T2 - T1) % 1000 )))"
    post_event verified "" "$COUNT" "$COUNT" 3
    [ "$ROOT_MODE" = squashfs ] && mount_image_root

    write_node_config
    install_node_agent
    hand_over_network
    apply_overlays
    if [ "$HOST_MODE" = 1 ]; then
        say "booted (host mode: no switch_root) total_ms=$(( $(now_ms) - T0 ))"
        post_event booted "" "$COUNT" "$COUNT" 3
        exit 0
    fi
    [ -x "$TARGET/sbin/init" ] || [ -L "$TARGET/sbin/init" ] || fail "capsule has no /sbin/init"
    post_event booted "" "$COUNT" "$COUNT" 3
    say "booted switch_root /sbin/init after $(( ($(now_ms) - T0) / 1000 ))s"
    exec 7>&-
    rm -rf "$WORK"  # before /run moves into the capsule: it holds a copy of the node's token
    for d in dev proc sys run; do
        if [ -d "$TARGET/$d" ]; then mount --move "/$d" "$TARGET/$d" 2>/dev/null; else umount -l "/$d" 2>/dev/null; fi
    done
    if [ "$ROOT_MODE" = squashfs ]; then  # the node agent measures the image RAM there (image + upper)
        mkdir -p "$TARGET/run/bootd-root" && mount --move "$RAMDIR" "$TARGET/run/bootd-root" || \
            say "note: the image tmpfs stays at $RAMDIR in the stage one (not visible to the node agent)"
    fi
    exec switch_root "$TARGET" /sbin/init
    fail "switch_root failed"
}

main "$@"
fail "the agent ended without switching root"
