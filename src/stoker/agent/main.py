"""The stoker guest agent.

It runs inside the microVM as PID 1 (the initramfs ``switch_root``s into
``python3 -B -S -m stoker.agent``), so it must stay standard-library only and
work on Python 3.9+.  As PID 1 it mounts the API filesystems, reaps orphans,
brings up loopback, and then serves the host over the virtio-serial port named
:data:`~stoker.protocol.wire.PORT_NAME` (or a file descriptor given with
``--fd``, which is how the host-side tests drive it without a VM).

It is built on plain threads and blocking I/O rather than asyncio: importing
asyncio costs about a second under TCG emulation, which would be most of the
VM's start-up time.  Modules only some requests need (subprocess, tarfile) are
imported on first use for the same reason.

* the main thread reads frames from the host and dispatches them;
* a reaper thread owns ``waitpid(-1)`` (as PID 1 we inherit every orphan);
* each command has pump threads for stdout/stderr and a feeder for stdin;
* every write to the host goes through one lock, so frames never interleave,
  and blocks while the host is not reading (that is the flow control).

The agent trusts the host (the host created this VM); the host does not trust
the agent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from stoker.agent import limits
from stoker.agent.channel import READ_SIZE, Channel, FrameWriter, spawn_thread
from stoker.protocol import wire

AGENT_VERSION = "0.3.0"
#: How long to keep draining a command's output pipes after it exited (grandchildren
#: may hold them open; we do not wait for them forever).
DRAIN_AFTER_EXIT = 2.0
#: Chunks of stdin / upload data queued before the agent stops reading the channel.
QUEUE_DEPTH = 64

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def guest_uptime() -> float:
    """Seconds since the guest kernel started (0.0 where /proc is not mounted)."""
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


#: Guest uptime when this module was imported (before setup), for boot profiling.
STARTED = guest_uptime()


def log(msg: str) -> None:
    # The console is the only place a broken agent can complain; keep it short.
    try:
        sys.stderr.write("stoker-agent: %s\n" % msg)
        sys.stderr.flush()
    except OSError:
        pass


# --------------------------------------------------------------------------- PID 1 setup

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if os.path.ismount(target):
        return
    os.makedirs(target, exist_ok=True)
    if libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, "mount %s on %s: %s" % (fstype, target, os.strerror(err)))


def setup_system() -> None:
    """Mount API filesystems and bring up loopback (only when running as PID 1)."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    links = (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    )
    for name, target in links:
        path = "/dev/" + name
        if not os.path.lexists(path):
            os.symlink(target, path)
    loopback_up()


