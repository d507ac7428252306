"""A new host process takes over a guest agent mid-command (the journal and ``resume``).

The real agent runs on the host with ``--listen`` (a Unix socket standing in
for a channel the host can reconnect to, as a restarted ``stoker serve``
reconnects to QEMU's).  The first host "stores" the command's output with the
journal offset it came at, as the service's log writer does, and dies without
a word (its connection aborted); a second host resumes from the stored offset
and must get exactly the rest: nothing lost, nothing twice.  Then the guest
misbehaving around the journal: answers nobody asked for are refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from stoker.errors import GuestProtocolError, InfrastructureError
from stoker.protocol import wire
from stoker.protocol.client import AgentClient, ChannelClosed, ChannelLimits

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {"PATH": os.environ["PATH"]}
#: 300 numbered lines, a few milliseconds apart, then exit status 7.
COUNT = 300
COMMAND = f'i=0; while [ $i -lt {COUNT} ]; do echo "line $i"; i=$((i+1)); sleep 0.002; done; exit 7'
EXPECTED = "".join(f"line {i}\n" for i in range(COUNT)).encode()


@pytest.fixture
async def agent_process(tmp_path: Path) -> AsyncIterator[tuple[Path, subprocess.Popen[bytes]]]:
    path = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-B", "-m", "stoker.agent", "--listen", str(path)],
        env={"PYTHONPATH": str(SRC), **ENV},
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def agent_socket(agent_process: tuple[Path, subprocess.Popen[bytes]]) -> Path:
    return agent_process[0]


async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


class Store:
    """What a host stored of a command's output, and the journal offset it stored up to."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offset = 0

    def on_frame(self, start: int, end: int) -> None:
        self.offset = end

    async def sink(self, data: bytes) -> None:
        self.data += data


async def _first_host_dies_mid_command(path: Path) -> tuple[bytes, int, int]:
    """Start the command, store some output, die; returns (stored, its offset, channel)."""
    reader, writer = await _connect(path)
    first = AgentClient(reader, writer)
    await first.wait_ready(10)
    await first.enable_journal()
    store = Store()
    channels: list[int] = []
    run = asyncio.get_running_loop().create_task(
        first.exec(
            ["sh", "-c", COMMAND],
            env=ENV,
            stdout=store.sink,
            on_started=channels.append,
            on_frame=store.on_frame,
            journal=True,
        )
    )
    while store.data.count(b"\n") < 60:
        await asyncio.sleep(0.01)
    # Stored together (no await in between), as a log flush stores them.
    stored, offset = bytes(store.data), store.offset
    await first.ack(offset)
    # Then output arrives that this host never stores: it dies first (SIGKILL: no goodbye).
    while store.data.count(b"\n") < 120:
        await asyncio.sleep(0.01)
    writer.transport.abort()
    with pytest.raises(ChannelClosed):
        await run
    await first.aclose()
    assert len(channels) == 1
    return stored, offset, channels[0]


async def test_a_new_host_gets_exactly_the_rest_of_a_running_command(agent_socket: Path) -> None:
    stored, offset, channel = await _first_host_dies_mid_command(agent_socket)
    assert 0 < len(stored) < len(EXPECTED)

    reader, writer = await _connect(agent_socket)
    second = await AgentClient.resume(reader, writer, offset, channels=[channel])
    try:
        rest = Store()
        result = await second.attach_exec(
            channel, stdout=rest.sink, on_frame=rest.on_frame, timeout=60
        )
        assert result.exit_code == 7
        assert stored + bytes(rest.data) == EXPECTED
        assert rest.offset > offset
        # The new host numbers its own operations after the old host's.
        again = await second.exec(["echo", "still here"], env=ENV, capture=True)
        assert again.stdout == b"still here\n"
    finally:
        await second.aclose()


async def test_an_offset_the_journal_no_longer_holds_is_refused(agent_socket: Path) -> None:
    stored, offset, channel = await _first_host_dies_mid_command(agent_socket)
    reader, writer = await _connect(agent_socket)
    # Acknowledged (and so forgotten) up to ``offset``: anything before it is gone.
    with pytest.raises(InfrastructureError, match="not a frame kept in the journal"):
        await AgentClient.resume(reader, writer, 0, channels=[channel])
    # A second try at the right offset still works.
    reader, writer = await _connect(agent_socket)
    second = await AgentClient.resume(reader, writer, offset, channels=[channel])
    try:
        result = await second.attach_exec(channel, timeout=60)
        assert result.exit_code == 7
    finally:
        await second.aclose()


async def test_an_orphaned_agent_ends_its_vm(
    agent_process: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    path, proc = agent_process
    reader, writer = await _connect(path)
    host = AgentClient(reader, writer)
    await host.wait_ready(10)
    await host.enable_journal(orphan_timeout=1.0)
    run = asyncio.get_running_loop().create_task(
        host.exec(["sleep", "600"], env=ENV, capture=False)
    )
    await asyncio.sleep(0.5)
    writer.transport.abort()  # the host dies, and no other comes
    with pytest.raises(ChannelClosed):
        await run
    await host.aclose()
    # The agent gives up after the timeout: a real guest powers off (here: it exits).
    code = await asyncio.to_thread(proc.wait, 30)
    assert code == 3


# --- a guest misbehaving around the journal ------------------------------------------------------

READY = {"type": "ready", "protocol": 1, "agent": "t", "python": "3", "kernel": "k", "pid1": True}
Guest = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _with_guest(guest: Guest, run: Callable[[AgentClient], Awaitable[None]]) -> None:
    host_sock, guest_sock = socket.socketpair()
    g_reader, g_writer = await asyncio.open_connection(sock=guest_sock)
    task = asyncio.get_running_loop().create_task(guest(g_reader, g_writer))
    h_reader, h_writer = await asyncio.open_connection(sock=host_sock)
    client = AgentClient(h_reader, h_writer, limits=ChannelLimits(request_timeout=5))
    try:
        await run(client)
    finally:
        await client.aclose()
        task.cancel()
        with pytest.raises((asyncio.CancelledError, Exception)):
            await task
        g_writer.close()


def _msg(channel: int, message: dict[str, object]) -> bytes:
    return wire.encode(wire.MSG, channel, json.dumps(message).encode())


@pytest.mark.parametrize(
    "unasked",
    [
        {"type": "journal_on"},
        {"type": "resumed", "nonce": "0" * 32, "highest": 7, "offset": 0},
    ],
    ids=["journal_on", "resumed"],
)
async def test_journal_answers_nobody_asked_for_are_refused(unasked: dict[str, object]) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_msg(0, READY) + _msg(0, unasked))
        await writer.drain()
        await asyncio.sleep(30)

    async def run(client: AgentClient) -> None:
        await client.wait_ready(5)
        with pytest.raises(GuestProtocolError, match="unasked"):
            await client.ping()

    await _with_guest(guest, run)


async def test_a_resume_without_the_marker_gives_up_within_its_bound() -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"\x00" * (1 << 20)
        while True:  # bytes that never contain the marker
            writer.write(chunk)
            await writer.drain()

    host_sock, guest_sock = socket.socketpair()
    g_reader, g_writer = await asyncio.open_connection(sock=guest_sock)
    task = asyncio.get_running_loop().create_task(guest(g_reader, g_writer))
    h_reader, h_writer = await asyncio.open_connection(sock=host_sock)
    try:
        with pytest.raises(GuestProtocolError, match="no resume marker"):
            await AgentClient.resume(h_reader, h_writer, 0, channels=[1], timeout=60)
    finally:
        task.cancel()
        with pytest.raises((asyncio.CancelledError, Exception)):
            await task
        g_writer.close()
