"""Placement and fairness: which queued jobs this host starts now (pure functions).

:func:`plan` is given the queued candidates (the head of every submitter's
queue per pool, see :func:`stoker.service.db.claim_jobs`), how many jobs each
submitter has running on any host, and this host's pools and free capacity.
It picks jobs in this order:

1. a submitter at its concurrency limit gets nothing more;
2. higher priority first;
3. among equals, the submitter with the fewest jobs running, so a burst of a
   thousand jobs from one submitter takes its share, not the host;
4. then first come, first served.

A job takes an idle warm VM of its pool when there is one; otherwise it needs
room for a new VM: below its pool's ``max`` and within the host's free vCPUs
and memory, if need be after evicting idle VMs of other pools.  When the best
waiting job does not fit, no other job may boot a VM in this pass (only warm
ones still go): the capacity that frees up next is reserved for it, so big
jobs are not starved by a stream of small ones.  Warm pools are refilled
(:func:`replenish`) only with what queued jobs leave over.

Nothing here touches the database or the clock: the tests drive these
functions directly, and the fake-backend scale test checks the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stoker.service.models import Job


@dataclass(frozen=True)
class Candidate:
    """A queued job, as much of it as placement needs."""

    id: str
    submitter: str
    pool: str
    priority: int
    created_at: datetime
    cpus: int
    memory_mb: int

    @classmethod
    def of(cls, job: Job) -> Candidate:
        assert job.pool is not None
        return cls(
            id=job.id,
            submitter=job.submitter,
            pool=job.pool,
            priority=job.priority,
            created_at=job.created_at,
            cpus=job.cpus,
            memory_mb=job.memory_mb,
        )


@dataclass(frozen=True)
class Capacity:
    """vCPUs and memory (MiB): a budget, or what is left of it."""

    cpus: float
    memory_mb: float

    def fits(self, cpus: float, memory_mb: float) -> bool:
        return cpus <= self.cpus + 1e-9 and memory_mb <= self.memory_mb + 1e-9

    def minus(self, cpus: float, memory_mb: float) -> Capacity:
        return Capacity(self.cpus - cpus, self.memory_mb - memory_mb)

    def plus(self, cpus: float, memory_mb: float) -> Capacity:
        return Capacity(self.cpus + cpus, self.memory_mb + memory_mb)


@dataclass(frozen=True)
class PoolState:
    """One pool on this host, as placement sees it."""

    cpus: int
    memory_mb: int
    max: int
    min_idle: int = 0
    #: Warm VMs at agent-ready, not promised to any job.
    idle: int = 0
    #: Warm VMs still booting.
    warming: int = 0
    #: Every VM of the pool: idle, warming, and serving (or booting for) a job.
    total: int = 0


@dataclass(frozen=True)
class Assignment:
    """Start job ``job_id`` in ``pool``: on an idle warm VM, or on a new one."""

    job_id: str
    submitter: str
    pool: str
    warm: bool
    #: Pools to destroy one idle VM of each first, to make room (new VMs only).
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` decided."""

    assignments: tuple[Assignment, ...]
    #: A job waits for host capacity: do not spend what frees up on warm VMs.
    waiting_for_capacity: bool
    #: The pool states and free capacity once the assignments are made.
    pools: Mapping[str, PoolState] = field(default_factory=dict)
    free: Capacity = Capacity(0, 0)


def _order_key(candidate: Candidate, active: Mapping[str, int]) -> tuple[object, ...]:
    return (
        -candidate.priority,
        active.get(candidate.submitter, 0),
        candidate.created_at,
        candidate.id,
    )


