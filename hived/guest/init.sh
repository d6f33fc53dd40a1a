#!/bin/sh
# hived cell initramfs /init (busybox sh, PID 1).
#
# Loads the virtio modules listed in /lib/modules/order (dependency order,
# written by `hived image build`; the network's only with hived.ip=), brings up
# eth0 if asked to, mounts the read-only root image on /newroot, the per-cell
# scratch disk on /newroot/work, cgroup2 on /sys/fs/cgroup, tmpfs on /tmp /run /var/tmp, and hands over to
# the agent (or, in bare mode, reports and reboots).
#
# Kernel command line (all optional):
#   hived.mode=agent|bare|template
#                           agent (default): switch_root to the Python agent;
#                           bare: print "hived-bare-ready" on ttyS0 and reboot
#                           (the boot-time baseline for benchmarks);
#                           template: like agent, but nothing per cell: no network
#                           configured (a clone restored from this VM's snapshot
#                           does it itself); the empty scratch disk is mounted and
#                           frozen at the snapshot point, each clone thaws its copy
#   hived.nic=1             load the network modules even without hived.ip (template
#                           of cells that have a NIC)
#   hived.root=DEV          root image device (default /dev/vda)
#   hived.work=DEV          scratch disk (default /dev/vdb; skipped if absent)
#   hived.debug=1           print the stage times on the console
#   hived.ip=ADDR/PREFIX    configure eth0 (the virtio-net device) with this address,
#   hived.gw=GW             a default route via GW, and optionally
#   hived.mtu=N             this MTU; without hived.ip the cell has no network
#
# Every failure prints one line "hived-init-error: <what failed>" and reboots;
# the cell runs with reboot=t panic=-1 and QEMU -no-reboot, so QEMU exits.
# Stage times (guest uptime in seconds) reach the agent as HIVED_T_* variables.

export PATH=/bin

uptime_s() {
    read -r t _ < /proc/uptime
    echo "$t"
}

die() {
    echo "hived-init-error: $*" > /dev/console
    sync
    reboot -f
    echo b > /proc/sysrq-trigger
    sleep 5
    exit 1  # PID 1 exiting panics the kernel; panic=-1 reboots at once
}

mount -t proc -o nosuid,nodev,noexec proc /proc || die "mount /proc"
T_INIT=$(uptime_s)
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die "mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || die "mount /dev"
# crun puts each build in a cgroup of its own: the unified hierarchy, moved with /sys.
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || die "mount cgroup2 on /sys/fs/cgroup"

mode=agent
root=/dev/vda
work=/dev/vdb
debug=0
net_ip=
net_gw=
net_mtu=
nic=0
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        hived.mode=*) mode=${arg#hived.mode=} ;;
        hived.root=*) root=${arg#hived.root=} ;;
        hived.work=*) work=${arg#hived.work=} ;;
        hived.debug=*) debug=${arg#hived.debug=} ;;
        hived.ip=*) net_ip=${arg#hived.ip=} ;;
        hived.gw=*) net_gw=${arg#hived.gw=} ;;
        hived.mtu=*) net_mtu=${arg#hived.mtu=} ;;
        hived.nic=*) nic=${arg#hived.nic=} ;;
    esac
done
case "$mode" in
    agent|bare|template) ;;
    *) die "unknown hived.mode=$mode (expected agent, bare or template)" ;;
esac

# Modules, in dependency order (one name per line); those in /lib/modules/net
# (virtio_net and what only it needs) only when the cell has a network.
[ -r /lib/modules/order ] || die "module list /lib/modules/order missing"
net_only=" "
if [ -z "$net_ip" ] && [ "$nic" != 1 ] && [ -r /lib/modules/net ]; then
    while read -r m; do
        net_only="$net_only$m "
    done < /lib/modules/net
fi
while read -r m; do
    [ -n "$m" ] || continue
    case "$net_only" in
        *" $m "*) continue ;;
    esac
    [ -f "/lib/modules/$m.ko" ] || die "module $m missing from the initramfs"
    insmod "/lib/modules/$m.ko" || die "insmod $m"
done < /lib/modules/order
T_MODULES=$(uptime_s)

# Network (only with hived.ip): virtio-net probes inside insmod, so eth0 is there
# already; the host end (tap0 in the cell's namespace) holds the gateway address.
T_NET=
if [ -n "$net_ip" ]; then
    case "$net_ip" in
        */*) ;;
        *) die "hived.ip=$net_ip needs a prefix length (ADDR/PREFIX)" ;;
    esac
    [ -n "$net_gw" ] || die "hived.ip=$net_ip given without hived.gw"
    [ -e /sys/class/net/eth0 ] || die "hived.ip given but no eth0 (is a virtio-net device attached?)"
    ip link set lo up || die "ip link set lo up"
    if [ -n "$net_mtu" ]; then
        ip link set eth0 mtu "$net_mtu" || die "ip link set eth0 mtu $net_mtu"
    fi
    ip addr add "$net_ip" dev eth0 || die "ip addr add $net_ip dev eth0"
    ip link set eth0 up || die "ip link set eth0 up"
    ip route add default via "$net_gw" dev eth0 || die "ip route add default via $net_gw"
    T_NET=$(uptime_s)
fi

# virtio-blk probes synchronously inside insmod, so the disk is normally
# there already; allow up to ~5 s anyway.
i=0
while [ ! -b "$root" ]; do
    [ $i -lt 500 ] || die "root device $root did not appear within 5 s"
    usleep 10000
    i=$((i + 1))
done

mount -t ext4 -o ro,nodev "$root" /newroot || die "mount $root (ext4, read-only) on /newroot"
# A template mounts its (empty) scratch disk too: the agent freezes it at the snapshot
# point and every clone gets a copy of the disk file, so a clone only thaws it.
if [ -b "$work" ]; then
    mount -t ext4 -o rw,nodev,nosuid,noatime "$work" /newroot/work \
        || die "mount $work (ext4) on /newroot/work"
fi
mount -t tmpfs -o nodev,nosuid,mode=1777 tmpfs /newroot/tmp || die "mount tmpfs /newroot/tmp"
mount -t tmpfs -o nodev,nosuid,mode=0755 tmpfs /newroot/run || die "mount tmpfs /newroot/run"
mount -t tmpfs -o nodev,nosuid,mode=1777 tmpfs /newroot/var/tmp \
    || die "mount tmpfs /newroot/var/tmp"
T_ROOT=$(uptime_s)

if [ "$debug" = 1 ]; then
    echo "hived-init: init $T_INIT modules $T_MODULES net ${T_NET:-none} root $T_ROOT mode $mode" \
        > /dev/console
fi

if [ "$mode" = bare ]; then
    echo hived-bare-ready > /dev/ttyS0
    sync
    reboot -f
    echo b > /proc/sysrq-trigger
    sleep 5
    exit 0
fi

[ -x /newroot/usr/bin/python3 ] || die "no /usr/bin/python3 in the root image"
for d in dev proc sys; do
    mount --move "/$d" "/newroot/$d" || die "move /$d into the new root"
done

exec env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 \
    PYTHONPATH=/opt/hived:/usr/lib/python3/dist-packages PYTHONDONTWRITEBYTECODE=1 HIVED_PUREPYTHON=1 \
    HIVED_T_INIT="$T_INIT" HIVED_T_MODULES="$T_MODULES" HIVED_T_ROOT="$T_ROOT" \
    HIVED_T_NET="$T_NET" \
    /bin/switch_root /newroot /usr/bin/python3 -S -m hived.cell
