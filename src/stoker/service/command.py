"""One ordinary job's command in its VM: the account, the command, the artifacts out.

(A session job runs steps instead: :mod:`stoker.service.sessions`.)
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stoker.accounts import guest_user
from stoker.archive import ExtractLimits
from stoker.errors import CommandTimeout, ProvisionError
from stoker.outcomes import describe, exec_cause, timeout_message
from stoker.protocol.common import ExecResult
from stoker.service.files import ArtifactFile, JobFiles, JobInputError, hash_artifacts
from stoker.service.jobs import job_env
from stoker.service.logs import LogWriter
from stoker.service.models import Job
from stoker.service.pools import GUEST_DIR
from stoker.service.runs import Outcome, judge
from stoker.vm import VM


async def run_command(
    job: Job,
    vm: VM,
    writer: LogWriter,
    files: JobFiles,
    max_artifact_bytes: int,
    enter: Callable[[str], None],
) -> Outcome:
    """Run ``job``'s command in ``vm`` (output to ``writer``), copy its artifacts out.

    ``enter`` is told the phase each part starts ("copying artifacts out"),
    so that the caller's failure messages say where it failed.  In a detached
    VM the agent journals the command's output and ``writer`` stores resume
    points, so that a restarted service takes over (:func:`resume_command`).
    """
    env, uid, gid = job_env(job), None, None
    if job.user is not None:
        try:
            account = await guest_user(vm, job.user)
        except ProvisionError as exc:
            # The job named an account its image does not have: its own mistake.
            raise JobInputError(f"{exc}") from None
        env = {"HOME": account.home, "USER": account.name, "LOGNAME": account.name, **env}
        uid, gid = account.uid, account.gid
    if vm.detached:
        writer.acks_to(vm.agent.ack)
    running = vm.exec(
        list(job.argv),
        env=env,
        cwd=job.workdir or GUEST_DIR,
        uid=uid,
        gid=gid,
        stdout=functools.partial(writer.write, "stdout"),
        stderr=functools.partial(writer.write, "stderr"),
        capture=False,
        timeout=job.timeout_s,
        on_started=writer.command_started if vm.detached else None,
        on_frame=writer.frame if vm.detached else None,
        journal=vm.detached,
    )
    return await _finish_command(job, vm, writer, files, max_artifact_bytes, enter, running)


async def resume_command(
    job: Job,
    vm: VM,
    writer: LogWriter,
    files: JobFiles,
    max_artifact_bytes: int,
    enter: Callable[[str], None],
    point: dict[str, Any],
) -> Outcome:
    """Follow the command an earlier process of this service started in ``vm`` (adopted)
    from its resume ``point``, then as :func:`run_command`."""
    writer.resume_from(point)
    writer.acks_to(vm.agent.ack)
    left = job.timeout_s - max(0.0, time.time() - float(point["started"]))
    running = vm.follow(
        int(point["channel"]),
        stdout=functools.partial(writer.write, "stdout"),
        stderr=functools.partial(writer.write, "stderr"),
        timeout=max(left, 0.001),
        on_frame=writer.frame,
    )
    return await _finish_command(job, vm, writer, files, max_artifact_bytes, enter, running)


async def _finish_command(
    job: Job,
    vm: VM,
    writer: LogWriter,
    files: JobFiles,
    max_artifact_bytes: int,
    enter: Callable[[str], None],
    running: Awaitable[ExecResult],
) -> Outcome:
    """Wait for the command (a timeout is noted in the log), copy artifacts out, judge."""
    result = None
    try:
        result = await running
    except CommandTimeout:
        await writer.system(timeout_message(job.timeout_s))
    if result is not None:
        cause = exec_cause(result)
        if cause in ("oom", "pids_limit", "disk_full"):
            await writer.system(describe(cause, result))  # why, next to the output it cut off
    artifacts: list[ArtifactFile] = []
    if job.artifacts:
        enter("copying artifacts out")
        report, missing = await vm.get(
            job.artifacts,
            files.artifacts,
            cwd=GUEST_DIR,
            limits=ExtractLimits(max_bytes=max_artifact_bytes),
        )
        artifacts = await asyncio.to_thread(hash_artifacts, files.artifacts, report.files)
        if missing:
            await writer.system(f"no files matched: {', '.join(missing)}")
    return judge(job, result, artifacts)
