"""Egress networking in real VMs: ordinary tools work through the allowlist, bypasses fail.

Every scenario runs inside a fresh network namespace that has only loopback
(``unshare --net``; see tests/net_scenario.py): the VM, its proxy and all the
servers it reaches live there, so nothing can leave the machine even if the
policy were broken.  The guest image (tests/data/test-net.toml: curl, git,
pip, openssl) is built into the shared cache once.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker.paths import Dirs

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and image builds need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing"),
]

HERE = Path(__file__).resolve().parent
IMAGE = "test-net"
PROXY = "http://127.0.0.1:3128"


def py(code: str) -> list[str]:
    return ["python3", "-c", code]


# Each bypass attempt prints one line saying what happened; none may succeed.
CONNECT_DIRECT = """
import socket, sys
for host, port in [("10.0.2.2", 80), ("10.0.2.3", 53), ("169.254.169.254", 80),
                   ("127.0.0.2", 443), ("8.8.8.8", 443)]:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        print("CONNECTED", host, port)
    except OSError as e:
        print("refused", host, port, e.errno)
"""

RAW_UDP_DNS = """
import socket
out = []
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.sendto(b"\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00", ("8.8.8.8", 0))
    out.append("RAW SENT")
except OSError as e:
    out.append("raw refused %d" % e.errno)
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00", ("8.8.8.8", 53))
    out.append("UDP SENT")
except OSError as e:
    out.append("udp refused %d" % e.errno)
try:
    socket.getaddrinfo("allowed.test", 443)
    out.append("RESOLVED")
except OSError as e:
    out.append("dns failed")
import os
out.append("links " + ",".join(sorted(os.listdir("/sys/class/net"))))
print("\\n".join(out))
"""

# CONNECT to an allowed name, then a TLS ClientHello naming another host.
SNI_MISMATCH = """
import socket, ssl
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\\r\\nHost: allowed.test:443\\r\\n\\r\\n")
head = s.recv(4096)
print("connect:", head.split(b"\\r\\n")[0].decode())
ctx = ssl.create_default_context(cafile="/tmp/stoker-test-ca.pem")
try:
    t = ctx.wrap_socket(s, server_hostname="other.test")
    print("HANDSHAKE OK", t.version())
except (OSError, ssl.SSLError) as e:
    print("handshake failed:", type(e).__name__)
"""

# Plain HTTP through the proxy with a Host header naming another host.
HOST_MISMATCH = """
import socket
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(b"GET http://allowed.test/echo HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n")
print(s.recv(4096).split(b"\\r\\n")[0].decode())
"""

# Plain (non-TLS) bytes through a CONNECT tunnel to a TLS port.
NOT_TLS = """
import socket
s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\\r\\n\\r\\n")
print("connect:", s.recv(4096).split(b"\\r\\n")[0].decode())
s.sendall(b"GET /hello.txt HTTP/1.0\\r\\nHost: allowed.test\\r\\n\\r\\n")
data = s.recv(4096)
print("got %d bytes" % len(data), b"hello" in data)
"""

# Hundreds of connections at once, each asking for an allowed tunnel and holding it.
FLOOD = """
import socket, collections
conns, outcome = [], collections.Counter()
for i in range(300):
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\\r\\n\\r\\n")
        conns.append(s)
    except OSError as e:
        outcome["connect error"] += 1
for s in conns:
    try:
        line = s.recv(4096).split(b"\\r\\n")[0].decode() or "closed"
    except OSError as e:
        line = "error"
    outcome[" ".join(line.split()[:2])] += 1
print(dict(outcome))
for s in conns:
    s.close()
"""

# Connections that never finish their request head.
SLOWLORIS = """
import socket, time
conns = [socket.create_connection(("127.0.0.1", 3128), timeout=30) for _ in range(5)]
for s in conns:
    s.sendall(b"CONNECT allowed.te")
t = time.monotonic()
closed = 0
for s in conns:
    try:
        closed += s.recv(4096) is not None
    except OSError:
        closed += 1
