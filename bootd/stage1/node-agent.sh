#!/bin/sh
# bootd node agent: runs on the booted node, after the stage one's switch_root.
#
# The stage one copies it (with bootd-fetch) into the capsule's /usr/lib/bootd/ and, when the capsule runs
# systemd, writes and enables bootd-agent.service; the busybox capsule's init starts it directly. So an
# image needs nothing from bootd. POSIX sh only (dash, bash or busybox sh): no Python on a node.
#
# What it does:
#   * under systemd, waits for start-up to finish (`systemctl is-system-running --wait`) and reports
#     `ready` when the answer is `running`, or `ready` with reason "degraded: <failed units>";
#     until then it reports `booted` ("systemd: starting") at each heartbeat interval, so a slow start-up
#     is not mistaken for a silent node; without systemd it reports `ready` at once;
#   * then heartbeats every BOOTD_HEARTBEAT seconds (default 30), and reports `ready` again whenever
#     systemd's verdict (running, or the set of failed units) changes (asked at most every 10 s);
#   * every report carries memory in use and the root filesystem's size and use (optional JSON fields:
#     mem_used_kb, mem_total_kb, root_used_kb, root_size_kb) and the image RAM, image_ram_kb: what the root
#     image holds in RAM (the root tmpfs's use; in the squashfs root mode the image plus the overlay upper);
#   * keeps the node's runtime overlays (hosts, authorized_keys, users...) current: at start and then every
#     BOOTD_OVERLAY_INTERVAL seconds (default 60, 0: never; a node or group variable, read at boot) it runs
#     the overlay applier (overlay.sh, installed as /usr/lib/bootd/overlay), which asks bootd with
#     If-None-Match (unchanged: one 304) and applies a changed overlay file by file, atomically, then the
#     hooks in /usr/lib/bootd/apply.d. In a process of its own, so a slow apply never delays a heartbeat;
#     a failure is logged and tried again at the next interval, never fatal.
# Where bootd is and who this node is: /etc/bootd/node.env (written by the stage one), else the kernel
# command line (bootd.url=, bootd.node=, bootd.token=, bootd.sources=), as the stage one found them.
# Several servers: every report goes to the current server (at first the one that took the stage one's
# last event); when it does not take one, the next source of the stage one's ordered list (BOOTD_SOURCES,
# else bootd.sources=: the other live servers the iPXE script named) is tried, and the agent stays on the
# first that takes it. Any server of the cluster accepts the node's credential (the store keeps it), so a
# node whose server died keeps reporting and is not marked stale.
# Console lines start with "BOOTD-AGENT "; "BOOTD-READY <name>" follows the first accepted `ready`.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
LIB=${BOOTD_AGENT_LIB:-/usr/lib/bootd}
STATE_DIR=${BOOTD_AGENT_STATE:-/run/bootd}
ROOT_RAM=${BOOTD_ROOT_RAM:-/run/bootd-root}

say() { echo "BOOTD-AGENT $*"; }

for word in $(cat /proc/cmdline 2>/dev/null); do
    case $word in
        bootd.url=*) BOOTD_URL=${word#bootd.url=} ;;
        bootd.node=*) BOOTD_NODE=${word#bootd.node=} ;;
        bootd.token=*) BOOTD_TOKEN=${word#bootd.token=} ;;
        bootd.sources=*) BOOTD_SOURCES=${word#bootd.sources=} ;;
    esac
done
NODE_ENV=${BOOTD_NODE_ENV:-/etc/bootd/node.env}  # another file only for tests on a build host
if [ -r "$NODE_ENV" ]; then
    # Shell assignments with quoted values (the stage one wrote them so): sourcing runs nothing.
    . "$NODE_ENV"
fi
BEAT=${BOOTD_HEARTBEAT:-30}
case $BEAT in ""|*[!0-9]*|0) BEAT=30 ;; esac
OVERLAY_INTERVAL=${BOOTD_OVERLAY_INTERVAL:-60}
OVERLAY_ROOT=${BOOTD_OVERLAY_ROOT:-/}  # another root only for tests on a build host
case $OVERLAY_INTERVAL in ""|*[!0-9]*) OVERLAY_INTERVAL=60 ;; esac
ROUTE_WAIT=${BOOTD_ROUTE_WAIT:-30}  # seconds: see wait_for_route
case $ROUTE_WAIT in ""|*[!0-9]*) ROUTE_WAIT=30 ;; esac
if [ -z "${BOOTD_URL:-}" ] || [ -z "${BOOTD_NODE:-}" ]; then
    say "no bootd.url/bootd.node (neither /etc/bootd/node.env nor the kernel command line): nothing to report to"
    exit 0  # not a failure to restart: this node was not booted by bootd
fi
export BOOTD_URL BOOTD_NODE BOOTD_TOKEN  # for the overlay applier; node.env's assignments are not exported
SOURCES=${BOOTD_SOURCES:-}

json_str() { printf '%s' "$1" | tr -d '"\\' | tr -d '\000-\037'; }

