#!/bin/busybox sh
# Init of the balloond kit's test guest. Loads the balloon driver, then serves a command loop
# on the serial console: each input line is "<id> <shell command>"; the command's output is
# followed by a line "@@done <id> rc=<exit status>". The host waits for that line.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty -echo

# Kernel messages would interleave with command output: keep them off the console.
dmesg -n 1

modules_rc=0
for module in $(cat /etc/kit/modules); do
    insmod "/lib/modules/kit/$module" || modules_rc=$?
done
echo "@@modules rc=$modules_rc"
echo "@@kernel $(uname -r) cmdline=$(cat /proc/cmdline)"
echo "@@ready"

while IFS= read -r line; do
    id=${line%% *}
    command=${line#* }
    eval "$command"
    echo "@@done $id rc=$?"
done
echo "@@console-closed"
poweroff -f
