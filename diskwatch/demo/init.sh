#!/bin/sh
# /sbin/init of the diskwatch demo guest (busybox sh).
#
# It does a little disk I/O that a person can recognise in diskwatch's trace:
# reads a few named files, then writes records into log files that already
# exist at full size in the image. The writes go *inside* the existing files
# (dd conv=notrunc), never past their end, so they land on blocks the block
# map made before boot already names; appending would allocate new blocks
# that no map knows. `sync` after each write pushes it to the disk.
#
# build_guest_image() replaces the @...@ placeholders.
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
CHURN_ITERATIONS=@CHURN_ITERATIONS@
WRITES=@WRITES@

# Debian's initramfs moves its /proc and /sys here; mount them if it did not.
[ -e /proc/mounts ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
mount -o remount,rw /
echo "diskwatch-demo: init running"

cat /etc/motd
for f in @READ_FILES@; do
    cat "$f" > /dev/null
    echo "diskwatch-demo: read $f"
done

# One 64-byte record every 4 KiB: each write touches its own block.
write_record() { # file slot text
    printf '%-63s\n' "$3" | dd of="$1" bs=64 seek=$(($2 * 64)) conv=notrunc 2> /dev/null
}

i=1
while [ "$i" -le "$WRITES" ]; do
    write_record /var/log/demo.log "$i" "boot write $i uptime $(cut -d' ' -f1 /proc/uptime)"
    sync
    echo "diskwatch-demo: wrote /var/log/demo.log record $i"
    i=$((i + 1))
done

# Churn, like the antivirus in the 2014 bmaplogger trace: rewrite a few logs
# and re-read a large file again and again. O_DIRECT reads (and dropping the
# page cache) make every pass reach the disk instead of the guest's cache.
# A log that does not exist when the block map is made (before boot):
# created now, 2,000,000 bytes (more than the 1 MiB of writes outside any
# named file that start diskwatch's automatic remap), then appended to every
# other pass, within its last block. Only a live remap names it.
if [ "$CHURN_ITERATIONS" -gt 0 ]; then
    yes "update check at boot" | head -c 2000000 > @CREATED_LOG@
    sync
    echo "diskwatch-demo: created @CREATED_LOG@"
fi

# A scan, as an antivirus's: every file of a tree read, directory by
# directory, a record written to its log after each directory (in place,
# as the churn passes write theirs: the log keeps its size).
if [ -d @SCAN_ROOT@ ]; then
    echo 3 > /proc/sys/vm/drop_caches
    for d in @SCAN_ROOT@/*; do
        for f in "$d"/*; do
            cat "$f" > /dev/null
        done
        write_record /var/log/av/scan.log 15 "scanned $d"
        sync
    done
    sync
    echo "diskwatch-demo: scanned @SCAN_ROOT@"
fi

# A temporary file, as an antivirus's scratch file: made, kept a few
# seconds (a live remap, started by its directory's and inode's writes,
# sees it), deleted (the next remap sees it gone). Listed with its life.
if [ "$CHURN_ITERATIONS" -gt 0 ]; then
    yes "quarantine scratch" | head -c 65536 > @TEMP_FILE@
    sync
    sleep 3
    rm -f @TEMP_FILE@
    sync
    echo "diskwatch-demo: made and deleted @TEMP_FILE@"
fi

i=1
while [ "$i" -le "$CHURN_ITERATIONS" ]; do
    for log in @CHURN_LOGS@; do
        write_record "$log" $((i % 16)) "scan pass $i uptime $(cut -d' ' -f1 /proc/uptime)"
    done
    sync
    echo 3 > /proc/sys/vm/drop_caches
    dd if=@CHURN_BIG@ of=/dev/null bs=65536 iflag=direct 2> /dev/null \
        || cat @CHURN_BIG@ > /dev/null
    if [ $((i % 2)) -eq 0 ]; then
        echo "update pass $i" >> @CREATED_LOG@
        sync
    fi
    echo "diskwatch-demo: churn pass $i"
    i=$((i + 1))
done

# A data disk, when the VM has one (diskwatch A B: /dev/vdb here, /dev/sdb
# in the map): its files read, one of them written in place.
if [ -b /dev/vdb1 ]; then
    mkdir -p /mnt/data
    if mount -t ext4 /dev/vdb1 /mnt/data; then
        echo 3 > /proc/sys/vm/drop_caches
        for f in /mnt/data/data/*; do
            cat "$f" > /dev/null
        done
        write_record /mnt/data/data/f3 1 "written by the guest at boot"
        # A file the map made before boot does not know (more than the
        # 1 MiB of unnamed writes that start a remap): named on this disk
        # by its own live remap; the guest goes on a moment, as a real one.
        yes "data disk log" | head -c 2000000 > /mnt/data/new.log
        sync
        sleep 2
        umount /mnt/data
        echo "diskwatch-demo: data disk read and written"
    fi
fi

sync
echo "@MARKER@"
mount -o remount,ro / 2> /dev/null
poweroff -f