usage_fields() { # two processes per report: the agent's own cost is what a heartbeat adds to a node
    mem=$(awk '/^MemTotal:/ { t = $2 } /^MemAvailable:/ { a = $2 } END { printf "%d %d", t - a, t }' /proc/meminfo)
    # df -P -k: "Filesystem 1024-blocks Used Available Capacity Mounted-on"; a tmpfs root counts here.
    # Image RAM, what the root image costs in RAM: the root tmpfs's use (tmpfs root mode), or the use of
    # the squashfs mode's tmpfs (the stage one moved it to $ROOT_RAM): the image file plus the overlay's upper.
    set -- ${mem:-0 0} $(df -P -k / "$ROOT_RAM" 2>/dev/null | awk -v ram="$ROOT_RAM" '
        NR == 2 { fs = $1; size = $2; used = $3 }
        NR == 3 && $6 == ram { image = $3 }
        END { if (image == "") image = (fs == "tmpfs") ? used : 0; print size + 0, used + 0, image + 0 }')
    printf '"mem_used_kb":%s,"mem_total_kb":%s,"root_size_kb":%s,"root_used_kb":%s,"image_ram_kb":%s' \
        "$1" "$2" "${3:-0}" "${4:-0}" "${5:-0}"
}

post_to() { # BASE WHAT JSON -> status 0 on a 2xx answer
    if [ -x "$LIB/bootd-fetch" ]; then
        printf '%s' "$3" | "$LIB/bootd-fetch" -p "$2" -u "$1" -n "$BOOTD_NODE" -t 10 2>"$STATE_DIR/post.err"
    elif command -v wget >/dev/null 2>&1; then
        timeout 10 wget -q -O /dev/null --header "X-Bootd-Token: ${BOOTD_TOKEN:-}" \
            --header "Content-Type: application/json" --post-data "$3" \
            "$1/api/v1/nodes/$BOOTD_NODE/$2" 2>"$STATE_DIR/post.err"
    elif command -v curl >/dev/null 2>&1; then
        curl -fsS -m 10 -o /dev/null -H "X-Bootd-Token: ${BOOTD_TOKEN:-}" -H "Content-Type: application/json" \
            --data-binary "$3" "$1/api/v1/nodes/$BOOTD_NODE/$2" 2>"$STATE_DIR/post.err"
    else
        echo "no HTTP client: neither $LIB/bootd-fetch nor wget nor curl" > "$STATE_DIR/post.err"
        return 1
    fi
}

# The sources other than the current server, in the stage one's order (post tries the current one first).
others() { for s in $(echo "$SOURCES" | tr ',' ' '); do [ "$s" = "$BOOTD_URL" ] || echo "$s"; done; }

post() { # WHAT JSON -> status 0 once a server took it; BOOTD_URL is then that server (the agent stays there)
    post_to "$BOOTD_URL" "$1" "$2" && return 0
    cp "$STATE_DIR/post.err" "$STATE_DIR/post.first" 2>/dev/null
    for base in $(others); do
        if post_to "$base" "$1" "$2"; then
            say "note: $BOOTD_URL did not take the $1 ($(tr '\n' ' ' < "$STATE_DIR/post.first" 2>/dev/null)): now reporting to $base"
            BOOTD_URL=$base
            echo "$BOOTD_URL" > "$STATE_DIR/url.tmp" && mv -f "$STATE_DIR/url.tmp" "$STATE_DIR/url"  # the overlay loop follows
            return 0
        fi
    done
    cp "$STATE_DIR/post.first" "$STATE_DIR/post.err" 2>/dev/null  # the current server's reason, not the last one's
    return 1
}

event() { # STATE REASON
    post events "{\"event\":\"$1\",\"reason\":\"$(json_str "$2")\",$(usage_fields)}"
}

# systemd's verdict as "running", "degraded: a.service b.service", or "starting: <state>".
verdict() {
    if [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then
        echo running
        return
    fi
    st=$(systemctl is-system-running 2>/dev/null)
    case $st in
        running) echo running ;;
        degraded)
            failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | \
                     awk '{ printf "%s ", $1 }')
            failed=${failed% }
            echo "degraded: ${failed:-unknown units}" ;;
        *) echo "starting: ${st:-unknown}" ;;
    esac
}

# Console lines: every change applied, the first "unchanged" after it (what a refresh costs), and a failure
# once, then every 10th time it repeats (an outage of bootd must not flood the console).
overlay_loop() {
    said="" n=0
    while kill -0 "$$" 2>/dev/null; do  # $$ is the agent's own pid here too: stop when the agent is gone
        [ -s "$STATE_DIR/url" ] && BOOTD_URL=$(cat "$STATE_DIR/url")  # the server the reports went to last
        out=$(BOOTD_FETCH="$LIB/bootd-fetch" BOOTD_OVERLAY_WORK="$STATE_DIR" "$LIB/overlay" runtime "$OVERLAY_ROOT" \
              2> "$STATE_DIR/overlay.err")
        case $? in
            0) say "overlay runtime $out"; said="" n=0 ;;
            4) [ -z "$said" ] && say "overlay runtime $out"; said=1 n=0 ;;
            *) n=$((n + 1))
               [ $((n % 10)) = 1 ] && say "note: overlay runtime not applied (retry in ${OVERLAY_INTERVAL}s): $(tr '\n' ' ' < "$STATE_DIR/overlay.err")" ;;
        esac
        sleep "$OVERLAY_INTERVAL" > /dev/null 2>&1  # not holding the agent's stdout once the agent is gone
    done
}

