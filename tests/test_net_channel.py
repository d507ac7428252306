"""Guest connections multiplexed over the agent channel (stoker.net.channel + agent/netfwd).

The real guest agent runs on the host over a socketpair (as in
test_agent_local.py); its proxy listener binds an ephemeral port on 127.0.0.1
and the tests connect to it as guest programs would.  On the host side the
connection handler is a small echo/source service written here: these tests
are about the transport (windows, EOF, close, limits, a hostile peer); the
egress proxy itself is tested in test_net_proxy.py and end to end in VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stoker.errors import GuestProtocolError
from stoker.net.channel import GuestNetwork, proxy_env
from stoker.protocol import wire
from stoker.protocol.client import AgentClient, ChannelLimits

SRC = Path(__file__).resolve().parents[1] / "src"


class Echo:
    """Echoes every byte back; with ``source`` set, first sends that many bytes."""

    def __init__(self, source: int = 0) -> None:
        self.source = source
        self.handled = 0
        self.finished = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handled += 1
        try:
            if self.source and self.handled == 1:  # only the first connection is a source
                block = b"s" * 65536
                left = self.source
                while left:
                    writer.write(block[: min(left, len(block))])
                    left -= min(left, len(block))
                    await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self.finished += 1


class Agent:
    def __init__(self, client: AgentClient, proc: subprocess.Popen[bytes]) -> None:
        self.client = client
        self.proc = proc


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-B", "-m", "stoker.agent", "--fd", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        env={"PYTHONPATH": str(SRC), "PATH": os.environ["PATH"]},
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    ours.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    client = AgentClient(reader, writer, limits=ChannelLimits(kill_grace=5))
    try:
        await client.wait_ready(10)
        yield Agent(client, proc)
    finally:
        await client.aclose()
        proc.kill()
        proc.wait()


async def start(agent: Agent, handler: Echo, **kw: int) -> tuple[GuestNetwork, int]:
    net = GuestNetwork(agent.client, handler, **kw)
    port = await net.start(proxy_env(), port=0)
    assert port > 0
    return net, port


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await reader.read(-1)
        await sender
        return got
    finally:
        writer.close()


async def test_bulk_roundtrip_keeps_every_byte(agent: Agent) -> None:
    net, port = await start(agent, Echo())
    try:
        payload = os.urandom(6 << 20)
        got = await asyncio.wait_for(roundtrip(port, payload), 120)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    finally:
        await net.aclose()


async def test_many_concurrent_streams(agent: Agent) -> None:
    handler = Echo()
    net, port = await start(agent, handler)
    try:
        payloads = [os.urandom(50_000 + i) for i in range(40)]
        results = await asyncio.wait_for(
            asyncio.gather(*(roundtrip(port, p) for p in payloads)), 120
        )
        assert results == payloads
        assert handler.handled == 40
        for _ in range(100):
            if net.active == 0:
                break
            await asyncio.sleep(0.05)
        assert net.active == 0, "finished streams must be forgotten"
    finally:
        await net.aclose()


async def test_a_stalled_stream_does_not_block_others_or_commands(agent: Agent) -> None:
    # The handler pushes 20 MB at a guest client that never reads: the window
    # stops it; another stream and a command still run.
    stalled = Echo(source=20 << 20)
    net, port = await start(agent, stalled)
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.5)
        got = await asyncio.wait_for(roundtrip(port, b"still flowing" * 1000), 30)
        assert got == b"still flowing" * 1000
        res = await asyncio.wait_for(
            agent.client.exec(["echo", "ok"], env={"PATH": os.environ["PATH"]}, capture=True), 30
        )
        assert res.stdout == b"ok\n"
        # Unblock: read everything the stalled stream was sent.
        total = 0
        while total < 20 << 20:
            chunk = await asyncio.wait_for(r1.read(1 << 20), 60)
            assert chunk
            total += len(chunk)
        w1.close()
    finally:
        await net.aclose()


async def test_host_close_reaches_the_guest_client(agent: Agent) -> None:
    class Greeter(Echo):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"bye\n")
            await writer.drain()
            writer.close()

    net, port = await start(agent, Greeter())
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(-1), 10) == b"bye\n"
        writer.close()
    finally:
        await net.aclose()


async def test_aclose_ends_open_streams(agent: Agent) -> None:
    handler = Echo()
    net, port = await start(agent, handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
    await net.aclose()
    assert handler.finished == 1 and net.active == 0
    assert await asyncio.wait_for(reader.read(-1), 10) == b""
    writer.close()


async def test_streams_beyond_the_hard_cap_are_closed_at_once(agent: Agent) -> None:
    handler = Echo()
    net, port = await start(agent, handler, max_streams=3)
    try:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
        for _, w in conns:
            w.write(b"ping")
        answered = 0
        for r, _ in conns:
            data = await asyncio.wait_for(r.read(4), 10)
            answered += data == b"ping"
        assert answered == 3 and net.refused == 3
        for _, w in conns:
            w.close()
    finally:
        await net.aclose()


# --------------------------------------------------------------------------- a hostile guest


class FakeGuest:
    """The host's AgentClient with a test-controlled peer writing raw frames."""

    def __init__(self, client: AgentClient, peer: socket.socket) -> None:
        self.client = client
        self.peer = peer

    async def send(self, frame: bytes) -> None:
        # In a thread: the host's reader runs on this loop and must keep reading.
        await asyncio.to_thread(self.peer.sendall, frame)

    def frames(self, timeout: float = 5.0) -> list[wire.Frame]:
        self.peer.settimeout(timeout)
        decoder = wire.Decoder()
        try:
            return decoder.feed(self.peer.recv(1 << 20))
        except TimeoutError:
            return []


