"""A private ``stoker serve`` for one GitLab job, when no shared service is configured.

The custom executor's stages are separate processes, but the job's VM must
live from ``prepare`` to ``cleanup``.  Without ``--service``, ``prepare``
starts this: a service of its own (SQLite, one pool of one VM, an API on
127.0.0.1 with a random token), detached from gitlab-runner's process group
so that a stage's end does not end it.  The VM dies with it (its VMM has a
parent-death signal), and it ends by itself when the job's session has ended,
when no session is opened within a minute, or on SIGTERM (``cleanup``).

Run as ``python -m stoker.ci.gitlab.local_service DIRECTORY``; everything it
needs and writes is in ``DIRECTORY`` (mode 0700): ``config.json``, ``url``
(written once it listens), ``service.log`` and the service's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stoker.errors import InfrastructureError

#: How long the service waits for its first job before it ends itself.
FIRST_JOB_SECONDS: Final = 60.0
#: How long ``prepare`` waits for the service to listen.
START_SECONDS: Final = 60.0
#: Chosen by tests: run the private service on the fake backend (it also needs
#: ``STOKER_ALLOW_FAKE_BACKEND=1``, which the service checks).
BACKEND_ENV: Final = "STOKER_GITLAB_LOCAL_BACKEND"
#: The private service's token, handed to it by ``prepare``.
TOKEN_ENV: Final = "STOKER_LOCAL_TOKEN"  # noqa: S105 (a variable's name)


@dataclass(frozen=True)
class LocalShape:
    """The one VM the private service runs."""

    image: str
    cpus: int
    memory_mb: int
    disk_mb: int
    #: ``host:port`` the guest may reach (GitLab's first).
    allow: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class LocalService:
    """A running private service: where it listens, its token, its process."""

    url: str
    token: str
    pid: int


def service_config(directory: Path, shape: LocalShape, token: str) -> dict[str, Any]:
    """The private service's configuration (pure): one pool, one VM, one token."""
    pool: dict[str, Any] = {
        "image": shape.image,
        "cpus": shape.cpus,
        "memory": shape.memory_mb,
        "disk": shape.disk_mb,
        "max": 1,
        "min_idle": 0,
        "timeout": shape.timeout_s,
    }
    if shape.allow:
        pool["network"] = {"mode": "egress", "allow": list(shape.allow)}
    return {
        "state_dir": str(directory / "state"),
        "runtime_dir": str(directory / "run"),
        "backend": os.environ.get(BACKEND_ENV, "qemu"),
        "retry_limit": 0,
        "listen": {"host": "127.0.0.1", "port": 1},
        "host": {"name": "gitlab-local", "cpus": shape.cpus, "memory_mb": shape.memory_mb},
        "pools": {"gitlab": pool},
        "tokens": [
            {
                "name": "gitlab-executor",
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
                "scopes": ["submit", "read"],
            }
        ],
    }


async def start_local_service(directory: Path, shape: LocalShape) -> LocalService:
    """Start the private service in ``directory`` and wait until it listens."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    token = "stk_" + secrets.token_hex(24)
    (directory / "config.json").write_text(json.dumps(service_config(directory, shape, token)))
    process = _spawn(directory, token)
    deadline = time.monotonic() + START_SECONDS
    url_file = directory / "url"
    while not url_file.exists():
        if process.poll() is not None:
            raise InfrastructureError(
                f"the private stoker service exited with status {process.returncode}: "
                + _tail(directory / "service.log")
            )
        if time.monotonic() > deadline:
            await stop_local_service(directory, process.pid)
            raise InfrastructureError("the private stoker service did not start within a minute")
        await asyncio.sleep(0.02)
    return LocalService(url=url_file.read_text().strip(), token=token, pid=process.pid)


def _spawn(directory: Path, token: str) -> subprocess.Popen[bytes]:
    with (directory / "service.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stoker.ci.gitlab.local_service", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own session: gitlab-runner's signals to a stage's process group
            # must not reach the service that holds the job's VM.
            start_new_session=True,
            close_fds=True,
            # The service asks its own API whether its job has ended.
            env={**os.environ, TOKEN_ENV: token},
        )


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child and has exited (never blocks)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace").strip()
    except OSError:
        return "(no log)"


def _is_ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is still the private service of ``directory`` (pids get reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(directory).encode() in argv and b"stoker.ci.gitlab.local_service" in argv


async def stop_local_service(directory: Path, pid: int | None, grace: float = 20.0) -> None:
    """Stop the private service (SIGTERM, then SIGKILL to its group) and remove ``directory``."""
    if pid is not None and _is_ours(pid, directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _is_ours(pid, directory) and time.monotonic() < deadline:
            _reap(pid)
            await asyncio.sleep(0.05)
        if _is_ours(pid, directory):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            for _ in range(100):
                _reap(pid)
                if not _is_ours(pid, directory):
                    break
                await asyncio.sleep(0.05)
    shutil.rmtree(directory, ignore_errors=True)


# --- the service process ------------------------------------------------------------------------


async def _watch(url: str, token: str, stop: asyncio.Event) -> None:
    """Stop once every job has ended (after the first), or when none came in time."""
    import httpx

    from stoker.service.jobs import JobState

    started = time.monotonic()
    seen = False
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                jobs = (await client.get("/v1/jobs", params={"limit": 10})).json()["jobs"]
                # Every state but the final ones (an "assigned" job counts: it was taken
                # for active once the service stopped itself under a prepare, mid-way).
                active = [j for j in jobs if not JobState(j["state"]).terminal]
                seen = seen or bool(jobs)
                if (seen and not active) or (
                    not seen and time.monotonic() - started > FIRST_JOB_SECONDS
                ):
                    stop.set()


async def _serve(directory: Path) -> None:
    from stoker.service.config import ServiceConfig
    from stoker.service.daemon import listen_socket, serve

    data = json.loads((directory / "config.json").read_text())
    token = os.environ.pop(TOKEN_ENV, "")
    config = ServiceConfig.model_validate(data, context={"base_dir": directory})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher: asyncio.Task[None] | None = None

    def ready(url: str) -> None:
        nonlocal watcher
        tmp = directory / "url.tmp"
        tmp.write_text(url)
        tmp.replace(directory / "url")
        if token:
            watcher = loop.create_task(_watch(url, token, stop))

    try:
        await serve(config, stop=stop, sock=listen_socket("127.0.0.1", 0), on_ready=ready)
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def main(argv: list[str] | None = None) -> int:
    """``python -m stoker.ci.gitlab.local_service DIRECTORY``."""
    from stoker.service.daemon import configure_logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stoker.ci.gitlab.local_service DIRECTORY", file=sys.stderr)
        return 2
    configure_logging("text", "info")
    asyncio.run(_serve(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
