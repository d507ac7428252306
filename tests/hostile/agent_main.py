"""A deliberately misbehaving guest agent, booted as PID 1 by test_hostile_guest_vm.py.

It plays the part of guest code that took over the agent channel.  The mode is
read from the file ``mode`` next to it (baked into the test's initramfs).
"""

import glob
import io
import os
import tarfile
import time

from stoker.protocol import wire

READY = {
    "type": "ready",
    "protocol": 1,
    "agent": "hostile",
    "python": "3",
    "kernel": "k",
    "pid1": True,
}


def port() -> int:
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name_file) as fh:
            if fh.read().strip() == wire.PORT_NAME:
                return os.open("/dev/" + name_file.split("/")[-2], os.O_RDWR)
    raise SystemExit("no port")


FD = port()
with open(os.path.join(os.path.dirname(__file__), "mode")) as _fh:
    MODE = _fh.read().strip()


def send(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(FD, view) :]


def frames():
    dec = wire.Decoder()
    while True:
        data = os.read(FD, 65536)
        if not data:
            time.sleep(0.05)
            continue
        yield from dec.feed(data)


def evil_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("harmless.txt")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"ok\n"))
        link = tarfile.TarInfo("escape")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc"
        tar.addfile(link)
        through = tarfile.TarInfo("escape/stoker-pwned")
        through.size = 5
        tar.addfile(through, io.BytesIO(b"pwned"))
    return buf.getvalue()


def serve() -> None:
    send(wire.encode_msg(0, READY))
    for kind, _stream, channel, payload in frames():
        if kind != wire.MSG:
            continue
        msg = wire.decode_msg(payload)
        if msg["type"] in ("init", "ping"):
            send(wire.encode_msg(channel, {"type": "ok" if msg["type"] == "init" else "pong"}))
        elif msg["type"] == "get" and MODE == "evil-tar":
            send(wire.encode(wire.DATA, channel, evil_tar(), wire.FILES))
            send(wire.encode(wire.EOF, channel, b"", wire.FILES))
            send(wire.encode_msg(channel, {"type": "done"}))
        elif msg["type"] == "exec" and MODE == "flood":
            send(wire.encode_msg(channel, {"type": "started", "pid": 2}))
            chunk = wire.encode(wire.DATA, channel, b"y" * wire.CHUNK, wire.STDOUT)
            while True:  # ignores every signal request
                send(chunk)
        elif msg["type"] == "exec" and MODE == "bad-exit":
            send(wire.encode_msg(channel, {"type": "started", "pid": 2}))
            send(wire.encode_msg(channel, {"type": "exit", "code": -5, "signal": 9}))


if MODE == "garbage":
    send(b"\xff" * 4096)
elif MODE == "huge-frame":
    send(wire.HEADER.pack(512 << 20, wire.DATA, wire.STDOUT, 0))
elif MODE == "silent":
    pass
else:
    serve()
while True:  # PID 1 must not exit (the kernel would panic)
    time.sleep(3600)