def loopback_up() -> None:
    """``ip link set lo up`` without iproute2: SIOCGIFFLAGS/SIOCSIFFLAGS."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, ifreq))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def set_hostname(name: str) -> None:
    socket.sethostname(name)
    try:
        with open("/etc/hostname", "w") as fh:
            fh.write(name + "\n")
    except OSError:
        pass


# linux/random.h
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
#: linux/fs.h BLKFLSBUF: drop a block device's cached pages.
BLKFLSBUF = 0x1261


def reseed_random(seed: bytes) -> None:
    """Mix ``seed`` into the kernel's pool, credit it, and reseed the CRNG now.

    Without the explicit reseed a restored clone would keep generating from
    the template's CRNG key until the next scheduled reseed.
    """
    with open("/dev/urandom", "wb", buffering=0) as fh:
        fcntl.ioctl(fh, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fh, RNDRESEEDCRNG)


def set_machine_id(machine_id: str) -> None:
    """A fresh /etc/machine-id (32 lower-case hex digits), where the image has one."""
    if len(machine_id) != 32 or any(c not in "0123456789abcdef" for c in machine_id):
        raise ValueError("machine id must be 32 hex digits")
    try:
        with open("/etc/machine-id", "w") as fh:
            fh.write(machine_id + "\n")
    except OSError:
        pass


def find_port() -> str:
    """Return the device path of our virtio-serial port (there is no udev in the guest)."""
    base = "/sys/class/virtio-ports"
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "name")) as fh:
                if fh.read().strip() == wire.PORT_NAME:
                    return "/dev/" + entry
        except OSError:
            continue
    raise RuntimeError("virtio-serial port %s not found" % wire.PORT_NAME)


#: Set in main(): end the VM with a reboot instead of a power-off.  Firecracker
#: has no power-off device (a halted guest would leave it running) but exits on
#: reboot; QEMU runs with -no-reboot, so either ends it.
END_WITH_REBOOT = False


def power_off() -> None:
    os.sync()
    # RB_AUTOBOOT or RB_POWER_OFF
    libc().reboot(0x01234567 if END_WITH_REBOOT else 0x4321FEDC)


# --------------------------------------------------------------------------- the agent


class Agent:
    def __init__(self, chan: Channel, pid1: bool) -> None:
        self.chan = chan
        self.pid1 = pid1
        # pid -> [event, status]; the reaper fills in the status.  Spawning and
        # registering happen under this lock, so the reaper never sees one of
        # our children before it is registered.
        self.children_lock = threading.Lock()
        self.children: Dict[int, List[Any]] = {}
        self.have_children = threading.Condition(self.children_lock)
        self.procs: Dict[int, int] = {}  # channel -> pid
        self.stdin: Dict[int, wire.ChunkReader] = {}
        self.uploads: Dict[int, wire.ChunkReader] = {}
        self.stopping = False
        #: The egress proxy forwarder (stoker.agent.netfwd), once the host asks for it.
        self.net: Any = None
        #: The highest channel a host opened (a resuming host numbers on from there).
        self.highest = 0
        #: Commands' cgroups (only as PID 1: never touch a host's hierarchy in tests).
        self.cgroups = limits.Cgroups() if pid1 else None
        self.groups: Dict[int, limits.JobCgroup] = {}  # channel -> its command's cgroup

    # -- child reaping: we own waitpid(-1) because as PID 1 we inherit every orphan

    def reaper(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self.children_lock:
                    self.have_children.wait(1.0)
                continue
            except InterruptedError:
                continue
            with self.children_lock:
                entry = self.children.pop(pid, None)
            if entry is not None:  # else an orphan: discarded
                entry[1] = status
                entry[0].set()

    # -- main loop

    def serve(self) -> None:
        spawn_thread(self.reaper)
        self.chan.on_connect = self.announce
        self.announce()
        while not self.stopping:
            for kind, stream, channel, payload in self.chan.read_frames():
                self.dispatch(kind, stream, channel, payload)

    def announce(self) -> None:
        """Tell the host who we are (on every new connection)."""
        if self.net is not None:
            self.net.reset()  # the streams belonged to the previous connection
        self.chan.msg(
            0,
            {
                "type": "ready",
                "protocol": wire.PROTOCOL_VERSION,
                "agent": AGENT_VERSION,
                "python": "%d.%d.%d" % sys.version_info[:3],
                "kernel": os.uname().release,
                "pid1": self.pid1,
                "uptime": guest_uptime(),
                "started": STARTED,
            },
        )

    def dispatch(self, kind: int, stream: int, channel: int, payload: bytes) -> None:
        if channel & wire.NET_CHANNEL_BIT:
            if self.net is not None:
                try:
                    self.net.on_frame(kind, channel, payload)
                except Exception as exc:  # one stream's trouble must not end the agent
                    log("net stream %x: %s: %s" % (channel, type(exc).__name__, exc))
            return
        self.highest = max(self.highest, channel)
        if kind == wire.MSG:
            msg = wire.decode_msg(payload)
            handler = getattr(self, "on_" + msg["type"], None)
            if handler is None:
                self.chan.msg(
                    channel, {"type": "error", "message": "unknown request %r" % msg["type"]}
                )
                return
            try:
                handler(channel, msg)
            except Exception as exc:  # report, keep serving
                self.chan.msg(
                    channel, {"type": "error", "message": "%s: %s" % (type(exc).__name__, exc)}
                )
            return
        target = (self.stdin if stream == wire.STDIN else self.uploads).get(channel)
        if target is None:
            return
        if kind == wire.DATA:
            target.put(payload)  # blocks when the consumer lags: back-pressure on the host
        else:
            target.put(None)

    # -- requests

    def on_ping(self, channel: int, msg: Dict[str, Any]) -> None:
        self.chan.msg(channel, {"type": "pong"})

    def on_journal(self, channel: int, msg: Dict[str, Any]) -> None:
        """Keep what is sent until acknowledged, for a host that may restart (Journal).

        ``orphan_timeout``: a host that stays away this long is not coming back
        (another host may run the job again by then): end the VM then.
        """
        timeout = msg.get("orphan_timeout")
        if timeout is not None:
            self.chan.orphan_timeout = float(timeout)
            self.chan.on_orphaned = self.orphaned
        self.chan.start_journal(channel)

    def orphaned(self) -> None:
        log("no host for %.0fs: ending the VM" % (self.chan.orphan_timeout or 0))
        for pid in list(self.procs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, 9)
        if self.pid1:
            power_off()
        os._exit(3)  # run on a host (tests): the process is the "VM"

    def on_ack(self, channel: int, msg: Dict[str, Any]) -> None:
        """The host stored everything before ``offset`` (no reply: acks are frequent)."""
        self.chan.ack(int(msg["offset"]))

    def on_resume(self, channel: int, msg: Dict[str, Any]) -> None:
        """A new host process took over: send it the journal from what it stored."""
        if self.net is not None:
            self.net.reset()  # the proxied connections ended with the old host
        self.chan.resume(channel, str(msg["nonce"]), int(msg["offset"]), self.highest)

    def on_init(self, channel: int, msg: Dict[str, Any]) -> None:
        # Sent after boot, and again after every snapshot restore: clones of one
        # template must not share their random state, identity or a stale clock.
        if self.pid1:
            if "time_ns" in msg:
                time.clock_settime_ns(time.CLOCK_REALTIME, int(msg["time_ns"]))
            if msg.get("hostname"):
                set_hostname(str(msg["hostname"]))
            if msg.get("entropy"):
                reseed_random(bytes.fromhex(str(msg["entropy"])))
            if msg.get("machine_id"):
                set_machine_id(str(msg["machine_id"]))
        self.chan.msg(channel, {"type": "ok"})

    def on_net_start(self, channel: int, msg: Dict[str, Any]) -> None:
        """Offer the host's egress proxy on the guest's loopback (idempotent)."""
        from stoker.agent import netfwd

        if msg.get("mode") == "nat":
            # The device was configured by init; names resolve through QEMU's forwarder.
            if self.pid1 and msg.get("nameserver"):
                netfwd.write_resolv_conf(str(msg["nameserver"]))
            self.chan.msg(channel, {"type": "net_started", "port": 0})
            return
        if self.net is None:
            self.net = netfwd.Forwarder(self.chan, int(msg.get("port", wire.NET_PROXY_PORT)))
        if self.pid1:  # never rewrite a host's /etc when run there by the tests
            env = msg.get("env") or {}
            netfwd.write_proxy_config({str(k): str(v) for k, v in env.items()})
        self.chan.msg(channel, {"type": "net_started", "port": self.net.port})

    def on_shutdown(self, channel: int, msg: Dict[str, Any]) -> None:
        self.chan.msg(channel, {"type": "ok"})
        self.stopping = True
        if self.pid1:
            power_off()

    def on_signal(self, channel: int, msg: Dict[str, Any]) -> None:
        pid = self.procs.get(channel)
        if pid is not None:
            signum = int(msg["signal"])
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)
            group = self.groups.get(channel)
            if group is not None and signum == 9:
                group.kill()  # also what left the process group (setsid, a fork bomb)

    def run_helper(self, argv: List[str]) -> "tuple[int, bytes]":
        """Run a helper to completion; its exit is collected through the reaper."""
        import subprocess

        entry: List[Any] = [threading.Event(), None]
        with self.children_lock:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            self.children[proc.pid] = entry
            self.have_children.notify()
        err = proc.stderr.read(1 << 20)  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        entry[0].wait()
        proc.returncode = entry[1]  # never let Popen wait on a pid the reaper took
        return entry[1], err

    def on_exec(self, channel: int, msg: Dict[str, Any]) -> None:
        import subprocess

        argv = [str(a) for a in msg["argv"]]
        env = {str(k): str(v) for k, v in (msg.get("env") or {}).items()}
        want_stdin = bool(msg.get("stdin"))
        gid = msg.get("gid")
        entry: List[Any] = [threading.Event(), None]
        group, note = None, None
        if self.cgroups is not None and isinstance(msg.get("limits"), dict):
            group, note = self.cgroups.for_command(msg["limits"], mount, log)
        with self.children_lock:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=msg.get("cwd") or "/",
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                    user=msg.get("uid"),
                    group=gid,
                    extra_groups=[] if gid is not None else None,
                    # Into its cgroup before exec: nothing it starts runs outside it.
                    preexec_fn=group.enter if group is not None else None,
                )
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                if group is not None and self.cgroups is not None:
                    self.cgroups.release(group)
                what = argv[0] if argv else "?"
                self.chan.msg(
                    channel,
                    {
                        "type": "error",
                        "spawn": True,
                        "message": "cannot start %s: %s" % (what, exc),
                    },
                )
                return
            self.children[proc.pid] = entry
            self.have_children.notify()
        self.procs[channel] = proc.pid
        if msg.get("journal") and self.chan.journal is not None:
            self.chan.journaled.add(channel)  # before "started": every frame of it counts
        if group is not None:
            self.groups[channel] = group
        watch = limits.Watch(group, note).start()
        if want_stdin:
            feed = wire.ChunkReader(QUEUE_DEPTH)
            self.stdin[channel] = feed
            spawn_thread(self.feed_stdin, proc.stdin, feed)
        self.chan.msg(channel, {"type": "started", "pid": proc.pid})
        spawn_thread(self.supervise, channel, proc, entry, watch)

    def feed_stdin(self, pipe: Any, feed: wire.ChunkReader) -> None:
        fd = pipe.fileno()
        try:
            while True:
                chunk = feed.read(wire.CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError:  # EPIPE: the command closed its stdin; discard the rest
            feed.drain()
        finally:
            pipe.close()

    def pump(self, channel: int, stream: int, pipe: Any, stop: threading.Event) -> None:
        fd = pipe.fileno()
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    if stop.is_set():
                        return
                    continue
                data = os.read(fd, READ_SIZE)
                if not data:
                    return
                self.chan.data(channel, stream, data)
        finally:
            pipe.close()
            self.chan.eof(channel, stream)

    def supervise(self, channel: int, proc: Any, entry: List[Any], watch: limits.Watch) -> None:
        stop = threading.Event()
        pumps = [
            spawn_thread(self.pump, channel, wire.STDOUT, proc.stdout, stop),
            spawn_thread(self.pump, channel, wire.STDERR, proc.stderr, stop),
        ]
        entry[0].wait()
        status = entry[1]
        proc.returncode = status  # so Popen never waits on a pid the reaper took
        deadline = time.monotonic() + DRAIN_AFTER_EXIT
        for pump in pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        stop.set()
        for pump in pumps:
            pump.join()
        feed = self.stdin.pop(channel, None)
        if feed is not None:
            feed.put(None)
        self.procs.pop(channel, None)
        watch.finish()
        evidence = watch.evidence()
        group = self.groups.pop(channel, None)
        if group is not None and self.cgroups is not None:
            self.cgroups.release(group)
        reply: Dict[str, Any] = {"type": "exit", "evidence": evidence}
        if os.WIFSIGNALED(status):
            reply["signal"] = os.WTERMSIG(status)
        else:
            reply["code"] = os.WEXITSTATUS(status)
        self.chan.msg(channel, reply)
        self.chan.journaled.discard(channel)  # its last frame is out

    def on_put(self, channel: int, msg: Dict[str, Any]) -> None:
        dest = str(msg["dest"])
        os.makedirs(dest, exist_ok=True)
        source = wire.ChunkReader(QUEUE_DEPTH)
        self.uploads[channel] = source
        spawn_thread(self.extract, channel, dest, source)

    def extract(self, channel: int, dest: str, source: wire.ChunkReader) -> None:
        import tarfile

        try:
            with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[call-overload]
                tar.extractall(dest, **_trusted_extract_args(tarfile))  # noqa: S202
        except Exception as exc:
            source.drain()
            self.chan.msg(
                channel, {"type": "error", "message": "extract into %s failed: %s" % (dest, exc)}
            )
        else:
            source.drain()
            self.chan.msg(channel, {"type": "done"})
        finally:
            self.uploads.pop(channel, None)

    def on_unpack(self, channel: int, msg: Dict[str, Any]) -> None:
        """Extract the tar on the seed disk: found by its serial, or named by the host.

        Firecracker cannot give a disk a serial, so there the host names the
        device; only whole virtio disks are accepted.
        """
        dest = str(msg["dest"])
        if msg.get("device"):
            device = str(msg["device"])
            if len(device) != 8 or not device.startswith("/dev/vd") or not device[7].islower():
                raise ValueError("not a virtio disk: %r" % device)
        else:
            device = find_block_device(str(msg["serial"]))
        os.makedirs(dest, exist_ok=True)
        spawn_thread(self.unpack, channel, device, dest)

    def unpack(self, channel: int, device: str, dest: str) -> None:
        try:
            # A restored clone's seed disk was the template's empty slot: the kernel may
            # still cache what it read of it then.  Drop that before reading the project.
            fd = os.open(device, os.O_RDONLY)
            try:
                if stat.S_ISBLK(os.fstat(fd).st_mode):
                    fcntl.ioctl(fd, BLKFLSBUF, 0)
            finally:
                os.close(fd)
            tar = next((t for t in ("/usr/bin/tar", "/bin/tar") if os.access(t, os.X_OK)), None)
            if tar is not None:
                # GNU tar (C) is several times faster than tarfile under emulation.
                status, err = self.run_helper(
                    [
                        tar,
                        "-x",
                        "-f",
                        device,
                        "-C",
                        dest,
                        "--numeric-owner",
                        "--preserve-permissions",
                        "--same-owner" if self.pid1 else "--no-same-owner",
                    ]
                )
                if status != 0:
                    raise RuntimeError(err.decode("utf-8", "replace").strip()[-500:])
            else:
                import tarfile

                with (
                    open(device, "rb", buffering=1 << 20) as fh,
                    tarfile.open(fileobj=fh, mode="r|") as archive,
                ):
                    archive.extractall(dest, **_trusted_extract_args(tarfile))  # noqa: S202
        except Exception as exc:
            self.chan.msg(
                channel, {"type": "error", "message": "unpacking %s failed: %s" % (device, exc)}
            )
        else:
            self.chan.msg(channel, {"type": "done"})

    def on_get(self, channel: int, msg: Dict[str, Any]) -> None:
        spawn_thread(self.pack, channel, str(msg.get("cwd") or "/"), [str(p) for p in msg["paths"]])

    def pack(self, channel: int, cwd: str, patterns: List[str]) -> None:
        import glob
        import tarfile

        matches: List[str] = []
        missing: List[str] = []
        for pattern in patterns:
            found = sorted(glob.glob(os.path.join(cwd, pattern), recursive=True))
            if not found:
                missing.append(pattern)
            matches.extend(f for f in found if f not in matches)
        out = FrameWriter(self.chan, channel, wire.FILES)
        try:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for path in matches:
                    rel = os.path.relpath(path, cwd)
                    if rel.startswith(".."):
                        continue  # outside cwd: the host would refuse the whole archive
                    tar.add(path, arcname=rel, filter=_plain_members)
            out.flush()
        except Exception as exc:
            self.chan.eof(channel, wire.FILES)
            self.chan.msg(channel, {"type": "error", "message": "packing failed: %s" % (exc,)})
            return
        self.chan.eof(channel, wire.FILES)
        self.chan.msg(channel, {"type": "done", "missing": missing})


def _trusted_extract_args(tarfile: Any) -> Dict[str, Any]:
    """extractall() arguments for archives from the (trusted) host: keep everything exactly."""
    kwargs: Dict[str, Any] = {"numeric_owner": True}
    if hasattr(tarfile, "fully_trusted_filter"):
        kwargs["filter"] = "fully_trusted"  # absolute symlinks etc. are the user's own
    return kwargs


#: Disks found by serial.  A VM's disks never change (no hotplug), and a clone
#: has its template's: the template's lookup spares each clone reading every
#: disk's serial, a request to the device each, which costs under emulation.
_DISKS_BY_SERIAL: Dict[str, str] = {}


def find_block_device(serial: str) -> str:
    """``/dev/vdX`` of the virtio disk whose serial is ``serial``."""
    known = _DISKS_BY_SERIAL.get(serial)
    if known is not None and os.path.exists(known):
        return known
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open("/sys/block/%s/serial" % name) as fh:
                if fh.read().strip() == serial:
                    _DISKS_BY_SERIAL[serial] = "/dev/" + name
                    return "/dev/" + name
        except OSError:
            continue
    raise RuntimeError("no disk with serial %r" % serial)


def _plain_members(info: Any) -> Any:
    """Leave out FIFOs and device nodes; the host refuses them anyway."""
    return info if (info.isfile() or info.isdir() or info.issym() or info.islnk()) else None


def wants_vsock() -> bool:
    """Whether the kernel command line asks for the vsock transport (Firecracker, CH)."""
    try:
        with open("/proc/cmdline") as fh:
            return "stoker.transport=vsock" in fh.read().split()
    except OSError:
        return False


def listen(family: int, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    sock.listen(1)
    return sock


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd: Optional[int] = None
    listener: Optional[socket.socket] = None
    if args[:1] == ["--fd"] and len(args) == 2 and args[1].isdigit():
        fd = int(args[1])
    elif args[:1] == ["--listen"] and len(args) == 2:
        # A Unix socket standing in for vsock: how host-side tests drive reconnects.
        listener = listen(socket.AF_UNIX, args[1])
    elif args:
        log("usage: python3 -m stoker.agent [--fd N | --listen PATH]")
        return 2
    pid1 = os.getpid() == 1
    if pid1:
        try:
            setup_system()
        except OSError as exc:
            log("system setup failed: %s" % exc)
    global END_WITH_REBOOT
    try:
        END_WITH_REBOOT = wants_vsock()
        if listener is None and fd is None and END_WITH_REBOOT:
            listener = listen(socket.AF_VSOCK, (socket.VMADDR_CID_ANY, wire.VSOCK_PORT))
        if listener is not None:
            conn, _ = listener.accept()
            fd = conn.detach()
        elif fd is None:
            fd = os.open(find_port(), os.O_RDWR | os.O_CLOEXEC)
        Agent(Channel(fd, listener), pid1).serve()
    except Exception as exc:
        log("fatal: %s: %s" % (type(exc).__name__, exc))
        if pid1:
            power_off()
        return 1
    if pid1:
        power_off()
    return 0
