"""Guest-network scenarios in a real VM, run inside a network namespace of their own.

``tests/test_net_vm.py`` starts this script as ``unshare --net python3 -m
net_scenario CONFIG`` so that the VM, its egress proxy and every server the
guest talks to live in a fresh namespace with nothing but loopback: even a
broken filter could not send a packet off the machine.

In the namespace it brings up ``lo`` and serves, on 0.0.0.0 ports 443 and 80
(free in a new namespace):

* HTTPS with a throw-away CA (trustme) for ``allowed.test``, ``other.test``,
  ``git.test``, ``pypi.test``, ``rebind.test``: a static file, a git smart-HTTP
  repository (``git http-backend``) and a package index with one wheel;
* plain HTTP: the same file and an endpoint echoing the request head.

The VM's proxy resolves names through a fixed mapping (the namespace has no
DNS): the allowed names map to 127.0.0.2, which the policy lists explicitly (a
loopback address is otherwise refused); ``rebind.test`` maps to 127.0.0.3,
allowed by name only, so it must be refused as a non-public address.

It boots one VM, runs each guest command of the scenario, and prints one JSON
document: per command its exit status and output, plus the proxy's connection
records and counters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import trustme

from stoker.net.policy import Limits, NetworkPolicy
from stoker.net.proxy import MappingResolver
from stoker.paths import Dirs
from stoker.vm import VM

NAMES = ["allowed.test", "other.test", "git.test", "pypi.test", "rebind.test"]
ALLOWED_ADDRESS = "127.0.0.2"
REBIND_ADDRESS = "127.0.0.3"
HELLO = b"hello from allowed.test\n"
GUEST_CA = "/tmp/stoker-test-ca.pem"


def make_wheel() -> tuple[str, bytes]:
    """A minimal pure-Python wheel: stoker_probe 1.0 with VALUE = 42."""
    name = "stoker_probe-1.0-py3-none-any.whl"
    files = {
        "stoker_probe/__init__.py": b"VALUE = 42\n",
        "stoker_probe-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: stoker-probe\nVersion: 1.0\n"
        ),
        "stoker_probe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: stoker-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("stoker_probe-1.0.dist-info/RECORD,,")
    files["stoker_probe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return name, buf.getvalue()


def make_repo(root: Path) -> Path:
    """A bare repository ``repo.git`` with one commit (README says hello)."""
    work = root / "work"
    work.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    (work / "README").write_text("cloned through the egress proxy\n")
    for argv in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "README"],
        ["git", "commit", "-q", "-m", "init"],
    ):
        subprocess.run(argv, cwd=work, env=env, check=True)
    bare = root / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], env=env, check=True)
    return root


class Handler(BaseHTTPRequestHandler):
    """Static file, request echo, package index and git smart HTTP."""

    protocol_version = "HTTP/1.0"
    wheel: tuple[str, bytes] = ("", b"")
    git_root: Path = Path()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        path = self.path
        if path == "/hello.txt":
            self._send(200, HELLO)
        elif path == "/echo":
            head = f"{self.requestline}\n{self.headers}".encode()
            self._send(200, head)
        elif path == "/simple/stoker-probe/":
            name, data = self.wheel
            digest = hashlib.sha256(data).hexdigest()
            html = (
                f'<html><body><a href="/packages/{name}#sha256={digest}">{name}</a></body></html>'
            )
            self._send(200, html.encode(), "text/html")
        elif path == f"/packages/{self.wheel[0]}":
            self._send(200, self.wheel[1], "application/octet-stream")
        elif path.startswith("/repo.git/"):
            self._git()
        else:
            self._send(404, b"not found\n")

    def _git(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(self.git_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextlib.contextmanager
def servers(ca: trustme.CA, root: Path) -> Iterator[None]:
    Handler.wheel = make_wheel()
    Handler.git_root = make_repo(root)
    cert = ca.issue_cert(*NAMES)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    https = ThreadingHTTPServer(("0.0.0.0", 443), Handler)
    https.socket = ctx.wrap_socket(https.socket, server_side=True)
    http = ThreadingHTTPServer(("0.0.0.0", 80), Handler)
    threads = [threading.Thread(target=srv.serve_forever, daemon=True) for srv in (https, http)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        for srv in (https, http):
            srv.shutdown()
            srv.server_close()
        for t in threads:
            t.join(10)


def loopback_up() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # The namespace must have nothing but loopback (the test's safety net).
    # (Asked over the namespace's own sockets: /sys still shows the host's.)
    links = sorted(name for _, name in socket.if_nameindex())
    if links != ["lo"]:
        raise SystemExit(f"refusing to run: the namespace has interfaces {links}")


async def run_scenario(config: dict[str, Any]) -> dict[str, Any]:
    ca = trustme.CA()
    resolver = MappingResolver(
        {
            **{name: [ip_address(ALLOWED_ADDRESS)] for name in NAMES if name != "rebind.test"},
            "rebind.test": [ip_address(REBIND_ADDRESS)],
        }
    )
    if config.get("mode") == "nat":
        policy = NetworkPolicy(mode="nat")
    else:
        policy = NetworkPolicy(
            mode="egress",
            allow=("allowed.test", "git.test", "pypi.test", "rebind.test", ALLOWED_ADDRESS),
            limits=Limits(**config.get("limits", {})),
        )
    results: dict[str, Any] = {"commands": {}}
    dirs = Dirs(cache=Path(config["cache"]), runtime=Path(config["runtime"]))
    with tempfile.TemporaryDirectory() as tmp, servers(ca, Path(tmp)):
        vm = VM(config["image"], dirs=dirs, network=policy, resolver=resolver)
        async with vm:
            await vm.exec(["sh", "-c", f"cat > {GUEST_CA}"], stdin=ca.cert_pem.bytes(), check=True)
            env = {
                "SSL_CERT_FILE": GUEST_CA,
                "CURL_CA_BUNDLE": GUEST_CA,
                "GIT_SSL_CAINFO": GUEST_CA,
                "PIP_CERT": GUEST_CA,
            }
            results["network_env"] = vm.network_env
            for name, argv in config["commands"].items():
                res = await vm.exec(argv, env=env, timeout=config.get("timeout", 180))
                results["commands"][name] = {
                    "code": res.returncode,
                    "stdout": res.stdout.decode("utf-8", "replace"),
                    "stderr": res.stderr.decode("utf-8", "replace"),
                }
            if vm.proxy is None:
                return results
            stats = vm.proxy.stats
            results["stats"] = {
                "allowed": stats.allowed,
                "denied": stats.denied,
                "errors": stats.errors,
                "active": stats.active,
            }
            results["records"] = [r.as_dict() for r in vm.proxy.records]
            results["denied_summary"] = vm.proxy.denied_summary(50)
    return results


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    loopback_up()
    results = asyncio.run(run_scenario(config))
    sys.stdout.write(json.dumps(results, default=str) + "\n")


if __name__ == "__main__":
    main()
