"""Chaos for ``stoker serve``: hosts on one database, killed with SIGKILL at random moments.

Used by ``tests/service/test_chaos.py`` (the fake VM backend, in CI) and
``bench/chaos.py`` (real microVMs, 100 jobs, the README's reliability table).

:func:`run_chaos` starts ``hosts`` daemons (``python -m stoker.service``, one
process each) on one PostgreSQL database, submits ``jobs`` jobs, and while
they run kills a random daemon with SIGKILL at random moments, restarting it
after a random pause (sometimes longer than the lease, so that both recovery
paths run: the host's own restart and another host's sweep).  Then it checks
what a user relies on and returns a :class:`ChaosReport`:

* every job ended exactly once, with the outcome its command deserves
  (``succeeded``): one terminal transition, never a second one;
* no attempt of a job ran twice (each attempt prints its number first; a
  number printed twice would be two hosts running the same attempt);
* no VMM process and no VM work directory is left once the daemons stopped.

Each job's command prints ``attempt=N`` first and ``done`` last, so its log
shows which attempts ran and whether the last one completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stoker.service.config import load_config
from stoker.service.jobs import TERMINAL, JobRequest, JobState
from stoker.service.jobviews import JobView
from stoker.service.service import Service

#: ``attempt=N`` at the start of every attempt's output.
_ATTEMPT = re.compile(r"^attempt=(\d+)$", re.MULTILINE)


class Daemon:
    """``python -m stoker.service --config CONFIG`` in a subprocess; the caller reaps it."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stoker.service", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM (graceful) and reap; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class ChaosPlan:
    """What to run and how hard to hit it."""

    jobs: int = 100
    kills: int = 10
    hosts: int = 2
    #: ``"fake"`` (the agent on this host, no VM: the scheduler's logic only) or ``"qemu"``.
    backend: str = "fake"
    #: Each job sleeps a random time in this range (seconds) between its two lines.
    job_seconds: tuple[float, float] = (0.2, 2.0)
    #: Pause before each kill, and before the killed daemon starts again (seconds).
    kill_gap: tuple[float, float] = (1.0, 4.0)
    restart_gap: tuple[float, float] = (0.0, 8.0)
    #: VMs per host at once, and the pool's shape.
    max_vms: int = 4
    cpus: int = 1
    memory_mb: int = 256
    lease_seconds: float = 4.0
    seed: int = 1
    #: How long the jobs may take in all once the kills are over.
    settle_timeout: float = 600.0


