"""A GitHub Actions just-in-time runner for exactly one job, in a fresh microVM.

GitHub's REST API (``POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig``,
or the organisation's equivalent) returns ``encoded_jit_config``: a base64
blob that registers an ephemeral runner for one job.  The ``github-runner``
image contains the runner but no registration; :func:`run_jit_runner` starts
``run.sh --jitconfig <blob>`` as the image's ``runner`` user and returns when
the runner exits (after its one job).  The blob travels over the agent
channel only, is never written to the image, and dies with the VM.
"""

from __future__ import annotations

import re

from stoker.accounts import guest_user
from stoker.errors import UsageError
from stoker.protocol.common import ExecResult, OutputSink
from stoker.vm import VM

RUNNER_DIR = "/opt/actions-runner"
RUNNER_USER = "runner"
#: A JIT config is a few KiB of base64; bound it so a mistake (a file of the
#: wrong kind) fails clearly instead of travelling into the guest.
MAX_JITCONFIG = 64 * 1024
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def check_jitconfig(jitconfig: str) -> str:
    """The JIT config without surrounding whitespace; raises :class:`UsageError` if malformed."""
    value = jitconfig.strip()
    if not value:
        raise UsageError("the JIT runner configuration is empty")
    if len(value) > MAX_JITCONFIG:
        raise UsageError(f"the JIT runner configuration is over {MAX_JITCONFIG // 1024} KiB")
    if len(value) % 4 or not _BASE64_RE.fullmatch(value):
        raise UsageError(
            "the JIT runner configuration is not base64",
            hint="pass the encoded_jit_config field of GitHub's generate-jitconfig response",
        )
    return value


def jit_runner_argv(jitconfig: str, *, runner_dir: str = RUNNER_DIR) -> list[str]:
    """The command starting the runner for one job."""
    return [f"{runner_dir}/run.sh", "--jitconfig", check_jitconfig(jitconfig)]


async def run_jit_runner(
    vm: VM,
    jitconfig: str,
    *,
    stdout: OutputSink | None = None,
    stderr: OutputSink | None = None,
    timeout: float | None = None,
) -> ExecResult:
    """Run the image's Actions runner for one job; returns how the runner exited.

    Raises :class:`UsageError` for a malformed configuration and
    :class:`~stoker.errors.ProvisionError` when the image has no ``runner`` user.
    """
    argv = jit_runner_argv(jitconfig)
    user = await guest_user(vm, RUNNER_USER)
    return await vm.exec(
        argv,
        env={"HOME": user.home, "USER": user.name, "LOGNAME": user.name},
        cwd=RUNNER_DIR,
        uid=user.uid,
        gid=user.gid,
        stdout=stdout,
        stderr=stderr,
        capture=stdout is None,
        timeout=timeout,
    )
