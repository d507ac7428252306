"""Bridges between the agent client's event loop and the threads that make or take tar streams."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from stoker.errors import InfrastructureError
from stoker.protocol import wire

#: Events (or chunks) queued before the producer waits: the back-pressure on both sides.
QUEUE_DEPTH = 64

T = TypeVar("T")


def run_consumer(consume: Callable[[BinaryIO], T], source: AsyncToThreadReader) -> T:
    try:
        return consume(source)  # type: ignore[arg-type]
    finally:
        source.closed_by_reader = True


class ThreadToAsyncWriter:
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


class AsyncToThreadReader(wire.ChunkReader):
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
