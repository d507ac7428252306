"""``stoker serve``, ``stoker job ...`` and ``stoker token ...`` as users run them.

A real ``stoker serve`` process (fake backend: commands run on this host)
listens on a loopback port; the CLI runs as separate processes against it,
exactly as from a shell.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stoker.service.auth import config_snippet, new_token

STOKER = [sys.executable, "-m", "stoker.cli"]
SECRET = "s3cret-value-for-the-cli"
ID_RE = re.compile(r"^[0-9a-f]{32}$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A ``stoker serve`` subprocess; its stderr is collected by a thread."""

    def __init__(self, root: Path, *, extra: str = "") -> None:
        self.root = root
        self.token = new_token()
        self.reader_token = new_token()
        self.port = free_port()
        self.config = root / "stoker.toml"
        self.config.write_text(
            f"""
state_dir = "state"
runtime_dir = "run"
backend = "fake"
poll_seconds = 0.2
heartbeat_seconds = 0.5
lease_seconds = 2
shutdown_grace_seconds = 5
{extra}
[listen]
host = "127.0.0.1"
port = {self.port}

[host]
name = "cli-test"
cpus = 4
memory_mb = "4G"

[pools.default]
cpus = 1
memory = "256M"
max = 4

"""
            + config_snippet("ci", ("submit", "read"), self.token)
            + config_snippet("viewer", ("read",), self.reader_token)
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [*STOKER, "serve", "--config", str(self.config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "STOKER_ALLOW_FAKE_BACKEND": "1"},
            cwd=self.root,
        )
        threading.Thread(target=self._collect, daemon=True).start()
        self.wait_for("stoker: serving on http://127.0.0.1:")
        return self

    def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from stoker serve:\n{''.join(self.lines)}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    @property
    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("serve")).start()
    try:
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from the project\n")
    (root / "sub" / "run.sh").write_text("mkdir -p out; echo built > out/result.txt\n")
    return root


