"""A **stand-in** for gitlab-runner's custom executor, for tests: it follows
``docs/executors/custom.md``, it is not GitLab Runner.

The real ``gitlab-runner`` cannot be installed where stoker is developed.  To
exercise stoker's driver (``stoker gitlab-executor config|prepare|run|cleanup``)
the way gitlab-runner would, this package drives a custom executor driver as
GitLab Runner's documentation (``docs/executors/custom.md``) and source
(``executors/custom/``, ``common/build.go``) describe it:

* every attempt at preparing the job gets a temporary directory, the working
  directory (and ``TMPDIR``) of every call; in it ``JOB_RESPONSE_FILE`` (the
  job's JSON) and ``BUILD_EXIT_CODE_FILE``; both go with the directory at the end;
* every call gets the host's environment, ``BUILD_FAILURE_EXIT_CODE`` and
  ``SYSTEM_FAILURE_EXIT_CODE`` (1 and 2, gitlab-runner's fixed values, or what
  the caller chooses), the ``job_env`` of ``config_exec`` and every job variable
  (plus the runner's predefined ones: ``CI_BUILDS_DIR``, ``CI_PROJECT_DIR``,
  ``CI_CONCURRENT_ID``, ...) as ``CUSTOM_ENV_<KEY>``;
* preparing is ``config_exec`` (one JSON object on standard output) then
  ``prepare_exec``; a failed attempt that is not a build failure is cleaned up
  (``cleanup_exec``) and retried, 3 attempts, ``retry_delay`` (3 s) apart, as
  gitlab-runner's ``retryCreateExecutor`` does: that is both the documented
  "invalid JSON is retried two more times" and "prepare_exec: 3 attempts";
* then ``run_exec RUN_ARGS... SCRIPT STAGE`` for each sub-stage, in
  ``common/build.go``'s order: ``prepare_script``, ``get_sources``,
  ``restore_cache`` and ``download_artifacts`` (with ``GET_SOURCES_ATTEMPTS``,
  ``RESTORE_CACHE_ATTEMPTS`` and ``ARTIFACT_DOWNLOAD_ATTEMPTS``), ``step_script``
  (the job's ``script``), ``after_script`` (when the job has one, whatever the
  script's result; its own result is ignored), ``archive_cache`` or
  ``archive_cache_on_failure``, ``upload_artifacts_on_success`` or
  ``upload_artifacts_on_failure``, ``cleanup_file_variables``.  A failed
  ``prepare_script`` ends the run stages at once, and a failure before the
  script skips the script and ``after_script``, as in gitlab-runner;
* ``cleanup_exec`` always runs at the end, whatever happened before (its
  result never changes the job's);
* exit statuses: 0 goes on; ``BUILD_FAILURE_EXIT_CODE`` is a build failure
  (``script_failure``, the status from the first line of
  ``BUILD_EXIT_CODE_FILE``, 1 without the file); ``SYSTEM_FAILURE_EXIT_CODE``
  a system failure (``runner_system_failure``); anything else (and a driver
  killed by a signal, -1) "unknown Custom executor executable exit code N", a
  system failure too;
* each call runs in its own process group, its output streamed to the trace
  as it comes; on a deadline (the stage's ``*_exec_timeout``, the job's
  ``runner_info.timeout`` or a cancel) the group gets SIGTERM,
  ``graceful_kill_timeout`` later SIGKILL, ``force_kill_timeout`` later the
  stand-in gives up on it.  A job timeout fails the job with
  ``job_execution_timeout``, a cancel with ``canceled``; the stages left are
  not started (gitlab-runner starts them with an expired context instead);
* the trace has the job's masked variables replaced by ``[MASKED]`` and is
  bounded by ``output_limit`` (KiB, 4096 like gitlab-runner).

The scripts given to ``run_exec`` (:mod:`.scripts`) are a small, honest
imitation of what gitlab-runner's bash shell writes (``set -eo pipefail``, the
job's variables exported, file variables written beside the project directory,
the stage's work in ``: | eval '...'``), not gitlab-runner's own:
``get_sources`` runs ``git init``/``git fetch``/``git checkout -f -q
$CI_COMMIT_SHA`` without ``--depth`` (FakeGitLab serves git's dumb HTTP
protocol, which cannot do shallow fetches), and the cache and artifact stages
only call ``gitlab-runner`` helper commands when the job defines caches or
artifacts *and* ``gitlab-runner`` is in ``PATH``.

:class:`StandInRunnerManager` (:mod:`.manager`) adds the runner's side of
GitLab's API around :func:`run_custom_job` (:mod:`.job`): ``POST
/api/v4/jobs/request``, ``PUT /api/v4/jobs/:id`` (running, then the result
with the trace's CRC32) and ``PATCH /api/v4/jobs/:id/trace`` with
``Content-Range``.  Never use any of it outside tests and ``bench/``.
"""

from .contract import (
    AFTER_SCRIPT_TIMEOUT,
    BUILD_FAILURE,
    BUILD_FAILURE_EXIT_CODE,
    PREPARATION_ATTEMPTS,
    PREPARATION_RETRY_INTERVAL,
    RUN_STAGES,
    SYSTEM_FAILURE,
    SYSTEM_FAILURE_EXIT_CODE,
    FailureReason,
    JobOutcome,
    RunnerSettings,
)
from .job import run_custom_job
from .manager import StandInManager, StandInRunnerManager
from .scripts import stage_script

__all__ = [
    "AFTER_SCRIPT_TIMEOUT",
    "BUILD_FAILURE",
    "BUILD_FAILURE_EXIT_CODE",
    "PREPARATION_ATTEMPTS",
    "PREPARATION_RETRY_INTERVAL",
    "RUN_STAGES",
    "SYSTEM_FAILURE",
    "SYSTEM_FAILURE_EXIT_CODE",
    "FailureReason",
    "JobOutcome",
    "RunnerSettings",
    "StandInManager",
    "StandInRunnerManager",
    "run_custom_job",
    "stage_script",
]
