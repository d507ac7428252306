"""A **stand-in** for gitlab-runner driving a custom executor, for tests: not GitLab Runner.

The real ``gitlab-runner`` cannot be installed here.  This follows GitLab
Runner's ``docs/executors/custom.md`` as documented, so that stoker's driver
(``stoker gitlab-executor``) is exercised the way gitlab-runner would:

* a temporary directory per job, the working directory of every call;
  ``JOB_RESPONSE_FILE`` (the job's JSON, removed at the end),
  ``BUILD_FAILURE_EXIT_CODE``, ``SYSTEM_FAILURE_EXIT_CODE``,
  ``BUILD_EXIT_CODE_FILE`` and every job variable as ``CUSTOM_ENV_<KEY>``;
* ``config_exec`` (JSON on stdout, retried twice if invalid; ``job_env`` goes
  to every later stage), ``prepare_exec`` (3 attempts on system failure,
  3 s apart by default), ``run_exec RUN_ARGS... SCRIPT STAGE`` for each
  sub-stage in the documented order (``after_script`` always,
  ``*_on_failure`` after a failed build), ``cleanup_exec`` always;
* each call in its own process group; on a deadline (the stage's timeout or
  the job's) SIGTERM to the group, ``graceful_kill_timeout`` later SIGKILL,
  ``force_kill_timeout`` later abandon;
* exit codes: 0 go on; ``BUILD_FAILURE_EXIT_CODE`` a script failure (its status
  from ``BUILD_EXIT_CODE_FILE``); ``SYSTEM_FAILURE_EXIT_CODE`` a system
  failure; anything else "unknown Custom executor executable exit code".

:class:`StandInManager` adds the runner side of GitLab's API: ``POST
/jobs/request``, ``PUT /jobs/:id`` (running, then the result with the
trace's CRC32), ``PATCH /jobs/:id/trace`` with ``Content-Range``.  The
scripts it writes are a small, honest imitation of gitlab-runner's bash
scripts (variables exported, the repository cloned over HTTP with the job
token, the job's script lines echoed and run); they are not gitlab-runner's.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import tomllib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

BUILD_FAILURE = 1
SYSTEM_FAILURE = 2
#: The sub-stages of ``run_exec``, in order (``step_script`` is the job's ``script``).
RUN_STAGES = (
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
)
Trace = Callable[[bytes], None]


@dataclass(frozen=True)
class RunnerSettings:
    """A ``[[runners]]`` entry with the custom executor (as gitlab-runner reads it)."""

    url: str
    builds_dir: str
    cache_dir: str
    config_exec: str
    prepare_exec: str
    run_exec: str
    cleanup_exec: str
    config_args: tuple[str, ...] = ()
    prepare_args: tuple[str, ...] = ()
    run_args: tuple[str, ...] = ()
    cleanup_args: tuple[str, ...] = ()
    config_exec_timeout: float = 3600
    prepare_exec_timeout: float = 3600
    cleanup_exec_timeout: float = 3600
    graceful_kill_timeout: float = 600
    force_kill_timeout: float = 600
    environment: tuple[str, ...] = ()
    shell: str = "bash"

    @classmethod
    def from_config_toml(cls, path: Path, name: str) -> RunnerSettings:
        """The ``[[runners]]`` entry called ``name`` in gitlab-runner's ``path``."""
        data = tomllib.loads(path.read_text())
        for entry in data.get("runners", []):
            if entry.get("name") == name:
                custom = entry.get("custom", {})
                keys = {k: v for k, v in custom.items() if k in cls.__dataclass_fields__}
                for k in ("config_args", "prepare_args", "run_args", "cleanup_args"):
                    if k in keys:
                        keys[k] = tuple(keys[k])
                return cls(
                    url=entry["url"],
                    builds_dir=entry["builds_dir"],
                    cache_dir=entry["cache_dir"],
                    environment=tuple(entry.get("environment", ())),
                    **keys,
                )
        raise KeyError(f"no [[runners]] entry named {name!r} in {path}")


