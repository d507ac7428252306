"""Fixtures for the service tests: configurations, fake-backend services, tarballs, PostgreSQL.

The fake backend runs the real agent in threads of the test process (no VMs);
real-VM tests are marked ``vm`` and use the session's private runtime
directory, so the root conftest's leak check covers them too.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from stoker.service.config import ServiceConfig
from stoker.service.daemon import listen_socket
from stoker.service.fake_backend import FakeBackend
from stoker.service.jobs import JobState
from stoker.service.jobviews import JobView
from stoker.service.service import Observer, Service

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]
TarballFactory = Callable[..., Path]


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``; nested tables merge, except ``pools`` (replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "pools":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def allow_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOKER_ALLOW_FAKE_BACKEND", "1")


@pytest.fixture
def make_config(tmp_path: Path, allow_fake: None) -> ConfigFactory:
    """Build a fake-backend configuration in ``tmp_path``; keyword arguments override keys."""

    def make(**overrides: Any) -> ServiceConfig:
        data: dict[str, Any] = {
            "state_dir": str(tmp_path / "state"),
            "backend": "fake",
            "host": {"name": "test-host", "cpus": 8, "memory_mb": 8192},
            "heartbeat_seconds": 0.2,
            "lease_seconds": 1.0,
            "poll_seconds": 0.2,
            "shutdown_grace_seconds": 5,
            "pools": {"small": {"cpus": 1, "memory": 256, "max": 8, "labels": ["linux"]}},
        }
        return ServiceConfig.model_validate(merge(data, overrides), context={"base_dir": tmp_path})

    return make


@pytest.fixture
async def fake_service(make_config: ConfigFactory) -> AsyncIterator[ServiceFactory]:
    """Start services on the fake backend; all are stopped at the end of the test."""
    started: list[Service] = []

    async def start(
        config: ServiceConfig | None = None,
        *,
        backend: FakeBackend | None = None,
        observer: Observer | None = None,
    ) -> Service:
        service = Service(
            config or make_config(), backend=backend or FakeBackend(), observer=observer
        )
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop(grace=5)


@pytest.fixture
def make_tarball(tmp_path: Path) -> TarballFactory:
    """Write a tar(.gz) of ``files`` (name -> content); ``members`` adds raw TarInfo entries."""
    counter = iter(range(1_000_000))

    def make(
        files: Mapping[str, bytes | str] | None = None,
        *,
        gz: bool = True,
        members: list[tuple[tarfile.TarInfo, bytes | None]] | None = None,
    ) -> Path:
        path = tmp_path / f"upload-{next(counter)}.tar{'.gz' if gz else ''}"
        with tarfile.open(path, "w:gz" if gz else "w") as tar:
            for name, content in (files or {}).items():
                data = content.encode() if isinstance(content, str) else content
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o755 if name.endswith(".sh") else 0o644
                tar.addfile(info, io.BytesIO(data))
            for info, data in members or []:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return path

    return make


class RecordingObserver:
    """An Observer that keeps every call (for the metrics contract)."""

    def __init__(self) -> None:
        self.transitions: list[tuple[str, JobState | None, JobState]] = []
        self.boots: list[tuple[str, float]] = []
        self.capacity_samples: list[tuple[float, float]] = []
        self.depths: dict[str, int] = {}
        self.vm_counts: list[dict[str, int]] = []
        self.failures: list[str] = []
        self.connections: list[tuple[str, str, int, int]] = []

    def job_transition(self, job: JobView, from_state: JobState | None, to_state: JobState) -> None:
        assert job.state is to_state
        self.transitions.append((job.id, from_state, to_state))

    def boot(self, kind: str, seconds: float) -> None:
        self.boots.append((kind, seconds))

    def capacity(self, used_cpus: float, used_memory_mb: float) -> None:
        self.capacity_samples.append((used_cpus, used_memory_mb))

    def queue_depth(self, pool: str, depth: int) -> None:
        self.depths[pool] = depth

    def vm_state_counts(self, counts: Mapping[str, int]) -> None:
        self.vm_counts.append(dict(counts))

    def infrastructure_failure(self, reason: str) -> None:
        self.failures.append(reason)

    def connection(self, pool: str, decision: str, bytes_up: int, bytes_down: int) -> None:
        self.connections.append((pool, decision, bytes_up, bytes_down))


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


PG_SKIP = (
    "STOKER_TEST_PG_URL is not set: these tests need a PostgreSQL server "
    "(`source scripts/ci-postgres.sh` starts a throw-away one and sets it)"
)


def reset_postgres(url: str) -> None:
    """Drop everything in the test database's public schema."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL database, emptied for this test."""
    url = os.environ.get("STOKER_TEST_PG_URL")
    if not url:
        pytest.skip(PG_SKIP)
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    reset_postgres(url)
    yield url


@pytest.fixture
def sock() -> Iterator[Any]:
    """A listening socket on 127.0.0.1 for a service the test runs in process (its port is
    known before the service starts: FakeGitHub sends its webhooks there)."""
    listener = listen_socket("127.0.0.1", 0)
    yield listener
    listener.close()
