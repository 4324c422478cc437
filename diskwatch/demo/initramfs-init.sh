#!/bin/busybox sh
# /init of the minimal initramfs (build_guest_image(initrd="minimal")).
# Debian's own initrd (36 MB, udev, every storage driver) is most of the demo
# guest's boot time under TCG; this one loads the few modules a virtio disk
# with ext4 needs, mounts root= and hands over to its /sbin/init (or init=).
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
# Dependencies come first in modules.order; a second pass catches any that did not.
for pass in 1 2; do
    for m in $($B cat /modules.order); do
        $B insmod "/lib/modules/$m" 2> /dev/null
    done
done
root=/dev/vda1
init=/sbin/init
for word in $($B cat /proc/cmdline); do
    case "$word" in
        root=*) root="${word#root=}" ;;
        init=*) init="${word#init=}" ;;
    esac
done
i=0
while [ ! -b "$root" ] && [ "$i" -lt 200 ]; do
    $B usleep 50000
    i=$((i + 1))
done
if ! $B mount -t ext4 -o rw "$root" /root; then
    echo "diskwatch initramfs: cannot mount $root"
    $B poweroff -f
fi
$B mount --move /dev /root/dev
$B mount --move /sys /root/sys
$B mount --move /proc /root/proc
exec $B switch_root /root "$init"
