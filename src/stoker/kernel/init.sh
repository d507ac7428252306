#!/bin/sh
# stoker guest init: PID 1 in the initramfs, busybox only.
#
# Boot contract (the host side of stoker relies on exactly this):
#   kernel command line
#     stoker.root=DEV          read-only root device (default /dev/vda)
#     stoker.rootfstype=FS     its filesystem (default erofs)
#     stoker.scratch=DEV       ext4 disk (formatted by the host) for the writable layer;
#                              without it the writable layer is a tmpfs
#     stoker.tmpfs_size=SIZE   size of that tmpfs (default 512m)
#     stoker.python=PATH       interpreter inside the root (default /usr/bin/python3)
#     stoker.nic=1             load the NIC driver and configure eth0 (nat mode)
#     stoker.probe=1           print STOKER-PROBE-OK after loading modules, power off
#     stoker.debug=1           trace every step on the console
#     stoker.init=PATH         a NixOS system's stage-2 init: the root device is then its
#                              store (mounted read-only on /nix/store) and the scratch disk
#                              (or tmpfs) the root itself; PATH is exec'd instead of PYTHON
#   /nix/store               if the root has one: bound read-only from the root device
#   on success: exec PYTHON -B -S -m stoker.agent as PID 1 of the overlay root
#     (lower = root device, upper = scratch/tmpfs), PYTHONPATH=/usr/lib/stoker-agent,
#     /dev /proc /sys already mounted
#   on failure: "stoker-init: error: WHAT" on the console, then power off
#     (QEMU runs with -no-reboot, so either way it exits)
#
# Quiet unless stoker.debug=1, and fast: builtins where possible, no fixed sleeps.

export PATH=/bin

halt_now() {
    poweroff -f
    reboot -f
    exit 1  # PID 1 exiting panics the kernel; panic=-1 and -no-reboot end QEMU
}

fail() {
    echo "stoker-init: error: $*" >/dev/console
    halt_now
}

debug() {
    [ "$DEBUG" = 1 ] || return 0
    { read -r up _ </proc/uptime; } 2>/dev/null || up=?
    echo "stoker-init: [$up] $*" >/dev/console
}

# must WHAT CMD...: run CMD; on failure stop with WHAT and CMD's error output.
must() {
    what=$1
    shift
    "$@" 2>/tmp/init.err && return 0
    rc=$?
    err=$(tr '\n' ' ' </tmp/init.err)
    fail "$what: ${err:-exit status $rc}"
}

# wait_block DEV: wait up to 10 s for block device DEV to appear.
wait_block() {
    [ -b "$1" ] && return 0
    read -r up _ </proc/uptime
    deadline=$((${up%.*} + 10))
    while [ ! -b "$1" ]; do
        read -r up _ </proc/uptime
        [ "${up%.*}" -lt "$deadline" ] || return 1
        usleep 10000
    done
}

# 1. Kernel file systems and parameters.  The kernel opened /dev/console from
#    the initramfs (it has a node) for our stdio before running us.
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
exec </dev/console >/dev/console 2>&1

ROOT=/dev/vda
ROOTFSTYPE=erofs
SCRATCH=
TMPFS_SIZE=512m
PYTHON=/usr/bin/python3
PROBE=0
DEBUG=0
PCI=0
NIC=0
INIT=
read -r cmdline </proc/cmdline
set -f  # the command line is split into words, never globbed
for arg in $cmdline; do
    case "$arg" in
    stoker.root=*) ROOT=${arg#*=} ;;
    stoker.rootfstype=*) ROOTFSTYPE=${arg#*=} ;;
    stoker.scratch=*) SCRATCH=${arg#*=} ;;
    stoker.tmpfs_size=*) TMPFS_SIZE=${arg#*=} ;;
    stoker.python=*) PYTHON=${arg#*=} ;;
    stoker.probe=*) PROBE=${arg#*=} ;;
    stoker.debug=*) DEBUG=${arg#*=} ;;
    stoker.pci=*) PCI=${arg#*=} ;;
    stoker.nic=*) NIC=${arg#*=} ;;
    stoker.init=*) INIT=${arg#*=} ;;
    esac
done
set +f
debug "cmdline: $cmdline"

# 2. Modules, dependencies first.  "File exists" means already loaded: fine.
#    The virtio-pci transport only for VMMs with PCI devices (stoker.pci=1).
load_modules() {
    while read -r mod; do
        [ -n "$mod" ] || continue
        debug "insmod $mod"
        if ! insmod "/lib/modules/$mod" 2>/tmp/init.err; then
            err=$(tr '\n' ' ' </tmp/init.err)
            case "$err" in
            *"File exists"*) ;;
            *) fail "insmod $mod: ${err:-failed}" ;;
            esac
        fi
    done <"$1"
}
load_modules /lib/modules/load.order
if [ "$PCI" = 1 ] && [ -f /lib/modules/load.pci ]; then
    load_modules /lib/modules/load.pci
