"""This host's VMs: the capacity ledger, warm pools, VM records, stray VMMs.

:class:`Fleet` owns every VM of this host that is not (yet) a job's: it boots
warm VMs for the pools (``min_idle`` each, ``max`` in all), hands idle ones
out, destroys what is discarded, and keeps the ledger: a VM holds its vCPUs
and memory from the moment it is planned until it is destroyed, never less.
The :class:`~stoker.service.supervisor.Supervisor` decides what to run where.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from stoker.backends.base import Backend
from stoker.net.proxy import ConnectionRecord
from stoker.protocol.common import JobLimits
from stoker.service.config import PoolConfig, ServiceConfig
from stoker.service.db import Database
from stoker.service.failures import is_vm_failure, record_failure
from stoker.service.fake_backend import FakeBackend, FakeVM
from stoker.service.fleet import merge_vm_record
from stoker.service.models import VMRecord, utcnow
from stoker.service.runs import JobRun
from stoker.service.scheduler import Capacity, PoolState, replenish
from stoker.vm import VM, VMState
from stoker.vmfiles import OWNER_FILE

log = logging.getLogger(__name__)

#: Where a job's files are in the guest, and the command's working directory.
GUEST_DIR = "/work/src"
#: A pool whose warm boots fail waits up to this long before trying again.
MAX_WARM_BACKOFF = 60.0


@dataclass(eq=False)
class WarmPool:
    """One pool's VMs on this host."""

    name: str
    config: PoolConfig
    idle: deque[VM] = field(default_factory=deque)
    warming: int = 0
    busy: int = 0
    failures: int = 0
    retry_at: float = 0.0

    @property
    def total(self) -> int:
        return len(self.idle) + self.warming + self.busy

    def state(self, *, warm_allowed: bool = True) -> PoolState:
        return PoolState(
            cpus=self.config.cpus,
            memory_mb=self.config.memory,
            max=self.config.max,
            min_idle=self.config.min_idle if warm_allowed else 0,
            idle=len(self.idle),
            warming=self.warming,
            total=self.total,
        )


#: VM.start() sweeps stale work directories in a worker thread while creating its own;
#: a sweep could read another VM's owner file half-written and remove that VM's
#: directory.  Serialising creation within this process closes that window.
_WORKDIR_LOCK = threading.Lock()


class ServiceVM(VM):
    """A :class:`~stoker.vm.VM` whose work directory is made under a process-wide lock."""

    def _make_workdir(self) -> Path:
        with _WORKDIR_LOCK:
            return super()._make_workdir()


