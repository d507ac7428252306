"""UNSAFE: ``gitlab-runner run-single`` with the runner's token inside the VM.

Prefer :mod:`stoker.ci.gitlab.executor` (the manager and its token stay on
the host).  Here the runner authentication token is handed to the guest
(``CI_SERVER_TOKEN``, which ``run-single`` reads), so the job it runs, which
is untrusted code, can read it and use it to take other jobs the runner is
allowed to: every job of its project or group.  That is why an instance-wide
runner's token is refused (:func:`check_runner_scope`): with it, a job could
take any project's jobs.  ``run-single`` takes one job and exits
(``--max-builds 1``); the ``gitlab-runner`` image contains the binary and a
``gitlab-runner`` user, no configuration.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from stoker.accounts import guest_user
from stoker.errors import UsageError
from stoker.protocol.common import ExecResult, OutputSink
from stoker.vm import VM

RUNNER_BINARY = "/usr/local/bin/gitlab-runner"
RUNNER_USER = "gitlab-runner"
MAX_TOKEN = 4096


def check_token(token: str) -> str:
    """The token without surrounding whitespace; raises :class:`UsageError` if malformed."""
    value = token.strip()
    if (
        not value
        or len(value) > MAX_TOKEN
        or any(c.isspace() or not c.isprintable() for c in value)
    ):
        raise UsageError("the GitLab runner token must be one line of printable characters")
    return value


async def check_runner_scope(
    url: str,
    runner_token: str,
    access_token: str,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> str:
    """The runner's type; :class:`UsageError` for an instance-wide or unknown runner token.

    ``access_token`` (``read_api`` scope) lets GitLab say which runner the token
    belongs to and whether it is an instance runner.
    """
    from stoker.ci.gitlab.client import GitLabClient

    async with GitLabClient(url, access_token, transport=transport) as client:
        # glrt- tokens need a system id to be verified; any stable-looking one does.
        runner_id = await client.verify_runner_id(runner_token, "s_stokerunsafe")
        if runner_id is None:
            raise UsageError("GitLab does not accept this runner token (deleted or mistyped?)")
        details = await client.runner(runner_id)
    if details.runner_type == "instance_type":
        raise UsageError(
            f"runner {runner_id} is an instance runner: its token inside a VM would let the "
            "job take any project's jobs, so it is refused",
            hint="use `stoker gitlab-executor` (the token stays on the host), or a project runner",
        )
    return details.runner_type


def run_single_argv(
    url: str, *, builds_dir: str, wait_timeout: int = 600, binary: str = RUNNER_BINARY
) -> list[str]:
    """The command taking exactly one job from ``url`` with the shell executor."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"expected the GitLab URL as http(s)://host, got {url!r}")
    if wait_timeout < 1:
        raise UsageError("wait_timeout must be at least one second")
    # fmt: off
    return [
        binary, "run-single",
        "--url", url,
        "--executor", "shell",
        "--max-builds", "1",
        "--wait-timeout", str(wait_timeout),
        "--builds-dir", builds_dir,
    ]
    # fmt: on


async def run_single_job(
    vm: VM,
    url: str,
    token: str,
    *,
    wait_timeout: int = 600,
    stdout: OutputSink | None = None,
    stderr: OutputSink | None = None,
    timeout: float | None = None,
) -> ExecResult:
    """Run one GitLab job in ``vm`` as the image's ``gitlab-runner`` user."""
    token = check_token(token)
    user = await guest_user(vm, RUNNER_USER)
    argv = run_single_argv(url, builds_dir=f"{user.home}/builds", wait_timeout=wait_timeout)
    return await vm.exec(
        argv,
        env={
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
            "CI_SERVER_TOKEN": token,
        },
        cwd=user.home,
        uid=user.uid,
        gid=user.gid,
        stdout=stdout,
        stderr=stderr,
        capture=stdout is None,
        timeout=timeout,
    )
