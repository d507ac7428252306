"""The guest half of egress networking: an HTTP proxy address on the guest's loopback.

In ``egress`` mode the guest has no network device at all.  Programs find the
proxy through ``http_proxy=http://127.0.0.1:3128`` (and friends); every
connection accepted there becomes one stream on the agent channel (a channel
number with :data:`~stoker.protocol.wire.NET_CHANNEL_BIT` set) and is handed,
on the host, to the VM's egress proxy, which decides everything.  Nothing here
enforces anything: a root job can replace this code, so the host trusts none of
it.

Per stream, both directions are flow-controlled: a side may send
:data:`~stoker.protocol.wire.NET_WINDOW` bytes before the receiver grants more
(``{"type": "net_window", "bytes": N}``, sent once the bytes left its
buffers).  That keeps one slow connection from stalling the channel that also
carries the job's output.  A stream ends with ``net_close`` from either side
(after EOF frames for a clean end, or alone for a reset).

Standard library only, Python 3.9+, threads (like the rest of the agent).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from typing import Any, Dict, Optional

from stoker.protocol import wire

#: Streams the guest keeps open at once; the host's own limit is lower and is
#: what counts, this only bounds the agent's threads.
MAX_STREAMS = 1024
# Queue sentinels, distinct from every payload by identity: stop at once, or
# after writing what is queued (the host's net_close follows its last data).
_CLOSE = b"close"
_FINISH = b"finish"

#: Configuration files pointing ordinary tools at the proxy (written on start;
#: environment variables alone do not reach login shells, sudo or apt).
PROFILE_FILE = "/etc/profile.d/stoker-proxy.sh"
APT_FILE = "/etc/apt/apt.conf.d/90stoker-proxy"
ENVIRONMENT_FILE = "/etc/environment"


class Stream:
    """One proxied connection: a local socket and its channel number."""

    def __init__(self, fwd: "Forwarder", channel: int, sock: socket.socket) -> None:
        self.fwd = fwd
        self.channel = channel
        self.sock = sock
        self.cond = threading.Condition()
        self.credit = wire.NET_WINDOW
        self.closed = False
        self.out: "queue.Queue[Optional[bytes]]" = queue.Queue()

    def start(self) -> None:
        for target in (self.upstream, self.downstream):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()

    def upstream(self) -> None:
        """Local socket -> host, within the credit the host granted."""
        try:
            while True:
                data = self.sock.recv(wire.CHUNK)
                if not data:
                    self.fwd.chan.eof(self.channel, 0)
                    return
                view = memoryview(data)
                while view:
                    with self.cond:
                        while self.credit <= 0 and not self.closed:
                            self.cond.wait()
                        if self.closed:
                            return
                        n = min(self.credit, len(view))
                        self.credit -= n
                    self.fwd.chan.data(self.channel, 0, bytes(view[:n]))
                    view = view[n:]
        except OSError:
            self.fwd.close(self.channel, tell_host=True)

    def downstream(self) -> None:
        """Host -> local socket; each chunk written is granted back to the host."""
        while True:
            item = self.out.get()
            if item is _FINISH:
                self.shut()  # everything before the host's net_close is written
                return
            if item is _CLOSE:
                return
            if item is None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                continue
            try:
                self.sock.sendall(item)
            except OSError:
                self.fwd.close(self.channel, tell_host=True)
                return
            self.fwd.chan.msg(self.channel, {"type": "net_window", "bytes": len(item)})

    def grant(self, n: int) -> None:
        with self.cond:
            self.credit += n
            self.cond.notify_all()

    def shut(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.out.put(_CLOSE)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class Forwarder:
    """Accepts connections on the guest's loopback and carries them to the host."""

    def __init__(self, chan: Any, port: int) -> None:
        self.chan = chan
        self.lock = threading.Lock()
        self.streams: Dict[int, Stream] = {}
        self.next_id = 1
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        thread = threading.Thread(target=self.accept_loop, daemon=True)
        thread.start()

    def accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if len(self.streams) >= MAX_STREAMS:
                    sock.close()
                    continue
                channel = wire.NET_CHANNEL_BIT | self.next_id
                self.next_id = self.next_id % 0x7FFFFFFF + 1
                stream = Stream(self, channel, sock)
                self.streams[channel] = stream
            self.chan.msg(channel, {"type": "net_open"})
            stream.start()

    def on_frame(self, kind: int, channel: int, payload: bytes) -> None:
        """A frame from the host for one of our streams (never blocks the reader)."""
        with self.lock:
            stream = self.streams.get(channel)
        if stream is None:
            return  # already closed here; the host's late frames are dropped
        if kind == wire.DATA:
            stream.out.put(payload)
        elif kind == wire.EOF:
            stream.out.put(None)
        else:
            msg = wire.decode_msg(payload)
            if msg["type"] == "net_window":
                stream.grant(int(msg.get("bytes", 0)))
            elif msg["type"] == "net_close":
                with self.lock:
                    self.streams.pop(channel, None)
                stream.out.put(_FINISH)

    def close(self, channel: int, tell_host: bool) -> None:
        with self.lock:
            stream = self.streams.pop(channel, None)
        if stream is None:
            return
        stream.shut()
        if tell_host:
            self.chan.msg(channel, {"type": "net_close"})

    def reset(self) -> None:
        """Drop every stream (the host side is gone: a new channel connection)."""
        with self.lock:
            channels = list(self.streams)
        for channel in channels:
            self.close(channel, tell_host=False)


def write_proxy_config(env: Dict[str, str]) -> None:
    """Point login shells, sudo'd commands and apt at the proxy (best effort)."""
    lines = ["%s=%s" % (k, v) for k, v in sorted(env.items())]
    _write(PROFILE_FILE, "".join("export %s\n" % line for line in lines))
    try:
        with open(ENVIRONMENT_FILE) as fh:
            kept = [ln for ln in fh.read().splitlines() if ln.split("=", 1)[0] not in env]
    except OSError:
        kept = []
    _write(ENVIRONMENT_FILE, "".join(line + "\n" for line in kept + lines))
    proxy = env.get("http_proxy")
    if proxy and os.path.isdir(os.path.dirname(APT_FILE)):
        _write(
            APT_FILE,
            'Acquire::http::Proxy "%s";\nAcquire::https::Proxy "%s";\n' % (proxy, proxy),
        )


def write_resolv_conf(nameserver: str) -> None:
    """nat mode: resolve names through the VMM's DNS forwarder."""
    with contextlib.suppress(OSError):
        os.unlink("/etc/resolv.conf")  # may be a dangling symlink in the image
    _write("/etc/resolv.conf", "nameserver %s\n" % nameserver)


def _write(path: str, text: str) -> None:
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
