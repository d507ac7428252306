"""One ordinary job's command in its VM: the account, the command, the artifacts out.

(A session job runs steps instead: :mod:`stoker.service.sessions`.)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from stoker.accounts import guest_user
from stoker.archive import ExtractLimits
from stoker.errors import CommandTimeout, ProvisionError
from stoker.outcomes import describe, exec_cause, timeout_message
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
    so that the caller's failure messages say where it failed.
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
    result = None
    try:
        result = await vm.exec(
            list(job.argv),
            env=env,
            cwd=job.workdir or GUEST_DIR,
            uid=uid,
            gid=gid,
            stdout=functools.partial(writer.write, "stdout"),
            stderr=functools.partial(writer.write, "stderr"),
            capture=False,
            timeout=job.timeout_s,
        )
    except CommandTimeout:
        await writer.system(timeout_message(job.timeout_s))
    else:
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
