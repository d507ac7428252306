"""The host end of a VM's proxied connections, multiplexed over its agent channel.

In ``egress`` mode the guest has no network device.  The agent listens on the
guest's loopback (see :mod:`stoker.agent.netfwd`) and opens one stream per
connection on the agent channel: a channel number with
:data:`~stoker.protocol.wire.NET_CHANNEL_BIT` set, announced by a ``net_open``
message.  The same channel runs over virtio-serial (QEMU) or vsock (Firecracker,
Cloud Hypervisor), so this module is the wiring for every backend.

Each stream is handed to the VM's egress proxy as an ordinary socket: one end of
a ``socketpair`` becomes the proxy's client connection, and two pumps move bytes
between the other end and the channel:

* guest -> proxy: the guest may send :data:`~stoker.protocol.wire.NET_WINDOW`
  bytes before we grant more, and we grant only once the bytes went into the
  socket pair; a guest that sends beyond its window breaks the protocol;
* proxy -> guest: we send only within the window the guest granted.

So memory per stream is bounded, one stalled connection never blocks the
channel's reader (which also carries the job's output), and the number of
streams is bounded too.  The guest is hostile: every message is validated, and
any violation fails the agent channel, which ends only this VM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Mapping
from typing import Annotated, Literal, Protocol

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from stoker.errors import GuestProtocolError
from stoker.protocol import wire
from stoker.protocol.client import AgentClient

log = logging.getLogger("stoker.net")


class ConnectionHandler(Protocol):
    """What serves one guest connection (:class:`stoker.net.proxy.EgressProxy`)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> object:
        """Serve the connection until it ends; must close ``writer``."""


class _NetMsg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NetOpen(_NetMsg):
    type: Literal["net_open"]


class NetWindow(_NetMsg):
    type: Literal["net_window"]
    bytes: int = Field(ge=1, le=wire.NET_WINDOW)


class NetClose(_NetMsg):
    type: Literal["net_close"]


_net_message: pydantic.TypeAdapter[NetOpen | NetWindow | NetClose] = pydantic.TypeAdapter(
    Annotated[NetOpen | NetWindow | NetClose, Field(discriminator="type")]
)


def proxy_env(port: int = wire.NET_PROXY_PORT) -> dict[str, str]:
    """The environment that points ordinary tools at the guest's proxy address."""
    url = f"http://127.0.0.1:{port}"
    no_proxy = "localhost,127.0.0.1,::1"
    return {
        "http_proxy": url,
        "https_proxy": url,
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "no_proxy": no_proxy,
        "NO_PROXY": no_proxy,
        # npm reads its own names for the same setting.
        "npm_config_proxy": url,
        "npm_config_https_proxy": url,
    }


class _Stream:
    """One guest connection: a socket pair, two pumps and the proxy's handler."""

    def __init__(self, channel: int) -> None:
        self.channel = channel
        # ours: pumped to and from the channel; theirs: the proxy's client socket.
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        #: Bytes the guest may still send before we grant more.
        self.recv_credit = wire.NET_WINDOW
        #: Bytes we may still send before the guest grants more.
        self.send_credit = wire.NET_WINDOW
        self.credit_changed = asyncio.Event()
        self.inbox: collections.deque[bytes | None] = collections.deque()  # None: guest EOF
        self.inbox_changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: The guest said net_close: do not send it one.
        self.closed_by_guest = False

    def close_sockets(self) -> None:
        for sock in (self.ours, self.theirs):
            with contextlib.suppress(OSError):
                sock.close()


