"""The service with real microVMs under TCG: few tests, each doing a lot.

* one in-process service with a warm pool: an uploaded job end to end
  (logs, artifacts, secrets), cancel, timeout;
* ``python -m stoker.service`` killed with SIGKILL mid-job: its VM runs on, and
  the restarted daemon takes it over; the job finishes in its first attempt
  with its whole output, nothing twice;
* two daemons on one PostgreSQL: the one running a job is killed, its VM ends
  itself, and the other recovers the job once the lease expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from chaos_harness import Daemon

from stoker.service.config import ServiceConfig, load_config
from stoker.service.jobs import JobRequest, JobState
from stoker.service.jobviews import JobView
from stoker.service.service import Service

pytestmark = [pytest.mark.vm]
TarballFactory = Callable[..., Path]

#: The command of the recovery tests: slow on the first attempt only.
SLOW_FIRST = (
    'echo "attempt=$STOKER_JOB_ATTEMPT"; '
    'if [ "$STOKER_JOB_ATTEMPT" = 0 ]; then sleep 60; fi; '
    "grep -c stoker.root= /proc/cmdline; echo finished"
)


def qemu_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"qemu-system" in cmd:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def stdout_of(service: Service, job_id: str) -> str:
    return "".join(c.text for c in await service.logs(job_id) if c.stream == "stdout")


# ------------------------------------------------------------------ one service, warm pool


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def warm_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    state = tmp_path_factory.mktemp("warm-service")
    config = ServiceConfig.model_validate(
        {
            "state_dir": str(state),
            "host": {"name": "vm-test", "cpus": 2, "memory_mb": 2048, "accel": "tcg"},
            "heartbeat_seconds": 1,
            "lease_seconds": 10,
            "poll_seconds": 0.5,
            "pools": {
                "warm": {
                    "cpus": 1,
                    "memory": 512,
                    "disk": 1024,
                    "min_idle": 1,
                    "max": 2,
                    "snapshot": "never",
                    # The job's own limit inside the guest (a hog meets it quickly).
                    "job_memory_limit": "150M",
                }
            },
        }
    )
    service = Service(config)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=10)


async def idle_vm(service: Service) -> Any:
    sup = service.supervisor
    assert sup is not None
    return await until(
        lambda: sup.pools["warm"].idle and sup.pools["warm"].idle[0], 120, "a warm VM"
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_uploaded_job_on_a_warm_vm(
    warm_service: Service, make_tarball: TarballFactory
) -> None:
    service = warm_service
    warm = await idle_vm(service)
    qemu = warm.vmm_pid
    upload = make_tarball({"hello.txt": "hello from the host\n", "run.sh": "echo script ran\n"})
    t0 = time.monotonic()
    job = await service.submit(
        JobRequest(
            command=(
                "sh",
                "-c",
                "cat hello.txt; sh run.sh; grep -c stoker.root /proc/cmdline; "
                'echo "token=$TOKEN" >&2; mkdir -p out; head -c 100000 /dev/urandom > out/blob; '
                "sha256sum out/blob",
            ),
            secrets={"TOKEN": "very-secret-token"},
            artifacts=("out/*",),
        ),
        "vm-tester",
        source=upload,
    )
    done = await service.wait(job.id, timeout=120)
    took = time.monotonic() - t0
    assert done.state is JobState.SUCCEEDED, done.reason
    assert done.vm_kind == "warm" and done.vm_name == warm.name
    # A warm VM was booted already: the job did not wait for a boot.
    assert took < 30, took
    logs = await service.logs(job.id)
    out = "".join(c.text for c in logs if c.stream == "stdout")
    err = "".join(c.text for c in logs if c.stream == "stderr")
    assert out.startswith("hello from the host\nscript ran\n1\n")
    assert err == "token=***\n"
    (artifact,) = await service.artifacts(job.id)
    blob = (await service.artifact_path(job.id, "out/blob")).read_bytes()
    assert artifact.name == "out/blob" and artifact.sha256 == hashlib.sha256(blob).hexdigest()
    assert out.split()[-2] == artifact.sha256
    # The VM served one job and is gone; the pool boots a replacement.
    await until(lambda: not alive(qemu), 30, "the used VM to be destroyed")
    replacement = await idle_vm(service)
    assert replacement.name != warm.name


@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_a_running_job(warm_service: Service) -> None:
    service = warm_service
    await idle_vm(service)
    job = await service.submit(JobRequest(command=("sh", "-c", "echo started; sleep 600")), "vm")
    await until(lambda: stdout_of(service, job.id), 60, "the command to start")
    view = await service.get(job.id)
    sup = service.supervisor
    assert sup is not None and view.state is JobState.RUNNING
    qemu = sup.jobs[job.id].vm.vmm_pid  # type: ignore[union-attr]
    t0 = time.monotonic()
    await service.cancel(job.id)
    done = await service.wait(job.id, timeout=60)
    assert done.state is JobState.CANCELLED and time.monotonic() - t0 < 20
    await until(lambda: qemu is None or not alive(qemu), 30, "the VM to be destroyed")


@pytest.mark.asyncio(loop_scope="module")
async def test_timeout(warm_service: Service) -> None:
    service = warm_service
    await idle_vm(service)
    job = await service.submit(
        JobRequest(command=("sh", "-c", "echo going; sleep 600"), timeout=3), "vm"
    )
    done = await service.wait(job.id, timeout=120)
    assert done.state is JobState.TIMED_OUT and done.cause == "timeout"
    assert done.reason == "the command timed out after 3s and was killed"
    assert await stdout_of(service, job.id) == "going\n"


@pytest.mark.asyncio(loop_scope="module")
async def test_hostile_jobs_fail_with_their_cause_and_are_not_retried(
    warm_service: Service,
) -> None:
    service = warm_service
    await idle_vm(service)
    hog = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
    oom = await service.submit(JobRequest(command=("python3", "-c", hog)), "vm")
    panic = await service.submit(
        JobRequest(command=("sh", "-c", "echo c > /proc/sysrq-trigger")), "vm"
    )
    done = await service.wait(oom.id, timeout=180)
    reason = "the command was killed by the guest's out-of-memory killer (memory limit 150 MiB)"
    assert (done.state, done.cause, done.reason) == (JobState.FAILED, "oom", reason)
    assert done.signal == 9 and done.attempt == 0
    system = "".join(c.text for c in await service.logs(oom.id) if c.stream == "system")
    assert reason in system
    done = await service.wait(panic.id, timeout=180)
    assert (done.state, done.cause) == (JobState.FAILED, "kernel_panic"), done.reason
    assert done.attempt == 0  # the job's own doing: another VM would panic too
    assert (done.reason or "").startswith("the guest kernel panicked while the command ran: ")


async def test_a_pool_makes_its_snapshot_and_restores_from_then_on(tmp_path: Path) -> None:
    # The default (auto): the first VM boots, the snapshot is made beside it, and the
    # pool's later VMs restore.  A shape no other test uses; the snapshot goes at the end.
    from stoker.paths import Dirs
    from stoker.snapshots import SnapshotStore

    config = ServiceConfig.model_validate(
        {
            "state_dir": str(tmp_path / "state"),
            "host": {"name": "snap-test", "cpus": 2, "memory_mb": 2048, "accel": "tcg"},
            "poll_seconds": 0.5,
            "pools": {"snap": {"cpus": 1, "memory": 576, "disk": 1088, "min_idle": 1, "max": 2}},
        }
    )
    assert config.pools["snap"].snapshot == "auto"
    store = SnapshotStore(Dirs.from_env())

    def ours() -> list[Any]:
        return [s for s in store.list() if s.key.memory_mb == 576 and s.key.disk_mb == 1088]

    service = Service(config)
    await service.start()
    try:
        sup = service.supervisor
        assert sup is not None
        pool = sup.pools["snap"]
        first = await until(lambda: pool.idle and pool.idle[0], 180, "a VM")
        assert first.restored_from is None
        (snap,) = await until(ours, 300, "the pool's snapshot")
        job = await service.submit(JobRequest(command=("true",), pool="snap"), "vm")
        done = await service.wait(job.id, timeout=120)
        assert done.state is JobState.SUCCEEDED and done.vm_name == first.name
        later = await until(lambda: [v for v in pool.idle if v.name != first.name], 180, "a new VM")
        assert later[0].restored_from is not None and later[0].restored_from.path == snap.path
    finally:
        await service.stop(grace=10)
        for old in ours():
            store.remove(old.path.name)


# ------------------------------------------------------------------ daemons, killed


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(name: str, **settings: Any) -> Daemon:
        lines = [f"{key} = {value!r}".replace("'", '"') for key, value in settings.items()]
        text = "\n".join(lines) + (
            f'\n[host]\nname = "{name}"\ncpus = 2\nmemory_mb = 2048\naccel = "tcg"\n'
            "[pools.default]\ncpus = 1\nmemory = 512\ndisk = 1024\nmax = 1\n"
            'snapshot = "never"\n'
        )
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        daemon = Daemon(config, tmp_path / f"{name}.log")
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.proc is not None:
            daemon.stop()


def _check_events(events: Any, expected: list[JobState]) -> None:
    assert [e.to_state for e in events] == expected
    assert all(e.at is not None for e in events)
    assert all(b.at >= a.at for a, b in itertools.pairwise(events))


#: The command of the take-over test: a line every half second, then ``finished``.
TICKING = (
    'echo "attempt=$STOKER_JOB_ATTEMPT"; i=0; '
    'while [ $i -lt 20 ]; do echo "tick $i"; i=$((i+1)); sleep 0.5; done; echo finished'
)
#: Its whole output, each line once.
TICKED = "attempt=0\n" + "".join(f"tick {i}\n" for i in range(20)) + "finished\n"


async def _ticking(daemon: Daemon, client: Service) -> tuple[JobView, list[int]]:
    """Start ``daemon`` with a TICKING job; once it ticks, the job and its one QEMU."""
    daemon.start()
    job = await client.submit(JobRequest(command=("sh", "-c", TICKING)), "tester")
    await until(lambda: _has_output(client, job.id, "tick 3"), 180, "the command to run")
    vmms = qemu_children(daemon.pid)
    assert len(vmms) == 1, vmms
    return job, vmms


async def test_kill_9_and_restart(
    daemons: Callable[..., Daemon], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    daemon = daemons(
        "solo",
        state_dir=str(tmp_path / "solo-state"),
        heartbeat_seconds=1,
        # Long enough for the restart: the VM waits this long (less a beat) for a host.
        lease_seconds=30,
        poll_seconds=0.5,
    )
    config = load_config(daemon.config)
    client = Service(config)
    await client.open()
    try:
        job, vmms = await _ticking(daemon, client)
        daemon.kill9()
        # The VM outlives the daemon (detached): its command waits for a reader.
        assert alive(vmms[0])
        stuck = await client.get(job.id)
        assert stuck.state is JobState.RUNNING and stuck.host == "solo"
        daemon.start()
        done = await client.wait(job.id, timeout=180)
        assert done.state is JobState.SUCCEEDED, (done.reason, daemon.tail())
        # Taken over, not run again: one attempt, one VM, every line once.
        assert done.attempt == 0 and done.vm_kind == "cold"
        run = [JobState.ASSIGNED, JobState.BOOTING, JobState.RUNNING]
        _check_events(done.events, [JobState.QUEUED, *run, JobState.SUCCEEDED])
        assert await stdout_of(client, job.id) == TICKED
        logs = "".join(c.text for c in await client.logs(job.id) if c.stream == "system")
        assert "took over VM" in logs
        assert daemon.stop() == 0, daemon.tail()
        assert not any(alive(p) for p in vmms)
        (host,) = await client.hosts()
        assert host.status == "stopped"
    except BaseException:
        print(daemon.tail())
        raise
    finally:
        await client.stop()


async def test_a_restart_hands_running_jobs_over(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    """``on_stop = "hand-over"``: SIGTERM leaves the command running; the next process
    takes it over (``systemctl restart`` without draining or killing anything)."""
    daemon = daemons(
        "handover",
        state_dir=str(tmp_path / "handover-state"),
        heartbeat_seconds=1,
        lease_seconds=30,
        poll_seconds=0.5,
        on_stop="hand-over",
    )
    client = Service(load_config(daemon.config))
    await client.open()
    try:
        job, vmms = await _ticking(daemon, client)
        assert daemon.stop() == 0, daemon.tail()
        assert alive(vmms[0])  # handed over, not stopped
        assert "left running" in daemon.tail()
        daemon.start()
        done = await client.wait(job.id, timeout=180)
        assert done.state is JobState.SUCCEEDED and done.attempt == 0, done.reason
        assert await stdout_of(client, job.id) == TICKED
        assert daemon.stop() == 0, daemon.tail()
        assert not any(alive(p) for p in vmms)
    except BaseException:
        print(daemon.tail())
        raise
    finally:
        await client.stop()


async def _has_output(client: Service, job_id: str, text: str) -> bool:
    return text in await stdout_of(client, job_id)


async def test_two_hosts_on_postgres(
    daemons: Callable[..., Daemon], tmp_path: Path, pg_url: str
) -> None:
    common = {
        "database_url": pg_url,
        "storage_dir": str(tmp_path / "shared-storage"),
        "heartbeat_seconds": 1,
        "lease_seconds": 5,
        "poll_seconds": 0.5,
    }
    one = daemons("host-one", state_dir=str(tmp_path / "one"), **common)
    two = daemons("host-two", state_dir=str(tmp_path / "two"), **common)
    client = Service(load_config(one.config))
    await client.open()
    try:
        one.start()
        two.start()
        await until(
            lambda: _alive_hosts(client, {"host-one", "host-two"}), 60, "both hosts to heartbeat"
        )
        job = await client.submit(JobRequest(command=("sh", "-c", SLOW_FIRST)), "tester")
        await until(lambda: _has_output(client, job.id, "attempt=0"), 120, "attempt 0 to run")
        first = (await client.get(job.id)).host
        victim, survivor = (one, two) if first == "host-one" else (two, one)
        vmms = qemu_children(victim.pid)
        victim.kill9()
        # With no host to talk to, the VM ends itself before the lease lets another
        # host run the job again: the job never runs twice at once.
        await until(lambda: not any(alive(p) for p in vmms), 10, "the orphaned VM to end")
        done = await client.wait(job.id, timeout=180)
        assert done.state is JobState.SUCCEEDED, (done.reason, survivor.tail())
        assert done.attempt == 1 and done.host != first
        recovered = done.events[4]
        assert recovered.to_state is JobState.QUEUED
        assert f"host {first} stopped heartbeating" in (recovered.reason or "")
        assert await stdout_of(client, job.id) == "attempt=0\nattempt=1\n1\nfinished\n"
        hosts = {h.name: h for h in await client.hosts()}
        assert not hosts[first or ""].alive and hosts[done.host or ""].alive
        assert survivor.stop() == 0, survivor.tail()
    except BaseException:
        print(one.tail(), two.tail(), sep="\n----\n")
        raise
    finally:
        await client.stop()


async def _alive_hosts(client: Service, names: set[str]) -> bool:
    return {h.name for h in await client.hosts() if h.alive} >= names
