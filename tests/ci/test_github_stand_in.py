"""The stand-in ``run.sh`` (tests only: the official runner cannot be downloaded here)
against FakeGitHub: one job end to end, failures, its proxy, its retries.

Everything listens on 127.0.0.1; every process a test starts is reaped by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fake_support import LABELS, REPO, LoopbackServer, jit_identity, register, runner_call, until

from stoker.ci.github.fake_github import FakeGitHub
from stoker.ci.github.stand_in import RUN_SH, build_tarball

pytestmark = pytest.mark.usefixtures("no_threads_left")

# --------------------------------------------------------------------------- the stand-in runner


def test_the_stand_in_tarball_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    sha = build_tarball(first)
    assert build_tarball(second) == sha
    assert first.read_bytes() == second.read_bytes()
    assert hashlib.sha256(first.read_bytes()).hexdigest() == sha
    with tarfile.open(first) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"./run.sh", "./stand_in.py"}  # at the root, like the release
        assert members["./run.sh"].mode == 0o755 and members["./stand_in.py"].mode == 0o644
        assert {m.mtime for m in members.values()} == {0}
        run_sh = tar.extractfile("./run.sh")
        assert run_sh is not None and run_sh.read() == RUN_SH
    assert b"STAND-IN" in RUN_SH


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """The stand-in unpacked like the release tarball: its ``run.sh``."""
    tarball = tmp_path / "stand-in.tar.gz"
    build_tarball(tarball)
    dest = tmp_path / "actions-runner"
    dest.mkdir()
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    return dest / "run.sh"


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no proxy settings of whoever runs the tests."""
    return {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **extra}


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A process whose output is collected; killed (if need be) and reaped at the end."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def test_the_stand_in_runs_one_job_end_to_end(
    gh: FakeGitHub, api: httpx.Client, stand_in: Path
) -> None:
    created = register(api, "stand-in-1")
    env = clean_env(ACTIONS_RUNNER_INPUT_JITCONFIG=created["encoded_jit_config"])
    with started([str(stand_in)], env) as proc:
        # Registered, then listening: the job is queued while it long-polls.
        until(lambda: gh.runners[created["runner"]["id"]].status == "online", 10, "a session")
        job_id = gh.queue_job(
            REPO,
            ["Self-Hosted", "Linux"],
            run=["sh", "-c", 'echo hello; echo "jit=${ACTIONS_RUNNER_INPUT_JITCONFIG:-unset}"'],
        )
        code, output = finish(proc)
    assert code == 0, output
    assert "stand-in-1: Listening for Jobs" in output
    assert "\nhello\n" in output
    assert "jit=unset" in output  # removed from the environment, as the runner does
    assert f"Job {job_id} completed with result: success" in output
    job = gh.jobs[job_id]
    assert (job.status, job.conclusion, job.runner_name) == ("completed", "success", "stand-in-1")
    assert gh.runners == {}


def test_the_stand_in_reports_failure_and_refuses_a_used_configuration(
    gh: FakeGitHub, api: httpx.Client, stand_in: Path
) -> None:
    encoded = register(api, "stand-in-2")["encoded_jit_config"]
    job_id = gh.queue_job(REPO, LABELS, run=["sh", "-c", "echo failing >&2; exit 3"])
    # The stand-in itself, without run.sh, the configuration as an argument this time.
    script = stand_in.parent / "stand_in.py"
    with started(["python3", str(script), "--jitconfig", encoded], clean_env()) as proc:
        code, output = finish(proc)
    assert code == 0, output
    assert "failing" in output and f"Job {job_id} completed with result: failure" in output
    assert gh.jobs[job_id].conclusion == "failure"
    with started([str(stand_in), "--jitconfig", encoded], clean_env()) as proc:
        code, output = finish(proc)
    assert code != 0
    assert "the session was refused (401)" in output  # the runner is gone: unknown
    # A configuration whose session was opened already (by anyone) is refused: 409.
    other = register(api, "stand-in-2b")["encoded_jit_config"]
    assert runner_call(api, "session", jit_identity(other)).status_code == 200
    with started([str(stand_in), "--jitconfig", other], clean_env()) as proc:
        code, output = finish(proc)
    assert code != 0 and "the session was refused (409)" in output
    with started([str(stand_in)], clean_env()) as proc:
        code, output = finish(proc)
    assert code == 2 and "no JIT configuration" in output


class RecordingProxy(LoopbackServer):
    """A plain-HTTP forward proxy on 127.0.0.1 that records what passed through it."""

    def __init__(self, port: int = 0) -> None:
        self.seen: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                # A proxy receives the absolute URL: ``POST http://host:port/path``.
                target = urlsplit(self.path)
                proxy.seen.append((self.command, self.path))
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                upstream = http.client.HTTPConnection(
                    target.hostname or "", target.port or 80, timeout=60
                )
                try:
                    upstream.request(
                        "POST", target.path, body, {"Content-Type": "application/json"}
                    )
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, "test-proxy", port)
        self.url = self.base_url


def test_the_stand_in_goes_through_the_http_proxy_of_its_environment(
    gh: FakeGitHub, api: httpx.Client, stand_in: Path
) -> None:
    encoded = register(api, "stand-in-3")["encoded_jit_config"]
    job_id = gh.queue_job(REPO, LABELS, run=["true"])
    with RecordingProxy() as proxy:
        env = clean_env(http_proxy=proxy.url, ACTIONS_RUNNER_INPUT_JITCONFIG=encoded)
        with started([str(stand_in)], env) as proc:
            code, output = finish(proc)
    assert code == 0, output
    assert gh.jobs[job_id].conclusion == "success"
    paths = [urlsplit(url) for _, url in proxy.seen]
    assert {p.netloc for p in paths} == {urlsplit(gh.url).netloc}
    assert [p.path for p in paths if not p.path.endswith("/heartbeat")] == [
        "/_fake/runner/session",
        "/_fake/runner/acquire",
        "/_fake/runner/complete",
    ]


def test_the_stand_in_retries_until_the_network_answers(
    gh: FakeGitHub, api: httpx.Client, stand_in: Path
) -> None:
    encoded = register(api, "stand-in-4")["encoded_jit_config"]
    job_id = gh.queue_job(REPO, LABELS, run=["true"])
    # A free port, closed again: the stand-in's proxy is not there yet (connection refused).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(http_proxy=f"http://127.0.0.1:{port}", ACTIONS_RUNNER_INPUT_JITCONFIG=encoded)
    with started([str(stand_in)], env) as proc:
        time.sleep(0.5)
        assert proc.poll() is None  # still retrying
        with RecordingProxy(port) as proxy:
            code, output = finish(proc)
    assert code == 0, output
    assert proxy.seen[0] == ("POST", f"{gh.url}/_fake/runner/session")
    assert gh.jobs[job_id].conclusion == "success"
