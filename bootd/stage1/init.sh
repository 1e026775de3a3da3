#!/bin/sh
# /init of the bootd stage one. The agent reads /proc/cmdline as it starts, so the pseudo filesystems
# come first; it must then stay PID 1 (switch_root refuses otherwise), hence exec.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec /bin/sh /bootd/agent.sh
