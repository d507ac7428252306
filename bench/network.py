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


async def curl(vm: VM, url: str, metric: str, env: dict[str, str]) -> float:
    res = await vm.exec(
        ["curl", "-sS", "-o", "/dev/null", "-w", f"%{{{metric}}}", url],
        env=env,
        timeout=900,
        check=True,
    )
    return float(res.stdout)


async def downloads(
    vm: VM, url: str, runs: int, env: dict[str, str], out: dict[str, Any], key: str
) -> None:
    """Median time, stoker CPU and QEMU CPU of ``runs`` downloads of ``url``."""
    assert vm.vmm_pid is not None
    times, cpu_self, cpu_qemu = [], [], []
    for _ in range(runs):
        s0, q0 = own_cpu(), cpu_seconds(vm.vmm_pid)
        times.append(await curl(vm, url, "time_total", env))
        cpu_self.append(own_cpu() - s0)
        cpu_qemu.append(cpu_seconds(vm.vmm_pid) - q0)
    out[f"{key}_s"] = statistics.median(times)
    out[f"{key}_cpu_stoker_s"] = statistics.median(cpu_self)
    out[f"{key}_cpu_qemu_s"] = statistics.median(cpu_qemu)


async def setup_latency(vm: VM, url: str, runs: int, env: dict[str, str]) -> float:
    return statistics.median([await curl(vm, url, "time_starttransfer", env) for _ in range(runs)])


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
            for scheme in ("http", "https"):
                url = f"{scheme}://bench.test/big"
                await downloads(vm, url, args.runs, env, out, f"vm_{scheme}")
            out["vm_setup_https_s"] = await setup_latency(
                vm, "https://bench.test/small", args.runs * 4, env
            )
            out["vm_setup_http_s"] = await setup_latency(
                vm, "http://bench.test/small", args.runs * 4, env
            )
        # The same download through a real NIC (nat: QEMU user-mode networking,
        # no proxy; 10.0.2.2 is the namespace's loopback): what the proxy costs.
        async with VM("test-net", network=NetworkPolicy(mode="nat")) as vm:
            await downloads(vm, "http://10.0.2.2/big", args.runs, {}, out, "nat_http")
            out["nat_setup_http_s"] = await setup_latency(
                vm, "http://10.0.2.2/small", args.runs * 4, {}
            )
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

    def rate(key: str) -> str:
        return f"{mb / r[key]:.1f} MB/s"

    def ms(value: float) -> str:
        return f"{value * 1000:.1f} ms"

    rows = [
        ("host direct, plain HTTP (no VM, no proxy)", rate("host_http_s")),
        ("VM, nat NIC (QEMU user networking, no proxy), plain HTTP", rate("nat_http_s")),
        ("VM, egress proxy, plain HTTP", rate("vm_http_s")),
        ("VM, egress proxy, HTTPS (CONNECT tunnel; TLS in the guest)", rate("vm_https_s")),
        ("ratio egress proxy HTTP / nat NIC HTTP", f"{r['nat_http_s'] / r['vm_http_s']:.2f}"),
        ("ratio egress proxy HTTP / host direct", f"{r['host_http_s'] / r['vm_http_s']:.4f}"),
        ("connection set-up to first byte, host direct", ms(r["host_setup_s"])),
        ("connection set-up to first byte, VM nat NIC, HTTP", ms(r["nat_setup_http_s"])),
        ("connection set-up to first byte, VM egress proxy, HTTP", ms(r["vm_setup_http_s"])),
        ("connection set-up to first byte, VM egress proxy, HTTPS", ms(r["vm_setup_https_s"])),
        (
            "host CPU per MB, stoker process (proxy + channel), HTTP",
            ms(r["vm_http_cpu_stoker_s"] / mb),
        ),
        ("host CPU per MB, stoker process, HTTPS", ms(r["vm_https_cpu_stoker_s"] / mb)),
        ("host CPU per MB, QEMU (emulated guest), egress HTTP", ms(r["vm_http_cpu_qemu_s"] / mb)),
        (
            "host CPU per MB, QEMU (emulated guest + slirp), nat HTTP",
            ms(r["nat_http_cpu_qemu_s"] / mb),
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
