"""A GitLab runner for exactly one build, in a fresh microVM.

``gitlab-runner run-single`` takes one job and exits (``--max-builds 1``).  The
``gitlab-runner`` image contains the binary and a ``gitlab-runner`` user, no
configuration; the URL and runner authentication token are handed in at run
time.  The token goes in the environment (``CI_SERVER_TOKEN``, which
``run-single`` reads), so it never appears in the guest's process list.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from stoker.accounts import guest_user
from stoker.errors import UsageError
from stoker.protocol.client import ExecResult, OutputSink
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