@dataclass
class JobOutcome:
    """How the stand-in ended a job."""

    state: Literal["success", "failed"]
    exit_code: int | None = None
    failure_reason: str | None = None
    #: (stage, exit status or None when killed/abandoned), in the order they ran.
    stages: list[tuple[str, int | None]] = field(default_factory=list)


class _Stop(Exception):
    """The job ended early (system failure, timeout, cancel)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _variables(job: Mapping[str, Any]) -> dict[str, str]:
    return {str(v["key"]): str(v["value"]) for v in job.get("variables", [])}


def _stage_script(stage: str, job: Mapping[str, Any], project_dir: str) -> str:
    """The bash script of one sub-stage (an imitation of gitlab-runner's, see above)."""
    lines = ["#!/usr/bin/env bash", "set -eo pipefail", "set +o noclobber"]
    for key, value in _variables(job).items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"export CI_PROJECT_DIR={shlex.quote(project_dir)}")
    if stage == "prepare_script":
        lines.append('echo "Running on $(hostname)..."')
    elif stage == "get_sources" and _variables(job).get("GIT_STRATEGY") == "none":
        lines += ['echo "Skipping Git repository setup"', f"mkdir -p {shlex.quote(project_dir)}"]
    elif stage == "get_sources":
        repo = str(job["git_info"]["repo_url"])
        sha = str(job["git_info"]["sha"])
        lines += [
            'echo "Fetching changes..."',
            f"rm -rf {shlex.quote(project_dir)}",
            f"mkdir -p {shlex.quote(str(Path(project_dir).parent))}",
            f"git clone -q {shlex.quote(repo)} {shlex.quote(project_dir)}",
            f"cd {shlex.quote(project_dir)}",
            f"git checkout -f -q {shlex.quote(sha)}",
            f'echo "Checking out {sha[:8]} as detached HEAD..."',
        ]
    elif stage in ("step_script", "after_script"):
        name = "script" if stage == "step_script" else "after_script"
        step = next((s for s in job.get("steps", []) if s.get("name") == name), None)
        lines.append(f"cd {shlex.quote(project_dir)}")
        for line in (step or {}).get("script", []):
            lines.append(f"echo {shlex.quote('$ ' + str(line))}")
            lines.append(str(line))
    elif stage in ("restore_cache", "archive_cache", "archive_cache_on_failure"):
        if job.get("cache"):
            lines.append(
                "command -v gitlab-runner >/dev/null || "
                "{ echo 'gitlab-runner is not in PATH: skipping the cache'; exit 0; }"
            )
        else:
            lines.append("true  # no cache defined")
    elif stage in (
        "download_artifacts",
        "upload_artifacts_on_success",
        "upload_artifacts_on_failure",
    ):
        if job.get("artifacts") or (stage == "download_artifacts" and job.get("dependencies")):
            lines.append(
                "command -v gitlab-runner >/dev/null || "
                "{ echo 'gitlab-runner is not in PATH: skipping artifacts'; exit 0; }"
            )
        else:
            lines.append("true  # no artifacts defined")
    else:  # cleanup_file_variables: the stand-in writes no file variables
        lines.append("true")
    return "\n".join(lines) + "\n"


