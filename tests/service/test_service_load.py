"""One host under load: concurrent submissions and live log followers (correctness only).

The small version of ``bench/load.py`` (which reports the timings and memory
figures): a real ``stoker serve`` on 127.0.0.1 with the fake backend, every
job submitted at once, a live follower for a third of them, ``GET
/v1/jobs/{id}`` polled meanwhile; twice on the same server.  Every job must
end exactly once and succeed with its whole output, every follower must see
every line and one end event, and the server's memory must stay within a
generous bound (no growth from one round to the next beyond it).  No timing
is asserted.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from load_scenario import expected_output, run_load
from serve_process import ServeProcess

from conftest import ServiceFactory
from stoker.service.daemon import listen_socket
from stoker.service.jobs import JobRequest

JOBS = 30
FOLLOWERS = 10


async def test_submissions_and_followers_under_load(tmp_path: Path) -> None:
    with ServeProcess(tmp_path, pool_max=8) as server:
        rounds = []
        for _ in range(2):
            result = await run_load(
                server, jobs=JOBS, followers=FOLLOWERS, lines=10, pause=0.02, idle_gets=40
            )
            assert result.problems() == []
            assert len(result.final) == JOBS and len(result.followers) == FOLLOWERS
            assert len(result.loaded_gets) > 0 and not result.get_errors
            rounds.append(result)
        first, second = rounds
        # Memory: bounded by a generous multiple, and a second round does not keep growing.
        assert first.rss_peak_kib < 4 * first.rss_before_kib
        assert second.rss_peak_kib < 2 * first.rss_peak_kib
        assert second.rss_after_kib < first.rss_after_kib + 64 * 1024


async def test_followers_leave_no_wake_up_behind(fake_service: ServiceFactory) -> None:
    # Every follower of a job left an event in the notifier's table for good (one per job
    # ever followed): it keeps only the events someone waits on.
    service = await fake_service()
    lines = 5
    script = f'for i in $(seq 1 {lines}); do echo "line $i"; sleep 0.05; done'
    job = await service.submit(JobRequest(command=["sh", "-c", script]), "ci")

    async def follow() -> str:
        chunks = [c async for c in service.follow_logs(job.id)]
        return b"".join(c.data for c in chunks if c.stream == "stdout").decode()

    outputs = await asyncio.gather(*(follow() for _ in range(3)))
    assert outputs == [expected_output(lines)] * 3
    assert await follow() == expected_output(lines)  # the job has ended: read at once
    assert len(service.notifier) == 0


def test_api_connections_do_not_wait_for_delayed_acks() -> None:
    # asyncio sets TCP_NODELAY only on sockets made with proto=IPPROTO_TCP; the listener's
    # connections had Nagle on, and every response on a kept-alive connection waited
    # ~40 ms for the client's delayed ACK (between its head and its body).
    listener = listen_socket("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
