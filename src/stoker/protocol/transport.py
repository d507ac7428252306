"""Transports: how the host gets a byte stream to the guest agent.

Callers only ever see a connected ``(StreamReader, StreamWriter)`` pair; which
wire carries it is the backend's business:

* :class:`SocketTransport` - a socket the VMM already connected to the guest's
  port (QEMU: one end of a socketpair handed to a virtio-serial chardev).
* :class:`HybridVsockTransport` - Firecracker / Cloud Hypervisor "hybrid vsock":
  connect to the VMM's Unix socket and perform the ``CONNECT <port>`` handshake.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from abc import ABC, abstractmethod
from pathlib import Path

from stoker.errors import GuestProtocolError, InfrastructureError

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: Read buffer limit of the stream reader; frames are bounded separately.
STREAM_LIMIT = 1 << 20


class Transport(ABC):
    """Produces a connected stream to the guest agent."""

    @abstractmethod
    async def connect(self, timeout: float) -> StreamPair:
        """Return a connected stream, or raise :class:`InfrastructureError`."""


class SocketTransport(Transport):
    """A stream over an already connected socket (ownership passes to the stream)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    async def connect(self, timeout: float) -> StreamPair:
        if self._sock is None:
            raise InfrastructureError("the agent socket was already used")
        sock, self._sock = self._sock, None
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)


class HybridVsockTransport(Transport):
    """Firecracker/Cloud Hypervisor vsock exposed as a host Unix socket.

    The host connects to ``uds_path`` and writes ``CONNECT <port>\\n``; the VMM
    answers ``OK <host-side port>\\n`` once the guest accepted, after which the
    socket is a plain byte stream to the guest's listener.

    Until the guest agent listens, the VMM closes a ``CONNECT`` (and before the
    device exists the socket file is missing), so :meth:`connect` retries until
    its deadline.  A reply that is not ``OK <port>`` is the guest's doing and is
    never retried.
    """

    RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.25)

    def __init__(self, uds_path: Path, port: int) -> None:
        self.uds_path = uds_path
        self.port = port

    async def connect(self, timeout: float) -> StreamPair:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        for attempt in itertools.count():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    return await self._handshake()
            except GuestProtocolError:
                raise
            except TimeoutError:
                last = InfrastructureError("the handshake timed out")
                break
            except (InfrastructureError, OSError) as exc:
                last = exc
            delay = self.RETRY_DELAYS[min(attempt, len(self.RETRY_DELAYS) - 1)]
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        raise InfrastructureError(
            f"the guest agent did not accept vsock port {self.port} on {self.uds_path} "
            f"within {timeout:g}s" + (f" (last error: {last})" if last else "")
        )

    async def _handshake(self) -> StreamPair:
        reader, writer = await asyncio.open_unix_connection(str(self.uds_path), limit=STREAM_LIMIT)
        try:
            writer.write(f"CONNECT {self.port}\n".encode())
            await writer.drain()
            # The reply is one short line; bound it so a confused peer cannot feed us.
            line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            writer.close()
            raise InfrastructureError(
                f"vsock handshake on {self.uds_path} port {self.port} failed: {exc}"
            ) from exc
        except BaseException:
            # Cancelled (the deadline) mid-read: do not leak the socket.
            writer.close()
            raise
        parts = line.decode("ascii", "replace").split()
        if len(parts) != 2 or parts[0] != "OK" or not parts[1].isdigit() or len(line) > 32:
            writer.close()
            raise GuestProtocolError(
                f"vsock handshake on {self.uds_path}: unexpected reply {line[:32]!r}"
            )
        return reader, writer