print("closed %d after %.0fs" % (closed, time.monotonic() - t))
"""

COMMANDS: dict[str, list[str]] = {
    "curl_https": ["curl", "-sS", "https://allowed.test/hello.txt"],
    "curl_http": ["curl", "-sS", "http://allowed.test/hello.txt"],
    "git_clone": [
        "sh",
        "-c",
        "git clone -q https://git.test/repo.git /tmp/repo && cat /tmp/repo/README",
    ],
    "pip_install": [
        "sh",
        "-c",
        "python3 -m pip install -q --disable-pip-version-check --no-cache-dir "
        "--index-url https://pypi.test/simple/ --target /tmp/pkgs stoker-probe "
        "&& PYTHONPATH=/tmp/pkgs python3 -c 'import stoker_probe; print(stoker_probe.VALUE)'",
    ],
    "apt_config": ["cat", "/etc/apt/apt.conf.d/90stoker-proxy", "/etc/profile.d/stoker-proxy.sh"],
    "curl_denied": ["curl", "-sS", "https://denied.test/"],
    "curl_other_name": ["curl", "-sS", "https://other.test/hello.txt"],
    "curl_rebind": ["curl", "-sS", "https://rebind.test/hello.txt"],
    "curl_ip_unlisted": ["curl", "-sSk", "https://127.0.0.3/hello.txt"],
    "curl_metadata": ["curl", "-sSf", "http://169.254.169.254/latest/meta-data/"],
    "curl_no_proxy": ["curl", "-sS", "--noproxy", "*", "-m", "10", "https://allowed.test/"],
    "direct": py(CONNECT_DIRECT),
    "raw_udp_dns": py(RAW_UDP_DNS),
    "sni_mismatch": py(SNI_MISMATCH),
    "host_mismatch": py(HOST_MISMATCH),
    "not_tls": py(NOT_TLS),
    "slowloris": py(SLOWLORIS),
    "flood": py(FLOOD),
    "after_flood": ["curl", "-sS", "https://allowed.test/hello.txt"],
}


@pytest.fixture(scope="session")
def net_image(dirs: Dirs, boot_artifacts: object) -> str:
    """The test-net image, built once into the shared cache (about a minute)."""
    env = {**os.environ, "STOKER_CACHE_DIR": str(dirs.cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stoker.cli",
            "image",
            "build",
            str(HERE / "data" / "test-net.toml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return IMAGE


def in_namespace(
    argv: list[str], tmp_path: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a new network namespace with only loopback."""
    return subprocess.run(
        ["unshare", "--net", "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )


@pytest.fixture(scope="module")
def scenario(
    net_image: str, dirs: Dirs, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("net-scenario")
    config = {
        "image": net_image,
        "cache": str(dirs.cache),
        "runtime": str(dirs.runtime),
        "commands": COMMANDS,
        "limits": {"max_connections": 16, "header_timeout": 5.0},
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    proc = in_namespace([sys.executable, str(HERE / "net_scenario.py"), str(path)], tmp, 1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_nat_mode_reaches_the_host_side_unfiltered(
    net_image: str, dirs: Dirs, tmp_path: Path
) -> None:
    # nat is the explicit opt-in for trusted code: a real NIC (QEMU user-mode
    # networking), where 10.0.2.2 is the host's loopback, here the namespace's.
    config = {
        "image": net_image,
        "cache": str(dirs.cache),
        "runtime": str(dirs.runtime),
        "mode": "nat",
        "commands": {
            "fetch": ["curl", "-sS", "-m", "60", "http://10.0.2.2/hello.txt"],
            "links": ["ls", "/sys/class/net"],
            "dns": ["cat", "/etc/resolv.conf"],
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = in_namespace([sys.executable, str(HERE / "net_scenario.py"), str(path)], tmp_path, 900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    fetch = result["commands"]["fetch"]
    assert fetch["code"] == 0 and fetch["stdout"] == "hello from allowed.test\n", fetch
    assert result["commands"]["links"]["stdout"].split() == ["eth0", "lo"]
    assert "nameserver 10.0.2.3" in result["commands"]["dns"]["stdout"]
    assert "https_proxy" not in result["network_env"]


def cmd(scenario: dict[str, Any], name: str) -> dict[str, Any]:
    out: dict[str, Any] = scenario["commands"][name]
    return out


def denied_reasons(scenario: dict[str, Any]) -> list[str]:
    return [
        f"{r['host']}:{r['port']} {r['reason']}"
        for r in scenario["records"]
        if r["decision"] == "denied"
    ]


def test_the_guest_environment_points_at_the_proxy(scenario: dict[str, Any]) -> None:
    assert scenario["network_env"]["https_proxy"] == PROXY
    files = cmd(scenario, "apt_config")
    assert files["code"] == 0, files
    assert f'Acquire::http::Proxy "{PROXY}";' in files["stdout"]
    assert f"export https_proxy={PROXY}" in files["stdout"]


def test_curl_https_and_http_through_the_allowlist(scenario: dict[str, Any]) -> None:
    for name in ("curl_https", "curl_http", "after_flood"):
        res = cmd(scenario, name)
        assert res["code"] == 0 and res["stdout"] == "hello from allowed.test\n", (name, res)
    dialled = {r["dialled"] for r in scenario["records"] if r["decision"] == "allowed"}
    assert dialled <= {"127.0.0.2:443", "127.0.0.2:80"}, dialled


def test_git_clone_over_https(scenario: dict[str, Any]) -> None:
    res = cmd(scenario, "git_clone")
    assert res["code"] == 0 and res["stdout"] == "cloned through the egress proxy\n", res


def test_pip_install_from_an_index(scenario: dict[str, Any]) -> None:
    res = cmd(scenario, "pip_install")
    assert res["code"] == 0 and res["stdout"].strip().endswith("42"), res


def test_denied_names_fail_with_the_reason(scenario: dict[str, Any]) -> None:
    for name in (
        "curl_denied",
        "curl_other_name",
        "curl_rebind",
        "curl_ip_unlisted",
        "curl_metadata",
    ):
        res = cmd(scenario, name)
        assert res["code"] != 0, (name, res)
        assert "403" in res["stderr"] or "403" in res["stdout"], (name, res)
    reasons = "\n".join(denied_reasons(scenario))
    assert "denied.test:443" in reasons and "other.test:443" in reasons
    assert (
        "rebind.test:443" in reasons and "127.0.0.3" in reasons
    )  # resolved to a non-public address
    assert "169.254.169.254:80" in reasons
    summary = "\n".join(scenario["denied_summary"])
    assert "denied.test:443" in summary


def test_direct_connections_have_no_route(scenario: dict[str, Any]) -> None:
    res = cmd(scenario, "direct")
    assert res["code"] == 0, res
    assert "CONNECTED" not in res["stdout"], res
    assert res["stdout"].count("refused") == 5
    res = cmd(scenario, "curl_no_proxy")
    assert res["code"] != 0, res


def test_raw_sockets_udp_and_dns_go_nowhere(scenario: dict[str, Any]) -> None:
    res = cmd(scenario, "raw_udp_dns")
    out = res["stdout"]
    assert res["code"] == 0, res
    assert "RAW SENT" not in out and "UDP SENT" not in out and "RESOLVED" not in out, out
    assert "links lo" in out, out  # no network device but loopback


def test_sni_and_host_mismatch_and_non_tls_are_refused(scenario: dict[str, Any]) -> None:
    sni = cmd(scenario, "sni_mismatch")["stdout"]
    assert "HANDSHAKE OK" not in sni and "handshake failed" in sni, sni
    host = cmd(scenario, "host_mismatch")["stdout"]
    assert "403" in host, host
    plain = cmd(scenario, "not_tls")["stdout"]
    assert "True" not in plain, plain
    reasons = "\n".join(denied_reasons(scenario))
    assert "SNI" in reasons and "Host" in reasons and "TLS" in reasons, reasons


def test_floods_and_slow_clients_are_bounded(scenario: dict[str, Any]) -> None:
    flood = cmd(scenario, "flood")
    assert flood["code"] == 0, flood
    outcome = ast.literal_eval(flood["stdout"].strip())  # a dict printed by the guest
    assert outcome.get("HTTP/1.1 200", 0) <= 16, outcome
    assert sum(outcome.values()) == 300, outcome
    slow = cmd(scenario, "slowloris")
    assert slow["code"] == 0 and slow["stdout"].startswith("closed 5"), slow
    assert scenario["stats"]["active"] == 0


def test_stoker_run_reports_denied_connections(net_image: str, tmp_path: Path) -> None:
    # The CLI end to end, in a namespace of its own: the denial happens by name,
    # before any lookup, and the user is told which connection and why.
    project = tmp_path / "proj"
    project.mkdir()
    proc = in_namespace(
        [
            sys.executable,
            "-m",
            "stoker.cli",
            "run",
            "--image",
            net_image,
            "--allow",
            "allowed.test",
            "--json",
            str(project),
            "--",
            "curl",
            "-sS",
            "https://denied.test/",
        ],
        tmp_path,
        600,
    )
    assert proc.returncode == 56, proc.stderr  # curl: CONNECT refused
    assert "the network policy denied 1 connection(s)" in proc.stderr, proc.stderr
    assert "denied.test:443" in proc.stderr and "not in allowlist" in proc.stderr
    summary = json.loads(proc.stdout)
    network = summary["network"]
    assert network["mode"] == "egress" and network["allow"] == ["allowed.test"]
    assert network["connections"]["denied"] == 1 and network["connections"]["allowed"] == 0
    assert any("denied.test:443" in line for line in network["denied"])


def test_bad_allowlist_entries_fail_before_boot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stoker.cli",
            "run",
            "--allow",
            "https://x.test/path",
            str(tmp_path),
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "https://x.test/path" in proc.stderr and "hint: write 'x.test'" in proc.stderr