class _Runner:
    """One job's calls to the driver."""

    def __init__(
        self,
        job: Mapping[str, Any],
        settings: RunnerSettings,
        trace: Trace,
        work_dir: Path,
        *,
        cancel: threading.Event,
        retry_delay: float,
        build_failure: int,
        system_failure: int,
    ) -> None:
        self.job = job
        self.settings = settings
        self.trace = trace
        self.work = work_dir
        self.cancel = cancel
        self.retry_delay = retry_delay
        self.build_failure = build_failure
        self.system_failure = system_failure
        self.job_env: dict[str, str] = {}
        self.deadline = time.monotonic() + float(job.get("runner_info", {}).get("timeout", 3600))
        self.outcome = JobOutcome(state="success")
        self.exit_file = work_dir / "build-exit-code"
        self.response_file = work_dir / "job-response.json"
        self.response_file.write_text(json.dumps(job))
        project = str(job.get("job_info", {}).get("project_name", "project"))
        self.builds_dir = settings.builds_dir
        self.project_dir = f"{settings.builds_dir}/{project}"

    def env(self) -> dict[str, str]:
        custom = {f"CUSTOM_ENV_{k}": v for k, v in _variables(self.job).items()}
        for item in self.settings.environment:
            key, _, value = item.partition("=")
            custom[f"CUSTOM_ENV_{key}"] = value
        custom.update(
            {
                "CUSTOM_ENV_CI_BUILDS_DIR": self.builds_dir,
                "CUSTOM_ENV_CI_PROJECT_DIR": self.project_dir,
                "CUSTOM_ENV_CI_CONCURRENT_ID": "0",
                "CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID": "0",
                "CUSTOM_ENV_CI_JOB_TIMEOUT": str(
                    int(self.job.get("runner_info", {}).get("timeout", 3600))
                ),
            }
        )
        return {
            **os.environ,
            **custom,
            **self.job_env,
            "BUILD_FAILURE_EXIT_CODE": str(self.build_failure),
            "SYSTEM_FAILURE_EXIT_CODE": str(self.system_failure),
            "BUILD_EXIT_CODE_FILE": str(self.exit_file),
            "JOB_RESPONSE_FILE": str(self.response_file),
        }

    def call(
        self, argv: list[str], timeout: float, *, stdout_to_trace: bool = True
    ) -> tuple[int | None, bytes]:
        """Run one driver call in its own process group; (status or None if killed, stdout)."""
        proc = subprocess.Popen(
            argv,
            cwd=self.work,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        captured = bytearray()

        def pump(stream: Any, keep: bool) -> None:
            for chunk in iter(lambda: stream.read1(65536), b""):
                if keep:
                    captured.extend(chunk)
                else:
                    self.trace(chunk)

        readers = [
            threading.Thread(target=pump, args=(proc.stdout, not stdout_to_trace), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, False), daemon=True),
        ]
        for reader in readers:
            reader.start()
        end = min(time.monotonic() + timeout, self.deadline)
        status: int | None = None
        while True:
            try:
                status = proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= end or self.cancel.is_set():
                    self._terminate(proc)
                    status = None
                    break
        for reader in readers:
            reader.join(timeout=5)
        return status, bytes(captured)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the group, SIGKILL after the grace, abandon after the force timeout."""
        self.trace(b"\n[stand-in] deadline reached: terminating the driver's process group\n")
        for sig, wait in (
            (signal.SIGTERM, self.settings.graceful_kill_timeout),
            (signal.SIGKILL, self.settings.force_kill_timeout),
        ):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_reason(self) -> _Stop:
        if self.cancel.is_set():
            return _Stop("canceled", "the job was canceled")
        if time.monotonic() >= self.deadline:
            return _Stop("job_execution_timeout", "the job timed out")
        return _Stop("runner_system_failure", "a driver call was killed")

    def judge(self, stage: str, status: int | None) -> None:
        self.outcome.stages.append((stage, status))
        if status is None:
            raise self.stop_reason()
        if status == self.build_failure:
            return
        if status == self.system_failure:
            raise _Stop("runner_system_failure", f"{stage}: system failure")
        if status != 0:
            raise _Stop(
                "runner_system_failure",
                f"{stage}: unknown Custom executor executable exit code {status}",
            )

    def config(self) -> None:
        s = self.settings
        for _attempt in range(3):
            status, out = self.call(
                [s.config_exec, *s.config_args], s.config_exec_timeout, stdout_to_trace=False
            )
            self.judge("config", status)
            try:
                data = json.loads(out)
                if not isinstance(data, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.trace(b"[stand-in] config_exec printed invalid JSON; retrying\n")
                continue
            self.job_env = {str(k): str(v) for k, v in (data.get("job_env") or {}).items()}
            self.builds_dir = str(data.get("builds_dir") or self.builds_dir)
            project = str(self.job.get("job_info", {}).get("project_name", "project"))
            self.project_dir = f"{self.builds_dir}/{project}"
            driver = data.get("driver") or {}
            self.trace(
                f"Using Custom executor with driver {driver.get('name', '')} "
                f"{driver.get('version', '')}...\n".encode()
            )
            return
        raise _Stop("runner_system_failure", "config_exec printed no valid JSON three times")

    def prepare(self) -> None:
        s = self.settings
        for attempt in range(3):
            status, _ = self.call([s.prepare_exec, *s.prepare_args], s.prepare_exec_timeout)
            self.outcome.stages.append(("prepare", status))
            if status == 0:
                return
            if status != self.system_failure or attempt == 2:
                self.outcome.stages.pop()
                self.judge("prepare", status)
                if status == self.build_failure:
                    raise _Stop("script_failure", "prepare failed")
                raise _Stop("runner_system_failure", "prepare failed")
            time.sleep(self.retry_delay)

    def run_stage(self, stage: str) -> bool:
        """Run one sub-stage; False when it was a build failure."""
        s = self.settings
        script = self.work / f"script-{stage}"
        script.write_text(_stage_script(stage, self.job, self.project_dir))
        attempts = 1
        variables = _variables(self.job)
        key = {"get_sources": "GET_SOURCES_ATTEMPTS", "restore_cache": "RESTORE_CACHE_ATTEMPTS",
               "download_artifacts": "ARTIFACT_DOWNLOAD_ATTEMPTS"}.get(stage)  # fmt: skip
        if key and variables.get(key, "").isdigit():
            attempts = max(1, min(int(variables[key]), 10))
        for attempt in range(attempts):
            self.exit_file.unlink(missing_ok=True)
            status, _ = self.call([s.run_exec, *s.run_args, str(script), stage], 1e9)
            if status == self.system_failure and attempt + 1 < attempts:
                continue
            self.judge(stage, status)
            return status == 0
        return False

    def user_exit_code(self) -> int:
        try:
            return int(self.exit_file.read_text().strip())
        except (OSError, ValueError):
            return 1

    def cleanup(self) -> None:
        s = self.settings
        cancelled = self.cancel.is_set()
        self.cancel.clear()  # cleanup always runs, with its own deadline
        self.deadline = time.monotonic() + s.cleanup_exec_timeout
        status, _ = self.call(
            [s.cleanup_exec, *s.cleanup_args], s.cleanup_exec_timeout, stdout_to_trace=False
        )
        self.outcome.stages.append(("cleanup", status))
        if cancelled:
            self.cancel.set()


def run_custom_job(
    job: Mapping[str, Any],
    settings: RunnerSettings,
    *,
    trace: Trace,
    work_dir: Path,
    cancel: threading.Event | None = None,
    retry_delay: float = 3.0,
    build_failure: int = BUILD_FAILURE,
    system_failure: int = SYSTEM_FAILURE,
) -> JobOutcome:
    """Drive one job through the custom executor (see the module docstring)."""
    runner = _Runner(
        job,
        settings,
        trace,
        work_dir,
        cancel=cancel or threading.Event(),
        retry_delay=retry_delay,
        build_failure=build_failure,
        system_failure=system_failure,
    )
    outcome = runner.outcome
    try:
        runner.config()
        runner.prepare()
        build_ok = True
        for stage in ("prepare_script", "get_sources", "restore_cache", "download_artifacts"):
            if not runner.run_stage(stage):
                build_ok = False
                break
        if build_ok:
            build_ok = runner.run_stage("step_script")
        if not build_ok:
            outcome.state, outcome.exit_code = "failed", runner.user_exit_code()
            outcome.failure_reason = "script_failure"
        if any(s.get("name") == "after_script" for s in job.get("steps", [])):
            # Its failure does not change the job's result.
            runner.run_stage("after_script")
        runner.run_stage("archive_cache" if build_ok else "archive_cache_on_failure")
        runner.run_stage(
            "upload_artifacts_on_success" if build_ok else "upload_artifacts_on_failure"
        )
        runner.run_stage("cleanup_file_variables")
    except _Stop as stop:
        outcome.state, outcome.failure_reason = "failed", stop.reason
        trace(f"\n[stand-in] ERROR: {stop}\n".encode())
    finally:
        runner.cleanup()
        runner.response_file.unlink(missing_ok=True)
    return outcome


class StandInManager:
    """The runner side of GitLab's API around :func:`run_custom_job` (a stand-in)."""

    def __init__(
        self,
        url: str,
        token: str,
        settings: RunnerSettings,
        *,
        system_id: str = "s_standin0000",
        retry_delay: float = 0.1,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.settings = settings
        self.system_id = system_id
        self.retry_delay = retry_delay
        self._http = httpx.Client(base_url=f"{self.url}/api/v4", timeout=30, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StandInManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_job(self, timeout: float) -> dict[str, Any] | None:
        """Poll ``POST /jobs/request`` until a job comes or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last_update = ""
        while time.monotonic() < deadline:
            response = self._http.post(
                "/jobs/request",
                json={
                    "token": self.token,
                    "system_id": self.system_id,
                    "last_update": last_update,
                    "info": {
                        "name": "stand-in",
                        "version": "stand-in",
                        "executor": "custom",
                        "shell": "bash",
                        "features": {"trace_checksum": True},
                    },
                },
            )
            if response.status_code == 201:
                job: dict[str, Any] = response.json()
                return job
            if response.status_code != 204:
                raise RuntimeError(f"jobs/request answered {response.status_code}")
            last_update = response.headers.get("x-gitlab-last-update", last_update)
            time.sleep(0.1)
        return None

    def run_once(self, work_dir: Path, *, timeout: float = 30) -> JobOutcome | None:
        """Take one job, run it, report it; None when no job came within ``timeout``."""
        job = self.request_job(timeout)
        if job is None:
            return None
        job_id, job_token = int(job["id"]), str(job["token"])
        masked = [str(v["value"]) for v in job.get("variables", []) if v.get("masked")]
        trace = bytearray()
        sent = 0
        cancel = threading.Event()
        lock = threading.Lock()
        self._http.put(f"/jobs/{job_id}", json={"token": job_token, "state": "running"})

        def mask(data: bytes) -> bytes:
            for value in masked:
                if len(value) >= 8:
                    data = data.replace(value.encode(), b"[MASKED]")
            return data

        def flush() -> None:
            nonlocal sent
            with lock:
                if sent >= len(trace):
                    return
                chunk = bytes(trace[sent:])
                response = self._http.patch(
                    f"/jobs/{job_id}/trace",
                    content=chunk,
                    headers={
                        "JOB-TOKEN": job_token,
                        "Content-Range": f"{sent}-{sent + len(chunk) - 1}",
                        "Content-Type": "text/plain",
                    },
                )
                if response.status_code == 416:
                    # GitLab says where its copy ends: resend from there.
                    sent = int(response.headers.get("range", "0-0").split("-")[1])
                    return
                if response.status_code == 202:
                    sent += len(chunk)
                    if response.headers.get("job-status") == "canceled":
                        cancel.set()

        def write(data: bytes) -> None:
            with lock:
                trace.extend(mask(data))

        stop = threading.Event()

        def pusher() -> None:
            while not stop.wait(0.2):
                flush()

        thread = threading.Thread(target=pusher, daemon=True)
        thread.start()
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            outcome = run_custom_job(
                job,
                self.settings,
                trace=write,
                work_dir=Path(tmp),
                cancel=cancel,
                retry_delay=self.retry_delay,
            )
        stop.set()
        thread.join()
        for _ in range(5):
            flush()
            if sent >= len(trace):
                break
        checksum = f"crc32:{zlib.crc32(bytes(trace)) & 0xFFFFFFFF:08x}"
        body: dict[str, Any] = {
            "token": job_token,
            "state": outcome.state,
            "checksum": checksum,
            "output": {"checksum": checksum, "bytesize": len(trace)},
        }
        if outcome.exit_code is not None:
            body["exit_code"] = outcome.exit_code
        if outcome.failure_reason:
            body["failure_reason"] = outcome.failure_reason
        for _ in range(3):
            response = self._http.put(f"/jobs/{job_id}", json=body)
            if response.status_code != 412:
                break
            sent = 0  # GitLab's copy differs: send it all again
            flush()
        return outcome
