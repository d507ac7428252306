"""The stoker guest agent.

It runs inside the microVM as PID 1 (the initramfs ``switch_root``s into
``python3 -m stoker.agent``), so it must stay standard-library only and work on
Python 3.9+.  As PID 1 it mounts the API filesystems, reaps orphans, brings up
loopback, and then serves the host over the virtio-serial port named
:data:`~stoker.protocol.wire.PORT_NAME` (or a file descriptor given with
``--fd``, which is how the host-side tests drive it without a VM).

Everything the host asks for is described in :mod:`stoker.protocol.wire`; the
message types handled here are ``init``, ``exec``, ``signal``, ``put``, ``get``,
``ping`` and ``shutdown``.  The agent trusts the host (the host is the one that
created this VM); the host does not trust the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import os
import signal
import socket
import struct
import sys
import tarfile
import time
from typing import Any, Callable, Dict, List, Optional

from stoker.protocol import wire

AGENT_VERSION = "0.1.0"
READ_SIZE = 256 * 1024
#: How long to keep draining a command's output pipes after it exited (grandchildren
#: may hold them open; we do not wait for them forever).
DRAIN_AFTER_EXIT = 2.0
#: Bytes of stdin buffered per process before the agent stops reading the channel.
STDIN_BUFFER = 4 << 20

_libc: Optional[ctypes.CDLL] = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def log(msg: str) -> None:
    # The console is the only place a broken agent can complain; keep it short.
    try:
        sys.stderr.write("stoker-agent: %s\n" % msg)
        sys.stderr.flush()
    except OSError:
        pass


# --------------------------------------------------------------------------- PID 1 setup


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if os.path.ismount(target):
        return
    os.makedirs(target, exist_ok=True)
    rc = libc().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount %s on %s: %s" % (fstype, target, os.strerror(err)))


MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def setup_system() -> None:
    """Mount API filesystems and bring up loopback (only when running as PID 1)."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
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


