"""Transports: the hybrid-vsock CONNECT handshake against a local Unix-socket peer.

The peer plays Firecracker's / Cloud Hypervisor's side: it reads ``CONNECT <port>\\n``
and answers ``OK <host port>\\n``, after which the socket carries the agent protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from stoker.errors import GuestProtocolError, InfrastructureError
from stoker.protocol import wire
from stoker.protocol.client import AgentClient
from stoker.protocol.transport import HybridVsockTransport

READY = {"type": "ready", "protocol": 1, "agent": "t", "python": "3", "kernel": "k", "pid1": True}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def uds(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[Path]]]:
    servers: list[asyncio.AbstractServer] = []

    async def serve(handler: Handler) -> Path:
        path = tmp_path / f"vsock-{len(servers)}.sock"
        servers.append(await asyncio.start_unix_server(handler, path=str(path)))
        return path

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_handshake_then_protocol(uds: Callable[[Handler], Awaitable[Path]]) -> None:
    seen: list[bytes] = []

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        writer.write(b"OK 1073741824\n")
        writer.write(wire.encode_msg(0, READY))
        await writer.drain()
        await reader.read()  # until the host closes
        writer.close()

    path = await uds(vmm)
    reader, writer = await HybridVsockTransport(path, 1024).connect(timeout=5)
    client = AgentClient(reader, writer)
    try:
        ready = await client.wait_ready(5)
        assert ready.agent == "t"
        assert seen == [b"CONNECT 1024\n"]
    finally:
        await client.aclose()


@pytest.mark.parametrize("reply", [b"NO\n", b"OK\n", b"OK abc\n", b"ERR 1024\n", b"OK 1 2\n"])
async def test_bad_handshake_reply(uds: Callable[[Handler], Awaitable[Path]], reply: bytes) -> None:
    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    path = await uds(vmm)
    with pytest.raises(GuestProtocolError, match="unexpected reply"):
        await HybridVsockTransport(path, 52).connect(timeout=5)


async def test_peer_hangs_up_during_handshake(uds: Callable[[Handler], Awaitable[Path]]) -> None:
    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.close()

    path = await uds(vmm)
    with pytest.raises(InfrastructureError, match="handshake"):
        await HybridVsockTransport(path, 52).connect(timeout=5)


async def test_peer_never_answers(uds: Callable[[Handler], Awaitable[Path]]) -> None:
    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    path = await uds(vmm)
    with pytest.raises(InfrastructureError, match="timed out"):
        await HybridVsockTransport(path, 52).connect(timeout=0.3)