class GuestNetwork:
    """Serves one VM's proxied connections; attach once, close with :meth:`aclose`."""

    def __init__(
        self,
        client: AgentClient,
        handler: ConnectionHandler,
        *,
        max_streams: int = 256,
        name: str = "vm",
    ) -> None:
        self._client = client
        self._handler = handler
        #: Hard cap on streams the guest may hold open.  The proxy's own
        #: connection limit is lower and answers with a reason; past this cap a
        #: stream is closed without a word, so a flood costs nothing.
        self.max_streams = max_streams
        self._streams: dict[int, _Stream] = {}
        self._closing = False
        self._log = log.getChild(name)
        self.refused = 0

    async def start(self, env: Mapping[str, str], port: int = wire.NET_PROXY_PORT) -> int:
        """Route the guest's network channels here and start the agent's listener.

        Returns the guest loopback port the agent listens on.
        """
        self._client.attach_network(self.on_frame)
        return await self._client.net_start(port, env)

    @property
    def active(self) -> int:
        """Streams currently open."""
        return len(self._streams)

    # ------------------------------------------------------------------ frames from the guest

    async def on_frame(self, kind: int, stream: int, channel: int, payload: bytes) -> None:
        """Called by the agent client's reader for every network frame (never waits long)."""
        if stream != 0:
            raise GuestProtocolError(f"network channel {channel:#x}: stream {stream}, expected 0")
        st = self._streams.get(channel)
        if kind == wire.MSG:
            msg = self._parse(channel, payload)
            if isinstance(msg, NetOpen):
                await self._open(channel)
            elif st is None:
                return  # late message for a stream we closed
            elif isinstance(msg, NetWindow):
                if st.send_credit + msg.bytes > wire.NET_WINDOW:
                    raise GuestProtocolError(
                        f"network channel {channel:#x}: window grant beyond what was sent"
                    )
                st.send_credit += msg.bytes
                st.credit_changed.set()
            else:
                st.closed_by_guest = True
                self._drop(st)
            return
        if st is None:
            return  # data racing our net_close: dropped
        if kind == wire.DATA:
            if len(payload) > st.recv_credit:
                raise GuestProtocolError(
                    f"network channel {channel:#x}: guest sent {len(payload)} bytes "
                    f"with a window of {st.recv_credit}"
                )
            st.recv_credit -= len(payload)
            st.inbox.append(payload)
        else:
            st.inbox.append(None)
        st.inbox_changed.set()

    def _parse(self, channel: int, payload: bytes) -> NetOpen | NetWindow | NetClose:
        try:
            return _net_message.validate_python(wire.decode_msg(payload))
        except wire.WireError as exc:
            raise GuestProtocolError(f"network channel {channel:#x}: {exc}") from None
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise GuestProtocolError(
                f"network channel {channel:#x}: invalid message: {where}: {first['msg']}"
            ) from None

    async def _open(self, channel: int) -> None:
        if channel in self._streams:
            raise GuestProtocolError(f"network channel {channel:#x} opened twice")
        if self._closing or len(self._streams) >= self.max_streams:
            self.refused += 1
            await self._client.send_frame(wire.encode_msg(channel, {"type": "net_close"}))
            return
        st = _Stream(channel)
        self._streams[channel] = st
        st.task = asyncio.get_running_loop().create_task(self._serve(st), name=f"net-{channel:#x}")

    def _drop(self, st: _Stream) -> None:
        """Forget ``st`` and stop its pumps (its proxy connection sees a reset)."""
        self._streams.pop(st.channel, None)
        if st.task is not None and not st.task.done():
            st.task.cancel()

    # ------------------------------------------------------------------ one stream

    async def _serve(self, st: _Stream) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=st.theirs)
            async with asyncio.TaskGroup() as tg:
                inbound = tg.create_task(self._to_proxy(st))
                outbound = tg.create_task(self._to_guest(st))
                # The handler closes its side when the connection is over; then
                # everything it wrote is forwarded and the guest's side no longer
                # matters (a guest that never closes cannot hold the stream).
                await self._handler.handle(reader, writer)
                await outbound
                inbound.cancel()
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one connection's failure must not end the others
            self._log.warning("network stream %#x failed: %s", st.channel, exc)
        finally:
            if writer is not None:
                writer.close()
            st.close_sockets()
            self._streams.pop(st.channel, None)
            if not st.closed_by_guest:
                # Bounded: during teardown the guest may have stopped reading.
                close = wire.encode_msg(st.channel, {"type": "net_close"})
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1):
                        await self._client.send_frame(close)

    async def _to_proxy(self, st: _Stream) -> None:
        """Guest data into the socket pair; each chunk written is granted back."""
        loop = asyncio.get_running_loop()
        while True:
            while not st.inbox:
                st.inbox_changed.clear()
                await st.inbox_changed.wait()
            chunk = st.inbox.popleft()
            if chunk is None:
                with contextlib.suppress(OSError):
                    st.ours.shutdown(socket.SHUT_WR)
                return
            try:
                await loop.sock_sendall(st.ours, chunk)
            except OSError:
                return  # the proxy closed its side; _to_guest sees the end
            st.recv_credit += len(chunk)
            await self._client.send_frame(
                wire.encode_msg(st.channel, {"type": "net_window", "bytes": len(chunk)})
            )

    async def _to_guest(self, st: _Stream) -> None:
        """Proxy output to the guest, within the window the guest granted."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(st.ours, wire.CHUNK)
            except OSError:
                data = b""
            if not data:
                await self._client.send_frame(wire.encode(wire.EOF, st.channel))
                return
            view = memoryview(data)
            while view:
                while st.send_credit <= 0:
                    st.credit_changed.clear()
                    await st.credit_changed.wait()
                n = min(st.send_credit, len(view))
                st.send_credit -= n
                await self._client.send_frame(wire.encode(wire.DATA, st.channel, bytes(view[:n])))
                view = view[n:]

    # ------------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        """Stop every stream and wait for them (idempotent)."""
        self._closing = True
        tasks = [st.task for st in self._streams.values() if st.task is not None]
        for st in list(self._streams.values()):
            self._drop(st)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
