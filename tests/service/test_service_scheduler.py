"""Placement and fairness: the scheduler's pure functions, without a database."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.service.scheduler import Candidate, Capacity, PoolState, plan, replenish

T0 = datetime(2030, 1, 1, tzinfo=UTC)
SMALL = PoolState(cpus=1, memory_mb=1024, max=100)
BIG = PoolState(cpus=4, memory_mb=4096, max=100)
PLENTY = Capacity(100, 100_000)
_ids = itertools.count()


def jobs(
    submitter: str, n: int, pool: str = "small", priority: int = 0, start: int = 0
) -> list[Candidate]:
    shape = {"small": SMALL, "big": BIG}.get(pool, SMALL)
    out = []
    for i in range(n):
        out.append(
            Candidate(
                id=f"{submitter}-{pool}-{next(_ids)}",
                submitter=submitter,
                pool=pool,
                priority=priority,
                created_at=T0 + timedelta(seconds=start + i),
                cpus=shape.cpus,
                memory_mb=shape.memory_mb,
            )
        )
    return out


def run(
    candidates: list[Candidate],
    *,
    free: Capacity = PLENTY,
    pools: dict[str, PoolState] | None = None,
    running: dict[str, int] | None = None,
    limit: int = 100,
) -> list[str]:
    result = plan(
        candidates,
        running=running or {},
        limit_of=lambda _: limit,
        pools=pools or {"small": SMALL, "big": BIG},
        free=free,
    )
    return [a.job_id for a in result.assignments]


def submitters_of(ids: list[str]) -> list[str]:
    return [i.split("-")[0] for i in ids]


def test_fifo_within_a_submitter() -> None:
    queue = jobs("a", 5)
    assert run(list(reversed(queue)), free=Capacity(3, 100_000)) == [c.id for c in queue[:3]]


def test_burst_does_not_starve_others() -> None:
    # a submitted 50 jobs first; b and c one each, later.
    queue = jobs("a", 50) + jobs("b", 1, start=100) + jobs("c", 1, start=200)
    chosen = submitters_of(run(queue, free=Capacity(3, 100_000)))
    assert sorted(chosen) == ["a", "b", "c"]


def test_round_robin_by_running_jobs() -> None:
    queue = jobs("a", 20) + jobs("b", 20, start=100)
    chosen = submitters_of(run(queue, free=Capacity(10, 100_000), running={"a": 4}))
    # b catches up with a's four running jobs before they alternate.
    assert Counter(chosen) == {"b": 7, "a": 3}
    assert chosen[:4] == ["b"] * 4


def test_per_submitter_limit_counts_jobs_running_anywhere() -> None:
    queue = jobs("a", 10) + jobs("b", 10, start=100)
    chosen = submitters_of(run(queue, running={"a": 3}, limit=4))
    assert Counter(chosen) == {"a": 1, "b": 4}


def test_priority_first() -> None:
    queue = jobs("a", 5) + jobs("b", 2, priority=5, start=100)
    assert submitters_of(run(queue, free=Capacity(2, 100_000))) == ["b", "b"]


def test_warm_vm_first_and_without_capacity() -> None:
    pools = {"small": PoolState(cpus=1, memory_mb=1024, max=4, idle=2, total=2)}
    result = plan(
        jobs("a", 3),
        running={},
        limit_of=lambda _: 10,
        pools=pools,
        free=Capacity(0, 0),
    )
    assert [a.warm for a in result.assignments] == [True, True]
    assert result.waiting_for_capacity


def test_pool_max_counts_idle_and_busy() -> None:
    pools = {"small": PoolState(cpus=1, memory_mb=1024, max=3, idle=1, total=2)}
    result = plan(
        jobs("a", 5), running={}, limit_of=lambda _: 10, pools=pools, free=Capacity(50, 1e6)
    )
    assert [a.warm for a in result.assignments] == [True, False]
    assert not result.waiting_for_capacity  # blocked by max, not by the host


def test_big_job_is_not_starved_by_small_ones() -> None:
    # The big job is first in line but needs 4 vCPUs; only 2 are free.
    queue = jobs("a", 1, pool="big") + jobs("b", 10, pool="small", start=100)
    result = plan(
        queue,
        running={},
        limit_of=lambda _: 100,
        pools={"small": SMALL, "big": BIG},
        free=Capacity(2, 100_000),
    )
    assert result.assignments == () and result.waiting_for_capacity
    # Warm VMs still serve: they need no new capacity.
    warm = {"small": PoolState(cpus=1, memory_mb=1024, max=100, idle=1, total=1), "big": BIG}
    result = plan(queue, running={}, limit_of=lambda _: 100, pools=warm, free=Capacity(2, 100_000))
    assert [a.pool for a in result.assignments] == ["small"] and result.assignments[0].warm


def test_idle_vms_of_other_pools_are_evicted_to_make_room() -> None:
    pools = {
        "small": PoolState(cpus=1, memory_mb=1024, max=10, min_idle=3, idle=3, total=3),
        "big": BIG,
    }
    result = plan(
        jobs("a", 1, pool="big"),
        running={},
        limit_of=lambda _: 10,
        pools=pools,
        free=Capacity(1, 1024),
    )
    (assignment,) = result.assignments
    assert assignment.pool == "big" and assignment.evict == ("small", "small", "small")
    assert result.pools["small"].idle == 0 and result.free == Capacity(0, 0)


def test_replenish_tops_up_within_capacity_and_max() -> None:
    pools = {
        "a": PoolState(cpus=1, memory_mb=1024, max=10, min_idle=3, idle=1, total=1),
        "b": PoolState(cpus=1, memory_mb=1024, max=2, min_idle=5, total=1),
        "c": PoolState(cpus=2, memory_mb=2048, max=10, min_idle=1, warming=1, total=1),
    }
    assert replenish(pools, Capacity(10, 100_000)) == {"a": 2, "b": 1}
    assert sum(replenish(pools, Capacity(2, 100_000)).values()) == 2
    assert replenish(pools, Capacity(10, 100_000), hold=True) == {}


def test_candidates_for_unknown_pools_are_ignored() -> None:
    assert run(jobs("a", 2, pool="gpu"), pools={"small": SMALL}) == []


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[Candidate], dict[str, PoolState], Capacity, dict[str, int], int]:
    pools = {}
    for name in ("p0", "p1", "p2"):
        cpus = draw(st.integers(1, 4))
        idle = draw(st.integers(0, 3))
        busy = draw(st.integers(0, 3))
        pools[name] = PoolState(
            cpus=cpus,
            memory_mb=cpus * 512,
            max=draw(st.integers(max(1, idle + busy), 10)),
            min_idle=draw(st.integers(0, 3)),
            idle=idle,
            total=idle + busy,
        )
    candidates = []
    for i in range(draw(st.integers(0, 40))):
        pool = draw(st.sampled_from(sorted(pools)))
        candidates.append(
            Candidate(
                id=f"j{i}",
                submitter=draw(st.sampled_from(["a", "b", "c", "d"])),
                pool=pool,
                priority=draw(st.integers(-1, 1)),
                created_at=T0 + timedelta(seconds=draw(st.integers(0, 100))),
                cpus=pools[pool].cpus,
                memory_mb=pools[pool].memory_mb,
            )
        )
    free = Capacity(draw(st.integers(0, 12)), draw(st.integers(0, 12)) * 512)
    running = {s: draw(st.integers(0, 3)) for s in "abcd"}
    return candidates, pools, free, running, draw(st.integers(1, 5))


@given(scenarios())
@settings(max_examples=300, deadline=None)
def test_plans_respect_every_bound(
    scenario: tuple[list[Candidate], dict[str, PoolState], Capacity, dict[str, int], int],
) -> None:
    candidates, pools, free, running, limit = scenario
    result = plan(candidates, running=running, limit_of=lambda _: limit, pools=pools, free=free)
    by_id = {c.id: c for c in candidates}
    # Capacity: new VMs (minus evicted idle ones) fit in what was free.
    cpus = mem = 0.0
    for a in result.assignments:
        if not a.warm:
            cpus += pools[a.pool].cpus
            mem += pools[a.pool].memory_mb
            for donor in a.evict:
                cpus -= pools[donor].cpus
                mem -= pools[donor].memory_mb
    assert cpus <= free.cpus + 1e-9 and mem <= free.memory_mb + 1e-9
    assert result.free.cpus >= -1e-9 and result.free.memory_mb >= -1e-9
    # Pools: never above max; warm jobs only where idle VMs were.
    for name, before in pools.items():
        after = result.pools[name]
        assert after.total <= max(before.max, before.total) and after.idle >= 0
        warm = sum(1 for a in result.assignments if a.pool == name and a.warm)
        assert warm <= before.idle
    # Submitters: never above their limit.
    started = Counter(by_id[a.job_id].submitter for a in result.assignments)
    for submitter, n in started.items():
        assert running.get(submitter, 0) + n <= max(limit, running.get(submitter, 0))
    # FIFO within a (submitter, pool, priority) queue.
    chosen = {a.job_id for a in result.assignments}
    for c in candidates:
        if c.id in chosen:
            earlier = [
                d
                for d in candidates
                if (d.submitter, d.pool, d.priority) == (c.submitter, c.pool, c.priority)
                and (d.created_at, d.id) < (c.created_at, c.id)
            ]
            assert all(d.id in chosen for d in earlier)
    # Replenishing afterwards stays within what is left.
    extra = replenish(result.pools, result.free)
    assert sum(pools[n].cpus * k for n, k in extra.items()) <= result.free.cpus + 1e-9
