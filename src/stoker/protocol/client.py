"""Host side of the agent protocol: one :class:`AgentClient` per VM.

A single reader task owns the stream from the guest.  It decodes frames
(bounded by :class:`~stoker.protocol.wire.Decoder`), validates every control
message against :mod:`stoker.protocol.messages`, and routes each frame to the
operation (exec, put, get, ...) that owns its channel.  Each operation has a
bounded event queue, so a guest that floods output is slowed down by
back-pressure instead of filling the host's memory.

Any violation by the guest (garbage, oversized frames, invalid messages, frames
for channels never opened) fails every pending operation with
:class:`~stoker.errors.GuestProtocolError` and closes the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import signal as signal_mod
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar, cast

from stoker.errors import (
    CommandTimeout,
    FrameError,
    GuestProtocolError,
    InfrastructureError,
    OutputLimitExceeded,
    StokerError,
)
from stoker.protocol import messages as m
from stoker.protocol import wire
from stoker.protocol.common import ChannelClosed, ChannelLimits, ExecResult, OutputSink

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Receives every frame on a guest-opened network channel (``kind, stream,
#: channel, payload``); called by the reader, so it must never wait on the guest.
NetHandler = Callable[[int, int, int, bytes], Awaitable[None]]

#: Events queued per operation before the reader stops reading (back-pressure).
QUEUE_DEPTH = 64
READ_SIZE = 256 * 1024


@dataclass
class _Event:
    kind: int
    stream: int
    payload: bytes = b""
    msg: Any = None


@dataclass
class _Op:
    channel: int
    events: asyncio.Queue[_Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_DEPTH))
    failed: BaseException | None = None


class AgentClient:
    """Speaks the stoker agent protocol over a connected stream."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        limits: ChannelLimits | None = None,
        name: str = "vm",
    ) -> None:
        self.limits = limits or ChannelLimits()
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._decoder = wire.Decoder(self.limits.max_frame)
        self._ops: dict[int, _Op] = {0: _Op(0)}
        self._ids = itertools.count(1)
        self._highest = 0
        self._failure: BaseException | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._log = log.getChild(name)
        self._net: NetHandler | None = None
        self.ready: m.Ready | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the reader task (idempotent)."""
        if self._reader_task is None:
            self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def wait_ready(self, timeout: float) -> m.Ready:
        """Wait for the agent's ``ready`` message and check the protocol version."""
        self.start()
        async with asyncio.timeout(timeout):
            msg = await self._next_msg(self._ops[0])
        if not isinstance(msg, m.Ready):
            raise GuestProtocolError(f"expected 'ready' from the agent, got {msg.type!r}")
        if msg.protocol != wire.PROTOCOL_VERSION:
            raise GuestProtocolError(
                f"agent speaks protocol {msg.protocol}, host speaks {wire.PROTOCOL_VERSION}",
                hint="rebuild the initramfs (stoker ships its agent inside it)",
            )
        self.ready = msg
        return msg

    async def init(
        self,
        *,
        hostname: str,
        time_ns: int | None = None,
        entropy: bytes | None = None,
        machine_id: str | None = None,
    ) -> None:
        """Set the guest's hostname and clock; reseed its RNG and set its machine id.

        After a snapshot restore this is what makes a clone distinct from its
        template and its siblings.
        """
        request: dict[str, object] = {
            "type": "init",
            "hostname": hostname,
            "time_ns": time_ns or time.time_ns(),
        }
        if entropy is not None:
            request["entropy"] = entropy.hex()
        if machine_id is not None:
            request["machine_id"] = machine_id
        await self._request(request, m.Ok)

    async def unpack(
        self, serial: str, dest: str, timeout: float, *, device: str | None = None
    ) -> None:
        """Have the agent extract the tar on the disk with ``serial`` (or at ``device``)."""
        request: dict[str, object] = {"type": "unpack", "serial": serial, "dest": dest}
        if device is not None:
            request["device"] = device
        await self._request(request, m.Done, timeout=timeout)

    def attach_network(self, handler: NetHandler) -> None:
        """Route the guest's network channels to ``handler`` (see :mod:`stoker.net.channel`).

        Without a handler a guest that opens one breaks the protocol: the VM has
        no network.
        """
        self._net = handler

    async def net_start(
        self,
        port: int,
        env: Mapping[str, str],
        *,
        mode: str = "egress",
        nameserver: str | None = None,
        timeout: float = 30.0,
    ) -> int:
        """Have the agent set up the guest's side of its network.

        ``egress``: offer the proxy on the guest's loopback ``port``; ``env`` goes
        into the guest's configuration files (profile, apt).  Returns the port
        the agent listens on (``port`` 0: one the guest picked).  ``nat``: the
        device is up already (init configured it); only ``nameserver`` is set.
        """
        request: dict[str, object] = {"type": "net_start", "mode": mode, "port": port}
        request["env"] = dict(env)
        if nameserver is not None:
            request["nameserver"] = nameserver
        reply = await self._request(request, m.NetStarted, timeout=timeout)
        return reply.port

    async def send_frame(self, frame: bytes) -> None:
        """Write one encoded frame (serialised with every other writer)."""
        await self._send(frame)

    async def ping(self) -> None:
        await self._request({"type": "ping"}, m.Pong)

    async def shutdown(self) -> None:
        """Ask the agent to power the guest off (acknowledged before it does)."""
        await self._request({"type": "shutdown"}, m.Ok)

    async def aclose(self) -> None:
        """Stop the reader and close the stream (idempotent)."""
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
        self._fail_all(ChannelClosed("agent channel closed"))

    @property
    def failure(self) -> BaseException | None:
        """Why the channel broke, if it did."""
        return self._failure

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise ChannelClosed("the guest agent closed the channel")
                try:
                    frames = self._decoder.feed(data)
                except wire.WireError as exc:
                    raise FrameError(f"guest sent a malformed frame: {exc}") from None
                for kind, stream, channel, payload in frames:
                    await self._route(kind, stream, channel, payload)
        except asyncio.CancelledError:
            raise
        except StokerError as exc:
            self._fail_all(exc)
        except (OSError, ConnectionError) as exc:
            self._fail_all(ChannelClosed(f"agent channel failed: {exc}"))

    async def _route(self, kind: int, stream: int, channel: int, payload: bytes) -> None:
        if channel & wire.NET_CHANNEL_BIT:
            if self._net is None:
                raise GuestProtocolError(
                    f"guest sent a frame for network channel {channel:#x}, "
                    "but the VM has no network"
                )
            await self._net(kind, stream, channel, payload)
            return
        if channel > self._highest:
            raise GuestProtocolError(f"guest sent a frame for channel {channel}, never opened")
        op = self._ops.get(channel)
        if kind == wire.MSG:
            try:
                raw = wire.decode_msg(payload)
                msg = m.parse(raw)
            except wire.WireError as exc:
                raise FrameError(f"guest sent an invalid message: {exc}") from None
            except m.InvalidMessage as exc:
                raise GuestProtocolError(f"guest sent an invalid message: {exc}") from None
            event = _Event(kind, stream, msg=msg)
        else:
            if stream == wire.STDIN:
                raise GuestProtocolError("guest sent data on the stdin stream")
            event = _Event(kind, stream, payload)
        if op is None:
            return  # a finished operation; late frames are dropped
        await op.events.put(event)  # bounded: back-pressure on a flooding guest

    def _fail_all(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            if not isinstance(exc, ChannelClosed):
                self._log.warning("agent channel failed: %s", exc)
        for op in self._ops.values():
            if op.failed is None:
                op.failed = self._failure
                with contextlib.suppress(asyncio.QueueFull):
                    op.events.put_nowait(_Event(0, 0))

    async def _next(self, op: _Op) -> _Event:
        if op.failed is not None and op.events.empty():
            raise op.failed
        event = await op.events.get()
        if event.kind == 0:
            assert op.failed is not None
            raise op.failed
        return event

    async def _next_msg(self, op: _Op) -> Any:
        event = await self._next(op)
        if event.kind != wire.MSG:
            raise GuestProtocolError(f"guest sent unexpected data on channel {op.channel}")
        return event.msg

    # ------------------------------------------------------------------ writing

    async def _send(self, frame: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        async with self._write_lock:
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (OSError, ConnectionError) as exc:
                raise ChannelClosed(f"cannot write to the agent channel: {exc}") from exc

    async def _send_msg(self, channel: int, message: dict[str, Any]) -> None:
        await self._send(wire.encode_msg(channel, message))

    async def _send_data(self, channel: int, stream: int, data: bytes) -> None:
        for i in range(0, len(data), wire.CHUNK):
            await self._send(wire.encode(wire.DATA, channel, data[i : i + wire.CHUNK], stream))

    def _open(self) -> _Op:
        if self._failure is not None:
            raise self._failure
        self.start()
        channel = next(self._ids)
        self._highest = channel
        op = _Op(channel)
        self._ops[channel] = op
        return op

    def _close(self, op: _Op) -> None:
        self._ops.pop(op.channel, None)

    async def _request(
        self, message: dict[str, Any], reply: type[T], *, timeout: float | None = None
    ) -> T:
        """Send one control request and wait (bounded) for its single reply."""
        limit = self.limits.request_timeout if timeout is None else timeout
        op = self._open()
        try:
            async with asyncio.timeout(limit):
                await self._send_msg(op.channel, message)
                msg = await self._next_msg(op)
        except TimeoutError:
            raise InfrastructureError(
                f"the guest agent did not answer {message['type']!r} within {limit:.0f}s"
            ) from None
        finally:
            self._close(op)
        if isinstance(msg, m.Error):
            raise InfrastructureError(f"agent: {message['type']} failed: {msg.message}")
        if not isinstance(msg, reply):
            raise GuestProtocolError(f"expected {reply.__name__} from the agent, got {msg.type!r}")
        return msg

    # ------------------------------------------------------------------ exec

    async def exec(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        uid: int | None = None,
        gid: int | None = None,
        stdin: bytes | AsyncIterator[bytes] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        capture: bool = False,
        max_capture: int | None = None,
        timeout: float | None = None,
        limits: Mapping[str, int | None] | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest and wait for it to end.

        Output is delivered to the ``stdout``/``stderr`` sinks as it arrives and,
        with ``capture=True``, also collected (at most ``max_capture`` bytes in
        total; beyond that the command is killed and :class:`OutputLimitExceeded`
        is raised).  When ``timeout`` passes, the command's process group is
        killed and :class:`CommandTimeout` is raised.  A command that exits
        non-zero is *not* an error here: inspect :class:`ExecResult`.  ``limits``
        (:meth:`~stoker.protocol.common.JobLimits.request`) puts the command in
        a cgroup with those limits; its evidence comes back in the result.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        cap = self.limits.max_capture if max_capture is None else max_capture
        op = self._open()
        started = time.monotonic()
        feeder: asyncio.Task[None] | None = None
        bufs: dict[int, bytearray] = {wire.STDOUT: bytearray(), wire.STDERR: bytearray()}
        sinks = {wire.STDOUT: stdout, wire.STDERR: stderr}
        running = False
        try:
            await self._send_msg(
                op.channel,
                {
                    "type": "exec",
                    "argv": list(argv),
                    "env": dict(env or {}),
                    "cwd": cwd,
                    "uid": uid,
                    "gid": gid,
                    "stdin": stdin is not None,
                    **({"limits": dict(limits)} if limits is not None else {}),
                },
            )
            async with asyncio.timeout(self.limits.request_timeout):
                first = await self._next_msg(op)
            if isinstance(first, m.Error):
                if first.spawn:
                    return ExecResult(127, None, spawn_error=first.message)
                raise InfrastructureError(f"agent: exec failed: {first.message}")
            if not isinstance(first, m.Started):
                raise GuestProtocolError(f"expected 'started', got {first.type!r}")
            running = True
            if stdin is not None:
                feeder = asyncio.get_running_loop().create_task(self._feed(op.channel, stdin))
            try:
                async with asyncio.timeout(timeout):
                    exit_msg = await self._collect(op, sinks, bufs if capture else None, cap)
            except TimeoutError:
                await self._kill(op)
                raise CommandTimeout(
                    f"command timed out after {timeout:g}s and was killed: {argv[0]}",
                    timeout=timeout or 0.0,
                ) from None
            except OutputLimitExceeded:
                await self._kill(op)
                raise
            running = False
            return ExecResult(
                exit_msg.code,
                exit_msg.signal,
                bytes(bufs[wire.STDOUT]),
                bytes(bufs[wire.STDERR]),
                time.monotonic() - started,
                evidence=exit_msg.evidence,
            )
        except asyncio.CancelledError:
            if running:
                # Ctrl-C / cancellation: do not leave the command running in the guest.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._signal(op.channel, signal_mod.SIGKILL))
            raise
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, StokerError):
                    await feeder
            self._close(op)

    async def _collect(
        self,
        op: _Op,
        sinks: Mapping[int, OutputSink | None],
        bufs: dict[int, bytearray] | None,
        cap: int,
    ) -> m.Exit:
        captured = 0
        while True:
            event = await self._next(op)
            if event.kind == wire.MSG:
                if isinstance(event.msg, m.Exit):
                    return event.msg
                raise GuestProtocolError(f"unexpected {event.msg.type!r} while a command runs")
            if event.stream not in (wire.STDOUT, wire.STDERR) or event.kind != wire.DATA:
                if event.kind == wire.EOF and event.stream in (wire.STDOUT, wire.STDERR):
                    continue
                raise GuestProtocolError(f"unexpected frame on stream {event.stream}")
            if bufs is not None:
                captured += len(event.payload)
                if captured > cap:
                    raise OutputLimitExceeded(
                        f"command output exceeded the capture limit of {cap} bytes"
                    )
                bufs[event.stream] += event.payload
            sink = sinks[event.stream]
            if sink is not None:
                res = sink(event.payload)
                if res is not None:
                    await res

    async def _feed(self, channel: int, stdin: bytes | AsyncIterator[bytes]) -> None:
        if isinstance(stdin, bytes | bytearray):
            await self._send_data(channel, wire.STDIN, bytes(stdin))
        else:
            async for chunk in stdin:
                await self._send_data(channel, wire.STDIN, chunk)
        await self._send(wire.encode(wire.EOF, channel, b"", wire.STDIN))

    async def _signal(self, channel: int, signum: int) -> None:
        await self._send_msg(channel, {"type": "signal", "signal": int(signum)})

    async def _kill(self, op: _Op) -> None:
        """SIGKILL the command's process group and wait (bounded) for its exit report."""
        await self._signal(op.channel, signal_mod.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.limits.kill_grace):
                while True:
                    event = await self._next(op)
                    if event.kind == wire.MSG and isinstance(event.msg, m.Exit):
                        return

    # ------------------------------------------------------------------ files

    async def put(self, dest: str, produce: Callable[[BinaryIO], object]) -> None:
        """Upload the tar stream ``produce`` writes (in a thread); the guest unpacks it."""
        op = self._open()
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
        sink = _ThreadToAsyncWriter(loop, chunks)

        def run() -> None:
            try:
                produce(cast(BinaryIO, sink))
                sink.flush()
            finally:
                sink.finish()

        try:
            await self._send_msg(op.channel, {"type": "put", "dest": dest})
            worker = loop.run_in_executor(None, run)
            try:
                while True:
                    async with asyncio.timeout(self.limits.transfer_idle_timeout):
                        chunk = await chunks.get()
                        if chunk is None:
                            break
                        await self._send(wire.encode(wire.DATA, op.channel, chunk, wire.FILES))
            finally:
                sink.cancel()
                await worker
            await self._send(wire.encode(wire.EOF, op.channel, b"", wire.FILES))
            async with asyncio.timeout(self.limits.transfer_idle_timeout):
                reply = await self._next_msg(op)
        except TimeoutError:
            raise InfrastructureError(f"upload to {dest} stalled in the guest") from None
        finally:
            self._close(op)
        if isinstance(reply, m.Error):
            raise InfrastructureError(f"agent: upload to {dest} failed: {reply.message}")
        if not isinstance(reply, m.Done):
            raise GuestProtocolError(f"expected 'done' after an upload, got {reply.type!r}")

    async def get(
        self, paths: Iterable[str], cwd: str, consume: Callable[[BinaryIO], T]
    ) -> tuple[T, list[str]]:
        """Download ``paths`` (globs relative to ``cwd``) as a tar stream.

        ``consume`` runs in a thread and reads the (untrusted) tar stream; its
        result is returned with the list of patterns that matched nothing.
        """
        op = self._open()
        loop = asyncio.get_running_loop()
        source = _AsyncToThreadReader()
        worker = loop.run_in_executor(None, _run_consumer, consume, source)
        try:
            await self._send_msg(op.channel, {"type": "get", "paths": list(paths), "cwd": cwd})
            while True:
                async with asyncio.timeout(self.limits.transfer_idle_timeout):
                    event = await self._next(op)
                if event.kind == wire.MSG:
                    if isinstance(event.msg, m.Error):
                        raise InfrastructureError(f"agent: download failed: {event.msg.message}")
                    raise GuestProtocolError(f"unexpected {event.msg.type!r} during a download")
                if event.stream != wire.FILES:
                    raise GuestProtocolError(f"unexpected stream {event.stream} in a download")
                if event.kind == wire.EOF:
                    source.feed(None)
                    break
                if worker.done():
                    break  # the consumer stopped (refused the archive); its error wins
                await source.afeed(event.payload)
            result = await worker
            async with asyncio.timeout(self.limits.request_timeout):
                reply = await self._next_msg(op)
            if isinstance(reply, m.Error):
                raise InfrastructureError(f"agent: download failed: {reply.message}")
            if not isinstance(reply, m.Done):
                raise GuestProtocolError(f"expected 'done' after a download, got {reply.type!r}")
            return result, list(reply.missing)
        except TimeoutError:
            raise InfrastructureError("download from the guest stalled") from None
        finally:
            source.feed(None)
            if not worker.done():
                with contextlib.suppress(BaseException):
                    await worker
            self._close(op)


def _run_consumer(consume: Callable[[BinaryIO], T], source: _AsyncToThreadReader) -> T:
    try:
        return consume(source)  # type: ignore[arg-type]
    finally:
        source.closed_by_reader = True


class _ThreadToAsyncWriter:
    """A write-only file for a worker thread that hands 64 KiB chunks to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[bytes | None]) -> None:
        self._loop = loop
        self._q = q
        self._buf = bytearray()
        self._cancelled = threading.Event()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= wire.CHUNK:
            self._push(bytes(self._buf[: wire.CHUNK]))
            del self._buf[: wire.CHUNK]
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._push(bytes(self._buf))
            self._buf.clear()

    def _push(self, item: bytes | None) -> None:
        if self._cancelled.is_set():
            raise InfrastructureError("upload cancelled")
        fut = asyncio.run_coroutine_threadsafe(self._q.put(item), self._loop)
        while True:
            try:
                fut.result(timeout=0.5)
                return
            except TimeoutError:
                if self._cancelled.is_set():
                    fut.cancel()
                    raise InfrastructureError("upload cancelled") from None

    def finish(self) -> None:
        with contextlib.suppress(InfrastructureError):
            self._push(None)

    def cancel(self) -> None:
        self._cancelled.set()


class _AsyncToThreadReader(wire.ChunkReader):
    """A read-only file for a worker thread, fed chunk by chunk from the event loop."""

    def __init__(self) -> None:
        super().__init__(QUEUE_DEPTH)
        self.closed_by_reader = False

    def feed(self, chunk: bytes | None) -> None:
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(chunk)

    async def afeed(self, chunk: bytes) -> None:
        try:
            self.q.put_nowait(chunk)
        except queue.Full:
            while not self.closed_by_reader:
                try:
                    await asyncio.to_thread(self.q.put, chunk, True, 0.5)
                    return
                except queue.Full:
                    continue
