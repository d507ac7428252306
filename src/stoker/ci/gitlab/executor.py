"""stoker as a GitLab Runner custom executor driver: one fresh microVM per job.

``gitlab-runner`` (the manager) stays on the host with its token and calls
``stoker gitlab-executor ... config|prepare|run|cleanup`` for every job, as
GitLab Runner's ``docs/executors/custom.md`` documents:

* ``config`` prints the JSON that sets the builds and cache directories in
  the guest, the host name, the driver's name and version, and the shell;
* ``prepare`` gets a VM: a **session job** (:mod:`stoker.service.sessions`)
  from a ``stoker serve`` pool when ``--service`` is given, so GitLab jobs
  share warm pools, capacity, fairness and metrics with everything else;
  else from a private service started for this job alone
  (:mod:`~stoker.ci.gitlab.local_service`).  It waits at most
  ``--prepare-timeout`` and leaves nothing behind when it fails;
* ``run SCRIPT STAGE`` runs each stage's script in that VM (``bash``,
  standard input closed), streaming its output.  The script gitlab-runner
  writes carries the job's variables; the runner's own token never enters
  the VM.  A script that fails is a build failure (``BUILD_FAILURE_EXIT_CODE``,
  its status in ``BUILD_EXIT_CODE_FILE``); VM or stoker trouble is a system
  failure (``SYSTEM_FAILURE_EXIT_CODE``, which GitLab retries);
* ``cleanup`` always ends the VM, even when an earlier stage (or stoker
  itself) crashed: it finds the job's session by its state file, or by the
  mark every session of the job carries when that file was never written.

What ties the stages of one job together is a state file (mode 0600) named
by a digest of the GitLab instance's URL and the job's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal
from urllib.parse import urlsplit

import stoker
from stoker.errors import StokerError, UsageError
from stoker.service.client import ApiClient, ApiError, LogEvent

#: The sub-stages of ``run`` gitlab-runner documents (``step_*`` are generated names).
STAGES: Final = frozenset(
    {
        "prepare_executor",
        "prepare_script",
        "get_sources",
        "clear_worktree",
        "restore_cache",
        "download_artifacts",
        "build_script",
        "after_script",
        "archive_cache",
        "archive_cache_on_failure",
        "upload_artifacts_on_success",
        "upload_artifacts_on_failure",
        "cleanup_file_variables",
    }
)
#: The environment variable that marks the session of one GitLab job (value: JobEnv.key).
MARK_ENV: Final = "STOKER_GITLAB_JOB"
_STEP_STAGE = re.compile(r"step_[a-z0-9_]{1,64}")
#: Largest stage script accepted (gitlab-runner's are a few hundred KiB at most).
MAX_SCRIPT_BYTES: Final = 4 << 20
#: Terminal states of a stoker job.
_ENDED: Final = frozenset({"succeeded", "failed", "errored", "cancelled", "timed_out"})
#: How a stage's script runs in the guest: copied from standard input to a private
#: file first, so that commands in it reading standard input see an empty one
#: instead of the rest of the script; the file (it holds the job's variables) goes after.
_STAGE_RUNNER: Final = (
    'f=$(mktemp /tmp/stoker-stage.XXXXXXXX) || exit 125; cat >"$f" || exit 125; '
    'bash "$f" </dev/null; rc=$?; rm -f "$f"; exit $rc'
)


class SystemFailure(StokerError):
    """The environment failed (VM, service, stoker): gitlab-runner may retry the stage."""


def known_stage(stage: str) -> bool:
    """Whether ``stage`` is a sub-stage gitlab-runner documents for ``run_exec``."""
    return stage in STAGES or bool(_STEP_STAGE.fullmatch(stage))


# --- what gitlab-runner hands the driver --------------------------------------------------------


@dataclass(frozen=True)
class JobEnv:
    """The part of the environment gitlab-runner gives every stage that the driver uses."""

    build_failure: int
    system_failure: int
    job_id: str
    server_url: str
    exit_code_file: Path | None = None
    project: str = ""
    #: The job's timeout in seconds (``CI_JOB_TIMEOUT``), when GitLab says.
    timeout: float | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> JobEnv:
        """Read it; :class:`UsageError` naming the variable when one is missing or malformed."""

        def code(name: str) -> int:
            value = environ.get(name)
            if value is None:
                raise UsageError(
                    f"{name} is not set: `stoker gitlab-executor` is meant to be run by "
                    "gitlab-runner's custom executor"
                )
            if not value.isdigit() or not 0 < int(value) < 256:
                raise UsageError(f"{name} must be an exit status (1-255), got {value!r}")
            return int(value)

        job_id = environ.get("CUSTOM_ENV_CI_JOB_ID", "")
        if not job_id.isdigit() or len(job_id) > 20:
            raise UsageError(f"CUSTOM_ENV_CI_JOB_ID must be GitLab's job id, got {job_id!r}")
        server = environ.get("CUSTOM_ENV_CI_SERVER_URL", "")
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"CUSTOM_ENV_CI_SERVER_URL must be GitLab's URL, got {server!r}")
        timeout_text = environ.get("CUSTOM_ENV_CI_JOB_TIMEOUT", "")
        exit_file = environ.get("BUILD_EXIT_CODE_FILE")
        return cls(
            build_failure=code("BUILD_FAILURE_EXIT_CODE"),
            system_failure=code("SYSTEM_FAILURE_EXIT_CODE"),
            job_id=job_id,
            server_url=server,
            exit_code_file=Path(exit_file) if exit_file else None,
            project=environ.get("CUSTOM_ENV_CI_PROJECT_PATH", ""),
            timeout=float(timeout_text) if timeout_text.isdigit() else None,
        )

    @property
    def key(self) -> str:
        """Names this job's state file and marks its sessions (unique per GitLab instance)."""
        digest = hashlib.sha256(f"{self.server_url}\0{self.job_id}".encode()).hexdigest()
        return digest[:24]

    def server_endpoint(self) -> str:
        """``host:port`` of the GitLab instance (what a job's VM must reach)."""
        parts = urlsplit(self.server_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the driver's own settings ------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutorOptions:
    """How this driver gets VMs (from ``config.toml``'s ``*_args``)."""

    state_dir: Path
    #: A ``stoker serve`` to take VMs from (None: a private service per job).
    service_url: str | None = None
    token_file: Path | None = None
    pool: str | None = None
    #: Private service only: the image, the VM's shape, and egress beyond GitLab's host.
    image: str = "gitlab-runner"
    cpus: int = 2
    memory_mb: int = 2048
    disk_mb: int = 16384
    allow: tuple[str, ...] = ()
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    #: The guest account stages run as (None: the pool's or the job's default, root).
    user: str | None = None
    prepare_timeout: float = 600.0
    #: A session with no stage for this long ends (gitlab-runner crashed between stages).
    idle_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if self.service_url is not None and self.token_file is None:
            raise UsageError("--service needs --token-file (a token with the submit scope)")
        for name in ("builds_dir", "cache_dir"):
            value = getattr(self, name)
            if not value.startswith("/") or ".." in value.split("/") or "\0" in value:
                raise UsageError(f"--{name.replace('_', '-')} must be an absolute guest path")

    def token(self) -> str:
        """The service token (from ``token_file``)."""
        assert self.token_file is not None
        try:
            value = self.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(
                f"cannot read --token-file {self.token_file}: {exc.strerror}"
            ) from None
        if not value or any(c.isspace() for c in value):
            raise UsageError(f"--token-file {self.token_file} does not hold one token")
        return value


@dataclass
class SessionState:
    """What ``prepare`` leaves for the later stages of one job (the state file)."""

    mode: Literal["service", "local"]
    url: str
    key: str
    job_id: str | None = None
    #: Private service only: its token, directory and process.
    token: str | None = None
    directory: str | None = None
    pid: int | None = None
    created: float = field(default_factory=time.time)

    @staticmethod
    def path(options: ExecutorOptions, job: JobEnv) -> Path:
        return options.state_dir / f"{job.key}.json"

    @classmethod
    def load(cls, path: Path) -> SessionState | None:
        """The state in ``path`` (None: missing); :class:`SystemFailure` if unreadable."""
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise SystemFailure(f"the executor's state file {path} is unreadable: {exc}") from None

    def save(self, path: Path) -> None:
        """Write atomically, readable by this user only (it may hold a token)."""
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            # First job here, or another job's cleanup just removed the empty directory.
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.__dict__, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)


