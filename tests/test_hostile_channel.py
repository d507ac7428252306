"""The host side of the agent channel against a deliberately misbehaving guest.

A fake guest (a coroutine on the other end of a socketpair) sends garbage,
oversized frames, invalid messages and floods; every case must end with a
clear, typed error and leave the host process healthy.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.errors import FrameError, GuestProtocolError, OutputLimitExceeded
from stoker.protocol import wire
from stoker.protocol.client import AgentClient, ChannelClosed, ChannelLimits

READY = {
    "type": "ready",
    "protocol": 1,
    "agent": "t",
    "python": "3.11",
    "kernel": "k",
    "pid1": True,
}
Guest = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _pair(
    guest: Guest, limits: ChannelLimits | None = None
) -> tuple[AgentClient, asyncio.Task[None]]:
    host_sock, guest_sock = socket.socketpair()
    host_sock.setblocking(False)
    guest_sock.setblocking(False)
    g_reader, g_writer = await asyncio.open_connection(sock=guest_sock)
    task = asyncio.get_running_loop().create_task(guest(g_reader, g_writer))
    h_reader, h_writer = await asyncio.open_connection(sock=host_sock)
    return AgentClient(h_reader, h_writer, limits=limits or ChannelLimits(request_timeout=2)), task


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[AgentClient]]]:
    made: list[tuple[AgentClient, asyncio.Task[None]]] = []

    async def make(guest: Guest, limits: ChannelLimits | None = None) -> AgentClient:
        client, task = await _pair(guest, limits)
        made.append((client, task))
        return client

    yield make
    for client, task in made:
        await client.aclose()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    header = await reader.readexactly(wire.HEADER_SIZE)
    length, kind, stream, channel = wire.HEADER.unpack(header)
    return kind, stream, channel, await reader.readexactly(length)


async def test_garbage_instead_of_frames(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"\xff" * 64)
        await w.drain()
        await asyncio.sleep(10)

    client = await connect(guest)
    with pytest.raises(FrameError, match="malformed frame"):
        await client.wait_ready(5)


async def test_oversized_frame_refused_before_buffering(
    connect: Callable[..., Awaitable[AgentClient]],
) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.HEADER.pack(0xFFFFFFF0, wire.DATA, wire.STDOUT, 0))
        await w.drain()
        await asyncio.sleep(10)

    client = await connect(guest)
    with pytest.raises(FrameError, match="exceeds the limit"):
        await client.wait_ready(5)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b"[1,2,3]", "not a JSON object"),
        (json.dumps({**READY, "protocol": "1"}).encode(), "protocol"),
        (json.dumps({**READY, "extra": 1}).encode(), "extra"),
        (json.dumps({"type": "launch_missiles"}).encode(), "type"),
        (json.dumps({**READY, "agent": "x" * 10_000}).encode(), "agent"),
    ],
)
async def test_invalid_messages(
    connect: Callable[..., Awaitable[AgentClient]], message: bytes, match: str
) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode(wire.MSG, 0, message))
        await w.drain()
        await asyncio.sleep(10)

    client = await connect(guest)
    with pytest.raises(GuestProtocolError, match=match):
        await client.wait_ready(5)


async def test_wrong_protocol_version(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, {**READY, "protocol": 99}))
        await w.drain()
        await asyncio.sleep(10)

    client = await connect(guest)
    with pytest.raises(GuestProtocolError, match="protocol 99"):
        await client.wait_ready(5)


async def test_never_answers(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    client = await connect(guest)
    with pytest.raises(TimeoutError):
        await client.wait_ready(0.3)


async def test_silent_after_ready(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, READY))
        await w.drain()
        await asyncio.sleep(30)

    client = await connect(guest, ChannelLimits(request_timeout=0.3))
    await client.wait_ready(5)
    with pytest.raises(Exception, match="did not answer 'ping'"):
        await client.ping()


async def test_frame_for_unopened_channel(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, READY))
        w.write(wire.encode(wire.DATA, 77, b"x", wire.STDOUT))
        await w.drain()
        await asyncio.sleep(10)

    client = await connect(guest)
    await client.wait_ready(5)
    await asyncio.sleep(0.1)
    with pytest.raises(GuestProtocolError, match="never opened"):
        await client.ping()


async def test_invalid_exit_status(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, READY))
        await w.drain()
        _, _, channel, _ = await _read_frame(r)
        w.write(wire.encode_msg(channel, {"type": "started", "pid": 5}))
        w.write(wire.encode_msg(channel, {"type": "exit", "code": 300}))
        await w.drain()
        await asyncio.sleep(10)

    client = await connect(guest)
    await client.wait_ready(5)
    with pytest.raises(GuestProtocolError, match="code"):
        await client.exec(["true"])


async def test_endless_output_capped(connect: Callable[..., Awaitable[AgentClient]]) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, READY))
        await w.drain()
        _, _, channel, _ = await _read_frame(r)
        w.write(wire.encode_msg(channel, {"type": "started", "pid": 5}))
        chunk = wire.encode(wire.DATA, channel, b"y" * wire.CHUNK, wire.STDOUT)
        while True:  # ignores the kill signal: a hostile guest never stops
            w.write(chunk)
            await w.drain()

    client = await connect(guest, ChannelLimits(kill_grace=0.5))
    await client.wait_ready(5)
    with pytest.raises(OutputLimitExceeded):
        await client.exec(["yes"], capture=True, max_capture=4 << 20)


async def test_guest_disconnects_mid_command(
    connect: Callable[..., Awaitable[AgentClient]],
) -> None:
    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, READY))
        await w.drain()
        _, _, channel, _ = await _read_frame(r)
        w.write(wire.encode_msg(channel, {"type": "started", "pid": 5}))
        await w.drain()
        w.close()

    client = await connect(guest)
    await client.wait_ready(5)
    with pytest.raises(ChannelClosed):
        await client.exec(["true"])


async def test_hostile_tar_on_download(
    connect: Callable[..., Awaitable[AgentClient]], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import io
    import tarfile

    from stoker.archive import safe_extract
    from stoker.errors import UnsafeArchive

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    async def guest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(wire.encode_msg(0, READY))
        await w.drain()
        _, _, channel, _ = await _read_frame(r)
        w.write(wire.encode(wire.DATA, channel, buf.getvalue(), wire.FILES))
        w.write(wire.encode(wire.EOF, channel, b"", wire.FILES))
        w.write(wire.encode_msg(channel, {"type": "done"}))
        await w.drain()
        await asyncio.sleep(10)

    out = tmp_path / "out"
    out.mkdir()
    client = await connect(guest)
    await client.wait_ready(5)
    with pytest.raises(UnsafeArchive):
        await client.get(["*"], "/", lambda s: safe_extract(s, out))
    assert not (tmp_path / "escape.txt").exists()
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- frame decoder fuzzing


@given(
    st.lists(
        st.tuples(
            st.sampled_from(wire.KINDS),
            st.sampled_from(wire.STREAMS),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=300),
        ),
        max_size=20,
    ),
    st.integers(1, 64),
)
@settings(max_examples=300, deadline=None)
def test_decoder_roundtrip_any_split(frames: list[tuple[int, int, int, bytes]], split: int) -> None:
    frames = [(k, s, c, b"" if k == wire.EOF else p) for k, s, c, p in frames]
    data = b"".join(wire.encode(k, c, p, s) for k, s, c, p in frames)
    dec = wire.Decoder()
    out = []
    for i in range(0, len(data), split):
        out.extend(dec.feed(data[i : i + split]))
    assert out == frames
    assert dec.pending == 0


@given(st.binary(max_size=4096))
@settings(max_examples=500, deadline=None)
def test_decoder_garbage_never_crashes_or_overbuffers(data: bytes) -> None:
    dec = wire.Decoder(max_payload=1024)
    try:
        for kind, stream, _channel, payload in dec.feed(data):
            assert kind in wire.KINDS and stream in wire.STREAMS and len(payload) <= 1024
    except wire.WireError:
        return
    assert dec.pending <= wire.HEADER_SIZE + 1024


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_decode_msg_only_raises_wire_error(payload: bytes) -> None:
    try:
        msg = wire.decode_msg(payload)
    except wire.WireError:
        return
    assert isinstance(msg, dict) and isinstance(msg["type"], str)


def test_header_layout_is_stable() -> None:
    # Golden bytes: changing the wire format must bump PROTOCOL_VERSION.
    assert wire.encode(wire.DATA, 7, b"ab", wire.STDERR) == struct.pack(">IBBI", 2, 2, 2, 7) + b"ab"
    assert wire.PROTOCOL_VERSION == 1
