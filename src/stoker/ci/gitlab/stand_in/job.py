"""One job driven through a custom executor driver as gitlab-runner does (stand-in)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from .contract import (
    AFTER_SCRIPT_TIMEOUT,
    ATTEMPT_VARIABLES,
    BUILD_FAILURE_EXIT_CODE,
    MASK,
    PREPARATION_ATTEMPTS,
    PREPARATION_RETRY_INTERVAL,
    SYSTEM_FAILURE_EXIT_CODE,
    JobError,
    JobOutcome,
    RunnerSettings,
    StopJob,
    Trace,
    build_error,
    system_error,
)
from .scripts import job_variables, project_slug, short_token, stage_script


class _TraceWriter:
    """Masks phrases (also across writes) and bounds the total, then hands bytes on."""

    def __init__(self, sink: Trace, phrases: Sequence[str], limit: int) -> None:
        self._sink = sink
        self._phrases = sorted({p.encode() for p in phrases if p}, key=len, reverse=True)
        self._keep = max((len(p) for p in self._phrases), default=1) - 1
        self._pending = b""
        self._limit = limit
        self._written = 0
        self._full = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            text = self._pending + data
            for phrase in self._phrases:
                text = text.replace(phrase, MASK)
            # Hold back the longest tail that could begin a phrase split across writes.
            cut = len(text)
            for i in range(max(0, len(text) - self._keep), len(text)):
                if any(p.startswith(text[i:]) for p in self._phrases):
                    cut = i
                    break
            self._pending = text[cut:]
            self._emit(text[:cut])

    def flush(self) -> None:
        with self._lock:
            text, self._pending = self._pending, b""
            for phrase in self._phrases:
                text = text.replace(phrase, MASK)
            self._emit(text)

    def _emit(self, data: bytes) -> None:
        if not data or self._full:
            return
        room = self._limit - self._written
        if len(data) > room:
            data = (
                data[:room]
                + (
                    f"\nJob's log exceeded limit of {self._limit} bytes.\n"
                    "Job execution will continue but no more output will be collected.\n"
                ).encode()
            )
            self._full = True
        self._written += len(data)
        self._sink(data)


# ---------------------------------------------------------------------- scripts


@dataclass
class _CallResult:
    status: int | None  # None: killed (or given up on) at a deadline
    stdout: bytes
    why: Literal["stage", "job", "cancel"] | None = None


class _Job:
    """One job's calls to the driver (the state of :func:`run_custom_job`)."""

    def __init__(
        self,
        job: Mapping[str, Any],
        runner: RunnerSettings,
        trace: _TraceWriter,
        work_dir: Path,
        *,
        cancel: threading.Event,
        retry_delay: float,
        build_failure: int,
        system_failure: int,
    ) -> None:
        self.job = job
        self.runner = runner
        self.trace = trace
        self.work_dir = work_dir
        self.cancel = cancel
        self.retry_delay = retry_delay
        self.build_failure = build_failure
        self.system_failure = system_failure
        timeout = float((job.get("runner_info") or {}).get("timeout") or 3600)
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.outcome = JobOutcome(state="success")
        self.tmp: Path | None = None
        self.job_env: dict[str, str] = {}
        self.builds_dir = runner.builds_dir
        self.cache_dir = runner.cache_dir
        self.shared = False
        self.status = "running"

    # -- paths and environment

    @property
    def project_dir(self) -> str:
        slug = project_slug(self.job)
        if self.shared:
            slug = f"{short_token(self.runner.token)}/0/{slug}"
        return f"{self.builds_dir.rstrip('/')}/{slug}"

    def predefined(self) -> dict[str, str]:
        """The variables gitlab-runner adds to the job's (``GetDefaultVariables``)."""
        values = {str(v["key"]) for v in job_variables(self.job, self.runner)}
        out = {
            "CI_BUILDS_DIR": self.builds_dir,
            "CI_PROJECT_DIR": self.project_dir,
            "CI_CONCURRENT_ID": "0",
            "CI_CONCURRENT_PROJECT_ID": "0",
            "CI_SERVER": "yes",
            "CI_JOB_STATUS": self.status,
            "CI_JOB_TIMEOUT": str(int(self.timeout)),
            "CI_RUNNER_VERSION": "stand-in",
            "CI_RUNNER_REVISION": "stand-in",
            "CI_RUNNER_EXECUTABLE_ARCH": f"linux/{os.uname().machine}",
            "CI_DISPOSABLE_ENVIRONMENT": "true",
        }
        if self.runner.token:
            out["CI_RUNNER_SHORT_TOKEN"] = short_token(self.runner.token)
        if self.runner.runner_id is not None and "CI_RUNNER_ID" not in values:
            out["CI_RUNNER_ID"] = str(self.runner.runner_id)
        return out

    def env(self) -> dict[str, str]:
        assert self.tmp is not None
        env = dict(os.environ)
        env.update(
            {
                "TMPDIR": str(self.tmp),
                "BUILD_FAILURE_EXIT_CODE": str(self.build_failure),
                "SYSTEM_FAILURE_EXIT_CODE": str(self.system_failure),
                "BUILD_EXIT_CODE_FILE": str(self.tmp / "build_exit_code"),
                "JOB_RESPONSE_FILE": str(self.tmp / "response.json"),
            }
        )
        env.update(self.job_env)  # first, so that CI/CD variables win (as gitlab-runner)
        for v in job_variables(self.job, self.runner):
            env[f"CUSTOM_ENV_{v['key']}"] = str(v.get("value", ""))
        services = [
            {
                "name": s.get("name", ""),
                "alias": str(s.get("alias") or "").split(",")[0],
                "entrypoint": s.get("entrypoint"),
                "command": s.get("command"),
            }
            for s in self.job.get("services") or []
            if isinstance(s, Mapping)
        ]
        env["CUSTOM_ENV_CI_JOB_SERVICES"] = json.dumps(services) if services else ""
        for key, value in self.predefined().items():
            env[f"CUSTOM_ENV_{key}"] = value
        return env

    # -- running one call

    def call(self, stage: str, argv: list[str], timeout: float, *, capture: bool) -> _CallResult:
        """Run one driver call in its own process group; stdout captured or traced."""
        assert self.tmp is not None
        use_job = stage != "cleanup"
        stage_end = time.monotonic() + timeout
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.tmp,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self.trace.write(f"ERROR: failed to start command: {exc}\n".encode())
            self.outcome.stages.append((stage, None))
            raise system_error(f"{stage}: failed to start command: {exc}") from None
        captured = bytearray()

        def pump(stream: IO[bytes], keep: bool) -> None:
            for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                if keep:
                    captured.extend(chunk)
                else:
                    self.trace.write(chunk)

        readers = [
            threading.Thread(target=pump, args=(proc.stdout, capture), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, False), daemon=True),
        ]
        for reader in readers:
            reader.start()

        def done() -> bool:
            return proc.poll() is not None and not any(r.is_alive() for r in readers)

        why: Literal["stage", "job", "cancel"] | None = None
        while not done():
            now = time.monotonic()
            if use_job and self.cancel.is_set():
                why = "cancel"
            elif use_job and now >= self.deadline:
                why = "job"
            elif now >= stage_end:
                why = "stage"
            if why is not None:
                self._terminate(proc, done)
                break
            time.sleep(0.02)
        for reader in readers:
            reader.join(timeout=1)
        status = proc.returncode if why is None else None
        if status is not None and status < 0:
            status = -1  # Go's ExitCode() of a process ended by a signal
        self.outcome.stages.append((stage, status))
        return _CallResult(status, bytes(captured), why)

    def _terminate(self, proc: subprocess.Popen[bytes], done: Callable[[], bool]) -> None:
        """SIGTERM to the group; SIGKILL after the grace; give up after the force timeout."""
        self.trace.write(b"\nWARNING: terminating the driver's process group (SIGTERM)\n")
        for sig, wait in (
            (signal.SIGTERM, self.runner.graceful_kill_timeout),
            (signal.SIGKILL, self.runner.force_kill_timeout),
        ):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if done():
                    return
                time.sleep(0.02)
            if sig == signal.SIGTERM:
                self.trace.write(b"WARNING: still running: SIGKILL to the process group\n")
        self.trace.write(b"WARNING: failed to kill process, likely process is dormant\n")

    def judge(self, stage: str, result: _CallResult) -> None:
        """gitlab-runner's reading of an exit status: raise unless it was 0."""
        if result.why == "cancel":
            raise StopJob("canceled", "canceled")
        if result.why == "job":
            raise StopJob(
                "job_execution_timeout", f"execution took longer than {self.timeout:g} seconds"
            )
        if result.why == "stage":
            raise system_error(f"{stage}: timed out (the process group was killed)")
        status = result.status
        if status == 0:
            return
        if status == self.build_failure:
            assert self.tmp is not None
            try:
                first = (self.tmp / "build_exit_code").read_text().splitlines()[:1]
            except OSError:
                raise build_error(1, f"exit status {status}") from None
            try:
                code = int(first[0].strip()) if first else int("")
            except ValueError:
                raise system_error(
                    f"unknown Custom executor executable exit code {self.system_failure}"
                ) from None
            raise build_error(code, f"exit status {code}")
        if status == self.system_failure:
            raise system_error(f"{stage}: exit status {status} (system failure)")
        raise system_error(f"unknown Custom executor executable exit code {status}")

    # -- the phases

    def new_attempt(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="custom-executor", dir=self.work_dir))
        (self.tmp / "response.json").write_text(json.dumps(self.job) + "\n")
        self.job_env = {}
        self.builds_dir, self.cache_dir, self.shared = (
            self.runner.builds_dir,
            self.runner.cache_dir,
            False,
        )

    def end_attempt(self) -> None:
        """``cleanup_exec`` (always; its result is only logged), then the directory goes."""
        r = self.runner
        try:
            if r.cleanup_exec:
                result = self.call(
                    "cleanup", [r.cleanup_exec, *r.cleanup_args], r.cleanup_exec_timeout,
                    capture=True,
                )  # fmt: skip
                if result.status != 0:
                    self.trace.write(
                        f"WARNING: Cleanup script failed: exit status {result.status}\n".encode()
                    )
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    def config(self) -> None:
        r = self.runner
        if r.config_exec:
            result = self.call(
                "config", [r.config_exec, *r.config_args], r.config_exec_timeout, capture=True
            )
            self.judge("config", result)
            if result.stdout.strip():
                try:
                    data = json.loads(result.stdout)
                    if not isinstance(data, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    raise system_error(f"error while parsing JSON output: {exc}") from None
                self.apply_config(data)
                return
        self.trace.write(b"Using Custom executor...\n")

    def apply_config(self, data: Mapping[str, Any]) -> None:
        if isinstance(data.get("builds_dir"), str) and data["builds_dir"]:
            self.builds_dir = data["builds_dir"]
        if isinstance(data.get("cache_dir"), str) and data["cache_dir"]:
            self.cache_dir = data["cache_dir"]
        if isinstance(data.get("builds_dir_is_shared"), bool):
            self.shared = data["builds_dir_is_shared"]
        if isinstance(data.get("job_env"), Mapping):
            self.job_env = {str(k): str(v) for k, v in data["job_env"].items()}
        driver = data.get("driver")
        line = "Using Custom executor..."
        if isinstance(driver, Mapping) and driver.get("name") is not None:
            line = f"Using Custom executor with driver {driver['name']}..."
            if driver.get("version") is not None:
                line = f"Using Custom executor with driver {driver['name']} {driver['version']}..."
        self.trace.write(line.encode() + b"\n")

    def prepare(self) -> None:
        """Config and prepare, retried like gitlab-runner's ``retryCreateExecutor``."""
        self.trace.write(b'Preparing the "custom" executor\n')
        error: JobError | None = None
        for attempt in range(PREPARATION_ATTEMPTS):
            self.new_attempt()
            try:
                self.config()
                r = self.runner
                if r.prepare_exec:
                    result = self.call(
                        "prepare", [r.prepare_exec, *r.prepare_args], r.prepare_exec_timeout,
                        capture=False,
                    )  # fmt: skip
                    self.judge("prepare", result)
                return
            except JobError as exc:
                error = exc
                self.end_attempt()
                if exc.reason == "script_failure":
                    raise
            except StopJob:
                self.end_attempt()
                raise
            self.trace.write(f"ERROR: Preparation failed: {error}\n".encode())
            if attempt + 1 < PREPARATION_ATTEMPTS:
                self.trace.write(f"Will be retried in {self.retry_delay:g}s ...\n".encode())
                if self.cancel.wait(self.retry_delay):
                    raise StopJob("canceled", "canceled")
                if time.monotonic() >= self.deadline:
                    raise StopJob("job_execution_timeout", "the job timed out while preparing")
        assert error is not None
        raise error

    def run_stage(self, stage: str, attempts: int = 1) -> None:
        """``run_exec RUN_ARGS... SCRIPT STAGE``, up to ``attempts`` times; raises on failure."""
        assert self.tmp is not None
        r = self.runner
        error: JobError | None = None
        for _ in range(attempts):
            script_dir = Path(tempfile.mkdtemp(prefix="script", dir=self.tmp))
            script = script_dir / "script.sh"
            script.write_text(
                stage_script(
                    stage,
                    self.job,
                    r,
                    builds_dir=self.builds_dir,
                    project_dir=self.project_dir,
                    extra=self.predefined(),
                )
            )
            script.chmod(0o700)
            self.trace.write(f"\n[stand-in] stage {stage}\n".encode())
            result = self.call(
                stage, [r.run_exec, *r.run_args, str(script), stage], 1e9, capture=False
            )
            try:
                self.judge(stage, result)
                return
            except JobError as exc:
                error = exc
        assert error is not None
        raise error

    def attempts(self, stage: str) -> int:
        key = ATTEMPT_VARIABLES.get(stage)
        values = {
            str(v["key"]): str(v.get("value", "")) for v in job_variables(self.job, self.runner)
        }
        raw = values.get(key or "", "").strip()
        if not raw:
            return 1
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if not 1 <= count <= 10:
            raise system_error(f"number of attempts out of the range [1, 10] for stage: {stage}")
        return count

    def run(self) -> JobError | None:
        """The run stages in ``common/build.go``'s order; the job's error (None: success)."""
        try:
            self.run_stage("prepare_script")
        except JobError as exc:
            return JobError(exc.reason, f"prepare environment: {exc}", exc.exit_code)
        err: JobError | None = None
        for stage in ("get_sources", "restore_cache", "download_artifacts"):
            try:
                self.run_stage(stage, self.attempts(stage))
            except JobError as exc:
                err = exc
                break
        if err is None:
            for step in self.job.get("steps") or []:
                if step.get("name") == "after_script":
                    continue
                try:
                    self.run_stage(f"step_{str(step.get('name', 'script')).lower()}")
                except JobError as exc:
                    err = exc
                    break
            self.status = "success" if err is None else "failed"
            if any(s.get("name") == "after_script" for s in self.job.get("steps") or []):
                saved = self.deadline
                self.deadline = min(saved, time.monotonic() + AFTER_SCRIPT_TIMEOUT)
                try:
                    self.run_stage("after_script")
                except JobError as exc:
                    self.trace.write(f"WARNING: after_script failed: {exc}\n".encode())
                except StopJob:
                    if saved <= time.monotonic() or self.cancel.is_set():
                        raise
                    self.trace.write(b"WARNING: after_script timed out\n")
                finally:
                    self.deadline = saved
        late: list[JobError] = []
        for ok_stage, failed_stage in (
            ("archive_cache", "archive_cache_on_failure"),
            ("upload_artifacts_on_success", "upload_artifacts_on_failure"),
        ):
            try:
                self.run_stage(ok_stage if err is None else failed_stage)
            except JobError as exc:
                late.append(exc)
        try:
            self.run_stage("cleanup_file_variables")
        except JobError as exc:
            self.trace.write(f"WARNING: Error while removing file variables: {exc}\n".encode())
        return err or (late[0] if late else None)


def run_custom_job(
    job: Mapping[str, Any],
    runner: RunnerSettings,
    *,
    trace: Trace,
    work_dir: Path,
    cancel: threading.Event | None = None,
    retry_delay: float = PREPARATION_RETRY_INTERVAL,
    build_failure_exit_code: int = BUILD_FAILURE_EXIT_CODE,
    system_failure_exit_code: int = SYSTEM_FAILURE_EXIT_CODE,
) -> JobOutcome:
    """Drive one job (GitLab's JobResponse JSON) through ``runner``'s custom executor driver.

    The driver's output goes to ``trace`` as it comes, masked and bounded (see
    the module docstring for everything else).  ``work_dir`` holds the
    temporary directories (one per preparation attempt, removed at the end).
    Setting ``cancel`` cancels the job.  ``retry_delay`` is the pause between
    preparation attempts (3 s in gitlab-runner; tests make it short); the two
    exit codes the driver is told to use can be chosen, they must differ and
    not be 0.  Never raises for anything the driver does.
    """
    if len({0, build_failure_exit_code, system_failure_exit_code}) != 3:
        raise ValueError("the build and system failure exit codes must differ, and not be 0")
    masked = [str(v.get("value", "")) for v in job_variables(job, runner) if v.get("masked")]
    writer = _TraceWriter(trace, masked, max(runner.output_limit, 1) * 1024)
    state = _Job(
        job,
        runner,
        writer,
        Path(work_dir),
        cancel=cancel or threading.Event(),
        retry_delay=retry_delay,
        build_failure=build_failure_exit_code,
        system_failure=system_failure_exit_code,
    )
    outcome = state.outcome
    writer.write(
        b"Running with the gitlab-runner stand-in (stoker's tests; this is not GitLab Runner)\n"
    )
    error: JobError | StopJob | None = None
    try:
        state.prepare()
        try:
            error = state.run()
        finally:
            state.end_attempt()
    except (JobError, StopJob) as exc:
        error = exc
    if error is not None:
        outcome.state = "failed"
        outcome.failure_reason = error.reason
        outcome.message = str(error)
        if isinstance(error, JobError) and error.reason == "script_failure":
            outcome.exit_code = error.exit_code
        system = " (system failure)" if error.reason == "runner_system_failure" else ""
        writer.write(f"\nERROR: Job failed{system}: {error}\n".encode())
    else:
        writer.write(b"\nJob succeeded\n")
    writer.flush()
    return outcome
