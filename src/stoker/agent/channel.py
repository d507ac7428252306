"""The agent's channel to the host: framed writes under one lock, and the journal.

Part of the guest agent (standard library only, Python 3.9+): see
:mod:`stoker.agent.main`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from stoker.protocol import wire

READ_SIZE = 256 * 1024


class Journal:
    """The frames of journaled commands sent since the host last acknowledged them.

    A host that may be restarted while a command runs (``stoker serve``) asks
    for the journal (``journal``) and starts such commands with ``journal``
    set.  Every frame of their channels is kept here, at its byte offset in the
    stream of journaled frames, until the host says (``ack``) that it has stored
    everything before an offset; a new host process (``resume``) gets every
    frame from the offset it last stored again.  Nothing else is journaled
    (replies, file transfers, network streams end with the host that asked).
    The size is bounded: past :data:`JOURNAL_LIMIT` bytes a command's output
    waits for an ``ack`` (the command blocks on its pipe).
    """

    def __init__(self) -> None:
        # A deque: acks trim from the left, and a flood of small frames must not
        # make each trim cost the whole journal.
        self.frames: "Deque[bytes]" = collections.deque()
        #: Offset of the first frame kept, and of the end of the last one.
        self.start = 0
        self.end = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    def append(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.end += len(frame)

    def trim(self, offset: int) -> None:
        """Forget the frames that end at or before ``offset``."""
        while self.frames and self.start + len(self.frames[0]) <= offset:
            self.start += len(self.frames.popleft())

    def since(self, offset: int) -> "Optional[List[bytes]]":
        """The frames from ``offset`` on; None unless ``offset`` starts a kept frame."""
        pos = self.start
        for i, frame in enumerate(self.frames):
            if pos == offset:
                return list(itertools.islice(self.frames, i, None))
            pos += len(frame)
        return [] if offset == self.end else None


#: Journaled bytes beyond which output waits for the host's ``ack``.
JOURNAL_LIMIT = 8 << 20


class Channel:
    """Frames over one blocking file descriptor (virtio-serial port or socket).

    With a ``listener`` (vsock), a connection that ends is replaced by the next
    one the host makes: after a snapshot restore, the VMM resets vsock
    connections and the host connects again.  ``on_connect`` runs after each
    replacement (the agent announces itself again).

    On virtio-serial a host that goes away (a restarted ``stoker serve``) makes
    reads return nothing and writes block until a host connects again; what it
    had not read may be lost, which the :class:`Journal` makes good.
    """

    def __init__(self, fd: int, listener: Optional[socket.socket] = None) -> None:
        self.fd = fd
        os.set_blocking(fd, True)
        self.decoder = wire.Decoder()
        self.lock = threading.Lock()
        #: Signalled when an ``ack`` made room in the journal.
        self.room = threading.Condition(self.lock)
        self.listener = listener
        self.on_connect: Optional[Callable[[], None]] = None
        self.journal: Optional[Journal] = None
        #: Channels of the commands started with ``journal`` set.
        self.journaled: "set[int]" = set()
        #: Seconds without a host after which ``on_orphaned`` runs (None: wait forever).
        self.orphan_timeout: Optional[float] = None
        self.on_orphaned: Optional[Callable[[], None]] = None
        self.lost_at: Optional[float] = None

    def _orphaned(self) -> None:
        """Called while no host is connected: give up once that lasted too long."""
        if self.orphan_timeout is None or self.on_orphaned is None:
            return
        now = time.monotonic()
        if self.lost_at is None:
            self.lost_at = now
        elif now - self.lost_at > self.orphan_timeout:
            self.on_orphaned()

    def _reconnect(self) -> None:
        assert self.listener is not None
        while True:
            self.listener.settimeout(0.5 if self.orphan_timeout is not None else None)
            try:
                conn, _ = self.listener.accept()
                break
            except socket.timeout:
                self._orphaned()
        self.lost_at = None
        with self.lock:
            old, self.fd = self.fd, conn.detach()
            os.set_blocking(self.fd, True)
            self.decoder = wire.Decoder()
        with contextlib.suppress(OSError):
            os.close(old)
        if self.on_connect is not None:
            self.on_connect()

    def read_frames(self) -> List[wire.Frame]:
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except ConnectionResetError:
                data = b""
            if not data:
                if self.listener is not None:
                    self._reconnect()
                    continue
                # virtio-serial reads 0 while the host side is disconnected; wait for it.
                # A frame the old host left half-written is never completed: drop it.
                self.decoder = wire.Decoder()
                self._orphaned()
                time.sleep(0.05)
                continue
            self.lost_at = None
            frames = self.decoder.feed(data)
            if frames:
                return frames

    def send(self, frame: bytes, output: bool = False) -> None:
        """Write one frame; journal it if the host asked.  ``output``: a command's
        output, which waits while the journal is full (control replies never do,
        or the reader thread that handles ``ack`` could wait on itself)."""
        with self.lock:
            journal = self.journal
            if journal is not None and wire.HEADER.unpack_from(frame, 0)[3] in self.journaled:
                while output and journal.size > JOURNAL_LIMIT and self.journal is journal:
                    self.room.wait(1.0)
                journal.append(frame)
            self._write(frame)

    def _write(self, frame: bytes) -> None:
        """Write ``frame`` whole (the lock is held)."""
        view = memoryview(frame)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    return  # the host went away; nothing to tell
                if exc.errno == errno.EAGAIN:
                    select.select([], [self.fd], [], 1.0)
                    continue
                raise
            view = view[n:]

    def msg(self, channel: int, message: Dict[str, Any]) -> None:
        self.send(wire.encode_msg(channel, message))

    def data(self, channel: int, stream: int, payload: bytes) -> None:
        for i in range(0, len(payload), wire.CHUNK):
            frame = wire.encode(wire.DATA, channel, payload[i : i + wire.CHUNK], stream)
            self.send(frame, output=True)

    def start_journal(self, channel: int) -> None:
        """Keep the frames of journaled commands from now on (offsets start at 0)."""
        with self.lock:
            if self.journal is None:
                self.journal = Journal()
            self._write(wire.encode_msg(channel, {"type": "journal_on"}))

    def ack(self, offset: int) -> None:
        with self.lock:
            if self.journal is not None:
                self.journal.trim(offset)
                self.room.notify_all()

    def resume(self, channel: int, nonce: str, offset: int, highest: int) -> None:
        """Mark where a new host's stream starts, then send the journal from ``offset``.

        The host discards everything before the ``resumed`` message (the tail of
        a frame the old host did not read whole), so the marker is written
        first, under the lock, before any other frame.
        """
        with self.lock:
            frames = self.journal.since(offset) if self.journal is not None else None
            marker: Dict[str, Any] = {"type": "resumed", "nonce": nonce, "highest": highest}
            if frames is None:
                kept = (self.journal.start, self.journal.end) if self.journal else (0, 0)
                marker["error"] = "offset %d is not a frame kept in the journal [%d, %d)" % (
                    offset,
                    kept[0],
                    kept[1],
                )
            else:
                marker["offset"] = offset
            self._write(wire.encode_msg(channel, marker))
            for frame in frames or ():
                self._write(frame)

    def eof(self, channel: int, stream: int) -> None:
        self.send(wire.encode(wire.EOF, channel, b"", stream))


class FrameWriter:
    """A write-only file that sends what it is given as DATA frames of one stream."""

    def __init__(self, chan: Channel, channel: int, stream: int) -> None:
        self.chan, self.channel, self.stream = chan, channel, stream
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= wire.CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.chan.data(self.channel, self.stream, bytes(self.buf))
            self.buf.clear()


def spawn_thread(target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread
