"""Load on one ``stoker serve`` host: concurrent submissions, live log followers, polling.

Shared by ``tests/service/test_service_load.py`` (small, checks correctness
only) and ``bench/load.py`` (200 submissions and 50 followers, prints the
figures).  Against a :class:`~serve_process.ServeProcess` (fake backend: the
"VMs" are the agent in threads, commands run on this host):

1. *idle*: ``GET /v1/jobs/{id}`` polled by a few clients while nothing runs;
2. *load*: every job submitted at once (each prints ``lines`` numbered lines,
   slowly), one live follower (``?follow=1``, server-sent events) for each of
   the first ``followers`` jobs, opened as soon as its job exists, and the same
   pollers as in 1 until every job has ended;
3. the server's resident memory sampled all along (before, peak, after).

Correctness is checked by :meth:`LoadResult.problems`: every job ended once
(one terminal transition), succeeded, with its whole output stored; every
follower saw every line of its job in order, then one ``end`` event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from serve_process import ServeProcess

ENDED = frozenset({"succeeded", "failed", "errored", "cancelled", "timed_out"})
#: Concurrent clients polling ``GET /v1/jobs/{id}`` (idle and under load alike).
POLLERS = 4


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def job_script(lines: int, pause: float) -> list[str]:
    """A job printing ``line 1`` .. ``line <lines>``, ``pause`` seconds apart."""
    loop = f'i=1; while [ $i -le {lines} ]; do echo "line $i"; i=$((i+1)); sleep {pause}; done'
    return ["sh", "-c", loop]


def expected_output(lines: int) -> str:
    return "".join(f"line {i}\n" for i in range(1, lines + 1))


@dataclass
class Follower:
    """What one live follower of a job saw."""

    job_id: str
    stdout: str = ""
    ends: list[dict[str, Any]] = field(default_factory=list)
    events_after_end: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    """Timings, memory and outcomes of one run of the scenario."""

    jobs: int
    lines: int
    idle_gets: list[float] = field(default_factory=list)
    loaded_gets: list[float] = field(default_factory=list)
    get_errors: list[str] = field(default_factory=list)
    submit_seconds: float = 0.0
    drain_seconds: float = 0.0
    rejected: list[str] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    followers: list[Follower] = field(default_factory=list)
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0

    def problems(self) -> list[str]:
        """Everything that went wrong (empty: every job and follower as expected)."""
        found = list(self.rejected) + list(self.get_errors)
        if len(self.final) != self.jobs:
            found.append(f"{self.jobs - len(self.final)} of {self.jobs} jobs never ended")
        want = expected_output(self.lines)
        for job_id, job in self.final.items():
            ends = [e for e in job["events"] if e["to_state"] in ENDED]
            if job["state"] != "succeeded" or len(ends) != 1:
                found.append(
                    f"job {job_id}: {job['state']} ({job.get('reason')}), {len(ends)} ends"
                )
            if self.outputs.get(job_id) != want:
                found.append(f"job {job_id}: stored output {self.outputs.get(job_id)!r}")
        for follower in self.followers:
            where = f"follower of {follower.job_id}"
            if follower.error is not None:
                found.append(f"{where}: {follower.error}")
            elif follower.stdout != want:
                found.append(f"{where} saw {follower.stdout!r}")
            elif len(follower.ends) != 1 or follower.ends[0]["state"] != "succeeded":
                found.append(f"{where}: end events {follower.ends}")
            elif follower.events_after_end:
                found.append(f"{where}: {follower.events_after_end} events after the end")
        return found

    @property
    def submit_rate(self) -> float:
        """Submissions accepted per second (all sent at once)."""
        return self.jobs / self.submit_seconds if self.submit_seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """The figures, for a table or JSON."""

        def ms(values: list[float], p: float) -> float:
            return 1000 * percentile(values, p) if values else float("nan")

        return {
            "jobs": self.jobs,
            "followers": len(self.followers),
            "get_idle_p50_ms": ms(self.idle_gets, 50),
            "get_idle_p99_ms": ms(self.idle_gets, 99),
            "get_load_p50_ms": ms(self.loaded_gets, 50),
            "get_load_p99_ms": ms(self.loaded_gets, 99),
            "gets_idle": len(self.idle_gets),
            "gets_load": len(self.loaded_gets),
            "submit_seconds": self.submit_seconds,
            "submit_per_s": self.submit_rate,
            "drain_seconds": self.drain_seconds,
            "rss_before_mib": self.rss_before_kib / 1024,
            "rss_peak_mib": self.rss_peak_kib / 1024,
            "rss_after_mib": self.rss_after_kib / 1024,
            "problems": len(self.problems()),
        }


class _Run:
    """One run of the scenario against ``server`` (see the module docstring)."""

    def __init__(self, server: ServeProcess, client: httpx.AsyncClient, result: LoadResult) -> None:
        self.server = server
        self.client = client
        self.result = result
        self.loaded = False
        self.done = asyncio.Event()

    async def sample_memory(self) -> None:
        while not self.done.is_set():
            self.result.rss_peak_kib = max(self.result.rss_peak_kib, self.server.rss_kib())
            await asyncio.sleep(0.05)

    async def poll(self, job_ids: list[str], sink: list[float], count: int | None) -> None:
        """GET job after job (round robin) until ``count`` requests or the end of the run."""
        n = 0
        while (count is None and not self.done.is_set()) or (count is not None and n < count):
            job_id = job_ids[n % len(job_ids)]
            t0 = time.perf_counter()
            response = await self.client.get(
                f"/v1/jobs/{job_id}", headers=self.server.headers("ci")
            )
            sink.append(time.perf_counter() - t0)
            if response.status_code != 200:
                self.result.get_errors.append(f"GET {job_id}: {response.status_code}")
            n += 1

    async def submit(self, spec: dict[str, Any]) -> str | None:
        response = await self.client.post(
            "/v1/jobs",
            files={"spec": (None, json.dumps(spec), "application/json")},
            headers=self.server.headers("ci"),
        )
        if response.status_code != 201:
            self.result.rejected.append(f"submission: {response.status_code} {response.text}")
            return None
        return str(response.json()["id"])

    async def follow(self, follower: Follower) -> None:
        """Read the job's event stream to its end; keep its stdout and end events."""
        url = f"/v1/jobs/{follower.job_id}/logs"
        try:
            async with self.client.stream(
                "GET", url, params={"follow": 1}, headers=self.server.headers("ci")
            ) as response:
                if response.status_code != 200:
                    follower.error = f"status {response.status_code}"
                    return
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        data = json.loads(line.removeprefix("data: "))
                        if follower.ends:
                            follower.events_after_end += 1
                        elif event == "log" and data["stream"] == "stdout":
                            follower.stdout += data["data"]
                        elif event == "end":
                            follower.ends.append(data)
                        elif event == "error":
                            follower.error = f"error event: {data}"
        except httpx.HTTPError as exc:
            follower.error = f"{type(exc).__name__}: {exc}"

    async def wait_all_ended(self, job_ids: list[str], timeout: float) -> None:
        """Until every job has ended (read with the admin token, not timed)."""
        deadline = time.monotonic() + timeout
        pending = set(job_ids)
        while pending and time.monotonic() < deadline:
            for job_id in sorted(pending):
                response = await self.client.get(
                    f"/v1/jobs/{job_id}", headers=self.server.headers("root")
                )
                job = response.json()
                if job["state"] in ENDED:
                    self.result.final[job_id] = job
                    pending.discard(job_id)
            if pending:
                await asyncio.sleep(0.5)

    async def stored_output(self, job_id: str) -> str:
        """The job's stored stdout, page by page."""
        text, after = "", 0
        while True:
            response = await self.client.get(
                f"/v1/jobs/{job_id}/logs",
                params={"after": after},
                headers=self.server.headers("ci"),
            )
            page = response.json()
            text += "".join(c["data"] for c in page["chunks"] if c["stream"] == "stdout")
            if page["complete"] or not page["chunks"]:
                return text
            after = page["next_after"]


async def run_load(
    server: ServeProcess,
    *,
    jobs: int,
    followers: int,
    lines: int = 20,
    pause: float = 0.05,
    idle_gets: int = 400,
    timeout: float = 600,
) -> LoadResult:
    """Run the scenario once against ``server`` (already started); the result."""
    result = LoadResult(jobs=jobs, lines=lines)
    limits = httpx.Limits(max_connections=jobs + followers + 50, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        run = _Run(server, client, result)
        result.rss_before_kib = result.rss_peak_kib = server.rss_kib()
        sampler = asyncio.create_task(run.sample_memory())
        # idle: one finished job to read, nothing else running
        seed = await run.submit({"command": ["true"]})
        assert seed is not None, result.rejected
        await run.wait_all_ended([seed], timeout=60)
        result.final.clear()
        share = -(-idle_gets // POLLERS)
        await asyncio.gather(*(run.poll([seed], result.idle_gets, share) for _ in range(POLLERS)))
        # load: every submission at once; a follower per job as soon as it exists
        spec = {"command": job_script(lines, pause)}
        watchers: list[asyncio.Task[None]] = []

        async def submit_and_follow(index: int) -> str | None:
            job_id = await run.submit(spec)
            if job_id is not None and index < followers:
                follower = Follower(job_id)
                result.followers.append(follower)
                watchers.append(asyncio.create_task(run.follow(follower)))
            return job_id

        pollers = [
            asyncio.create_task(run.poll([seed], result.loaded_gets, None)) for _ in range(POLLERS)
        ]
        t0 = time.perf_counter()
        submitted = await asyncio.gather(*(submit_and_follow(i) for i in range(jobs)))
        result.submit_seconds = time.perf_counter() - t0
        job_ids = [j for j in submitted if j is not None]
        await run.wait_all_ended(job_ids, timeout)
        result.drain_seconds = time.perf_counter() - t0
        run.done.set()
        await asyncio.gather(*pollers)
        await asyncio.wait_for(asyncio.gather(*watchers), timeout=60)
        for job_id in job_ids:
            result.outputs[job_id] = await run.stored_output(job_id)
        await sampler
        await asyncio.sleep(1)  # let the server finish what the last requests started
        result.rss_after_kib = server.rss_kib()
    return result
