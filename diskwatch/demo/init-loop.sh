#!/bin/sh
# /sbin/init of the "loop" demo guest (busybox sh): a guest that keeps
# running, for `diskwatch attach` to find already at work.
#
# Every second it reads a few named files (dropping the page cache first, so
# the reads reach the disk), writes a record into /var/log/demo.log in place
# (dd conv=notrunc: no new blocks, the block map stays true), syncs, and
# prints a counter on its console. Lines on the console steer it:
#   burst  start a writer that rewrites the log's first 4 KiB again and again
#          (O_DIRECT, numbered) and reads each write back: a write lost or
#          overwritten by stale data under it prints "MISMATCH"
#   create make a new file, /var/log/created-N.log (N the tick), and sync:
#          what a map made before it does not name
#   stop   end the loop: the root filesystem is remounted read-only and the
#          guest powers off, so the image is clean for e2fsck afterwards.
#
# build_guest_image() installs it as /sbin/init-loop beside the one-shot
# /sbin/init (boot with init=/sbin/init-loop) and replaces @READ_FILES@.
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

[ -e /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
mount -o remount,rw /
echo "diskwatch-demo: init running"

write_record() { # file slot text
    printf '%-63s\n' "$3" | dd of="$1" bs=64 seek=$(($2 * 64)) conv=notrunc 2> /dev/null
}

burst() {
    # SIGTERM ends it between two writes (the shell runs the trap once the
    # running dd is done): no writer left when / goes read-only.
    trap 'exit 0' TERM
    i=0
    while :; do
        i=$((i + 1))
        printf '%-4095s\n' "burst $i" \
            | dd of=/var/log/demo.log bs=4096 count=1 iflag=fullblock oflag=direct conv=notrunc 2> /dev/null
        got=$(dd if=/var/log/demo.log bs=4096 count=1 iflag=direct 2> /dev/null | head -c 24)
        case "$got" in
            "burst $i "*) ;;
            *) echo "diskwatch-loop: MISMATCH wrote burst $i, read back: $(echo $got)" ;;
        esac
    done
}

# A data disk, when the VM has one (an ext4 partition on its second or
# third disk: the first partition that mounts): each tick its files are
# read and a record written into /data/f3 in place, as on the root disk.
data=
for dev in /dev/vdb1 /dev/vdc1; do
    if [ -b "$dev" ] && mkdir -p /mnt/data && mount -t ext4 "$dev" /mnt/data 2> /dev/null; then
        data=/mnt/data
        echo "diskwatch-loop: data disk $dev"
        break
    fi
done

writer=
n=0
while :; do
    n=$((n + 1))
    echo 3 > /proc/sys/vm/drop_caches
    for f in @READ_FILES@; do
        cat "$f" > /dev/null
    done
    write_record /var/log/demo.log $((n % 15 + 1)) "loop $n uptime $(cut -d' ' -f1 /proc/uptime)"
    if [ -n "$data" ]; then
        for f in "$data"/data/*; do
            cat "$f" > /dev/null
        done
        write_record "$data/data/f3" $((n % 15 + 1)) "loop $n on the data disk"
    fi
    sync
    echo "diskwatch-loop: tick $n"
    # The one-second pause is a read of the console: "stop" ends the loop.
    if read -t 1 line; then
        case "$line" in
            *stop*) break ;;
            *create*)
                printf 'made at tick %s\n' "$n" > "/var/log/created-$n.log"
                sync
                echo "diskwatch-loop: created /var/log/created-$n.log" ;;
            *burst*)
                if [ -z "$writer" ]; then
                    burst &
                    writer=$!
                    echo "diskwatch-loop: burst writer started"
                fi ;;
        esac
    fi
done

if [ -n "$writer" ]; then
    kill "$writer"
    wait "$writer" 2> /dev/null
fi
sync
[ -n "$data" ] && umount /mnt/data
mount -o remount,ro /
echo "diskwatch-loop: stopped"
poweroff -f
