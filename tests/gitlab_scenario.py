"""GitLab CI end to end with real VMs, inside a network namespace of its own.

``tests/test_gitlab_vm.py`` runs this as ``unshare --net python3
gitlab_scenario.py CONFIG``: FakeGitLab (a fake, on 127.0.0.2), ``stoker
serve`` (a real process, QEMU under TCG) and the stand-in runner manager
(standing in for gitlab-runner, which cannot be installed here) live in a
fresh namespace with nothing but loopback.

``stoker serve`` registers the pool's runner at start and writes its
gitlab-runner entry; the stand-in reads that entry and drives ``stoker
gitlab-executor`` exactly as it says.  The pool has no ``network`` of its
own: the default for a GitLab pool lets its VMs reach GitLab's host only,
so each job clones the project from the fake over HTTP through its egress
proxy.  Steps: a job that succeeds (and scans its VM for runner tokens), a
job that fails with status 5, a job whose ``stoker gitlab-executor run`` is
killed (``kill -9``) mid-stage.  After each, no QEMU is left.  Prints one
JSON document.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent / "ci"))

from stoker.ci.gitlab.fake_gitlab import FakeGitLab
from stoker.ci.gitlab.runner_config import load
from stoker.ci.gitlab.stand_in import RunnerSettings, StandInManager

PAT = "glpat-vm-scenario-0123456789"
SERVICE_TOKEN = "stk_gitlab_vm_scenario_token"
#: Searches the VM for anything shaped like a runner token and prints the SHA-256 of
#: each (the test compares with the real token's); a planted one proves the search works.
SCAN = [
    "mkdir -p /tmp/planted && printf 'x=glrt-plantedcontrol0123\\n' > /tmp/planted/f",
    "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' < $f; done "
    "> /tmp/procs.txt 2>/dev/null || true",
    "grep -rhoaE 'glrt-[A-Za-z0-9_-]{10,}' /etc /root /home /opt /usr/local /var /tmp /run "
    "/builds 2>/dev/null | sort -u | while read -r t; do "
    "printf 'token-sha %s\\n' $(printf %s \"$t\" | sha256sum | cut -c1-64); done",
    "test ! -e /etc/gitlab-runner/config.toml && echo no-runner-config",
    "echo scan-done",
]


def wait(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def qemu_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if b"qemu-system" in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bare_repo(work: Path) -> tuple[Path, str]:
    src = work / "src"
    src.mkdir()
    (src / "README").write_text("hello from the repository\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "PATH": "/usr/bin:/bin", "HOME": str(work)}  # fmt: skip
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."],
                 ["git", "commit", "-q", "-m", "one"]):  # fmt: skip
        subprocess.run(argv, cwd=src, env=env, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=src, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    bare = work / "app.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], env=env, check=True)
    subprocess.run(["git", "update-server-info"], cwd=bare, env=env, check=True)
    return bare, sha


def write_config(work: Path, cfg: dict[str, Any], port: int, gitlab_url: str) -> Path:
    (work / "pat").write_text(PAT)
    (work / "svc-token").write_text(SERVICE_TOKEN)
    digest = hashlib.sha256(SERVICE_TOKEN.encode()).hexdigest()
    stoker = str(Path(sys.executable).with_name("stoker"))
    text = f"""
