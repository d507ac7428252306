"""A real ``stoker serve`` process on the fake backend, listening on 127.0.0.1.

Shared by the API fuzz test, the load test and ``bench/load.py``: a
configuration file with one bearer token per scope set, the process started
with ``STOKER_ALLOW_FAKE_BACKEND=1`` (the fake backend runs commands on this
host: only harmless commands are ever submitted to it), its log in a file, and
its resident memory read from ``/proc``.  A context manager: leaving it stops
the server (SIGTERM, then SIGKILL after the grace period) and reaps it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from stoker.service.auth import config_snippet, new_token

#: token name -> its scopes (every combination the API distinguishes).
SCOPED_TOKENS: Final[Mapping[str, tuple[str, ...]]] = {
    "root": ("admin",),
    "ci": ("submit", "read"),
    "viewer": ("read",),
    "pusher": ("submit",),
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS (a zombie?)")


class ServeProcess:
    """``stoker serve`` on the fake backend in ``root`` (its state, config and log)."""

    def __init__(
        self,
        root: Path,
        *,
        pool_max: int = 8,
        cpus: int = 8,
        database_url: str = "",
        extra: str = "",
        tokens: Mapping[str, Sequence[str]] = SCOPED_TOKENS,
        pool_labels: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens = {name: new_token() for name in tokens}
        self.config = root / "stoker.toml"
        self.log_path = root / "serve.log"
        database = f'database_url = "{database_url}"\n' if database_url else ""
        snippets = "".join(
            config_snippet(name, tuple(scopes), self.tokens[name])
            for name, scopes in tokens.items()
        )
        self.config.write_text(
            f"""state_dir = "state"
runtime_dir = "run"
backend = "fake"
{database}poll_seconds = 0.2
heartbeat_seconds = 0.5
lease_seconds = 5
shutdown_grace_seconds = 10
{extra}
[listen]
host = "127.0.0.1"
port = {self.port}

[host]
name = "serve-test"
cpus = {cpus}
memory_mb = "16G"

[submitters]
max_concurrent = {pool_max}

[pools.default]
cpus = 1
memory = "256M"
max = {pool_max}
labels = {json.dumps(list(pool_labels))}

{snippets}"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def headers(self, who: str) -> dict[str, str]:
        """The ``Authorization`` header of token ``who``."""
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def __enter__(self) -> ServeProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stoker.cli", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "STOKER_ALLOW_FAKE_BACKEND": "1"},
                cwd=self.root,
            )
        try:
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        code = self.stop()
        if kind is None and code != 0:
            raise AssertionError(f"stoker serve exited with {code}:\n{self.log()[-4000:]}")

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while f"serving on {self.url}" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"stoker serve did not start:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        """The server's resident memory now."""
        return rss_kib(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not end; the exit status (idempotent)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
