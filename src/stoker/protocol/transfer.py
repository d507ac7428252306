"""File transfers over the agent channel: a tar stream up (``put``), one down (``get``).

The two halves of :meth:`AgentClient.put` and :meth:`AgentClient.get` (a
friend module: it opens the client's operations), with the thread bridges of
:mod:`stoker.protocol.streams` between the event loop and the tar code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, BinaryIO, TypeVar, cast

from stoker.errors import GuestProtocolError, InfrastructureError
from stoker.protocol import messages as m
from stoker.protocol import wire
from stoker.protocol.streams import (
    QUEUE_DEPTH,
    AsyncToThreadReader,
    ThreadToAsyncWriter,
    run_consumer,
)

if TYPE_CHECKING:
    from stoker.protocol.client import AgentClient

T = TypeVar("T")


async def put(client: AgentClient, dest: str, produce: Callable[[BinaryIO], object]) -> None:
    """Upload the tar stream ``produce`` writes (in a thread); the guest unpacks it."""
    op = client._open()
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
    sink = ThreadToAsyncWriter(loop, chunks)

    def run() -> None:
        try:
            produce(cast(BinaryIO, sink))
            sink.flush()
        finally:
            sink.finish()

    try:
        await client._send_msg(op.channel, {"type": "put", "dest": dest})
        worker = loop.run_in_executor(None, run)
        try:
            while True:
                async with asyncio.timeout(client.limits.transfer_idle_timeout):
                    chunk = await chunks.get()
                    if chunk is None:
                        break
                    await client._send(wire.encode(wire.DATA, op.channel, chunk, wire.FILES))
        finally:
            sink.cancel()
            await worker
        await client._send(wire.encode(wire.EOF, op.channel, b"", wire.FILES))
        async with asyncio.timeout(client.limits.transfer_idle_timeout):
            reply = await client._next_msg(op)
    except TimeoutError:
        raise InfrastructureError(f"upload to {dest} stalled in the guest") from None
    finally:
        client._close(op)
    if isinstance(reply, m.Error):
        raise InfrastructureError(f"agent: upload to {dest} failed: {reply.message}")
    if not isinstance(reply, m.Done):
        raise GuestProtocolError(f"expected 'done' after an upload, got {reply.type!r}")


async def get(
    client: AgentClient, paths: Iterable[str], cwd: str, consume: Callable[[BinaryIO], T]
) -> tuple[T, list[str]]:
    """Download ``paths`` (globs relative to ``cwd``) as a tar stream.

    ``consume`` runs in a thread and reads the (untrusted) tar stream; its
    result is returned with the list of patterns that matched nothing.
    """
    op = client._open()
    loop = asyncio.get_running_loop()
    source = AsyncToThreadReader()
    worker = loop.run_in_executor(None, run_consumer, consume, source)
    try:
        await client._send_msg(op.channel, {"type": "get", "paths": list(paths), "cwd": cwd})
        while True:
            async with asyncio.timeout(client.limits.transfer_idle_timeout):
                event = await client._next(op)
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
        async with asyncio.timeout(client.limits.request_timeout):
            reply = await client._next_msg(op)
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
        client._close(op)