state_dir = "{work / "state"}"
cache_dir = "{cfg["cache"]}"
runtime_dir = "{work / "runtime"}"
heartbeat_seconds = 1
lease_seconds = 5
poll_seconds = 0.3
shutdown_grace_seconds = 10
[listen]
host = "127.0.0.1"
port = {port}
[host]
name = "gl-vm-test"
cpus = 2
memory_mb = "4G"
accel = "tcg"
[pools.gl]
image = "{cfg["image"]}"
cpus = 1
memory = "768M"
disk = "2G"
max = 2
timeout = "15m"
snapshot = "never"
[[tokens]]
name = "gitlab"
sha256 = "{digest}"
scopes = ["submit", "read"]
[gitlab]
url = "{gitlab_url}"
token_file = "pat"
runner_config = "gitlab-runner/config.toml"
service_token_file = "svc-token"
stoker = "{stoker}"
[gitlab.pools.gl]
runner_type = "project_type"
project_id = 42
tags = ["vm"]
"""
    path = work / "stoker.toml"
    path.write_text(text)
    return path


def executor_run_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gitlab-executor" in argv and b"step_script" in argv:
                found.append(int(entry))
    return found


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    work = Path(cfg["work"])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    bare, sha = bare_repo(work)
    port = free_port()
    env = {**os.environ, "STOKER_CACHE_DIR": cfg["cache"]}
    results: dict[str, Any] = {}
    with FakeGitLab(host="127.0.0.2") as gl:
        gl.add_token(PAT, {"create_runner", "manage_runner"})
        gl.add_project(42, "acme/app", repo_dir=bare)
        config = write_config(work, cfg, port, gl.url)
        argv = [sys.executable, "-m", "stoker.cli", "serve", "--config", str(config)]
        serve = subprocess.Popen(
            argv, env=env, stdout=(work / "serve.log").open("wb"), stderr=subprocess.STDOUT
        )
        try:
            runner_file = work / "gitlab-runner" / "config.toml"
            wait(lambda: _healthy(port) and runner_file.exists(), 120, "serve and registration")
            entry = load(runner_file).get("stoker-gl")
            assert entry is not None
            (runner,) = gl.runners().values()
            results["runner"] = {"type": runner.type, "tags": runner.tags}
            settings = RunnerSettings.from_config_toml(runner_file, "stoker-gl")
            manager = StandInManager(gl.url, str(entry["token"]), settings)
            managed = work / "manager"
            managed.mkdir()

            ok = gl.queue_job(42, ["cat README", *SCAN], tags=["vm"], sha=sha)
            started = time.monotonic()
            outcome = manager.run_once(managed, timeout=60)
            results["ok_seconds"] = round(time.monotonic() - started, 1)
            results["ok_state"] = outcome.state if outcome else None
            job = gl.jobs()[ok]
            trace = job.trace.decode(errors="replace")
            results["ok_gitlab_state"] = job.state
            results["ok_trace_has_readme"] = "hello from the repository" in trace
            results["token_sha_found"] = [
                line.split()[1] for line in trace.splitlines() if line.startswith("token-sha ")
            ]
            results["runner_token_sha"] = hashlib.sha256(runner.token.encode()).hexdigest()
            results["planted_sha"] = hashlib.sha256(b"glrt-plantedcontrol0123").hexdigest()
            results["scan_done"] = "scan-done" in trace and "no-runner-config" in trace
            results["ok_trace_tail"] = trace[-1500:]
            wait(lambda: not qemu_pids(), 60, "the first VM to be destroyed")

            bad = gl.queue_job(42, ["echo failing", "exit 5"], tags=["vm"], sha=sha)
            outcome = manager.run_once(managed, timeout=60)
            job = gl.jobs()[bad]
            results["bad"] = [job.state, job.exit_code, job.failure_reason]
            wait(lambda: not qemu_pids(), 60, "the second VM to be destroyed")

            # kill -9 of the driver mid-stage: cleanup still ends the VM
            slow = gl.queue_job(42, ["echo started", "sleep 600"], tags=["vm"], sha=sha)
            killer_done = threading.Event()

            def killer() -> None:
                wait(lambda: bool(executor_run_pids()), 300, "the step_script stage")
                time.sleep(2)
                for pid in executor_run_pids():
                    os.kill(pid, signal.SIGKILL)
                killer_done.set()

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            outcome = manager.run_once(managed, timeout=60)
            thread.join(timeout=10)
            job = gl.jobs()[slow]
            results["killed"] = [job.state, job.failure_reason, killer_done.is_set()]
            results["killed_stages"] = [s for s, _ in outcome.stages] if outcome else []
            results["qemu_after_kill_seconds"] = round(
                wait(lambda: not qemu_pids(), 60, "the killed job's VM to be destroyed"), 2
            )
            manager.close()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
                jobs = api.get(
                    "/v1/jobs", params={"limit": 10},
                    headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
                ).json()["jobs"]  # fmt: skip
                reasons = []
                for j in jobs:
                    for seq in range(1, 30):
                        step = api.get(
                            f"/v1/jobs/{j['id']}/steps/{seq}",
                            headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
                        )  # fmt: skip
                        if step.status_code == 404:
                            break
                        if step.json()["reason"]:
                            reasons.append(step.json()["reason"])
            results["sessions"] = sorted(j["state"] for j in jobs)
            results["step_reasons"] = reasons
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        results["qemu_left_at_end"] = len(qemu_pids())
    print(json.dumps(results))


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
