#!/bin/sh
# udhcpc hook for the stage one: configure the address and default route, nothing else (no DNS needed,
# bootd.url carries an IP address).
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface" 2>/dev/null
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface" 2>/dev/null
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            for r in $router; do ip route add default via "$r" dev "$interface" 2>/dev/null && break; done
        fi
        ;;
esac
exit 0
