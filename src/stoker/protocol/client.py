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
import secrets
import signal as signal_mod
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from stoker.errors import (
    CommandTimeout,
    FrameError,
    GuestProtocolError,
    InfrastructureError,
    OutputLimitExceeded,
    StokerError,
)
from stoker.protocol import messages as m
from stoker.protocol import transfer, wire
from stoker.protocol.common import ChannelClosed, ChannelLimits, ExecResult, OutputSink
from stoker.protocol.streams import (
    QUEUE_DEPTH,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Told the journal offsets (start, end) of each frame of a command, before its sink
#: gets the frame's output (see :meth:`AgentClient.enable_journal`).
FrameHook = Callable[[int, int], None]
#: Receives every frame on a guest-opened network channel (``kind, stream,
#: channel, payload``); called by the reader, so it must never wait on the guest.
NetHandler = Callable[[int, int, int, bytes], Awaitable[None]]

READ_SIZE = 256 * 1024
#: Bytes a resuming host reads past, at most, before the agent's ``resumed`` marker:
#: the rest of a frame the old host did not read whole, and frames written meanwhile.
RESUME_SCAN_LIMIT = 64 << 20


@dataclass
class _Event:
    kind: int
    stream: int
    payload: bytes = b""
    msg: Any = None
    #: Offsets of the frame and of its end in the agent's journal (None: no journal).
    start: int | None = None
    end: int | None = None


@dataclass
class _Op:
    channel: int
    events: asyncio.Queue[_Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_DEPTH))
    failed: BaseException | None = None
    #: Journal offsets of the events queued or being handled, oldest first.
    pending: deque[int] = field(default_factory=deque)
    #: Whether the event :meth:`AgentClient._next` returned last is journaled.
    handling: bool = False


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
        #: Journal offset of the next journaled frame from the guest (None: no journal).
        self._pos: int | None = None
        self._journal_asked = False
        #: Channels whose frames the agent journals (commands started with ``journal``).
        self._journaled: set[int] = set()
        #: While resuming: the marker's first bytes, and what was read before it.
        self._resume: tuple[bytes, bytearray, int] | None = None
        self._resume_nonce: str | None = None

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

    def abort(self) -> None:
        """Drop the connection at once, saying nothing (a new process takes over)."""
        self._writer.transport.abort()

    @property
    def failure(self) -> BaseException | None:
        """Why the channel broke, if it did."""
        return self._failure

    # ------------------------------------------------------------------ journal and resume

    async def enable_journal(self, orphan_timeout: float | None = None) -> None:
        """Have the agent keep what it sends until :meth:`ack`, so a new host can resume.

        For a host process that may be restarted while a command runs (``stoker
        serve``): it stores the command's output, then acks the stored offset
        (:meth:`durable_offset`); after a restart :meth:`resume` gets the rest.
        With ``orphan_timeout`` the agent ends the VM once no host has been
        connected for that long (another host may take the job over by then).
        """
        self._journal_asked = True
        request: dict[str, object] = {"type": "journal"}
        if orphan_timeout is not None:
            request["orphan_timeout"] = float(orphan_timeout)
        await self._request(request, m.JournalOn)

    def durable_offset(self) -> int | None:
        """The journal offset before which every frame was handled (its output is in a sink).

        None without a journal.  Frames still queued for an operation, or the one
        it is handling, hold it back: they are not stored anywhere yet.
        """
        if self._pos is None:
            return None
        return min((op.pending[0] for op in self._ops.values() if op.pending), default=self._pos)

    async def ack(self, offset: int) -> None:
        """Tell the agent that everything before journal ``offset`` is stored."""
        await self._send_msg(0, {"type": "ack", "offset": int(offset)})

    @classmethod
    async def resume(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        offset: int,
        *,
        channels: Iterable[int] = (),
        limits: ChannelLimits | None = None,
        name: str = "vm",
        timeout: float = 30.0,
    ) -> AgentClient:
        """Take over an agent a previous host process (now gone) was talking to.

        ``reader``/``writer`` are a new connection to the same guest; ``offset``
        is the journal offset that host stored everything before.  The frames
        from there on are sent again, and those of ``channels`` (operations the
        old host had running, e.g. an exec: see :meth:`attach_exec`) are routed
        to them.  Raises :class:`InfrastructureError` if the agent no longer
        holds ``offset``.
        """
        client = cls(reader, writer, limits=limits, name=name)
        nonce = secrets.token_hex(16)
        prefix = b'{"type":"resumed","nonce":"' + nonce.encode() + b'"'
        client._resume = (prefix, bytearray(), 0)
        client._resume_nonce = nonce
        for channel in channels:
            if not 0 < channel < wire.NET_CHANNEL_BIT:
                raise ValueError(f"not an operation's channel: {channel}")
            client._ops[channel] = _Op(channel)
            client._journaled.add(channel)
        client.start()
        try:
            await client._send_msg(0, {"type": "resume", "nonce": nonce, "offset": int(offset)})
            async with asyncio.timeout(timeout):
                msg = await client._next_msg(client._ops[0])
        except TimeoutError:
            await client.aclose()
            raise InfrastructureError(
                f"the guest agent did not resume within {timeout:g}s"
            ) from None
        except BaseException:
            await client.aclose()
            raise
        assert isinstance(msg, m.Resumed)  # _journal_event refused anything else
        if msg.error is not None:
            await client.aclose()
            raise InfrastructureError(f"cannot resume the agent channel: {msg.error}")
        return client

    def _past_marker(self, data: bytes) -> bytes:
        """While resuming: drop what precedes the ``resumed`` marker; then the bytes from it."""
        assert self._resume is not None
        prefix, seen, dropped = self._resume
        seen += data
        at = seen.find(prefix, wire.HEADER_SIZE)  # its frame's header comes first
        if at < 0:
            keep = len(prefix) + wire.HEADER_SIZE
            if len(seen) > keep:
                dropped += len(seen) - keep
                del seen[:-keep]
            if dropped > RESUME_SCAN_LIMIT:
                raise GuestProtocolError(
                    f"no resume marker from the agent within {RESUME_SCAN_LIMIT} bytes"
                )
            self._resume = (prefix, seen, dropped)
            return b""
        self._resume = None
        return bytes(seen[at - wire.HEADER_SIZE :])

    def _journal_event(self, msg: m.JournalOn | m.Resumed, size: int) -> int | None:
        """Start counting journal offsets; the journal offset of ``msg``'s frame."""
        if isinstance(msg, m.JournalOn):
            if not self._journal_asked or self._pos is not None:
                raise GuestProtocolError("guest sent 'journal_on' unasked")
            self._pos = 0  # the journal counts the frames of journaled commands only
            return None
        if self._resume_nonce is None or msg.nonce != self._resume_nonce:
            raise GuestProtocolError("guest sent 'resumed' unasked")
        self._resume_nonce = None
        self._pos = msg.offset  # None (an error): the caller gives up
        self._highest = max(self._highest, msg.highest)
        self._ids = itertools.count(self._highest + 1)
        return None

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise ChannelClosed("the guest agent closed the channel")
                if self._resume is not None:
                    data = self._past_marker(data)
                try:
                    frames = self._decoder.feed(data)
                except wire.WireError as exc:
                    raise FrameError(f"guest sent a malformed frame: {exc}") from None
                for kind, stream, channel, payload in frames:
                    start = None
                    if self._pos is not None and channel in self._journaled:
                        start = self._pos
                        self._pos += wire.HEADER_SIZE + len(payload)
                    await self._route(kind, stream, channel, payload, start)
        except asyncio.CancelledError:
            raise
        except StokerError as exc:
            self._fail_all(exc)
        except (OSError, ConnectionError) as exc:
            self._fail_all(ChannelClosed(f"agent channel failed: {exc}"))

    async def _route(
        self, kind: int, stream: int, channel: int, payload: bytes, start: int | None = None
    ) -> None:
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
            if isinstance(msg, m.JournalOn | m.Resumed):
                start = self._journal_event(msg, len(payload))
            event = _Event(kind, stream, msg=msg)
        else:
            if stream == wire.STDIN:
                raise GuestProtocolError("guest sent data on the stdin stream")
            event = _Event(kind, stream, payload)
        if op is None:
            return  # a finished operation; late frames are dropped
        if start is not None and channel != 0:
            # Channel 0's session messages are nobody's output: they never hold back acks.
            event.start, event.end = start, start + wire.HEADER_SIZE + len(payload)
            op.pending.append(start)
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

    def _handled(self, op: _Op) -> None:
        """The caller is done with the event :meth:`_next` gave it (its output is in a sink)."""
        if op.handling:
            op.pending.popleft()
            op.handling = False

    async def _next(self, op: _Op) -> _Event:
        self._handled(op)
        if op.failed is not None and op.events.empty():
            raise op.failed
        event = await op.events.get()
        op.handling = event.start is not None
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
        on_started: Callable[[int], None] | None = None,
        on_frame: FrameHook | None = None,
        journal: bool = False,
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

        With ``journal`` (after :meth:`enable_journal`) the agent keeps the
        command's frames until acked: ``on_started`` is told its channel once it
        runs (what a resuming host attaches to), ``on_frame`` the journal
        offsets of its frames.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        cap = self.limits.max_capture if max_capture is None else max_capture
        if journal and self._pos is None:
            raise ValueError("journal=True needs enable_journal() first")
        op = self._open()
        if journal:
            self._journaled.add(op.channel)  # before the request: every reply frame counts
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
                    "journal": journal,
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
            if on_started is not None:
                on_started(op.channel)
            if stdin is not None:
                feeder = asyncio.get_running_loop().create_task(self._feed(op.channel, stdin))
            result = await self._wait_exit(
                op, argv[0], sinks, bufs if capture else None, cap, timeout, started, on_frame
            )
            running = False
            return result
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

    async def attach_exec(
        self,
        channel: int,
        *,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        timeout: float | None = None,
        what: str = "the command",
        on_frame: FrameHook | None = None,
    ) -> ExecResult:
        """Follow a command that a previous host process started on ``channel`` to its end.

        The channel must have been named to :meth:`resume`.  Output from the
        journal offset the resume started at goes to the sinks; ``timeout`` is
        what is left of the command's own.  As :meth:`exec` otherwise (no capture).
        """
        op = self._ops.get(channel)
        if op is None or channel == 0:
            raise ValueError(f"channel {channel} was not named to resume()")
        sinks = {wire.STDOUT: stdout, wire.STDERR: stderr}
        try:
            return await self._wait_exit(
                op, what, sinks, None, 0, timeout, time.monotonic(), on_frame
            )
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._signal(channel, signal_mod.SIGKILL))
            raise
        finally:
            self._close(op)

    async def _wait_exit(
        self,
        op: _Op,
        what: str,
        sinks: Mapping[int, OutputSink | None],
        bufs: dict[int, bytearray] | None,
        cap: int,
        timeout: float | None,
        started: float,
        on_frame: FrameHook | None = None,
    ) -> ExecResult:
        """Deliver a running command's output until it exits, kill it on ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                exit_msg = await self._collect(op, sinks, bufs, cap, on_frame)
        except TimeoutError:
            await self._kill(op)
            raise CommandTimeout(
                f"command timed out after {timeout:g}s and was killed: {what}",
                timeout=timeout or 0.0,
            ) from None
        except OutputLimitExceeded:
            await self._kill(op)
            raise
        out = bufs or {}
        return ExecResult(
            exit_msg.code,
            exit_msg.signal,
            bytes(out.get(wire.STDOUT, b"")),
            bytes(out.get(wire.STDERR, b"")),
            time.monotonic() - started,
            evidence=exit_msg.evidence,
        )

    async def _collect(
        self,
        op: _Op,
        sinks: Mapping[int, OutputSink | None],
        bufs: dict[int, bytearray] | None,
        cap: int,
        on_frame: FrameHook | None = None,
    ) -> m.Exit:
        captured = 0
        while True:
            self._handled(op)  # the sink took the last event: acks may include it now
            event = await self._next(op)
            if on_frame is not None and event.start is not None and event.end is not None:
                # Before the sink, with no await between: a sink that stores output
                # synchronously stores it together with the offset it came at.
                on_frame(event.start, event.end)
            if event.kind == wire.MSG:
                if isinstance(event.msg, m.Exit):
                    return event.msg
                if isinstance(event.msg, m.Started):
                    continue  # a resumed journal can start before the command did
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
        await transfer.put(self, dest, produce)

    async def get(
        self, paths: Iterable[str], cwd: str, consume: Callable[[BinaryIO], T]
    ) -> tuple[T, list[str]]:
        """Download ``paths`` (globs relative to ``cwd``) as a tar stream.

        ``consume`` runs in a thread and reads the (untrusted) tar stream; its
        result is returned with the list of patterns that matched nothing.
        """
        return await transfer.get(self, paths, cwd, consume)