@dataclass
class ChaosReport:
    """What happened, and what was wrong (``problems`` empty: nothing)."""

    plan: ChaosPlan
    kills: list[tuple[float, str]] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    reruns: int = 0
    #: Jobs a restarted daemon took over (their VM survived the kill).
    taken_over: int = 0
    duplicate_attempts: int = 0
    lost: int = 0
    leftover_vmms: list[int] = field(default_factory=list)
    leftover_dirs: list[str] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The report as the README's reliability table rows."""
        lat = sorted(self.latency_s) or [0.0]
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rows = [
            ("backend", self.plan.backend),
            ("hosts on one PostgreSQL", str(self.plan.hosts)),
            ("jobs", str(self.plan.jobs)),
            ("SIGKILLs of a daemon", str(len(self.kills))),
            ("jobs by final state", ", ".join(f"{k} {v}" for k, v in sorted(self.states.items()))),
            ("attempts run (reruns after a kill)", f"{self.attempts} ({self.reruns})"),
            ("jobs taken over by a restarted daemon", str(self.taken_over)),
            ("attempts that ran twice", str(self.duplicate_attempts)),
            ("jobs lost (never ended)", str(self.lost)),
            (
                "VMMs / VM work directories left",
                f"{len(self.leftover_vmms)} / {len(self.leftover_dirs)}",
            ),
            ("submit -> end, median / p99", f"{statistics.median(lat):.1f} s / {p99:.1f} s"),
            ("wall time", f"{self.wall_s:.0f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_config(
    path: Path, *, name: str, state_dir: Path, plan: ChaosPlan, database_url: str, storage: Path
) -> None:
    """One host's ``stoker serve`` configuration for :func:`run_chaos`."""
    accel = '\naccel = "tcg"' if plan.backend == "qemu" else ""
    disk = "\ndisk = 1024" if plan.backend == "qemu" else ""
    path.write_text(
        f'state_dir = "{state_dir}"\n'
        f'database_url = "{database_url}"\n'
        f'storage_dir = "{storage}"\n'
        # VM work directories below the state directory, where the leak check looks.
        f'runtime_dir = "{state_dir / "run"}"\n'
        f'backend = "{plan.backend}"\n'
        "heartbeat_seconds = 1\n"
        f"lease_seconds = {plan.lease_seconds}\n"
        "poll_seconds = 0.3\n"
        # Every kill can cost a job an attempt: never let chaos end one as errored.
        "retry_limit = 50\n"
        "shutdown_grace_seconds = 60\n"
        f'[host]\nname = "{name}"\n'
        f"cpus = {plan.max_vms * plan.cpus}\n"
        f"memory_mb = {plan.max_vms * plan.memory_mb + 256}{accel}\n"
        f"[pools.default]\ncpus = {plan.cpus}\nmemory = {plan.memory_mb}{disk}\n"
        f'max = {plan.max_vms}\nsnapshot = "never"\n'
    )


def _command(rng: random.Random, plan: ChaosPlan) -> tuple[str, ...]:
    low, high = plan.job_seconds
    pause = round(rng.uniform(low, high), 2)
    return ("sh", "-c", f'echo "attempt=$STOKER_JOB_ATTEMPT"; sleep {pause}; echo done')


def processes_below(roots: Iterable[Path], needle: bytes = b"") -> list[int]:
    """PIDs (not ours) whose working directory is below one of ``roots`` (and whose
    command line contains ``needle``)."""
    resolved = [r.resolve() for r in roots]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = (proc / "cwd").readlink()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and any(cwd.is_relative_to(r) for r in resolved):
            found.append(int(proc.name))
    return found


def kill_fake_vms(state_dir: Path) -> None:
    """SIGKILL what a killed daemon's fake VMs left running.

    Real VMs die with their daemon (QEMU has a parent-death signal); the fake
    backend's "guest" commands are host processes, so end them the same way.
    """
    for _ in range(50):
        pids = processes_below([state_dir])
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of the killed service's fake VMs survive: {pids}")


def _vm_dirs(state_dirs: Iterable[Path]) -> list[str]:
    return [str(p) for d in state_dirs for p in (d / "run").glob("stoker-*") if p.is_dir()]


async def run_chaos(
    plan: ChaosPlan,
    workdir: Path,
    database_url: str,
    *,
    env: dict[str, str] | None = None,
) -> ChaosReport:
    """Run ``plan`` in ``workdir`` against ``database_url``; never leaves a daemon running."""
    rng = random.Random(plan.seed)
    report = ChaosReport(plan)
    storage = workdir / "storage"
    names = [f"chaos-{chr(ord('a') + i)}" for i in range(plan.hosts)]
    state_dirs = {n: workdir / n for n in names}
    daemons: dict[str, Daemon] = {}
    for name in names:
        config = workdir / f"{name}.toml"
        write_config(
            config,
            name=name,
            state_dir=state_dirs[name],
            plan=plan,
            database_url=database_url,
            storage=storage,
        )
        daemons[name] = Daemon(config, workdir / f"{name}.log", env)
    client = Service(load_config(daemons[names[0]].config))
    await client.open()
    started = time.monotonic()
    waiter: asyncio.Task[dict[str, tuple[JobView, float]]] | None = None
    try:
        for daemon in daemons.values():
            daemon.start()
        submitted: dict[str, float] = {}
        for _ in range(plan.jobs):
            job = await client.submit(JobRequest(command=_command(rng, plan)), "chaos")
            submitted[job.id] = time.monotonic()
        # Jobs are watched while the kills go on, so their latencies are true.
        waiter = asyncio.create_task(_wait_all(client, submitted, plan.settle_timeout))
        for _ in range(plan.kills):
            await asyncio.sleep(rng.uniform(*plan.kill_gap))
            victim = rng.choice(names)
            daemon = daemons[victim]
            if not daemon.running:
                daemon.start()
                continue
            daemon.kill9()
            report.kills.append((round(time.monotonic() - started, 1), victim))
            if plan.backend == "fake":
                kill_fake_vms(state_dirs[victim])
            await asyncio.sleep(rng.uniform(*plan.restart_gap))
            daemon.start()
        ended = await waiter
        report.wall_s = time.monotonic() - started
        for job_id, (view, at) in ended.items():
            report.latency_s.append(at - submitted[job_id])
            report.states[view.state.value] = report.states.get(view.state.value, 0) + 1
        report.lost = len(submitted) - len(ended)
        if report.lost:
            report.problems.append(f"{report.lost} jobs never ended")
        for view, _ in ended.values():
            await _check_job(client, view, report)
    finally:
        if waiter is not None and not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        for name, daemon in daemons.items():
            if daemon.proc is not None:
                code = daemon.stop()
                if code != 0:
                    report.problems.append(f"{name} exited with status {code} on SIGTERM")
            if plan.backend == "fake":
                kill_fake_vms(state_dirs[name])
        await client.stop()
    report.leftover_vmms = processes_below(state_dirs.values(), b"qemu-system")
    if report.leftover_vmms:
        report.problems.append(f"VMM processes left: {report.leftover_vmms}")
    report.leftover_dirs = _vm_dirs(state_dirs.values())
    if report.leftover_dirs:
        report.problems.append(f"VM work directories left: {report.leftover_dirs}")
    if len(report.kills) < plan.kills:
        report.problems.append(f"only {len(report.kills)} kills happened, not {plan.kills}")
    return report


async def _wait_all(
    client: Service, submitted: dict[str, float], timeout: float
) -> dict[str, tuple[JobView, float]]:
    ended: dict[str, tuple[JobView, float]] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(submitted) and time.monotonic() < deadline:
        for job_id in submitted:
            if job_id in ended:
                continue
            view = await client.get(job_id)
            if view.state in TERMINAL:
                ended[job_id] = (view, time.monotonic())
        await asyncio.sleep(0.5)
    return ended


async def _check_job(client: Service, view: JobView, report: ChaosReport) -> None:
    terminal = [e for e in view.events if e.to_state in TERMINAL]
    if view.state is not JobState.SUCCEEDED:
        report.problems.append(f"job {view.id} ended {view.state.value}: {view.reason}")
    if len(terminal) != 1 or view.events[-1].to_state not in TERMINAL:
        report.problems.append(
            f"job {view.id} ended {len(terminal)} times: {[e.to_state.value for e in view.events]}"
        )
    chunks = await client.logs(view.id)
    out = "".join(c.text for c in chunks if c.stream == "stdout")
    if any("took over VM" in c.text for c in chunks if c.stream == "system"):
        report.taken_over += 1
    attempts = [int(n) for n in _ATTEMPT.findall(out)]
    report.attempts += len(attempts)
    report.reruns += max(0, len(attempts) - 1)
    twice = len(attempts) - len(set(attempts))
    if twice:
        report.duplicate_attempts += twice
        report.problems.append(f"job {view.id}: an attempt ran twice: {attempts}")
    if view.state is JobState.SUCCEEDED and (not attempts or attempts[-1] != view.attempt):
        report.problems.append(
            f"job {view.id}: succeeded on attempt {view.attempt}, its log shows {attempts}"
        )
    if view.state is JobState.SUCCEEDED and not out.endswith("done\n"):
        report.problems.append(f"job {view.id}: succeeded but its log ends {out[-40:]!r}")
