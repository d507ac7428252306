"""The custom executor contract as gitlab-runner applies it (stand-in, tests only).

Exit codes, stage order, the runner's settings and a job's outcome.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

#: gitlab-runner's ``BUILD_FAILURE_EXIT_CODE`` (``executors/custom/command``: fixed, 1).
BUILD_FAILURE_EXIT_CODE: Final = 1
#: gitlab-runner's ``SYSTEM_FAILURE_EXIT_CODE`` (fixed, 2).
SYSTEM_FAILURE_EXIT_CODE: Final = 2
#: Older names of the two codes.
BUILD_FAILURE: Final = BUILD_FAILURE_EXIT_CODE
SYSTEM_FAILURE: Final = SYSTEM_FAILURE_EXIT_CODE
#: gitlab-runner's ``PreparationRetries`` and ``PreparationRetryInterval``.
PREPARATION_ATTEMPTS: Final = 3
PREPARATION_RETRY_INTERVAL: Final = 3.0
#: gitlab-runner's ``AfterScriptTimeout`` (5 minutes).
AFTER_SCRIPT_TIMEOUT: Final = 300.0
#: The sub-stages of ``run_exec``, in order (``step_script`` is the job's ``script``).
RUN_STAGES: Final = (
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
#: The stages retried on a system failure, with the variable giving their attempts.
ATTEMPT_VARIABLES: Final = {
    "get_sources": "GET_SOURCES_ATTEMPTS",
    "restore_cache": "RESTORE_CACHE_ATTEMPTS",
    "download_artifacts": "ARTIFACT_DOWNLOAD_ATTEMPTS",
}
MASK: Final = b"[MASKED]"

Trace = Callable[[bytes], None]
FailureReason = Literal[
    "script_failure", "runner_system_failure", "job_execution_timeout", "canceled"
]


@dataclass(frozen=True)
class RunnerSettings:
    """One ``[[runners]]`` entry of gitlab-runner's ``config.toml`` with the custom executor.

    The ``[runners.custom]`` keys are flattened (``config_exec``, ``run_args``, ...);
    timeouts are in seconds (gitlab-runner's defaults: 3600 for the stages, 600
    for the kill timeouts).  ``environment`` holds ``KEY=VALUE`` strings, added to
    every job's variables as gitlab-runner does.  ``output_limit`` bounds the
    trace, in KiB.  The job's own timeout comes from ``runner_info.timeout``.
    """

    url: str
    builds_dir: str
    cache_dir: str
    run_exec: str
    config_exec: str = ""
    prepare_exec: str = ""
    cleanup_exec: str = ""
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
    name: str = ""
    token: str = ""
    runner_id: int | None = None
    output_limit: int = 4096

    @classmethod
    def from_config_toml(cls, path: Path, name: str) -> RunnerSettings:
        """The ``[[runners]]`` entry called ``name`` in gitlab-runner's ``config.toml`` at ``path``.

        Raises ``KeyError`` when there is no such entry, ``ValueError`` when it
        does not use the custom executor or lacks ``run_exec``.
        """
        data = tomllib.loads(Path(path).read_text())
        for entry in data.get("runners", []):
            if entry.get("name") != name:
                continue
            if entry.get("executor", "custom") != "custom":
                raise ValueError(f"runner {name!r} uses executor {entry.get('executor')!r}")
            custom = dict(entry.get("custom") or {})
            if not custom.get("run_exec"):
                raise ValueError(f"runner {name!r} has no [runners.custom] run_exec")
            keys: dict[str, Any] = {}
            for key in ("config_exec", "prepare_exec", "run_exec", "cleanup_exec"):
                if key in custom:
                    keys[key] = str(custom[key])
            for key in ("config_args", "prepare_args", "run_args", "cleanup_args"):
                if key in custom:
                    keys[key] = tuple(str(a) for a in custom[key])
            for key in (
                "config_exec_timeout",
                "prepare_exec_timeout",
                "cleanup_exec_timeout",
                "graceful_kill_timeout",
                "force_kill_timeout",
            ):
                if key in custom:
                    keys[key] = float(custom[key])
            if "output_limit" in entry:
                keys["output_limit"] = int(entry["output_limit"])
            if "id" in entry:
                keys["runner_id"] = int(entry["id"])
            return cls(
                url=str(entry["url"]),
                builds_dir=str(entry["builds_dir"]),
                cache_dir=str(entry["cache_dir"]),
                environment=tuple(str(e) for e in entry.get("environment", ())),
                shell=str(entry.get("shell", "bash")),
                name=name,
                token=str(entry.get("token", "")),
                **keys,
            )
        raise KeyError(f"no [[runners]] entry named {name!r} in {path}")


@dataclass
class JobOutcome:
    """How the stand-in ended a job.

    ``state`` is what it reports to GitLab; ``exit_code`` is the user's exit
    status after a build failure (else None); ``failure_reason`` is GitLab's
    (``script_failure``, ``runner_system_failure``, ``job_execution_timeout``,
    ``canceled``); ``stages`` lists every driver call in order as (``config``,
    ``prepare``, a ``run_exec`` sub-stage or ``cleanup``; its exit status, None
    when it was killed or given up on); ``message`` says why a job failed.
    """

    state: Literal["success", "failed"]
    exit_code: int | None = None
    failure_reason: FailureReason | None = None
    stages: list[tuple[str, int | None]] = field(default_factory=list)
    message: str | None = None


# ---------------------------------------------------------------------- errors


class JobError(Exception):
    """A failed stage, as gitlab-runner's errors: a build error or a system failure."""

    def __init__(self, reason: FailureReason, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.reason: FailureReason = reason
        self.exit_code = exit_code


def build_error(exit_code: int, message: str) -> JobError:
    return JobError("script_failure", message, exit_code)


def system_error(message: str) -> JobError:
    return JobError("runner_system_failure", message)


class StopJob(Exception):
    """The job's deadline passed or it was canceled: nothing more runs but cleanup."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason: FailureReason = reason
