"""A ``stoker serve`` with its GitHub integration against FakeGitHub, for tests and bench/.

Everything listens on 127.0.0.1: the service's REST API (which receives the
fake's webhooks) and the fake GitHub.  Runner jobs run the stand-in
``run.sh`` (:mod:`stoker.ci.github.stand_in`): on the fake backend it is
linked into every fake VM at ``/opt/actions-runner``; in real VMs it is the
image's runner, built from the shipped spec with the stand-in as artifact.
"""

from __future__ import annotations

import asyncio
import contextlib
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stoker.backends.base import Backend
from stoker.ci.github.fake_github import FakeGitHub
from stoker.ci.github.integration import GitHubIntegration
from stoker.ci.github.stand_in import build_tarball
from stoker.service.api import create_app
from stoker.service.config import ServiceConfig
from stoker.service.daemon import listen_socket
from stoker.service.fake_backend import FakeBackend
from stoker.service.metrics import Metrics
from stoker.service.service import Service

APP_ID = 4242
INSTALLATION = 77
OWNER = "acme"
REPO = "acme/app"
SECRET = b"webhook-secret-for-tests"
LABELS = ["self-hosted", "linux", "x64"]


def app_key(directory: Path) -> tuple[Path, bytes]:
    """A fresh App private key file (PEM) and its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = directory / "app.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


def stand_in_dir(directory: Path) -> Path:
    """The stand-in runner unpacked like the release tarball (``run.sh`` at its root)."""
    tarball = directory / "stand-in.tar.gz"
    build_tarball(tarball)
    dest = directory / "actions-runner"
    dest.mkdir()
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    return dest


def github_table(
    directory: Path,
    api_url: str,
    *,
    pools: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The ``[github]`` table of the tests (App credentials, one repository target)."""
    (directory / "hook-secret").write_bytes(SECRET)
    return {
        "api_url": api_url,
        "app_id": APP_ID,
        "private_key_file": str(directory / "app.pem"),
        "webhook_secret_file": str(directory / "hook-secret"),
        "reconcile_seconds": 1.0,
        "recheck_after": 2.0,
        "targets": [{"repository": REPO}],
        "pools": pools or {"gh": {"labels": LABELS}},
        **overrides,
    }


@dataclass
class Running:
    """A started service with its API and GitHub integration."""

    service: Service
    integration: GitHubIntegration
    url: str
    metrics: Metrics


@contextlib.asynccontextmanager
async def serving(
    config: ServiceConfig, sock: Any, *, backend: Backend | None = None
) -> AsyncIterator[Running]:
    """Run ``config``'s service and REST API on ``sock`` until the block ends."""
    assert config.github is not None
    integration = GitHubIntegration(config.github)
    metrics = Metrics()
    service = Service(config, backend=backend, observer=metrics, integrations=[integration])
    await service.start()
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None
    try:
        app = create_app(service, config)
        server = uvicorn.Server(
            uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
        )
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        yield Running(service, integration, f"http://{host}:{port}", metrics)
    finally:
        if server is not None:
            server.should_exit = True
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        await service.stop(grace=5)


@contextlib.contextmanager
def github_for(sock: Any, public_key: bytes) -> Iterator[FakeGitHub]:
    """FakeGitHub with the App installed on OWNER and REPO added, its webhooks sent to the
    service that will listen on ``sock``."""
    with FakeGitHub(
        app_id=APP_ID,
        public_key_pem=public_key,
        webhook_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1/github/webhook",
        webhook_secret=SECRET,
    ) as fake:
        fake.install(OWNER, INSTALLATION)
        fake.add_repo(REPO)
        yield fake


def make_socket() -> Any:
    """A listening socket on 127.0.0.1 (its port is the webhook's)."""
    return listen_socket("127.0.0.1", 0)


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def fake_backend(runner_dir: Path) -> FakeBackend:
    """The fake backend with the stand-in runner as its image's /opt/actions-runner."""
    return FakeBackend(image_files={"/opt/actions-runner": runner_dir})


__all__ = [
    "APP_ID",
    "INSTALLATION",
    "LABELS",
    "OWNER",
    "REPO",
    "SECRET",
    "FakeGitHub",
    "Running",
    "app_key",
    "fake_backend",
    "github_for",
    "github_table",
    "make_socket",
    "serving",
    "stand_in_dir",
    "until",
]