fi
# The network device's driver only for VMs that have one (stoker.nic=1: nat
# mode), configured with QEMU user-mode networking's fixed addresses: the guest
# is 10.0.2.15/24, 10.0.2.2 the host side, 10.0.2.3 its DNS forwarder.
if [ "$NIC" = 1 ]; then
    [ -f /lib/modules/load.nic ] && load_modules /lib/modules/load.nic
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    must "cannot bring up eth0" ip link set eth0 up
    must "cannot address eth0" ip addr add 10.0.2.15/24 dev eth0
    must "cannot add the default route" ip route add default via 10.0.2.2
fi

# 3. Probe mode: the accelerator boots a guest; nothing more to check.
if [ "$PROBE" = 1 ]; then
    printf '\nSTOKER-PROBE-OK\n' >/dev/console
    halt_now
fi

# 4-5. The read-only root.
debug "waiting for $ROOT"
wait_block "$ROOT" || fail "root device $ROOT did not appear within 10 s"
must "cannot mount $ROOT ($ROOTFSTYPE) on /lower" mount -t "$ROOTFSTYPE" -o ro "$ROOT" /lower

# 6. The writable layer and the overlay.
if [ -n "$SCRATCH" ]; then
    debug "waiting for $SCRATCH"
    wait_block "$SCRATCH" || fail "scratch device $SCRATCH did not appear within 10 s"
    must "cannot mount scratch disk $SCRATCH on /rw" mount -t ext4 -o noatime "$SCRATCH" /rw
else
    must "cannot mount a tmpfs on /rw" \
        mount -t tmpfs -o "size=$TMPFS_SIZE,mode=0755" tmpfs /rw
fi
if [ -n "$INIT" ]; then
    # A NixOS image is the system's store: NixOS's own layout, no overlay.
    must "cannot bind the writable root" mount --bind /rw /newroot
    must "cannot create /nix/store in the root" mkdir -p /newroot/nix/store
    must "cannot mount the store on /nix/store" mount --bind /lower /newroot/nix/store
else
    must "cannot create /rw/upper and /rw/work" mkdir -p /rw/upper /rw/work
    must "cannot mount the overlay on /newroot" \
        mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
    # An image's Nix store (nix: bases) stays read-only, as on NixOS: the erofs
    # itself, bound over the overlay's copy, so no command can add or alter a path.
    if [ -d /lower/nix/store ]; then
        must "cannot bind the Nix store read-only" mount --bind /lower/nix/store /newroot/nix/store
    fi
fi
debug "root mounted"

# 7. The agent.
must "cannot create /usr/lib/stoker-agent" mkdir -p /newroot/usr/lib/stoker-agent
must "cannot copy the agent" cp -a /stoker-agent/. /newroot/usr/lib/stoker-agent/

# 8. Kernel file systems move into the new root.
for dir in dev proc sys; do
    [ -d "/newroot/$dir" ] || must "cannot create /$dir in the root" mkdir -p "/newroot/$dir"
    must "cannot move /$dir into the root" mount --move "/$dir" "/newroot/$dir"
done

# 9. Hand over to the agent, or to the NixOS system's init (which starts it).
export PYTHONPATH=/usr/lib/stoker-agent
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ -n "$INIT" ]; then
    if [ ! -e "/newroot$INIT" ] && [ ! -L "/newroot$INIT" ]; then
        fail "$INIT does not exist in the system's store"
    fi
    debug "exec $INIT"
    exec switch_root /newroot "$INIT"
    fail "switch_root failed"
fi
# -e or -L: an absolute symlink resolves only after switch_root.
if [ ! -e "/newroot$PYTHON" ] && [ ! -L "/newroot$PYTHON" ]; then
    fail "$PYTHON does not exist in the root file system"
fi
debug "exec $PYTHON -B -S -m stoker.agent"
exec switch_root /newroot "$PYTHON" -B -S -m stoker.agent
fail "switch_root failed"
