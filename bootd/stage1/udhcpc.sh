#!/bin/sh
# udhcpc hook for the stage one: configure the address and default route (bootd.url carries an IP
# address, so the stage one itself needs no DNS), and keep what the DHCP reply said in $BOOTD_LEASE
# (default /run/bootd/lease) for the hand-over to the capsule: its resolv.conf and DHCP client config.
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
        {
            echo "LEASE_IP=$ip"
            echo "LEASE_MASK=${mask:-24}"
            echo "LEASE_ROUTER='$(echo $router | tr -cd '0-9. ')'"
            echo "LEASE_DNS='$(echo $dns | tr -cd '0-9. ')'"
            echo "LEASE_DOMAIN='$(echo $domain | tr -cd 'A-Za-z0-9.-')'"
            echo "LEASE_TIME=$(echo $lease | tr -cd '0-9')"
        } > "${BOOTD_LEASE:-/run/bootd/lease}"
        ;;
esac
exit 0