class Fleet:
    """This host's VMs outside jobs, and the ledger of what all of its VMs hold.

    ``observe(method, *args)`` reports to the service's observer (metrics),
    ``wake()`` asks the supervisor for a scheduling pass (capacity came back,
    a warm VM is ready), ``changed()`` says the VM counts changed, and
    ``on_connection(pool, record)`` gets every connection record of the VMs'
    egress proxies (it must not block).
    """

    def __init__(
        self,
        config: ServiceConfig,
        db: Database,
        backend: Backend,
        *,
        observe: Callable[..., None],
        wake: Callable[[], None],
        changed: Callable[[], None],
        on_connection: Callable[[str, ConnectionRecord], None],
    ) -> None:
        self.config = config
        self.db = db
        self.backend = backend
        self.host = config.host.name
        self.dirs = config.dirs
        self.budget = Capacity(config.host.cpu_budget, config.host.memory_budget_mb)
        self.used = Capacity(0, 0)
        self.pools = {name: WarmPool(name, cfg) for name, cfg in config.pools.items()}
        #: Set by the supervisor while its task group runs (clean-ups and warm boots go there).
        self.tg: asyncio.TaskGroup | None = None
        self.stopping = False
        self._observe = observe
        self._wake = wake
        self._changed = changed
        self._on_connection = on_connection
        self._warm_tasks: set[asyncio.Task[None]] = set()
        #: Key digests of the snapshots this host is making for its pools.
        self._making: set[str] = set()
        self._stray: set[asyncio.Task[None]] = set()
        self._log = log.getChild(self.host)

    # ------------------------------------------------------------------ capacity

    def reserve(self, cpus: float, memory_mb: float) -> None:
        self.used = self.used.plus(cpus, memory_mb)
        if not self.budget.fits(self.used.cpus, self.used.memory_mb):
            # The scheduler plans within the free capacity; this is a bug if it happens.
            self._log.error("capacity overcommitted: %s of %s", self.used, self.budget)
        self._observe("capacity", self.used.cpus, self.used.memory_mb)

    def release(self, cpus: float, memory_mb: float) -> None:
        self.used = self.used.minus(cpus, memory_mb)
        self._observe("capacity", self.used.cpus, self.used.memory_mb)

    def free(self) -> Capacity:
        """What the ledger has not handed out."""
        return Capacity(
            self.budget.cpus - self.used.cpus, self.budget.memory_mb - self.used.memory_mb
        )

    def pool_states(self) -> dict[str, PoolState]:
        """Placement's view of every pool (pools backing off after failed boots want none)."""
        now = time.monotonic()
        return {
            name: pool.state(warm_allowed=pool.retry_at <= now) for name, pool in self.pools.items()
        }

    def make_room(self, run: JobRun, pool: WarmPool, donors: Iterable[str]) -> None:
        """Reserve a new VM of ``pool`` for ``run``, evicting an idle VM of each of ``donors``.

        The victims (in ``run.evicted``, destroyed by the run) keep their capacity
        until they are gone, since the host holds them until then: the job takes
        now only what they do not cover, and the rest in :meth:`settle_evicted`.
        """
        freed_cpus = freed_memory = 0.0
        for donor in donors:
            victim = self.take_idle(self.pools[donor])
            if victim is not None:
                freed_cpus += self.pools[donor].config.cpus
                freed_memory += self.pools[donor].config.memory
                run.evicted.append(victim)
        run.evicted_capacity = (freed_cpus, freed_memory)
        self.reserve(
            max(0.0, pool.config.cpus - freed_cpus), max(0.0, pool.config.memory - freed_memory)
        )

    def settle_evicted(self, run: JobRun) -> None:
        """The VMs evicted for ``run`` are gone: their capacity becomes the job's (idempotent)."""
        cpus, memory = run.evicted_capacity
        if not cpus and not memory:
            return
        run.evicted_capacity = (0.0, 0.0)
        pool = self.pools[run.pool]
        self.release(cpus, memory)
        self.reserve(min(pool.config.cpus, cpus), min(pool.config.memory, memory))
        self._wake()

    def vm_counts(self, job_vms: Iterable[VM | None]) -> dict[str, int]:
        """VMs by state: ``booting`` (warm or for a job), ``idle``, ``busy``."""
        counts = {"booting": 0, "idle": 0, "busy": 0}
        for pool in self.pools.values():
            counts["idle"] += len(pool.idle)
            counts["booting"] += pool.warming
        for vm in job_vms:
            if vm is not None and vm.state is VMState.READY:
                counts["busy"] += 1
            else:
                counts["booting"] += 1
        return counts

    # ------------------------------------------------------------------ idle VMs

    def take_idle(self, pool: WarmPool, *, job: str | None = None) -> VM | None:
        """An idle VM of ``pool`` that is still alive (dead ones are discarded).

        ``job``: the VM now serves that job (its connection records say so).
        """
        while pool.idle:
            vm = pool.idle.popleft()
            if vm.state is VMState.READY and vm.vmm_pid is not None:
                if job is not None:
                    vm.job = job
                    if vm.proxy is not None:
                        vm.proxy.job = job
                return vm
            self._log.warning("idle VM %s of pool %s died; discarding it", vm.name, pool.name)
            self.discard(vm, pool)
        return None

    def discard(self, vm: VM, pool: WarmPool) -> None:
        """Destroy a VM that is no longer in ``pool``'s idle list, releasing its capacity."""
        self.spawn(self.destroy(vm, release=(pool.config.cpus, pool.config.memory)))

    def drop_dead_idle(self) -> None:
        """Discard idle VMs whose VMM ended."""
        for pool in self.pools.values():
            alive = deque(
                v for v in pool.idle if v.state is VMState.READY and v.vmm_pid is not None
            )
            if len(alive) != len(pool.idle):
                for vm in pool.idle:
                    if vm not in alive:
                        self._log.warning("idle VM %s of pool %s died", vm.name, pool.name)
                        self.discard(vm, pool)
                pool.idle = alive

    def snapshot_later(self, pool: WarmPool, vm: VM) -> None:
        """``vm`` booted because its pool's snapshot is missing: make it once, in the background.

        Like a warm boot, the template takes the pool's shape out of the free
        capacity while it runs; without room now, a later boot asks again.
        """
        key = vm.snapshot_missing
        if key is None or self.tg is None or self.stopping:
            return
        digest, cfg = key.digest(), pool.config
        free = self.free()
        if digest in self._making or free.cpus < cfg.cpus or free.memory_mb < cfg.memory:
            return
        self._making.add(digest)
        self.reserve(cfg.cpus, cfg.memory)
        task = self.tg.create_task(
            self._make_snapshot(pool, digest), name=f"stoker-snapshot-{pool.name}"
        )
        self._warm_tasks.add(task)
        task.add_done_callback(self._warm_tasks.discard)

    async def _make_snapshot(self, pool: WarmPool, digest: str) -> None:
        vm = self.new_vm(pool, seed=None)
        vm.snapshot_mode = "create"
        t0 = time.monotonic()
        try:
            async with vm:
                pass
            self._log.info(
                "snapshot %s for pool %s made in %.1fs: its VMs restore from now on",
                digest[:12],
                pool.name,
                time.monotonic() - t0,
                extra={"pool": pool.name, "host": self.host},
            )
        except Exception as exc:
            self._making.discard(digest)  # a later boot tries again
            self._log.warning("making a snapshot for pool %s failed: %s", pool.name, exc)
        finally:
            self.release(pool.config.cpus, pool.config.memory)

    def drain(self) -> None:
        """Stop booting warm VMs and destroy the idle ones (the service stops)."""
        self.stopping = True
        for task in list(self._warm_tasks):
            task.cancel()
        for pool in self.pools.values():
            while pool.idle:
                self.discard(pool.idle.popleft(), pool)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a clean-up in the task group (or, while it shuts down, beside it)."""
        try:
            if self.tg is not None:
                self.tg.create_task(coro)
                return
        except RuntimeError:
            pass
        task = asyncio.get_running_loop().create_task(coro)
        self._stray.add(task)
        task.add_done_callback(self._stray.discard)

    async def destroy(self, vm: VM, *, release: tuple[float, float] | None = None) -> None:
        """Destroy ``vm``; then (never before: the host holds it until it is gone)
        give its capacity back to the ledger."""
        try:
            await vm.destroy()
        except Exception as exc:
            self._log.error("destroying VM %s failed: %s", vm.name, exc)
        finally:
            if release is not None:
                self.release(*release)
                self._wake()
        await self.forget_vm(vm.name)

    async def forget_vm(self, name: str) -> None:
        """Remove the VM's record (never raises)."""
        try:
            await self.db.run(lambda s: s.execute(delete(VMRecord).where(VMRecord.name == name)))
        except Exception as exc:
            self._log.warning("removing the record of VM %s failed: %s", name, exc)

    async def record_vm(self, record: VMRecord) -> None:
        """Write (or update) the VM's record (never raises)."""
        record.host = self.host
        record.created_at = utcnow()

        try:
            await self.db.run(lambda s: merge_vm_record(s, record))
        except Exception as exc:
            self._log.warning("recording VM %s failed: %s", record.name, exc)

    async def vm_failed(
        self,
        name: str,
        pool: str,
        exc: BaseException,
        *,
        job_id: str | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        """Record that VM ``name`` broke with ``exc``, for ``GET /v1/vms/failed``
        (never raises; an error that is not the VM's own is not recorded)."""
        if not is_vm_failure(exc):
            return
        write = functools.partial(
            record_failure,
            vm_name=name,
            host=self.host,
            pool=pool,
            exc=exc,
            job_id=job_id,
            secrets=list(secrets),
        )
        try:
            await self.db.run(write)
        except Exception as error:
            self._log.warning("recording the failure of VM %s failed: %s", name, error)

    # ------------------------------------------------------------------ warm pools

    def refill(self, *, hold: bool) -> None:
        """Start warm boots for pools below ``min_idle`` (``hold``: jobs wait for capacity)."""
        if self.stopping or self.tg is None:
            return
        for name, count in replenish(self.pool_states(), self.free(), hold=hold).items():
            pool = self.pools[name]
            for _ in range(count):
                self.reserve(pool.config.cpus, pool.config.memory)
                pool.warming += 1
                task = self.tg.create_task(self._warm_one(pool), name=f"stoker-warm-{name}")
                self._warm_tasks.add(task)
                task.add_done_callback(self._warm_tasks.discard)

    def new_vm(self, pool: WarmPool, *, seed: Path | None, job: str | None = None) -> VM:
        """A VM of ``pool``'s shape and network (not started), for ``job`` if given,
        with ``seed`` copied to :data:`GUEST_DIR`."""
        cfg = pool.config
        cls = FakeVM if isinstance(self.backend, FakeBackend) else ServiceVM
        return cls(
            cfg.image_name,
            cpus=cfg.cpus,
            memory=cfg.memory,
            disk=cfg.disk,
            accel=self.config.host.accel,
            backend=self.backend,
            dirs=self.dirs,
            seed=(seed, GUEST_DIR) if seed is not None else None,
            snapshot=cfg.snapshot,
            network=cfg.network,
            job=job,
            on_connection=functools.partial(self._on_connection, pool.name),
            # Real VMs outlive a crashed or killed service, which takes them over on
            # restart (stoker.service.adoption); fake ones are threads of this process.
            detached=cls is ServiceVM,
            orphan_timeout=self.config.orphan_seconds,
            job_limits=JobLimits(memory_mb=cfg.job_memory_limit, pids=cfg.job_pids_limit),
            isolation=self.config.isolation(pool.name),
        )

    async def _warm_one(self, pool: WarmPool) -> None:
        vm = self.new_vm(pool, seed=None)
        ready = False
        try:
            await self.record_vm(VMRecord(name=vm.name, pool=pool.name, state="booting"))
            t0 = time.monotonic()
            await vm.start()
            seconds = time.monotonic() - t0
            await self.record_vm(
                VMRecord(
                    name=vm.name,
                    pool=pool.name,
                    state="idle",
                    pid=vm.vmm_pid,
                    workdir=str(vm.workdir),
                )
            )
            ready = True
            self._observe("boot", "warm", seconds)
            self.snapshot_later(pool, vm)
            self._log.info(
                "warm VM %s of pool %s ready in %.2fs%s",
                vm.name,
                pool.name,
                seconds,
                " (restored)" if vm.restored_from is not None else "",
                extra={"vm": vm.name, "pool": pool.name, "host": self.host},
            )
        except Exception as exc:
            await self.vm_failed(vm.name, pool.name, exc)
            pool.failures += 1
            delay = min(MAX_WARM_BACKOFF, 2.0**pool.failures)
            pool.retry_at = time.monotonic() + delay
            self._log.error(
                "warm boot for pool %s failed (retrying in %.0fs): %s", pool.name, delay, exc
            )
            self._observe("infrastructure_failure", "boot")
        finally:
            pool.warming -= 1
            if ready and not self.stopping:
                pool.failures = 0
                pool.idle.append(vm)
                self._wake()
            else:
                self.spawn(self.destroy(vm, release=(pool.config.cpus, pool.config.memory)))
            self._changed()


def vm_record(vm: VM | None, pool: WarmPool, job_id: str, state: str) -> VMRecord | None:
    """The record of a job's VM (None: no VM yet)."""
    if vm is None:
        return None
    return VMRecord(
        name=vm.name,
        pool=pool.name,
        job_id=job_id,
        state=state,
        pid=vm.vmm_pid,
        workdir=str(vm.workdir) if vm.workdir else None,
    )


# --- VMMs a previous life left ----------------------------------------------------------------


def kill_stray_vmms(runtime: Path) -> list[int]:
    """SIGKILL VMMs working in ``runtime`` whose owning stoker process is gone.

    A VMM's working directory is its VM's work directory (see
    :class:`stoker.backends.qemu.QemuBackend`), which records its owner.
    VMMs of a live owner (another stoker using the same directory) are left
    alone.
    """
    killed: list[int] = []
    if not runtime.is_dir():
        return killed
    root = runtime.resolve()
    for proc in Path("/proc").iterdir():
        entry = proc.name
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = (proc / "cwd").readlink()
        except OSError:
            continue
        if b"qemu-system" not in cmdline or not cwd.is_relative_to(root):
            continue
        owner = _owner_alive(cwd / OWNER_FILE)
        if owner:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry), signal.SIGKILL)
            killed.append(int(entry))
    return killed


def _owner_alive(owner_file: Path) -> bool:
    try:
        recorded = owner_file.read_text().strip()
    except OSError:
        return False
    pid = recorded.split(":", 1)[0]
    if not pid.isdigit():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}" == recorded