# --- the stages ---------------------------------------------------------------------------------


def config_output(options: ExecutorOptions, job: JobEnv) -> dict[str, Any]:
    """What ``config`` prints (custom.md's "Config" table)."""
    where = f"pool {options.pool}" if options.service_url else f"image {options.image}"
    return {
        "builds_dir": options.builds_dir,
        "cache_dir": options.cache_dir,
        # Every job has a VM of its own: nothing in the builds directory is shared.
        "builds_dir_is_shared": False,
        "hostname": f"stoker-{job.key[:12]}",
        "driver": {"name": f"stoker ({where})", "version": stoker.__version__},
        "shell": "bash",
    }


Write = Callable[[str], None]


async def prepare(options: ExecutorOptions, job: JobEnv, say: Write) -> SessionState:
    """Get a VM for ``job`` and make its builds and cache directories.

    Raises :class:`SystemFailure` when no VM comes within the deadline or the
    image cannot run jobs; nothing is left behind then.
    """
    path = SessionState.path(options, job)
    if path.exists():
        # gitlab-runner retries prepare: what a failed earlier attempt left goes first.
        await cleanup(options, job, say=lambda _: None)
    state: SessionState | None = None
    try:
        async with asyncio.timeout(options.prepare_timeout):
            if options.service_url is not None:
                state = SessionState(mode="service", url=options.service_url, key=job.key)
                token = options.token()
            else:
                from stoker.ci.gitlab.local_service import LocalShape, start_local_service

                directory = options.state_dir / f"{job.key}.service"
                state = SessionState(mode="local", url="", key=job.key, directory=str(directory))
                state.save(path)
                say(f"Starting a private stoker service for image {options.image}...")
                local = await start_local_service(
                    directory,
                    LocalShape(
                        image=options.image,
                        cpus=options.cpus,
                        memory_mb=options.memory_mb,
                        disk_mb=options.disk_mb,
                        allow=(job.server_endpoint(), *options.allow),
                        timeout_s=job.timeout or 3 * 3600.0,
                    ),
                )
                state.url, state.token, state.pid = local.url, local.token, local.pid
                token = local.token
            state.save(path)
            async with ApiClient(state.url, token) as api:
                spec: dict[str, Any] = {
                    "session": {"idle_timeout": options.idle_timeout},
                    # How cleanup finds the session when prepare died before saving its id.
                    "env": {MARK_ENV: job.key},
                }
                if options.pool is not None and options.service_url is not None:
                    spec["pool"] = options.pool
                if options.user is not None:
                    spec["user"] = options.user
                submitted = await api.submit(spec)
                state.job_id = str(submitted["id"])
                state.save(path)
                t0 = time.monotonic()
                say(f"Waiting for a VM (stoker job {state.job_id}, pool {submitted['pool']})...")
                current = await _wait_running(api, state.job_id)
                say(
                    f"Got {current.get('vm_kind') or 'a'} VM {current.get('vm_name')} on "
                    f"{current.get('host')} in {time.monotonic() - t0:.2f}s"
                )
                dirs = " ".join(shlex.quote(d) for d in (options.builds_dir, options.cache_dir))
                check = (
                    f"mkdir -p {dirs} || exit 1; "
                    "command -v bash >/dev/null || { echo 'the image has no bash' >&2; exit 2; }; "
                    "command -v git >/dev/null || echo 'warning: the image has no git' >&2; "
                    "command -v gitlab-runner >/dev/null || echo 'note: no gitlab-runner in "
                    "the image: cache and artifact steps are skipped' >&2; exit 0"
                )
                code, reason = await _run_step(api, state.job_id, ["sh", "-c", check], b"")
                if code != 0:
                    why = f": {reason}" if reason else ""
                    raise SystemFailure(f"the VM cannot run GitLab jobs (exit {code}{why})")
    except BaseException as exc:
        # Nothing half-made survives a failed or interrupted prepare.
        with contextlib.suppress(Exception):
            await asyncio.shield(cleanup(options, job, say=lambda _: None))
        if isinstance(exc, TimeoutError):
            raise SystemFailure(
                f"no VM within the prepare timeout of {options.prepare_timeout:g}s"
            ) from None
        if isinstance(exc, ApiError):
            raise SystemFailure(f"the stoker service refused the job: {exc}") from None
        raise
    return state


