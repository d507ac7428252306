"""Egress proxy benchmark: a VM's downloads through the proxy against the host's own.

Runs itself inside a fresh network namespace with only loopback (``unshare
--net``, like the tests): a plain-HTTP and an HTTPS server (throw-away CA) on
0.0.0.0 ports 80 and 443 serve a 200 MB file; the proxy resolves the test
names to 127.0.0.2, which the allowlist names explicitly.  Measured in one run:

* throughput of the 200 MB download by the host directly (Python, no proxy)
  and from a VM through its egress proxy (``curl -o /dev/null``), over plain
  HTTP (the proxy parses and relays the request) and HTTPS (a CONNECT tunnel:
  TLS runs in the guest, under TCG emulation here);
* connection set-up latency: median time to fetch a tiny file, host direct vs
  the VM through the proxy (curl's own ``time_starttransfer``);
* host CPU per MB proxied: CPU time of the stoker process (proxy + channel
  pumps) and of QEMU during the VM's download, divided by the megabytes.

Prints a markdown table for the README.  Needs root (namespaces), the
``test-net`` image (built from tests/data/test-net.toml if missing).

Usage: ``python bench/network.py [--mb 200] [--runs 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import trustme

from stoker.net.policy import NetworkPolicy
from stoker.net.proxy import MappingResolver
from stoker.vm import VM

ROOT = Path(__file__).resolve().parents[1]
ADDRESS = "127.0.0.2"
GUEST_CA = "/tmp/bench-ca.pem"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    size = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        size = self.size if self.path == "/big" else 16
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"x" * (1 << 20)
        left = size
        while left:
            n = min(left, len(block))
            self.wfile.write(block[:n])
            left -= n


@contextlib.contextmanager
def servers(ca: trustme.CA, size: int) -> Iterator[None]:
    Handler.size = size
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("bench.test").configure_cert(ctx)
    https = ThreadingHTTPServer(("0.0.0.0", 443), Handler)
    https.socket = ctx.wrap_socket(https.socket, server_side=True)
    http = ThreadingHTTPServer(("0.0.0.0", 80), Handler)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (https, http)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        for s in (https, http):
            s.shutdown()
            s.server_close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ca = trustme.CA()
    size = args.mb << 20
    resolver = MappingResolver({"bench.test": [ip_address(ADDRESS)]})
    policy = NetworkPolicy(mode="egress", allow=("bench.test", ADDRESS))
    out: dict[str, Any] = {"mb": args.mb}
    with servers(ca, size):
        async with VM("test-net", network=policy, resolver=resolver) as vm:
            await vm.exec(["sh", "-c", f"cat > {GUEST_CA}"], stdin=ca.cert_pem.bytes(), check=True)
            env = {"CURL_CA_BUNDLE": GUEST_CA}
            assert vm.vmm_pid is not None
            for scheme in ("http", "https"):
                times, cpu_self, cpu_qemu = [], [], []
                for _ in range(args.runs):
                    s0, q0 = own_cpu(), cpu_seconds(vm.vmm_pid)
                    res = await vm.exec(
                        [
                            "curl",
                            "-sS",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{time_total}",
                            f"{scheme}://bench.test/big",
                        ],
                        env=env,
                        timeout=900,
                        check=True,
                    )
                    cpu_self.append(own_cpu() - s0)
                    cpu_qemu.append(cpu_seconds(vm.vmm_pid) - q0)
                    times.append(float(res.stdout))
                out[f"vm_{scheme}_s"] = statistics.median(times)
                out[f"vm_{scheme}_cpu_stoker_s"] = statistics.median(cpu_self)
                out[f"vm_{scheme}_cpu_qemu_s"] = statistics.median(cpu_qemu)
            setup = []
            for _ in range(args.runs * 4):
                res = await vm.exec(
                    [
                        "curl",
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{time_starttransfer}",
                        "https://bench.test/small",
                    ],
                    env=env,
                    timeout=60,
                    check=True,
                )
                setup.append(float(res.stdout))
            out["vm_setup_s"] = statistics.median(setup)
        out["host_http_s"] = statistics.median(host_download_plain(size) for _ in range(args.runs))
        out["host_setup_s"] = statistics.median(host_setup() for _ in range(args.runs * 4))
    return out


def host_download_plain(size: int) -> float:
    t = time.perf_counter()
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://{ADDRESS}/big", timeout=300
    ) as resp:
        got = 0
        while chunk := resp.read(1 << 20):
            got += len(chunk)
    assert got == size
    return time.perf_counter() - t


def host_setup() -> float:
    t = time.perf_counter()
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://{ADDRESS}/small", timeout=30
    ) as resp:
        resp.read()
    return time.perf_counter() - t


def table(r: dict[str, Any]) -> str:
    mb = r["mb"]
    rows = [
        ("host direct, plain HTTP (no proxy)", f"{mb / r['host_http_s']:.0f} MB/s"),
        ("VM through the proxy, plain HTTP", f"{mb / r['vm_http_s']:.1f} MB/s"),
        (
            "VM through the proxy, HTTPS (CONNECT; TLS in the guest)",
            f"{mb / r['vm_https_s']:.1f} MB/s",
        ),
        ("ratio VM proxied HTTP / host direct", f"{r['host_http_s'] / r['vm_http_s']:.3f}"),
        ("connection set-up, host direct (median)", f"{r['host_setup_s'] * 1000:.1f} ms"),
        (
            "connection set-up, VM through the proxy, HTTPS (median)",
            f"{r['vm_setup_s'] * 1000:.1f} ms",
        ),
        (
            "host CPU per MB proxied: stoker (proxy + channel), HTTP",
            f"{r['vm_http_cpu_stoker_s'] / mb * 1000:.2f} ms",
        ),
        (
            "host CPU per MB proxied: QEMU (guest emulation), HTTP",
            f"{r['vm_http_cpu_qemu_s'] / mb * 1000:.2f} ms",
        ),
        (
            "host CPU per MB proxied: stoker, HTTPS",
            f"{r['vm_https_cpu_stoker_s'] / mb * 1000:.2f} ms",
        ),
    ]
    lines = ["| measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.in_namespace:
        # The guest image with curl (a no-op when it is built already).
        subprocess.run(
            [
                sys.executable,
                "-m",
                "stoker.cli",
                "image",
                "build",
                str(ROOT / "tests" / "data" / "test-net.toml"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        proc = subprocess.run(
            [
                "unshare",
                "--net",
                "--",
                sys.executable,
                __file__,
                "--in-namespace",
                "--mb",
                str(args.mb),
                "--runs",
                str(args.runs),
            ],
            check=False,
        )
        raise SystemExit(proc.returncode)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    links = sorted(name for _, name in socket.if_nameindex())
    if links != ["lo"]:
        raise SystemExit(f"refusing to run: the namespace has interfaces {links}")
    result = asyncio.run(bench(args))
    print(
        f"Egress proxy, {args.mb} MB download, medians of {args.runs} "
        f"({os.cpu_count()} host CPUs)\n"
    )
    print(table(result))
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