def stoker(
    *args: str,
    server: Server | None = None,
    token: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STOKER_TOKEN")}
    if server is not None:
        environment["STOKER_URL"] = server.url
        environment["STOKER_TOKEN"] = token if token is not None else server.token
    environment.update(env or {})
    return subprocess.run(
        [*STOKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=environment,
        input=stdin,
        cwd=cwd,
    )


# --- tokens -------------------------------------------------------------------------------------


def test_token_new_prints_the_token_once_and_its_config_entry(tmp_path: Path) -> None:
    result = stoker("token", "new", "release-bot", "--scopes", "submit,read")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.startswith("stk_")
    assert token not in result.stderr
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert (
        '[[tokens]]\nname = "release-bot"\n'
        f'sha256 = "{digest}"\nscopes = ["submit", "read"]\n' in result.stderr
    )
    hashed = stoker("token", "hash", stdin=token + "\n")
    assert hashed.returncode == 0 and hashed.stdout.strip() == digest
    again = stoker("token", "new", "release-bot")
    assert again.stdout.strip() != token
    bad = stoker("token", "new", "x", "--scopes", "write")
    assert bad.returncode == 2 and "unknown scope 'write'" in bad.stderr
    bad = stoker("token", "new", "-bad name")
    assert bad.returncode == 2


# --- submitting and following --------------------------------------------------------------------


def test_submit_follow_streams_and_exits_with_the_status(server: Server, project: Path) -> None:
    result = stoker(
        "job",
        "submit",
        str(project),
        "--follow",
        "-e",
        "GREETING=hi",
        "--secret",
        f"PASS={SECRET}",
        "--",
        "sh",
        "-c",
        'cat hello.txt; echo "$GREETING $PASS"; echo to-stderr >&2; exit 3',
        server=server,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "hello from the project\nhi ***\n"
    assert "to-stderr\n" in result.stderr and "failed (exit status 3)" in result.stderr
    assert SECRET not in result.stdout + result.stderr + server.log


def test_submit_then_logs_ls_show_artifacts(server: Server, project: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(server.token + "\n")
    submitted = stoker(
        "job",
        "submit",
        str(project),
        "--url",
        server.url,
        "--token-file",
        str(token_file),
        "-a",
        "out/*",
        "--",
        "sh",
        "-c",
        "sh sub/run.sh; for i in 1 2 3; do echo step $i; sleep 0.2; done",
        env={"STOKER_URL": "http://127.0.0.1:1", "STOKER_TOKEN": "ignored"},  # options win
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert ID_RE.match(job_id), submitted.stdout
    followed = stoker("job", "logs", job_id, "--follow", server=server)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "step 1\nstep 2\nstep 3\n"
    assert "succeeded" in followed.stderr
    stored = stoker("job", "logs", job_id, server=server, token=server.reader_token)
    assert stored.returncode == 0 and stored.stdout == followed.stdout
    listed = stoker("job", "ls", "--json", "--state", "succeeded", server=server)
    assert listed.returncode == 0, listed.stderr
    assert job_id in [job["id"] for job in json.loads(listed.stdout)]
    table = stoker("job", "ls", "--limit", "5", server=server)
    assert table.returncode == 0 and job_id[:8] in table.stdout
    shown = stoker("job", "show", job_id, server=server)
    assert json.loads(shown.stdout)["state"] == "succeeded"
    out = tmp_path / "artifacts"
    fetched = stoker("job", "artifacts", job_id, "--out", str(out), server=server)
    assert fetched.returncode == 0, fetched.stderr
    assert (out / "out" / "result.txt").read_text() == "built\n"
    assert f"{out / 'out' / 'result.txt'} (6 bytes)" in fetched.stdout
    cancelled = stoker("job", "cancel", job_id, server=server)
    assert cancelled.returncode == 2 and "already ended" in cancelled.stderr


def test_cancel_a_running_job(server: Server, project: Path) -> None:
    submitted = stoker("job", "submit", str(project), "--", "sleep", "60", server=server)
    job_id = submitted.stdout.strip()
    assert ID_RE.match(job_id), submitted.stderr
    deadline = time.monotonic() + 20
    while json.loads(stoker("job", "show", job_id, server=server).stdout)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    refused = stoker("job", "cancel", job_id, server=server, token=server.reader_token)
    assert refused.returncode == 2 and "lacks the 'submit' scope" in refused.stderr
    cancelled = stoker("job", "cancel", job_id, server=server)
    assert cancelled.returncode == 0, cancelled.stderr
    assert job_id in cancelled.stdout
    followed = stoker("job", "logs", job_id, "--follow", server=server)
    assert followed.returncode == 130 and "cancelled" in followed.stderr


def test_a_timeout_exits_124(server: Server, project: Path) -> None:
    result = stoker(
        "job", "submit", str(project), "--timeout", "1s", "-f", "--", "sleep", "30", server=server
    )
    assert result.returncode == 124, result.stderr
    assert "timed_out" in result.stderr


def test_interrupting_follow_leaves_the_job_running(server: Server, project: Path) -> None:
    env = {**os.environ, "STOKER_URL": server.url, "STOKER_TOKEN": server.token}
    proc = subprocess.Popen(
        [*STOKER, "job", "submit", str(project), "-f", "--", "sh", "-c", "echo up; sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    job_id = re.search(r"stopped following job ([0-9a-f]{32}); it keeps running", stderr)
    assert job_id is not None, stderr
    shown = json.loads(stoker("job", "show", job_id.group(1), server=server).stdout)
    assert shown["state"] == "running"
    assert stoker("job", "cancel", job_id.group(1), server=server).returncode == 0


# --- errors ---------------------------------------------------------------------------------------


def test_client_errors_are_explained(server: Server, project: Path, tmp_path: Path) -> None:
    no_token = stoker("job", "ls", env={"STOKER_URL": server.url})
    assert no_token.returncode == 2 and "no API token" in no_token.stderr
    bad_token = stoker("job", "ls", server=server, token="stk_not_a_real_token")
    assert bad_token.returncode == 2
    assert "invalid bearer token (HTTP 401)" in bad_token.stderr
    assert "stk_not_a_real_token" not in bad_token.stderr
    unknown = stoker(
        "job", "submit", str(project), "--image", "gentoo", "--", "true", server=server
    )
    assert unknown.returncode == 2
    assert "unknown image 'gentoo'" in unknown.stderr and "images served: default" in unknown.stderr
    too_big = stoker("job", "submit", str(project), "--cpus", "3", "--", "true", server=server)
    assert too_big.returncode == 2 and "3 vCPUs" in too_big.stderr
    missing = stoker("job", "submit", str(tmp_path / "nope"), "--", "true", server=server)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    port = free_port()
    unreachable = stoker("job", "ls", server=server, env={"STOKER_URL": f"http://127.0.0.1:{port}"})
    assert unreachable.returncode == 125 and "cannot reach the stoker service" in unreachable.stderr


# --- the server -----------------------------------------------------------------------------------


def test_serve_stops_gracefully_on_sigterm(tmp_path: Path, project: Path) -> None:
    srv = Server(tmp_path).start()
    try:
        submitted = stoker(
            "job", "submit", str(project), "--", "sh", "-c", "sleep 3; echo done", server=srv
        )
        job_id = submitted.stdout.strip()
        assert ID_RE.match(job_id), submitted.stderr
        deadline = time.monotonic() + 20
        while json.loads(stoker("job", "show", job_id, server=srv).stdout)["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.log
    assert "stoker: signal 15: stopping; running jobs get up to 5s" in srv.log
    # The running job was given its grace time and finished; the state survives a restart.
    again = Server(tmp_path).start()
    try:
        shown = json.loads(stoker("job", "show", job_id, server=again).stdout)
        assert shown["state"] == "succeeded", shown
        logs = stoker("job", "logs", job_id, server=again)
        assert logs.stdout == "done\n"
    finally:
        assert again.stop(signal.SIGINT) == 0, again.log


def test_serve_reports_bad_config_and_busy_ports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('backend = "fake"\n[pools.default]\ncpus = "many"\n')
    result = stoker(
        "serve", "--config", str(bad), env={"STOKER_ALLOW_FAKE_BACKEND": "1"}, cwd=tmp_path
    )
    assert result.returncode == 2 and "bad.toml:3: pools.default.cpus" in result.stderr
    srv = Server(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", srv.port))
        busy.listen()
        result = stoker(
            "serve",
            "--config",
            str(srv.config),
            env={"STOKER_ALLOW_FAKE_BACKEND": "1"},
            cwd=srv.root,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{srv.port}" in result.stderr
