"""The real guest agent driven over a socketpair on the host (no VM needed).

This exercises the protocol end to end (framing, exec, streams, signals, files)
quickly; the same agent runs as PID 1 in the VM tests.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stoker.errors import CommandTimeout, OutputLimitExceeded
from stoker.protocol.client import AgentClient, ChannelLimits

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
async def agent() -> AsyncIterator[AgentClient]:
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
        ready = await client.wait_ready(10)
        assert ready.protocol == 1 and ready.pid1 is False
        yield client
    finally:
        await client.aclose()
        proc.kill()
        proc.wait()


async def test_exec_roundtrip(agent: AgentClient) -> None:
    res = await agent.exec(
        ["sh", "-c", "echo out; echo err >&2; exit 3"],
        capture=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert res.exit_code == 3 and res.signal is None
    assert res.stdout == b"out\n" and res.stderr == b"err\n"


async def test_signal_termination(agent: AgentClient) -> None:
    res = await agent.exec(["sh", "-c", "kill -TERM $$"], env={"PATH": os.environ["PATH"]})
    assert res.exit_code is None and res.signal == signal.SIGTERM
    assert res.returncode == 128 + signal.SIGTERM


async def test_env_cwd_stdin(agent: AgentClient, tmp_path: Path) -> None:
    res = await agent.exec(
        ["sh", "-c", "pwd; echo $FOO; cat"],
        env={"FOO": "bar", "PATH": "/usr/bin:/bin"},
        cwd=str(tmp_path),
        stdin=b"hello stdin",
        capture=True,
    )
    assert res.stdout.decode().splitlines() == [str(tmp_path), "bar", "hello stdin"]


async def test_spawn_failure_is_127(agent: AgentClient) -> None:
    res = await agent.exec(["/nonexistent/program"])
    assert res.exit_code == 127 and res.spawn_error and "nonexistent" in res.spawn_error


async def test_timeout_kills_process_group(agent: AgentClient) -> None:
    with pytest.raises(CommandTimeout):
        await agent.exec(
            ["sh", "-c", "sleep 100 & sleep 100"], timeout=0.5, env={"PATH": "/usr/bin:/bin"}
        )
    # The channel is still usable afterwards.
    await agent.ping()


async def test_capture_limit(agent: AgentClient) -> None:
    with pytest.raises(OutputLimitExceeded):
        await agent.exec(
            ["sh", "-c", "yes"], capture=True, max_capture=1 << 20, env={"PATH": "/usr/bin:/bin"}
        )
    await agent.ping()


async def test_large_output_streamed(agent: AgentClient) -> None:
    total = 0

    def sink(data: bytes) -> None:
        nonlocal total
        total += len(data)

    res = await agent.exec(
        ["head", "-c", str(20 << 20), "/dev/zero"], stdout=sink, env={"PATH": "/usr/bin:/bin"}
    )
    assert res.ok and total == 20 << 20


async def test_put_and_get_roundtrip(agent: AgentClient, tmp_path: Path) -> None:
    dest = tmp_path / "in-guest"

    def produce(out: io.RawIOBase) -> None:
        with tarfile.open(fileobj=out, mode="w|") as tar:  # type: ignore[call-overload]
            data = os.urandom(300_000)
            info = tarfile.TarInfo("dir/blob.bin")
            info.size = len(data)
            info.mode = 0o640
            tar.addfile(info, io.BytesIO(data))
            (tmp_path / "orig.bin").write_bytes(data)

    await agent.put(str(dest), produce)
    assert (dest / "dir/blob.bin").read_bytes() == (tmp_path / "orig.bin").read_bytes()
    assert (dest / "dir/blob.bin").stat().st_mode & 0o777 == 0o640

    def consume(stream: io.RawIOBase) -> list[str]:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            names = []
            for member in tar:
                names.append(member.name)
                if member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    assert f.read() == (tmp_path / "orig.bin").read_bytes()
            return names

    names, missing = await agent.get(["dir/*.bin", "nope/*"], str(dest), consume)
    assert names == ["dir/blob.bin"]
    assert missing == ["nope/*"]


async def test_listening_agent_serves_a_new_connection_after_a_reset(tmp_path: Path) -> None:
    """vsock mode: after a snapshot restore the host connects again and is greeted anew."""
    path = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-B", "-m", "stoker.agent", "--listen", str(path)],
        env={"PYTHONPATH": str(SRC), "PATH": os.environ["PATH"]},
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        for round_ in range(2):
            reader, writer = await asyncio.open_unix_connection(str(path))
            client = AgentClient(reader, writer)
            try:
                ready = await client.wait_ready(10)
                assert ready.protocol == 1
                res = await client.exec(
                    ["echo", f"round {round_}"], capture=True, env={"PATH": os.environ["PATH"]}
                )
                assert res.stdout == f"round {round_}\n".encode()
            finally:
                # Dropping the connection is what a VMM reset looks like to the agent.
                await client.aclose()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
