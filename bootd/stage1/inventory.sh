#!/bin/sh
# bootd commissioning: print what this machine is as one JSON object (busybox sh, no jq).
# The stage one POSTs it to bootd (/api/v1/nodes/NODE/inventory) once per boot; bootd keeps a bounded
# copy per node (bootd/service/inventory.py) for `bootd node show`, the API, the status page and
# `bootd node rename --map`. SYS (default /sys) and PROC (default /proc) let the host tests point it
# at a fake tree.
SYS=${BOOTD_SYS:-/sys}
PROC=${BOOTD_PROC:-/proc}

esc() { # JSON string body: drop control characters, escape \ and "
    printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g'
}
val() { [ -r "$1" ] && head -c 200 "$1" 2>/dev/null | head -n 1; }
str() { printf '"%s"' "$(esc "$1")"; }
num() { case "$1" in ''|*[!0-9]*) printf 'null' ;; *) printf '%s' "$1" ;; esac; }

d=$SYS/class/dmi/id
printf '{"dmi":{"vendor":%s,"product":%s,"serial":%s,"asset_tag":%s,"board":%s,"bios":%s},' \
    "$(str "$(val $d/sys_vendor)")" "$(str "$(val $d/product_name)")" "$(str "$(val $d/product_serial)")" \
    "$(str "$(val $d/chassis_asset_tag)")" "$(str "$(val $d/board_name)")" "$(str "$(val $d/bios_version)")"
cpus=$(grep -c '^processor' "$PROC/cpuinfo" 2>/dev/null)
model=$(sed -n 's/^model name[[:space:]]*: //p' "$PROC/cpuinfo" 2>/dev/null | head -n 1)
mem=$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\) kB/\1/p' "$PROC/meminfo" 2>/dev/null)
printf '"cpus":%s,"cpu_model":%s,"memory_kb":%s,"kernel":%s,' "$(num "$cpus")" "$(str "$model")" \
    "$(num "$mem")" "$(str "$(uname -r)")"

printf '"nics":['
sep=
for n in "$SYS"/class/net/*; do
    name=${n##*/}
    [ "$name" = lo ] && continue
    [ -e "$n/device" ] || continue  # physical (or virtio) NICs only: no bridges, tunnels, veths
    driver=$(readlink "$n/device/driver" 2>/dev/null); driver=${driver##*/}
    speed=$(val "$n/speed" 2>/dev/null)
    printf '%s{"name":%s,"mac":%s,"link":%s,"speed_mbps":%s,"driver":%s}' "$sep" "$(str "$name")" \
        "$(str "$(val "$n/address")")" "$(str "$(val "$n/operstate")")" "$(num "$speed")" "$(str "$driver")"
    sep=,
done
printf '],"disks":['
sep=
for b in "$SYS"/block/*; do
    name=${b##*/}
    case "$name" in loop*|ram*|zram*|dm-*|sr*) continue ;; esac
    sectors=$(val "$b/size")
    case "$sectors" in ''|*[!0-9]*) continue ;; esac
    printf '%s{"name":%s,"size_bytes":%s,"model":%s,"rotational":%s}' "$sep" "$(str "$name")" \
        "$((sectors * 512))" "$(str "$(val "$b/device/model")")" "$(str "$(val "$b/queue/rotational")")"
    sep=,
done
printf ']}\n'