async def _wait_running(api: ApiClient, job_id: str) -> dict[str, Any]:
    delay = 0.02
    while True:
        current = await api.get(job_id)
        if current["state"] == "running":
            return current
        if current["state"] in _ENDED:
            raise SystemFailure(
                f"the VM did not start: {current['state']}: {current.get('reason')}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


async def _run_step(
    api: ApiClient,
    job_id: str,
    command: list[str],
    stdin: bytes,
    out: IO[bytes] | None = None,
    err: IO[bytes] | None = None,
) -> tuple[int | None, str | None]:
    """Run one step; its output to ``out``/``err``; (exit status or None, reason)."""
    # gitlab-runner runs one stage at a time: a step still running belongs to a driver
    # process that was killed mid-stage, and would hold the VM until its command ends.
    step = await api.add_step(job_id, command, stdin=stdin, interrupt=True)
    final: dict[str, Any] = {}
    async for item in api.follow_step(job_id, int(step["seq"])):
        if isinstance(item, LogEvent):
            sink = out if item.stream == "stdout" else err
            if sink is not None:
                sink.write(item.data)
                sink.flush()
        else:
            final = item
    code = final.get("exit_code")
    sig = final.get("signal")
    if code is None and isinstance(sig, int):
        code = 128 + sig
    return code, final.get("reason")


async def run(
    options: ExecutorOptions,
    job: JobEnv,
    script: Path,
    stage: str,
    out: IO[bytes],
    err: IO[bytes],
) -> int:
    """Run ``stage``'s ``script`` in the job's VM; the driver's exit status.

    0 when the script succeeded, ``job.build_failure`` when it failed (its
    status written to ``BUILD_EXIT_CODE_FILE``).  Raises :class:`UsageError`
    for an unknown stage or a missing script, :class:`SystemFailure` when
    the VM or the service fails.
    """
    if not known_stage(stage):
        raise UsageError(
            f"unknown stage {stage!r}: expected one of {', '.join(sorted(STAGES))} or step_*"
        )
    try:
        with script.open("rb") as fh:
            data = fh.read(MAX_SCRIPT_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"the script file {script} of stage {stage} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read the script file {script}: {exc.strerror}") from None
    if len(data) > MAX_SCRIPT_BYTES:
        raise UsageError(f"the script of stage {stage} is larger than {MAX_SCRIPT_BYTES} bytes")
    state = SessionState.load(SessionState.path(options, job))
    if state is None or state.job_id is None:
        raise SystemFailure(f"no VM for GitLab job {job.job_id}: prepare did not run or failed")
    async with ApiClient(state.url, _token_of(options, state)) as api:
        try:
            code, reason = await _run_step(
                api, state.job_id, ["bash", "-c", _STAGE_RUNNER], data, out, err
            )
        except asyncio.CancelledError:
            # gitlab-runner ends a stage (job timeout or cancel) with SIGTERM: stop the
            # command by ending the VM; cleanup follows.
            with contextlib.suppress(Exception):
                await asyncio.shield(api.cancel(state.job_id))
            raise
        except ApiError as exc:
            raise SystemFailure(f"stage {stage}: the stoker service failed: {exc}") from None
    if code is None:
        raise SystemFailure(f"stage {stage}: {reason or 'the command did not finish'}")
    if code == 0:
        return 0
    if job.exit_code_file is not None:
        with contextlib.suppress(OSError):
            job.exit_code_file.write_text(f"{code}\n")
    return job.build_failure


def _token_of(options: ExecutorOptions, state: SessionState) -> str:
    if state.mode == "local":
        if not state.token:
            raise SystemFailure("the executor's state file has no token for the private service")
        return state.token
    return options.token()


async def cleanup(options: ExecutorOptions, job: JobEnv, say: Write) -> None:
    """End the job's VM and everything ``prepare`` made (idempotent, never skips a part)."""
    path = SessionState.path(options, job)
    state = SessionState.load(path)
    problems: list[str] = []
    unended: str | None = None
    if state is not None and state.url:
        try:
            async with ApiClient(state.url, _token_of(options, state), timeout=15) as api:
                await _end_sessions(api, state.job_id, job.key, say)
        except (StokerError, OSError) as exc:
            unended = f"ending the session: {exc}"
    elif state is None and options.service_url is not None:
        # prepare may have died between submitting and writing its state: find it by its mark.
        try:
            async with ApiClient(options.service_url, options.token(), timeout=15) as api:
                await _end_sessions(api, None, job.key, say)
        except (StokerError, OSError) as exc:
            problems.append(f"looking for the job's sessions: {exc}")
    if state is not None and state.mode == "local" and state.directory:
        from stoker.ci.gitlab.local_service import stop_local_service

        try:
            await stop_local_service(Path(state.directory), state.pid)
        except (StokerError, OSError) as exc:
            problems.append(f"stopping the private service: {exc}")
        else:
            if unended is not None:
                # Its VM dies with the private service (parent-death signal): ended either way.
                say(f"{unended}; the private service is stopped, and the VM with it")
                unended = None
    if unended is not None:
        problems.insert(0, unended)
    if problems:
        # The state stays, so that another cleanup can finish the work.
        raise SystemFailure("cleanup incomplete: " + "; ".join(problems))
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # the last job's cleanup leaves no empty directory behind


async def _end_sessions(api: ApiClient, job_id: str | None, key: str, say: Write) -> None:
    ids = {job_id} if job_id else set()
    if job_id is None:
        # Sessions of this token still alive and marked as this GitLab job's.
        for state in ("queued", "booting", "running"):
            for found in await api.jobs(state=state, limit=1000):
                if found.get("env", {}).get(MARK_ENV) == key:
                    ids.add(str(found["id"]))
    for each in sorted(ids):
        try:
            current = await api.get(each)
        except ApiError as exc:
            if exc.status == 404:
                continue
            raise
        if current["state"] in _ENDED:
            continue
        if current["state"] == "running" and current.get("session_idle_timeout") is not None:
            # A clean end (succeeded) when no stage is left running in it.
            await api.close_session(each)
            for _ in range(50):
                await asyncio.sleep(0.1)
                if (await api.get(each))["state"] in _ENDED:
                    break
            else:
                await _cancel(api, each)
        else:
            await _cancel(api, each)
        say(f"stoker job {each} ended; its VM is destroyed")


async def _cancel(api: ApiClient, job_id: str) -> None:
    try:
        await api.cancel(job_id)
    except ApiError as exc:
        if exc.status not in (404, 409):  # gone or ended meanwhile: fine
            raise


# --- the process --------------------------------------------------------------------------------


async def run_stage(coro: Any) -> Any:
    """Await ``coro`` with SIGTERM and SIGINT cancelling it (gitlab-runner's deadlines)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
