"""The service end to end on the FAKE backend: the agent in threads, commands on this host.

Fast enough to test every path: uploads and bad input, logs (live, bounded,
secrets masked), artifacts, cancel, timeout, retries of infrastructure
failures only, warm pools, leases, restart recovery, graceful shutdown.
Real VMs are in ``test_service_vm.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import pwd
import shutil
import subprocess
import tarfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from stoker.errors import BootError, UsageError
from stoker.service.config import ServiceConfig
from stoker.service.fake_backend import FakeBackend, FakeLaunchedVM, FakeVM
from stoker.service.jobs import (
    Conflict,
    JobRequest,
    JobState,
    NotFound,
    QuotaExceeded,
    TooLarge,
    new_job,
    resolve,
)
from stoker.service.jobviews import JobFilter, JobView
from stoker.service.models import Artifact, Job, LogChunk, VMRecord, utcnow
from stoker.service.service import Service

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]
TarballFactory = Callable[..., Path]


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10) -> None:
    """Wait until ``predicate()`` holds (polling: only for test observation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def state_is(service: Service, job_id: str, state: JobState) -> bool:
    return (await service.get(job_id)).state is state


def sh(script: str, **kw: Any) -> JobRequest:
    return JobRequest(command=("sh", "-c", script), **kw)


async def output(service: Service, job_id: str) -> dict[str, str]:
    streams: dict[str, str] = {"stdout": "", "stderr": "", "system": ""}
    for chunk in await service.logs(job_id):
        streams[chunk.stream] += chunk.text
    return streams


def count_jobs(service: Service) -> int:
    return service.db.call(lambda s: s.scalar(select(func.count()).select_from(Job)) or 0)


# ------------------------------------------------------------------ the happy path


async def test_submit_run_logs_artifacts(
    fake_service: ServiceFactory, make_tarball: TarballFactory, observer: Any
) -> None:
    service = await fake_service(observer=observer)
    upload = make_tarball({"hello.txt": "hello from the upload\n", "sub/run.sh": "echo ran\n"})
    job = await service.submit(
        sh(
            'cat hello.txt; sh sub/run.sh; echo "$GREETING $TOKEN"; echo to-stderr >&2; '
            "mkdir -p out; echo report > out/report.txt; echo $STOKER_JOB_ID > out/id",
            env={"GREETING": "hi"},
            secrets={"TOKEN": "sup3r-s3cret"},
            artifacts=("out/*", "missing-*.xml"),
            labels=("linux",),
        ),
        "alice",
        source=upload,
    )
    assert job.state is JobState.QUEUED and job.source.kind == "upload"
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.SUCCEEDED and done.exit_code == 0 and done.attempt == 0
    assert [e.to_state for e in done.events] == [
        JobState.QUEUED,
        JobState.ASSIGNED,
        JobState.BOOTING,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert all(b.at >= a.at for a, b in itertools.pairwise(done.events))
    assert done.started_at is not None and done.finished_at is not None
    logs = await output(service, job.id)
    assert logs["stdout"] == "hello from the upload\nran\nhi ***\n"
    assert logs["stderr"] == "to-stderr\n"
    assert "cold VM" in logs["system"] and "no files matched: missing-*.xml" in logs["system"]
    assert "sup3r-s3cret" not in done.model_dump_json()
    arts = {a.name: a for a in await service.artifacts(job.id)}
    assert set(arts) == {"out/report.txt", "out/id"}
    path = await service.artifact_path(job.id, "out/id")
    assert path.read_text() == f"{job.id}\n" and arts["out/id"].size == 33
    with pytest.raises(NotFound):
        await service.artifact_path(job.id, "out")
    assert [t for i, _, t in observer.transitions if i == job.id] == [
        e.to_state for e in done.events
    ]
    assert ("cold" in {k for k, _ in observer.boots}) and observer.failures == []
    budget = service.config.host
    assert all(c <= budget.cpu_budget for c, _ in observer.capacity_samples)
    listed = await service.list(JobFilter(label="linux"))
    assert [j.id for j in listed] == [job.id] and listed[0].events == ()
    assert await service.list(JobFilter(label="linu")) == []


async def test_failed_command_is_not_retried(fake_service: ServiceFactory) -> None:
    service = await fake_service()
    job = await service.submit(sh("echo trying; exit 3", pool="small"), "bob")
    done = await service.wait(job.id, timeout=10)
    assert done.state is JobState.FAILED and done.exit_code == 3 and done.attempt == 0
    assert done.reason == "exit status 3"
    missing = await service.submit(JobRequest(command=("/no/such/program",)), "bob")
    done = await service.wait(missing.id, timeout=10)
    assert done.state is JobState.FAILED and done.exit_code == 127 and done.attempt == 0
    assert "cannot start the command" in (done.reason or "")
    killed = await service.submit(sh("kill -TERM $$"), "bob")
    done = await service.wait(killed.id, timeout=10)
    assert done.state is JobState.FAILED and done.signal == 15 and "SIGTERM" in (done.reason or "")


async def test_timeout_keeps_artifacts(fake_service: ServiceFactory) -> None:
    service = await fake_service()
    job = await service.submit(
        sh("echo partial > log.txt; echo started; sleep 30", timeout=1, artifacts=("log.txt",)),
        "bob",
    )
    t0 = time.monotonic()
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.TIMED_OUT and time.monotonic() - t0 < 15
    assert [a.name for a in await service.artifacts(job.id)] == ["log.txt"]
    assert "timed out after 1s" in (await output(service, job.id))["system"]


# ------------------------------------------------------------------ bad input leaves nothing


def _evil(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    data = b"x" if kind == tarfile.REGTYPE else None
    info.size = len(data or b"")
    return info, data


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("escaping-dotdot", UsageError),
        ("escaping-absolute", UsageError),
        ("escaping-symlink", UsageError),
        ("device", UsageError),
        ("not-a-tarball", UsageError),
        ("too-big-upload", TooLarge),
        ("too-big-unpacked", UsageError),
        ("unknown-image", UsageError),
        ("resources-above-max", UsageError),
        ("upload-and-git", UsageError),
        ("bad-submitter", UsageError),
    ],
)
async def test_bad_submissions_leave_no_trace(
    case: str,
    error: type[Exception],
    fake_service: ServiceFactory,
    make_config: ConfigFactory,
    make_tarball: TarballFactory,
    tmp_path: Path,
) -> None:
    limits = {"max_upload_bytes": 4096, "max_source_bytes": 100_000}
    service = await fake_service(make_config(limits=limits))
    request = sh("true")
    submitter = "mallory"
    source: Path | None = make_tarball({"ok.txt": "fine"})
    if case == "escaping-dotdot":
        source = make_tarball(members=[_evil("ok"), _evil("../escape.txt")])
    elif case == "escaping-absolute":
        source = make_tarball(members=[_evil("/tmp/escape.txt")])
    elif case == "escaping-symlink":
        source = make_tarball(members=[_evil("link", tarfile.SYMTYPE, "/etc"), _evil("link/x")])
    elif case == "device":
        source = make_tarball(members=[_evil("dev", tarfile.CHRTYPE)])
    elif case == "not-a-tarball":
        source = tmp_path / "junk.tar.gz"
        source.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    elif case == "too-big-upload":
        source = make_tarball({"big.bin": bytes(range(256)) * 64}, gz=False)
    elif case == "too-big-unpacked":
        source = make_tarball({"zeros.bin": b"\0" * 200_000})
    elif case == "unknown-image":
        request = sh("true", image="windows")
    elif case == "resources-above-max":
        request = sh("true", cpus=4)
    elif case == "upload-and-git":
        request = sh("true", git={"url": "https://example.com/r.git"})
    elif case == "bad-submitter":
        submitter = "has spaces"
    with pytest.raises(error):
        await service.submit(request, submitter, source=source)
    assert count_jobs(service) == 0
    leftovers = [p for p in service.config.jobs_dir.rglob("*")]
    assert leftovers == [] or leftovers == [service.config.jobs_dir / ".incoming"]
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


async def test_queue_quota(fake_service: ServiceFactory, make_config: ConfigFactory) -> None:
    service = await fake_service(
        make_config(limits={"max_queued_per_submitter": 2}, submitters={"max_concurrent": 1})
    )
    first = await service.submit(sh("sleep 30"), "greedy")
    await until(lambda: state_is(service, first.id, JobState.RUNNING))
    await service.submit(sh("true"), "greedy")
    await service.submit(sh("true"), "greedy")
    with pytest.raises(QuotaExceeded):
        await service.submit(sh("true"), "greedy")
    await service.submit(sh("true"), "someone-else")
    await service.cancel(first.id)


# ------------------------------------------------------------------ cancel, lookups


async def test_cancel_queued_and_running(
    fake_service: ServiceFactory, make_config: ConfigFactory
) -> None:
    backend = FakeBackend()
    service = await fake_service(make_config(submitters={"max_concurrent": 1}), backend=backend)
    running = await service.submit(sh("echo started; sleep 60"), "carol")
    waiting = await service.submit(sh("true"), "carol")
    await until(lambda: state_is(service, running.id, JobState.RUNNING))
    cancelled = await service.cancel(waiting.id)
    assert cancelled.state is JobState.CANCELLED
    t0 = time.monotonic()
    view = await service.cancel(running.id)
    assert view.cancel_requested
    done = await service.wait(running.id, timeout=10)
    assert done.state is JobState.CANCELLED and time.monotonic() - t0 < 5
    assert done.reason == "cancelled on request"
    await until(lambda: not backend.live)
    with pytest.raises(Conflict):
        await service.cancel(running.id)
    with pytest.raises(NotFound):
        await service.cancel("0" * 32)
    with pytest.raises(NotFound):
        await service.get("nope")
    with pytest.raises(NotFound):
        await service.logs("nope")


async def test_list_filters_and_pages(fake_service: ServiceFactory) -> None:
    service = await fake_service()
    ids = []
    for i in range(5):
        job = await service.submit(sh("exit 0" if i % 2 else "exit 1"), f"user{i % 2}")
        ids.append(job.id)
    for job_id in ids:
        await service.wait(job_id, timeout=10)
    assert [j.id for j in await service.list()] == list(reversed(ids))
    failed = await service.list(JobFilter(state=JobState.FAILED))
    assert {j.id for j in failed} == {ids[0], ids[2], ids[4]}
    assert {j.submitter for j in await service.list(JobFilter(submitter="user1"))} == {"user1"}
    page = await service.list(JobFilter(limit=2))
    rest = await service.list(JobFilter(before=page[-1].id))
    assert [j.id for j in page + rest] == list(reversed(ids))


# ------------------------------------------------------------------ logs


async def test_follow_logs_live(fake_service: ServiceFactory, tmp_path: Path) -> None:
    service = await fake_service()
    # The command waits after line1 until the follower has seen it: lines arrive
    # while the command runs (causally, not by timing: the fake runs on this host).
    go = tmp_path / "go"
    command = f"echo line1; while [ ! -e {go} ]; do sleep 0.05; done; echo line2; echo line3"
    job = await service.submit(sh(command), "dave")
    seen: list[str] = []
    async for chunk in service.follow_logs(job.id):
        seen.append(chunk.text)
        if "line1" in chunk.text:
            go.touch()
    view = await service.get(job.id)
    assert view.state is JobState.SUCCEEDED
    assert "line1\nline2\nline3\n" in "".join(seen)
    # After the fact, from a sequence number on.
    later = [c.text async for c in service.follow_logs(job.id, after_seq=seen and 1)]
    assert "".join(later) == "".join(seen[1:])


async def test_log_limit(fake_service: ServiceFactory, make_config: ConfigFactory) -> None:
    service = await fake_service(make_config(limits={"max_log_bytes": 1000}))
    job = await service.submit(sh("head -c 20000 /dev/zero | tr '\\0' a; echo done"), "erin")
    done = await service.wait(job.id, timeout=10)
    assert done.state is JobState.SUCCEEDED and done.log_truncated and done.log_bytes == 1000
    logs = await output(service, job.id)
    assert logs["stdout"] == "a" * 1000 and "output limit of 1000 bytes" in logs["system"]
    stored = service.db.call(
        lambda s: s.scalar(
            select(func.sum(func.length(LogChunk.data))).where(LogChunk.stream != "system")
        )
    )
    assert stored == 1000


# ------------------------------------------------------------------ retries


async def test_boot_failures_are_retried_until_the_limit(
    fake_service: ServiceFactory, make_config: ConfigFactory, observer: Any
) -> None:
    launches = 0

    def flaky(spec: object) -> None:
        nonlocal launches
        launches += 1
        if launches <= 2:
            raise BootError("the guest agent did not come up (simulated)")

    service = await fake_service(
        make_config(retry_limit=2), backend=FakeBackend(on_launch=flaky), observer=observer
    )
    job = await service.submit(sh("echo attempt=$STOKER_JOB_ATTEMPT"), "fred")
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.SUCCEEDED and done.attempt == 2
    assert (await output(service, job.id))["stdout"] == "attempt=2\n"
    states = [e.to_state for e in done.events]
    assert states.count(JobState.QUEUED) == 3 and states.count(JobState.BOOTING) == 3
    assert observer.failures == ["boot", "boot"]


async def test_infrastructure_failure_ends_errored(
    fake_service: ServiceFactory, make_config: ConfigFactory
) -> None:
    def broken(spec: object) -> None:
        raise BootError("no VM today (simulated)")

    service = await fake_service(make_config(retry_limit=1), backend=FakeBackend(on_launch=broken))
    job = await service.submit(sh("true"), "fred")
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.ERRORED and done.attempt == 1
    assert "no VM today" in (done.reason or "") and "gave up after 2 attempts" in (
        done.reason or ""
    )


async def test_a_vmm_crash_is_retried_and_spares_the_other_jobs(
    fake_service: ServiceFactory,
) -> None:
    backend = FakeBackend()
    service = await fake_service(backend=backend)
    victim = await service.submit(
        sh('echo "attempt $STOKER_JOB_ATTEMPT"; [ "$STOKER_JOB_ATTEMPT" = 1 ] || sleep 60'), "gina"
    )
    bystander = await service.submit(sh("sleep 1; echo fine"), "hank")
    await until(lambda: state_is(service, victim.id, JobState.RUNNING))
    view = await service.get(victim.id)
    vmm = backend.live[view.vm_name or ""]
    assert isinstance(vmm, FakeLaunchedVM)
    await vmm.crash()
    done = await service.wait(victim.id, timeout=20)
    assert done.state is JobState.SUCCEEDED and done.attempt == 1 and done.cause == "exit"
    assert "VMM exited unexpectedly" in (await output(service, victim.id))["system"]
    other = await service.wait(bystander.id, timeout=20)
    assert other.state is JobState.SUCCEEDED and other.attempt == 0


async def test_a_vmm_crash_on_the_last_attempt_is_recorded_as_its_cause(
    fake_service: ServiceFactory,
) -> None:
    backend = FakeBackend()
    service = await fake_service(backend=backend)
    job = await service.submit(sh("echo started; sleep 60", retries=0), "gina")
    await until(lambda: state_is(service, job.id, JobState.RUNNING))
    vmm = backend.live[(await service.get(job.id)).vm_name or ""]
    assert isinstance(vmm, FakeLaunchedVM)
    await vmm.crash()
    done = await service.wait(job.id, timeout=20)
    assert (done.state, done.cause, done.attempt) == (JobState.ERRORED, "vmm_crash", 0)


# ------------------------------------------------------------------ warm pools


async def test_warm_pool_serves_one_job_per_vm(
    fake_service: ServiceFactory, make_config: ConfigFactory, observer: Any
) -> None:
    backend = FakeBackend()
    config = make_config(pools={"warm": {"cpus": 1, "memory": 256, "min_idle": 2, "max": 3}})
    service = await fake_service(config, backend=backend, observer=observer)
    sup = service.supervisor
    assert sup is not None
    await until(lambda: len(sup.pools["warm"].idle) == 2)
    idle_before = {vm.name for vm in sup.pools["warm"].idle}
    job = await service.submit(sh("hostname; echo $STOKER_JOB_ID"), "ivy")
    done = await service.wait(job.id, timeout=10)
    assert done.state is JobState.SUCCEEDED and done.vm_kind == "warm"
    assert done.vm_name in idle_before
    # Used once, then destroyed; the pool is topped up again.
    await until(lambda: len(sup.pools["warm"].idle) == 2 and done.vm_name not in backend.live)
    assert {k for k, _ in observer.boots} == {"warm"}
    records = service.db.call(lambda s: s.scalars(select(VMRecord)).all())
    assert len(records) == 2 and {r.state for r in records} == {"idle"}
    assert done.vm_name not in {r.name for r in records}
    # max = 3 counts idle and busy VMs: four long jobs run three at a time.
    jobs = [await service.submit(sh("sleep 1"), f"u{i}") for i in range(4)]
    peak = 0
    while not all([(await service.get(j.id)).state.terminal for j in jobs]):
        pool = sup.pools["warm"]
        assert pool.total <= 3
        peak = max(peak, pool.busy)
        await asyncio.sleep(0.02)
    assert peak == 3 and backend.peak_vms <= 3


async def test_idle_vms_are_evicted_for_other_pools(
    fake_service: ServiceFactory, make_config: ConfigFactory
) -> None:
    backend = FakeBackend()
    config = make_config(
        host={"cpus": 2, "memory_mb": 4096},
        pools={
            "a": {"cpus": 1, "memory": 256, "min_idle": 2, "max": 2},
            "b": {"cpus": 2, "memory": 256, "max": 1},
        },
    )
    service = await fake_service(config, backend=backend)
    sup = service.supervisor
    assert sup is not None
    await until(lambda: len(sup.pools["a"].idle) == 2)
    job = await service.submit(sh("echo big", pool="b"), "jack")
    done = await service.wait(job.id, timeout=10)
    assert done.state is JobState.SUCCEEDED and done.vm_kind == "cold"
    assert backend.peak_cpus <= 2
    await until(lambda: len(sup.pools["a"].idle) == 2)


# ------------------------------------------------------------------ leases, hosts, restarts


def _insert_claimed(
    service: Service, *, host: str, state: JobState, attempt: int = 0, **extra: Any
) -> str:
    request = sh('echo "recovered attempt $STOKER_JOB_ATTEMPT"')
    resolved = resolve(request, service.config, "kate")
    job, event = new_job(
        request,
        resolved,
        submitter="kate",
        job_id=f"x{time.monotonic_ns():031d}"[-32:],
        source_kind="none",
        source_ref=None,
    )
    job.state = state.value
    job.host = host
    job.attempt = attempt
    job.lease_until = utcnow() - timedelta(seconds=5)
    for key, value in extra.items():
        setattr(job, key, value)
    service.db.call(lambda s: s.add_all([job, event]))
    return job.id


async def test_jobs_of_a_silent_host_are_recovered(fake_service: ServiceFactory) -> None:
    service = await fake_service()
    retried = _insert_claimed(service, host="dead-host", state=JobState.RUNNING)
    exhausted = _insert_claimed(service, host="dead-host", state=JobState.BOOTING, attempt=3)
    cancelling = _insert_claimed(
        service, host="dead-host", state=JobState.ASSIGNED, cancel_requested=True
    )
    done = await service.wait(retried, timeout=10)
    assert done.state is JobState.SUCCEEDED and done.attempt == 1
    assert any("dead-host stopped heartbeating" in (e.reason or "") for e in done.events)
    assert (await output(service, retried))["stdout"] == "recovered attempt 1\n"
    gave_up = await service.wait(exhausted, timeout=10)
    assert gave_up.state is JobState.ERRORED and "gave up after 4 attempts" in (
        gave_up.reason or ""
    )
    assert (await service.wait(cancelling, timeout=10)).state is JobState.CANCELLED


async def test_restart_recovers_the_previous_life(
    fake_service: ServiceFactory, make_config: ConfigFactory
) -> None:
    config = make_config()
    first = Service(config)
    await first.open()
    orphan = _insert_claimed(first, host=config.host.name, state=JobState.RUNNING)
    first.db.call(
        lambda s: s.add(
            VMRecord(
                name="stoker-dead",
                host=config.host.name,
                pool="small",
                state="busy",
                created_at=utcnow(),
            )
        )
    )
    await first.stop()
    service = await fake_service(config)
    done = await service.wait(orphan, timeout=10)
    assert done.state is JobState.SUCCEEDED and done.attempt == 1
    assert "restarted" in (done.events[-5].reason or "")
    assert "stoker-dead" not in {v.name for v in await service.vms()}
    (host,) = await service.hosts()
    assert host.name == config.host.name and host.alive and host.status == "running"


async def test_one_service_per_state_dir(
    fake_service: ServiceFactory, make_config: ConfigFactory
) -> None:
    config = make_config()
    await fake_service(config)
    with pytest.raises(UsageError, match="another stoker serve"):
        await Service(config, backend=FakeBackend()).start()


async def test_losing_the_lease_stops_the_job_silently(fake_service: ServiceFactory) -> None:
    backend = FakeBackend()
    service = await fake_service(backend=backend)
    job = await service.submit(sh("sleep 60"), "liam")
    await until(lambda: state_is(service, job.id, JobState.RUNNING))
    # Another host decided this one was dead and took the job over.
    service.db.call(lambda s: s.execute(update(Job).where(Job.id == job.id).values(host="other")))
    await until(lambda: not backend.live and job.id not in (service.supervisor or {}).jobs)  # type: ignore[union-attr]
    view = await service.get(job.id)
    assert view.state is JobState.RUNNING and view.host == "other"


async def test_cancel_from_another_host_is_noticed(fake_service: ServiceFactory) -> None:
    service = await fake_service()
    job = await service.submit(sh("sleep 60"), "mia")
    await until(lambda: state_is(service, job.id, JobState.RUNNING))
    service.db.call(
        lambda s: s.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    )
    done = await service.wait(job.id, timeout=10)
    assert done.state is JobState.CANCELLED


async def test_graceful_shutdown(make_config: ConfigFactory) -> None:
    backend = FakeBackend()
    service = Service(make_config(), backend=backend)
    await service.start()
    quick = await service.submit(sh("sleep 0.5; echo done"), "nina")
    slow = await service.submit(sh("sleep 60"), "nina")
    await until(lambda: state_is(service, slow.id, JobState.RUNNING))
    await until(lambda: state_is(service, quick.id, JobState.RUNNING))
    t0 = time.monotonic()
    await service.stop(grace=2)
    assert time.monotonic() - t0 < 10 and not backend.live
    client = Service(make_config())
    await client.open()
    assert (await client.get(quick.id)).state is JobState.SUCCEEDED
    ended = await client.get(slow.id)
    assert ended.state is JobState.ERRORED and "shut down" in (ended.reason or "")
    (host,) = await client.hosts()
    assert host.status == "stopped" and not host.alive
    await client.stop()


# ------------------------------------------------------------------ git sources


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(path), *args], check=True, env=env, capture_output=True)

    git("init", "-q", "-b", "main")
    (path / "Makefile").write_text("test:\n\techo tested\n")
    (path / "VERSION").write_text("1.2.3\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    git("tag", "v1")
    return path


async def test_git_source(
    fake_service: ServiceFactory, make_config: ConfigFactory, repo: Path
) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    service = await fake_service(make_config(git={"allow_protocols": ["file"]}))
    good = await service.submit(
        sh("cat VERSION", git={"url": f"file://{repo}", "ref": "v1"}), "olga"
    )
    done = await service.wait(good.id, timeout=20)
    assert done.state is JobState.SUCCEEDED and done.source.kind == "git"
    assert (await output(service, good.id))["stdout"] == "1.2.3\n"
    bad = await service.submit(sh("true", git={"url": f"file://{repo}", "ref": "nope"}), "olga")
    failed = await service.wait(bad.id, timeout=20)
    assert failed.state is JobState.FAILED and failed.attempt == 0
    assert "git fetch" in (failed.reason or "")


async def test_fake_vm_paths_stay_in_their_root(tmp_path: Path) -> None:
    from stoker.paths import Dirs

    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    async with FakeVM(backend=FakeBackend(), dirs=dirs, cpus=1, memory=256) as vm:
        (tmp_path / "tree").mkdir()
        await vm.put(tmp_path / "tree", "/../../etc/x")
        result = await vm.exec(["pwd"], cwd="/../../etc/x")
        assert vm.workdir is not None
        assert result.stdout.decode().strip() == str(vm.workdir / "root" / "etc" / "x")


def test_artifact_rows_match_files(tmp_path: Path) -> None:
    # The model keeps artifacts by (job, name): one row per file, replaced per attempt.
    assert [c.name for c in Artifact.__table__.primary_key.columns] == ["job_id", "name"]
    assert JobView.model_fields["events"].default == ()


async def test_the_same_on_postgres(
    fake_service: ServiceFactory,
    make_config: ConfigFactory,
    make_tarball: TarballFactory,
    pg_url: str,
) -> None:
    """The facade's queries (filters, pages, logs, artifacts, cancel) on PostgreSQL."""
    service = await fake_service(make_config(database_url=pg_url))
    upload = make_tarball({"in.txt": "from postgres\n"})
    job = await service.submit(
        sh("cat in.txt; cp in.txt out.txt", artifacts=("out.txt",), labels=("linux",)),
        "pat",
        source=upload,
    )
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.SUCCEEDED and len(done.events) == 5
    assert (await output(service, job.id))["stdout"] == "from postgres\n"
    assert [a.name for a in await service.artifacts(job.id)] == ["out.txt"]
    assert [j.id for j in await service.list(JobFilter(label="linux"))] == [job.id]
    assert await service.list(JobFilter(label="linu")) == []
    slow = await service.submit(sh("sleep 60"), "pat")
    await until(lambda: state_is(service, slow.id, JobState.RUNNING))
    await service.cancel(slow.id)
    assert (await service.wait(slow.id, timeout=10)).state is JobState.CANCELLED
    page = await service.list(JobFilter(limit=1))
    assert [j.id for j in page] == [slow.id]
    assert [j.id for j in await service.list(JobFilter(before=slow.id))] == [job.id]
    assert {p.name: p.queued for p in await service.pools()} == {"small": 0}


# ------------------------------------------------------------------ user, workdir, retries


async def test_a_job_runs_as_the_account_it_names_in_its_workdir(
    fake_service: ServiceFactory,
) -> None:
    service = await fake_service()
    # The fake backend's "guest" is this host under a private root directory (0700
    # parents): only root can enter it, so root is the account named here; the real-VM
    # GitHub tests run the runner as the image's `runner` user.
    job = await service.submit(
        sh('id -un; echo "$HOME $USER"; pwd', user="root", workdir="/work"), "alice"
    )
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.SUCCEEDED, done.reason
    assert (done.user, done.workdir) == ("root", "/work")
    home = pwd.getpwnam("root").pw_dir
    out = (await output(service, job.id))["stdout"].splitlines()
    assert out[:2] == ["root", f"{home} root"]
    assert out[2].endswith("/work") and not out[2].endswith("/work/src")


async def test_an_account_the_image_lacks_fails_the_job_without_retries(
    fake_service: ServiceFactory,
) -> None:
    service = await fake_service()
    job = await service.submit(sh("true", user="no-such-user-here"), "alice")
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.FAILED and done.attempt == 0
    assert "no user 'no-such-user-here'" in (done.reason or "")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"workdir": "relative/dir"}, "absolute guest path"),
        ({"workdir": "/a/../b"}, "absolute guest path"),
        ({"user": "bad user"}, "expected a name"),
        ({"retries": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_user_workdir_and_retries_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JobRequest.model_validate({"command": ["true"], **spec})