# Right after switch_root the capsule's own DHCP client (systemd-networkd, ifupdown) may be taking the boot NIC
# over, and for a moment there is no route to bootd: the first report and the first overlay refresh then failed
# with "Network is unreachable" (seen in CI). Wait for a route first, quietly, up to BOOTD_ROUTE_WAIT seconds
# (default 30); past that, go on (the reports and refreshes retry, and say why).
wait_for_route() {
    command -v ip >/dev/null 2>&1 || return 0
    host=${BOOTD_URL#*://}
    host=${host%%/*}
    case $host in \[*) host=${host#[}; host=${host%%]*} ;; *) host=${host%:*} ;; esac
    case $host in *:*) ;; *[!0-9.]*) return 0 ;; esac  # a name: ip cannot look its route up
    i=0
    while [ "$i" -lt "$ROUTE_WAIT" ]; do
        ip route get "$host" >/dev/null 2>&1 && return 0
        i=$((i + 1))
        sleep 1
    done
    say "note: no route to $host after ${ROUTE_WAIT}s; reporting anyway"
}

mkdir -p "$STATE_DIR"
rm -f "$STATE_DIR/url"
say "start node=$BOOTD_NODE bootd=$BOOTD_URL${SOURCES:+ sources=$SOURCES} heartbeat=${BEAT}s overlay=${OVERLAY_INTERVAL}s"
wait_for_route
if [ "$OVERLAY_INTERVAL" -gt 0 ] && [ -x "$LIB/overlay" ]; then
    overlay_loop &
    OVERLAY_PID=$!
    trap 'kill "$OVERLAY_PID" 2>/dev/null; exit 0' TERM INT
elif [ "$OVERLAY_INTERVAL" -gt 0 ]; then
    say "note: no $LIB/overlay: runtime overlays are not refreshed on this node"
fi

# Wait for start-up, telling bootd the node is alive meanwhile: at most every 10 s, since each round
# starts systemctl, which costs a slow machine (QEMU TCG) CPU that start-up itself needs.
WAIT=$BEAT
[ "$WAIT" -lt 10 ] && WAIT=10
while :; do
    v=$(verdict)
    case $v in starting:*) ;; *) break ;; esac
    event booted "systemd: ${v#starting: }" || say "note: could not report to $BOOTD_URL: $(cat "$STATE_DIR/post.err" 2>/dev/null)"
    if command -v timeout >/dev/null 2>&1; then
        timeout "$WAIT" systemctl is-system-running --wait >/dev/null 2>&1
    else
        sleep "$WAIT"
    fi
done

reported=""
announced=0
n=0
since=$WAIT  # seconds since systemd was last asked: at most every WAIT (10 s) once ready, as above
while :; do
    if [ -z "$reported" ] || [ "$since" -ge "$WAIT" ]; then
        v=$(verdict)
        since=0
    else
        v=$reported
    fi
    case $v in starting:*) v=$reported ;; esac  # e.g. a unit restarting: keep the last verdict
    if [ "$v" != "$reported" ]; then
        reason=""
        [ "$v" = running ] || reason=$v
        if event ready "$reason"; then
            reported=$v
            echo "$v" > "$STATE_DIR/verdict"
            addrs=$(ip -4 -o addr show scope global 2>/dev/null | awk '{ sub("/.*", "", $4); printf "%s,", $4 }')
            say "ready node=$BOOTD_NODE hostname=$(hostname 2>/dev/null) ip=${addrs%,} ${reason:-running}"
            if [ "$announced" = 0 ]; then
                echo "BOOTD-READY $BOOTD_NODE"
                touch "$STATE_DIR/ready"
                announced=1
            fi
            n=0
        else
            say "note: ready not accepted by $BOOTD_URL: $(cat "$STATE_DIR/post.err" 2>/dev/null)"
            [ -z "$reported" ] && { sleep 2; continue; }  # the first ready is worth a quick retry
        fi
    elif ! post heartbeat "{$(usage_fields)}"; then
        n=$((n + 1))
        # Said once, then every 10th failure: a long outage must not flood the console.
        [ $((n % 10)) = 1 ] && say "note: heartbeat to $BOOTD_URL failed: $(cat "$STATE_DIR/post.err" 2>/dev/null)"
    else
        n=0
    fi
    sleep "$BEAT"
    since=$((since + BEAT))
done
