"""The agent channel's wire format, shared verbatim by the host and the guest agent.

This module is copied into every guest, so it must stay standard-library only and
run on Python 3.9 (guests bring their own distribution's Python).

Every frame is a fixed 10-byte header followed by a payload::

    +----------------+--------+--------+----------------+-----------------+
    | length: u32 BE | kind u8| stream | channel: u32 BE| payload (length)|
    +----------------+--------+--------+----------------+-----------------+

* ``kind`` is :data:`MSG` (a UTF-8 JSON object: a control message),
  :data:`DATA` (raw bytes of one stream; never base64) or :data:`EOF`
  (the end of one stream; empty payload).
* ``channel`` names the operation the frame belongs to (an exec, a put, a get);
  channel 0 carries session-level messages (ready, init, shutdown).
* ``stream`` says which stream of the operation a DATA/EOF frame belongs to:
  :data:`STDIN`, :data:`STDOUT`, :data:`STDERR` or :data:`FILES` (a tar stream).

The payload length is bounded by :data:`MAX_PAYLOAD`; a decoder refuses larger
frames before buffering them, so a hostile peer cannot make the other side
allocate more than one frame's worth of memory.

The protocol is versioned by :data:`PROTOCOL_VERSION`, announced in the guest's
``ready`` message; the host refuses versions it does not speak.
"""

from __future__ import annotations

import json
import queue
import struct
from typing import Any, Dict, List, Optional, Tuple

PROTOCOL_VERSION = 1

#: Name of the virtio-serial port the agent listens on.
PORT_NAME = "org.stoker.agent"
#: The vsock port the agent listens on when the VMM offers vsock instead of
#: virtio-serial (Firecracker, Cloud Hypervisor: kernel parameter stoker.transport=vsock).
VSOCK_PORT = 1024

#: Channels of proxied network connections, opened by the guest, have this bit
#: set; the host numbers its operations from 1 upward, so the two never meet.
NET_CHANNEL_BIT = 0x80000000
#: Bytes either side may send on one network connection before the receiver
#: grants more with a ``net_window`` message (per-connection flow control: a
#: slow connection never stalls the channel or another connection).
NET_WINDOW = 256 * 1024
#: Guest loopback port of the agent's HTTP proxy (``http_proxy`` in the guest).
NET_PROXY_PORT = 3128

HEADER = struct.Struct(">IBBI")
HEADER_SIZE = HEADER.size  # 10

#: Largest payload of one frame.  DATA is chunked well below this.
MAX_PAYLOAD = 1 << 20
#: Largest JSON control message.  Control messages are small; argv/env fit easily.
MAX_MESSAGE = 256 * 1024
#: Size of DATA chunks senders produce.
CHUNK = 64 * 1024

MSG = 1
DATA = 2
EOF = 3
KINDS = (MSG, DATA, EOF)

STDIN = 0
STDOUT = 1
STDERR = 2
FILES = 3
STREAMS = (STDIN, STDOUT, STDERR, FILES)

Frame = Tuple[int, int, int, bytes]  # (kind, stream, channel, payload)


class WireError(Exception):
    """The byte stream violates the framing rules."""


def encode(kind: int, channel: int, payload: bytes = b"", stream: int = 0) -> bytes:
    """Encode one frame."""
    if kind not in KINDS:
        raise WireError("unknown frame kind %r" % (kind,))
    if stream not in STREAMS:
        raise WireError("unknown stream %r" % (stream,))
    if not 0 <= channel <= 0xFFFFFFFF:
        raise WireError("channel out of range: %r" % (channel,))
    if len(payload) > MAX_PAYLOAD:
        raise WireError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    return HEADER.pack(len(payload), kind, stream, channel) + payload


def encode_msg(channel: int, message: Dict[str, Any]) -> bytes:
    """Encode a control message as a MSG frame."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_MESSAGE:
        raise WireError("message of %d bytes exceeds %d" % (len(body), MAX_MESSAGE))
    return encode(MSG, channel, body)


def decode_msg(payload: bytes) -> Dict[str, Any]:
    """Decode a MSG payload into a JSON object (its fields are checked by the caller)."""
    if len(payload) > MAX_MESSAGE:
        raise WireError("message of %d bytes exceeds %d" % (len(payload), MAX_MESSAGE))
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("message is not UTF-8 JSON: %s" % (exc,)) from None
    if not isinstance(obj, dict):
        raise WireError("message is not a JSON object")
    if not isinstance(obj.get("type"), str):
        raise WireError("message has no string 'type'")
    return obj


class Decoder:
    """Incremental frame decoder with a bounded buffer.

    Feed it bytes as they arrive; it returns every complete frame.  It never holds
    more than one header plus :data:`MAX_PAYLOAD` bytes (plus one read's worth).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> List[Frame]:
        self._buf += data
        frames: List[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Optional[Frame]:
        if len(self._buf) < HEADER_SIZE:
            return None
        length, kind, stream, channel = HEADER.unpack_from(self._buf, 0)
        if kind not in KINDS:
            raise WireError("unknown frame kind %d" % kind)
        if stream not in STREAMS:
            raise WireError("unknown stream %d" % stream)
        if length > self._max:
            raise WireError("frame of %d bytes exceeds the limit of %d" % (length, self._max))
        if kind == EOF and length:
            raise WireError("EOF frame with a payload")
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return (kind, stream, channel, payload)

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame."""
        return len(self._buf)


class ChunkReader:
    """A read-only file over a bounded queue of byte chunks; ``None`` marks the end.

    One side (the thread reading the channel) puts chunks; a worker thread reads
    them as a file (e.g. tarfile in stream mode).  The bound is the back-pressure.
    """

    def __init__(self, depth: int = 64) -> None:
        self.q: "queue.Queue[Optional[bytes]]" = queue.Queue(depth)
        self._chunk = b""
        self._pos = 0
        self.eof = False

    def put(self, chunk: Optional[bytes]) -> None:
        self.q.put(chunk)

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._pos >= len(self._chunk):
                if self.eof:
                    break
                chunk = self.q.get()
                if chunk is None:
                    self.eof = True
                    break
                self._chunk, self._pos = chunk, 0
            want = len(self._chunk) - self._pos if n < 0 else n - len(out)
            piece = self._chunk[self._pos : self._pos + want]
            self._pos += len(piece)
            out += piece
        return bytes(out)

    def drain(self) -> None:
        """Consume the rest so the producer never blocks on a full queue."""
        while not self.eof:
            if self.q.get() is None:
                self.eof = True