def set_clock(time_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


def set_hostname(name: str) -> None:
    socket.sethostname(name)
    try:
        with open("/etc/hostname", "w") as fh:
            fh.write(name + "\n")
    except OSError:
        pass


def find_port() -> str:
    """Return the device path of our virtio-serial port (no udev in the guest)."""
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        try:
            with open(name_file) as fh:
                if fh.read().strip() == wire.PORT_NAME:
                    return "/dev/" + name_file.split("/")[-2]
        except OSError:
            continue
    raise RuntimeError("virtio-serial port %s not found" % wire.PORT_NAME)


def power_off() -> None:
    os.sync()
    # RB_POWER_OFF; QEMU also runs with -no-reboot, so RB_AUTOBOOT would work too.
    libc().reboot(0x4321FEDC)


# --------------------------------------------------------------------------- channel I/O


class Channel:
    """Frames over one non-blocking file descriptor (virtio-serial port or socket)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.loop = asyncio.get_event_loop()
        self.decoder = wire.Decoder()
        self.write_lock = asyncio.Lock()

    async def _wait(self, add: Callable[..., None], remove: Callable[[int], Any]) -> None:
        fut = self.loop.create_future()
        add(self.fd, _wake, fut)
        try:
            await fut
        finally:
            remove(self.fd)

    async def read_frames(self) -> List[wire.Frame]:
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                await self._wait(self.loop.add_reader, self.loop.remove_reader)
                continue
            if not data:
                # virtio-serial reads 0 while the host side is disconnected; wait for it.
                await asyncio.sleep(0.05)
                continue
            frames = self.decoder.feed(data)
            if frames:
                return frames

    async def send(self, frame: bytes) -> None:
        async with self.write_lock:
            view = memoryview(frame)
            while view:
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    await self._wait(self.loop.add_writer, self.loop.remove_writer)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                        return  # host went away; nothing to tell
                    raise
                view = view[n:]

    async def msg(self, channel: int, message: Dict[str, Any]) -> None:
        await self.send(wire.encode_msg(channel, message))

    async def data(self, channel: int, stream: int, payload: bytes) -> None:
        for i in range(0, len(payload), wire.CHUNK):
            await self.send(wire.encode(wire.DATA, channel, payload[i : i + wire.CHUNK], stream))

    async def eof(self, channel: int, stream: int) -> None:
        await self.send(wire.encode(wire.EOF, channel, b"", stream))


def _wake(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, write: bool = False) -> None:
    fut = loop.create_future()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    add(fd, _wake, fut)
    try:
        await fut
    finally:
        remove(fd)


class PipeWriter:
    """Feeds bytes into a non-blocking pipe from a bounded buffer, in its own task."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = bytearray()
        self.closing = False
        self.loop = asyncio.get_event_loop()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.task = self.loop.create_task(self._run())

    async def write(self, data: bytes) -> None:
        if self.fd < 0:
            return  # the reader went away; discard like a closed pipe would
        self.buf += data
        self.drained.clear()
        self.wake.set()
        if len(self.buf) > STDIN_BUFFER:
            await self.drained.wait()

    def close(self) -> None:
        self.closing = True
        self.wake.set()

    async def _run(self) -> None:
        try:
            while True:
                if not self.buf:
                    self.drained.set()
                    if self.closing:
                        break
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                try:
                    n = os.write(self.fd, self.buf[: wire.CHUNK])
                except BlockingIOError:
                    await wait_fd(self.loop, self.fd, write=True)
                    continue
                except OSError:  # EPIPE: the process closed stdin
                    self.buf.clear()
                    break
                del self.buf[:n]
        finally:
            self.drained.set()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


# --------------------------------------------------------------------------- the agent


class Agent:
    def __init__(self, chan: Channel, pid1: bool) -> None:
        self.chan = chan
        self.pid1 = pid1
        self.loop = asyncio.get_event_loop()
        # pid -> future resolved with the raw wait status; filled by the SIGCHLD reaper.
        self.children: Dict[int, "asyncio.Future[int]"] = {}
        self.procs: Dict[int, int] = {}  # channel -> pid
        self.stdin: Dict[int, PipeWriter] = {}
        self.uploads: Dict[int, Any] = {}
        self.tasks: "set[asyncio.Task[Any]]" = set()
        self.stopping = False

    # -- child reaping: we own waitpid(-1) because as PID 1 we inherit every orphan

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            # Orphans (re-parented to us as PID 1) are just discarded.  Our own
            # children are always registered before this handler can run: Popen
            # and watch() happen in one synchronous step of the event loop.
            fut = self.children.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(status)

    def watch(self, pid: int) -> "asyncio.Future[int]":
        fut: "asyncio.Future[int]" = self.loop.create_future()
        self.children[pid] = fut
        return fut

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- main loop

    async def serve(self) -> None:
        self.loop.add_signal_handler(signal.SIGCHLD, self.reap)
        await self.chan.msg(
            0,
            {
                "type": "ready",
                "protocol": wire.PROTOCOL_VERSION,
                "agent": AGENT_VERSION,
                "python": "%d.%d.%d" % sys.version_info[:3],
                "kernel": os.uname().release,
                "pid1": self.pid1,
            },
        )
        while not self.stopping:
            for kind, stream, channel, payload in await self.chan.read_frames():
                await self.dispatch(kind, stream, channel, payload)

    async def dispatch(self, kind: int, stream: int, channel: int, payload: bytes) -> None:
        if kind == wire.MSG:
            msg = wire.decode_msg(payload)
            handler = getattr(self, "on_" + msg["type"], None)
            if handler is None:
                await self.chan.msg(
                    channel, {"type": "error", "message": "unknown request %r" % msg["type"]}
                )
                return
            try:
                await handler(channel, msg)
            except Exception as exc:  # report, keep serving
                await self.chan.msg(
                    channel, {"type": "error", "message": "%s: %s" % (type(exc).__name__, exc)}
                )
        elif stream == wire.STDIN:
            writer = self.stdin.get(channel)
            if writer is None:
                return
            if kind == wire.DATA:
                await writer.write(payload)
            else:
                writer.close()
                self.stdin.pop(channel, None)
        elif stream == wire.FILES:
            upload = self.uploads.get(channel)
            if upload is None:
                return
            if kind == wire.DATA:
                await upload.write(payload)
            else:
                upload.close()

    # -- requests

    async def on_ping(self, channel: int, msg: Dict[str, Any]) -> None:
        await self.chan.msg(channel, {"type": "pong"})

    async def on_init(self, channel: int, msg: Dict[str, Any]) -> None:
        if self.pid1:
            if "time_ns" in msg:
                set_clock(int(msg["time_ns"]))
            if msg.get("hostname"):
                set_hostname(str(msg["hostname"]))
        await self.chan.msg(channel, {"type": "ok"})

    async def on_shutdown(self, channel: int, msg: Dict[str, Any]) -> None:
        await self.chan.msg(channel, {"type": "ok"})
        self.stopping = True
        if self.pid1:
            power_off()

    async def on_signal(self, channel: int, msg: Dict[str, Any]) -> None:
        pid = self.procs.get(channel)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, int(msg["signal"]))

    async def on_exec(self, channel: int, msg: Dict[str, Any]) -> None:
        import subprocess

        argv = [str(a) for a in msg["argv"]]
        env = {str(k): str(v) for k, v in (msg.get("env") or {}).items()}
        cwd = msg.get("cwd") or "/"
        want_stdin = bool(msg.get("stdin"))
        uid = msg.get("uid")
        gid = msg.get("gid")
        try:
            # Popen only forks and execs here; we never block waiting on it (the
            # SIGCHLD reaper reports the exit), so this is safe in the event loop.
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                user=uid,
                group=gid,
                extra_groups=[] if gid is not None else None,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            await self.chan.msg(
                channel,
                {
                    "type": "error",
                    "message": "cannot start %s: %s" % (argv[0] if argv else "?", exc),
                    "spawn": True,
                },
            )
            return
        status_fut = self.watch(proc.pid)
        self.procs[channel] = proc.pid
        if want_stdin:
            assert proc.stdin is not None
            self.stdin[channel] = PipeWriter(os.dup(proc.stdin.fileno()))
            proc.stdin.close()
        out_fd = os.dup(proc.stdout.fileno())  # type: ignore[union-attr]
        err_fd = os.dup(proc.stderr.fileno())  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        await self.chan.msg(channel, {"type": "started", "pid": proc.pid})
        self.spawn(self.supervise(channel, proc, status_fut, out_fd, err_fd))

    async def pump(self, channel: int, stream: int, fd: int, stop: asyncio.Event) -> None:
        os.set_blocking(fd, False)
        try:
            while True:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    waiter = self.loop.create_task(wait_fd(self.loop, fd))
                    stopper = self.loop.create_task(stop.wait())
                    done, _ = await asyncio.wait(
                        {waiter, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    waiter.cancel()
                    stopper.cancel()
                    if stopper in done and waiter not in done:
                        return
                    continue
                if not data:
                    return
                await self.chan.data(channel, stream, data)
        finally:
            os.close(fd)
            await self.chan.eof(channel, stream)

    async def supervise(
        self, channel: int, proc: Any, status_fut: "asyncio.Future[int]", out_fd: int, err_fd: int
    ) -> None:
        stop = asyncio.Event()
        pumps = [
            self.loop.create_task(self.pump(channel, wire.STDOUT, out_fd, stop)),
            self.loop.create_task(self.pump(channel, wire.STDERR, err_fd, stop)),
        ]
        status = await status_fut
        proc.returncode = status  # so Popen never waits on a pid we already reaped
        _, pending = await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT)
        if pending:
            stop.set()
            await asyncio.wait(pending)
        writer = self.stdin.pop(channel, None)
        if writer is not None:
            writer.close()
        self.procs.pop(channel, None)
        if os.WIFSIGNALED(status):
            await self.chan.msg(channel, {"type": "exit", "signal": os.WTERMSIG(status)})
        else:
            await self.chan.msg(channel, {"type": "exit", "code": os.WEXITSTATUS(status)})

    async def on_put(self, channel: int, msg: Dict[str, Any]) -> None:
        dest = str(msg["dest"])
        os.makedirs(dest, exist_ok=True)
        rfd, wfd = os.pipe()
        writer = PipeWriter(wfd)
        self.uploads[channel] = writer

        def extract() -> None:
            with os.fdopen(rfd, "rb", buffering=wire.CHUNK) as fh:
                with tarfile.open(fileobj=fh, mode="r|") as tar:
                    kwargs: Dict[str, Any] = {"numeric_owner": True}
                    if hasattr(tarfile, "fully_trusted_filter"):
                        # The host is trusted; keep absolute symlinks etc. exactly.
                        kwargs["filter"] = "fully_trusted"
                    tar.extractall(dest, **kwargs)  # noqa: S202 - the host is trusted
                # Drain any padding so the writer never blocks on a full pipe.
                while fh.read(wire.CHUNK):
                    pass

        async def run() -> None:
            try:
                await asyncio.get_event_loop().run_in_executor(None, extract)
            except Exception as exc:
                writer.close()
                await writer.task
                await self.chan.msg(
                    channel,
                    {"type": "error", "message": "extract into %s failed: %s" % (dest, exc)},
                )
            else:
                await self.chan.msg(channel, {"type": "done"})
            finally:
                self.uploads.pop(channel, None)

        self.spawn(run())

    async def on_get(self, channel: int, msg: Dict[str, Any]) -> None:
        cwd = str(msg.get("cwd") or "/")
        patterns = [str(p) for p in msg["paths"]]
        matches: List[str] = []
        missing: List[str] = []
        for pattern in patterns:
            found = sorted(glob.glob(os.path.join(cwd, pattern), recursive=True))
            if not found:
                missing.append(pattern)
            matches.extend(f for f in found if f not in matches)
        rfd, wfd = os.pipe()

        def pack() -> None:
            with (
                os.fdopen(wfd, "wb", buffering=wire.CHUNK) as fh,
                tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for path in matches:
                    rel = os.path.relpath(path, cwd)
                    if rel.startswith(".."):
                        continue  # outside cwd: the host would refuse the whole archive
                    tar.add(path, arcname=rel, filter=_plain_members)

        async def run() -> None:
            fut = asyncio.get_event_loop().run_in_executor(None, pack)
            os.set_blocking(rfd, False)
            try:
                while True:
                    try:
                        data = os.read(rfd, wire.CHUNK)
                    except BlockingIOError:
                        await wait_fd(self.loop, rfd)
                        continue
                    if not data:
                        break
                    await self.chan.data(channel, wire.FILES, data)
            finally:
                os.close(rfd)
            await self.chan.eof(channel, wire.FILES)
            try:
                await fut
            except Exception as exc:
                await self.chan.msg(
                    channel, {"type": "error", "message": "packing failed: %s" % (exc,)}
                )
            else:
                await self.chan.msg(channel, {"type": "done", "missing": missing})

        self.spawn(run())


def _plain_members(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
    """Leave out FIFOs and device nodes; the host refuses them anyway."""
    return info if (info.isfile() or info.isdir() or info.issym() or info.islnk()) else None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="stoker-agent")
    parser.add_argument(
        "--fd", type=int, help="serve on this file descriptor instead of the virtio port"
    )
    args = parser.parse_args(argv)
    pid1 = os.getpid() == 1
    if pid1:
        try:
            setup_system()
        except OSError as exc:
            log("system setup failed: %s" % exc)
    fd = args.fd if args.fd is not None else os.open(find_port(), os.O_RDWR | os.O_CLOEXEC)

    async def run() -> None:
        agent = Agent(Channel(fd), pid1)
        await agent.serve()

    try:
        asyncio.run(run())
    except Exception as exc:
        log("fatal: %s: %s" % (type(exc).__name__, exc))
        if pid1:
            power_off()
        return 1
    if pid1:
        power_off()
    return 0