@pytest.fixture
async def fake_guest() -> AsyncIterator[FakeGuest]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    client = AgentClient(reader, writer)
    client.start()
    try:
        yield FakeGuest(client, peer)
    finally:
        await client.aclose()
        peer.close()


NET = wire.NET_CHANNEL_BIT | 1


async def _failure(client: AgentClient) -> BaseException | None:
    for _ in range(100):
        if client.failure is not None:
            return client.failure
        await asyncio.sleep(0.02)
    return None


async def test_network_frames_without_a_network_break_the_channel(fake_guest: FakeGuest) -> None:
    await fake_guest.send(wire.encode_msg(NET, {"type": "net_open"}))
    failure = await _failure(fake_guest.client)
    assert isinstance(failure, GuestProtocolError) and "no network" in str(failure)


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([wire.encode_msg(NET, {"type": "net_open", "extra": 1})], "invalid message"),
        ([wire.encode_msg(NET, {"type": "net_teleport"})], "invalid message"),
        (
            [
                wire.encode_msg(NET, {"type": "net_open"}),
                wire.encode_msg(NET, {"type": "net_open"}),
            ],
            "opened twice",
        ),
        (
            [
                wire.encode_msg(NET, {"type": "net_open"}),
                wire.encode(wire.DATA, NET, b"x" * 65536),
                *[wire.encode(wire.DATA, NET, b"x" * 65536) for _ in range(40)],
            ],
            "window",
        ),
        (
            [
                wire.encode_msg(NET, {"type": "net_open"}),
                wire.encode_msg(NET, {"type": "net_window", "bytes": 1}),
            ],
            "window grant",
        ),
        ([wire.encode(wire.DATA, NET, b"x", wire.STDOUT)], "stream"),
    ],
)
async def test_protocol_violations_fail_the_channel(
    fake_guest: FakeGuest, frames: list[bytes], reason: str
) -> None:
    # The handler never reads, so nothing the guest sends is granted back.
    class Stuck(Echo):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3600)

    net = GuestNetwork(fake_guest.client, Stuck())
    fake_guest.client.attach_network(net.on_frame)
    try:
        # Sent in the background: once the host stops reading, a send may block.
        sender = asyncio.create_task(fake_guest.send(b"".join(frames)))
        failure = await _failure(fake_guest.client)
        fake_guest.peer.shutdown(socket.SHUT_RDWR)  # unblocks the sender
        with contextlib.suppress(OSError):
            await sender
        assert isinstance(failure, GuestProtocolError), failure
        assert reason in str(failure)
    finally:
        await net.aclose()


async def test_late_frames_for_closed_streams_are_dropped(fake_guest: FakeGuest) -> None:
    net = GuestNetwork(fake_guest.client, Echo())
    fake_guest.client.attach_network(net.on_frame)
    try:
        await fake_guest.send(wire.encode_msg(NET, {"type": "net_close"}))
        await fake_guest.send(wire.encode(wire.DATA, NET, b"late"))
        await fake_guest.send(wire.encode(wire.EOF, NET))
        await asyncio.sleep(0.3)
        assert fake_guest.client.failure is None
        assert net.active == 0
    finally:
        await net.aclose()