def plan(
    candidates: Sequence[Candidate],
    *,
    running: Mapping[str, int],
    limit_of: Callable[[str], int],
    pools: Mapping[str, PoolState],
    free: Capacity,
    max_assignments: int = 64,
) -> Plan:
    """Choose the jobs to start on this host now (see the module docstring for the rules).

    ``running`` counts each submitter's claimed jobs on every host;
    ``limit_of`` gives a submitter's concurrency limit.  Candidates for pools
    this host does not have are ignored.
    """
    queues: dict[str, list[Candidate]] = {}
    for candidate in sorted(candidates, key=lambda c: (-c.priority, c.created_at, c.id)):
        if candidate.pool in pools:
            queues.setdefault(candidate.submitter, []).append(candidate)
    active = dict(running)
    state = dict(pools)
    blocked: set[str] = set()
    waiting = False
    chosen: list[Assignment] = []
    while len(chosen) < max_assignments:
        heads = []
        for submitter, queue in queues.items():
            if active.get(submitter, 0) >= limit_of(submitter):
                continue
            head = next((c for c in queue if c.pool not in blocked), None)
            if head is not None:
                heads.append(head)
        if not heads:
            break
        best = min(heads, key=lambda c: _order_key(c, active))
        pool = state[best.pool]
        assignment: Assignment | None = None
        if pool.idle > 0:
            state[best.pool] = replace(pool, idle=pool.idle - 1)
            assignment = Assignment(best.id, best.submitter, best.pool, warm=True)
        elif waiting or pool.total >= pool.max:
            blocked.add(best.pool)
        else:
            evict, after_free, after_state = _make_room(pool, best.pool, state, free)
            if evict is None:
                blocked.add(best.pool)
                # Later jobs may not boot VMs with what this one waits for.
                waiting = True
            else:
                free = after_free.minus(pool.cpus, pool.memory_mb)
                state = after_state
                state[best.pool] = replace(pool, total=pool.total + 1)
                assignment = Assignment(best.id, best.submitter, best.pool, False, evict)
        if assignment is not None:
            queues[best.submitter].remove(best)
            active[best.submitter] = active.get(best.submitter, 0) + 1
            chosen.append(assignment)
    return Plan(tuple(chosen), waiting, state, free)


def _make_room(
    pool: PoolState, name: str, pools: Mapping[str, PoolState], free: Capacity
) -> tuple[tuple[str, ...] | None, Capacity, dict[str, PoolState]]:
    """Idle VMs of other pools to destroy so that a VM of ``pool`` fits (None: impossible)."""
    state = dict(pools)
    evict: list[str] = []
    # Biggest idle VMs first: fewest evictions.
    donors = sorted(
        (n for n, p in pools.items() if n != name and p.idle > 0),
        key=lambda n: (-pools[n].memory_mb, -pools[n].cpus, n),
    )
    for donor in donors:
        while not free.fits(pool.cpus, pool.memory_mb) and state[donor].idle > 0:
            d = state[donor]
            state[donor] = replace(d, idle=d.idle - 1, total=d.total - 1)
            free = free.plus(d.cpus, d.memory_mb)
            evict.append(donor)
    if not free.fits(pool.cpus, pool.memory_mb):
        return None, free, dict(pools)
    return tuple(evict), free, state


def replenish(
    pools: Mapping[str, PoolState], free: Capacity, *, hold: bool = False
) -> dict[str, int]:
    """How many warm VMs to start per pool to get back to ``min_idle`` within capacity.

    Pools are topped up one VM at a time, the one missing most first, so a
    small host shares what it has.  ``hold`` (a job waits for capacity)
    starts nothing.
    """
    if hold:
        return {}
    state = dict(pools)
    out: dict[str, int] = {}
    while True:
        deficits = [
            (p.min_idle - p.idle - p.warming, name)
            for name, p in state.items()
            if p.min_idle > p.idle + p.warming
            and p.total < p.max
            and free.fits(p.cpus, p.memory_mb)
        ]
        if not deficits:
            return out
        _, name = max(deficits)
        p = state[name]
        state[name] = replace(p, warming=p.warming + 1, total=p.total + 1)
        free = free.minus(p.cpus, p.memory_mb)
        out[name] = out.get(name, 0) + 1


def can_place_any(states: Mapping[str, PoolState], free: Capacity) -> bool:
    """Whether a job of some pool could start now (an idle VM, or room for a new one)."""
    idle_room = {
        name: Capacity(p.idle * p.cpus, p.idle * p.memory_mb) for name, p in states.items()
    }
    for name, p in states.items():
        if p.idle > 0:
            return True
        if p.total >= p.max:
            continue
        room = free
        for other, extra in idle_room.items():
            if other != name:
                room = room.plus(extra.cpus, extra.memory_mb)
        if room.fits(p.cpus, p.memory_mb):
            return True
    return False


def slots(states: Mapping[str, PoolState], free: Capacity) -> int:
    """About how many jobs one pass can start (how deep to look into each queue)."""
    idle = sum(p.idle for p in states.values())
    new = max(
        (
            min(p.max - p.total, int(min(free.cpus / p.cpus, free.memory_mb / p.memory_mb)))
            for p in states.values()
        ),
        default=0,
    )
    return min(16, max(1, idle + new))
