"""The stand-in gitlab-runner follows the custom executor contract (drivers made by the test).

The drivers are small bash scripts in the test's directory ("local shell"
drivers): they record what they were called with, so the order of stages,
their arguments and environment, the exit-code handling, the retries and the
termination of process groups can be checked.  Every process a test starts
carries a mark in its environment; none may be left when the test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stoker.ci.gitlab.stand_in import (
    BUILD_FAILURE_EXIT_CODE,
    SYSTEM_FAILURE_EXIT_CODE,
    JobOutcome,
    RunnerSettings,
    StandInRunnerManager,
    run_custom_job,
)

DRIVER = r"""#!/usr/bin/env bash
# A local-shell custom executor driver written by the test.
stage="$1"; shift
log="$LOG"
echo "$stage $*" >> "$log"
{
  echo "--- $stage ${2:-}"
  echo "cwd=$PWD tmpdir=$TMPDIR"
  echo "job_id=$CUSTOM_ENV_CI_JOB_ID project_dir=$CUSTOM_ENV_CI_PROJECT_DIR"
  echo "builds_dir=$CUSTOM_ENV_CI_BUILDS_DIR concurrent=$CUSTOM_ENV_CI_CONCURRENT_ID"
  echo "from_runner_env=$CUSTOM_ENV_FROM_RUNNER from_config=${FROM_CONFIG:-unset}"
  echo "response=$(head -c 9 "$JOB_RESPONSE_FILE")"
  echo "codes=$BUILD_FAILURE_EXIT_CODE/$SYSTEM_FAILURE_EXIT_CODE"
} >> "$MARKS/env.log"
count() {
    n=$(( $(cat "$MARKS/n-$1" 2>/dev/null || echo 0) + 1 )); echo $n > "$MARKS/n-$1"; echo $n
}
case "$stage" in
config)
    echo "config says hello on stderr" >&2
    n=$(count config)
    if [ -e "$MARKS/bad-config" ] && [ "$n" -le "$(cat "$MARKS/bad-config")" ]; then
        echo "not json"; exit 0
    fi
    printf '{"builds_dir": "%s/builds", "driver": {"name": "test", "version": "1"}, ' "$MARKS"
    printf '"job_env": {"FROM_CONFIG": "yes"}}\n'
    ;;
prepare)
    if [ -e "$MARKS/prepare-fails" ]; then exit "$SYSTEM_FAILURE_EXIT_CODE"; fi
    ;;
run)
    script="$1"; name="$2"
    if [ -e "$MARKS/unknown-$name" ]; then exit 77; fi
    fails="$MARKS/sysfail-$name"
    if [ -e "$fails" ] && [ "$(count "$name")" -le "$(cat "$fails")" ]; then
        exit "$SYSTEM_FAILURE_EXIT_CODE"
    fi
    if [ -e "$MARKS/hang-$name" ]; then
        echo $$ > "$MARKS/driver.pid"
        trap 'echo TERM >> "$MARKS/signals"' TERM     # notes SIGTERM, keeps running
        ( trap '' TERM; exec sleep 300 ) &            # a child that ignores SIGTERM
        echo $! > "$MARKS/child.pid"
        echo "hanging"
        while true; do sleep 300 & wait $!; done
    fi
    bash "$script"
    rc=$?
    if [ $rc -ne 0 ]; then
        [ -e "$MARKS/no-code-file" ] || echo $rc > "$BUILD_EXIT_CODE_FILE"
        exit "$BUILD_FAILURE_EXIT_CODE"
    fi
    ;;
cleanup)
    echo "cleanup from_config=${FROM_CONFIG:-unset}" >> "$log"
    ;;
esac
"""


def make_job(script: list[str], **extra: Any) -> dict[str, Any]:
    """A JobResponse as GitLab sends it (no repository: GIT_STRATEGY none)."""
    job: dict[str, Any] = {
        "id": 7,
        "token": "glcbt-job-token",
        "job_info": {"id": 7, "name": "t", "stage": "test", "project_id": 1, "project_name": "app"},
        "git_info": {
            "repo_url": "http://gitlab-ci-token:x@127.0.0.1:1/acme/app.git",
            "sha": "0" * 40,
            "ref": "main",
            "before_sha": "0" * 40,
            "depth": 20,
        },
        "runner_info": {"timeout": 60},
        "variables": [
            {"key": "CI_JOB_ID", "value": "7", "public": True, "masked": False},
            {"key": "GIT_STRATEGY", "value": "none", "public": True, "masked": False},
            {"key": "SECRET", "value": "s3cr3t-value-42", "public": False, "masked": True},
        ],
        "steps": [{"name": "script", "script": script, "timeout": 60, "when": "on_success"}],
    }
    job.update(extra)
    return job


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every process the test starts carries STANDIN_TEST_MARK; none may survive it."""
    mark = f"STANDIN_TEST_MARK={tmp_path}".encode()
    monkeypatch.setenv("STANDIN_TEST_MARK", str(tmp_path))
    yield
    deadline = time.monotonic() + 5
    while True:
        left = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    left.append(proc.name)
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunnerSettings:
    path = tmp_path / "driver.sh"
    path.write_text(DRIVER)
    path.chmod(0o755)
    (tmp_path / "marks").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("MARKS", str(tmp_path / "marks"))
    return RunnerSettings(
        url="http://127.0.0.1:1",
        builds_dir=str(tmp_path / "unused-builds"),
        cache_dir=str(tmp_path / "cache"),
        config_exec=str(path),
        config_args=("config",),
        prepare_exec=str(path),
        prepare_args=("prepare",),
        run_exec=str(path),
        run_args=("run",),
        cleanup_exec=str(path),
        cleanup_args=("cleanup",),
        graceful_kill_timeout=0.5,
        force_kill_timeout=2,
        environment=("FROM_RUNNER=r1",),
    )


def mark(tmp_path: Path, name: str, content: str = "") -> None:
    (tmp_path / "marks" / name).write_text(content)


def drive(
    tmp_path: Path, settings: RunnerSettings, job: dict[str, Any], **kwargs: Any
) -> tuple[JobOutcome, bytes]:
    trace = bytearray()
    kwargs.setdefault("retry_delay", 0.01)
    outcome = run_custom_job(
        job, settings, trace=trace.extend, work_dir=tmp_path / "work", **kwargs
    )
    assert list((tmp_path / "work").iterdir()) == []  # temporary dirs and response files gone
    return outcome, bytes(trace)


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def ran(tmp_path: Path) -> list[str]:
    return [line.split()[2] for line in calls(tmp_path) if line.startswith("run /")]


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


# ---------------------------------------------------------------------- layer 1


def test_stage_order_arguments_and_environment(driver: RunnerSettings, tmp_path: Path) -> None:
    job = make_job(["echo hello", "echo secret=$SECRET"])
    job["steps"].append({"name": "after_script", "script": ["echo after=$CI_JOB_STATUS"]})
    outcome, trace = drive(tmp_path, driver, job)
    assert outcome.state == "success" and outcome.failure_reason is None, (outcome, trace)
    log = calls(tmp_path)
    assert log[0] == "config " and log[1] == "prepare "
    assert ran(tmp_path) == [
        "prepare_script", "get_sources", "restore_cache", "download_artifacts", "step_script",
        "after_script", "archive_cache", "upload_artifacts_on_success", "cleanup_file_variables",
    ]  # fmt: skip
    assert [s for s, _ in outcome.stages] == ["config", "prepare", *ran(tmp_path), "cleanup"]
    assert all(code == 0 for _, code in outcome.stages)
    # run_args first, then the script's path (in the job's temporary directory) and the stage
    first = next(line.split() for line in log if line.startswith("run /"))
    assert first[0] == "run" and first[1].endswith("/script.sh") and first[2] == "prepare_script"
    assert log[-1] == "cleanup from_config=yes"  # job_env reaches cleanup too
    env = (tmp_path / "marks" / "env.log").read_text().split("--- ")[1:]
    assert len(env) == len(outcome.stages)
    project = f"{tmp_path}/marks/builds/acme/app"  # config's builds_dir + the project's path
    for block in env:
        assert f"cwd={tmp_path}/work/custom-executor" in block
        assert "job_id=7" in block and 'response={"id": 7' in block
        assert "concurrent=0" in block and "from_runner_env=r1" in block
        assert f"codes={BUILD_FAILURE_EXIT_CODE}/{SYSTEM_FAILURE_EXIT_CODE}" in block
    for block in env[1:]:  # config's job_env: every later stage
        assert "from_config=yes" in block and f"project_dir={project}" in block
    assert "from_config=unset" in env[0]
    assert b"Using Custom executor with driver test 1..." in trace
    assert b"config says hello on stderr" in trace  # config's stderr goes to the trace
    assert b"Running on " in trace and b"$ echo hello\nhello\n" in trace
    assert b"after=success" in trace
    assert b"s3cr3t-value-42" not in trace and b"secret=[MASKED]" in trace


def test_a_failing_script_is_a_build_failure(driver: RunnerSettings, tmp_path: Path) -> None:
    job = make_job(["echo before", "exit 3", "echo never"])
    job["steps"].append({"name": "after_script", "script": ["echo after=$CI_JOB_STATUS"]})
    outcome, trace = drive(tmp_path, driver, job)
    assert outcome.state == "failed" and outcome.failure_reason == "script_failure"
    assert outcome.exit_code == 3  # through BUILD_EXIT_CODE_FILE
    assert b"$ exit 3" in trace and b"before" in trace and b"never" not in trace
    assert b"after=failed" in trace
    assert ran(tmp_path)[4:] == [
        "step_script", "after_script",
        "archive_cache_on_failure", "upload_artifacts_on_failure", "cleanup_file_variables",
    ]  # fmt: skip
    assert calls(tmp_path)[-1].startswith("cleanup")


def test_a_build_failure_without_the_exit_code_file_is_status_1(
    driver: RunnerSettings, tmp_path: Path
) -> None:
    mark(tmp_path, "no-code-file")
    outcome, _ = drive(tmp_path, driver, make_job(["exit 9"]))
    assert (outcome.failure_reason, outcome.exit_code) == ("script_failure", 1)


def test_a_failing_after_script_does_not_fail_the_job(
    driver: RunnerSettings, tmp_path: Path
) -> None:
    job = make_job(["true"])
    job["steps"].append({"name": "after_script", "script": ["exit 4"]})
    outcome, _ = drive(tmp_path, driver, job)
    assert outcome.state == "success"
    assert ("after_script", BUILD_FAILURE_EXIT_CODE) in outcome.stages


def test_prepare_system_failure_is_retried_three_times(
    driver: RunnerSettings, tmp_path: Path
) -> None:
    mark(tmp_path, "prepare-fails")
    started = time.monotonic()
    outcome, trace = drive(tmp_path, driver, make_job(["true"]), retry_delay=0.3)
    assert outcome.state == "failed" and outcome.failure_reason == "runner_system_failure"
    # each attempt is config + prepare, cleaned up before the next (gitlab-runner's retry)
    assert [s for s, _ in outcome.stages] == ["config", "prepare", "cleanup"] * 3
    assert time.monotonic() - started >= 0.6  # the delay between attempts
    assert trace.count(b"Preparation failed") == 3 and ran(tmp_path) == []


def test_invalid_config_json_is_retried(driver: RunnerSettings, tmp_path: Path) -> None:
    mark(tmp_path, "bad-config", "1")  # the first answer is not JSON
    outcome, trace = drive(tmp_path, driver, make_job(["true"]))
    assert outcome.state == "success", trace
    assert [s for s, _ in outcome.stages][:4] == ["config", "cleanup", "config", "prepare"]
    assert b"error while parsing JSON output" in trace


def test_config_never_valid_is_a_system_failure(driver: RunnerSettings, tmp_path: Path) -> None:
    mark(tmp_path, "bad-config", "99")
    outcome, _ = drive(tmp_path, driver, make_job(["true"]))
    assert outcome.failure_reason == "runner_system_failure"
    assert [s for s, _ in outcome.stages] == ["config", "cleanup"] * 3


def test_unknown_exit_code_is_a_system_failure(driver: RunnerSettings, tmp_path: Path) -> None:
    mark(tmp_path, "unknown-step_script")
    outcome, trace = drive(tmp_path, driver, make_job(["true"]))
    assert outcome.state == "failed" and outcome.failure_reason == "runner_system_failure"
    assert outcome.exit_code is None
    assert b"unknown Custom executor executable exit code 77" in trace
    assert ran(tmp_path)[-3:] == [
        "archive_cache_on_failure", "upload_artifacts_on_failure", "cleanup_file_variables",
    ]  # fmt: skip
    assert calls(tmp_path)[-1].startswith("cleanup")


def test_a_failed_prepare_script_ends_the_run_stages(
    driver: RunnerSettings, tmp_path: Path
) -> None:
    mark(tmp_path, "sysfail-prepare_script", "9")
    outcome, trace = drive(tmp_path, driver, make_job(["true"]))
    assert outcome.failure_reason == "runner_system_failure"
    assert ran(tmp_path) == ["prepare_script"] and calls(tmp_path)[-1].startswith("cleanup")
    assert b"prepare environment" in trace


def test_get_sources_attempts(driver: RunnerSettings, tmp_path: Path) -> None:
    mark(tmp_path, "sysfail-get_sources", "2")  # two system failures, then it works
    job = make_job(["true"])
    job["variables"].append({"key": "GET_SOURCES_ATTEMPTS", "value": "3", "public": True})
    outcome, _ = drive(tmp_path, driver, job)
    assert outcome.state == "success"
    assert ran(tmp_path)[:4] == ["prepare_script", "get_sources", "get_sources", "get_sources"]
    (tmp_path / "calls.log").unlink()
    (tmp_path / "marks" / "n-get_sources").unlink()
    outcome, _ = drive(tmp_path, driver, make_job(["true"]))  # the default: one attempt
    assert outcome.failure_reason == "runner_system_failure"
    assert ran(tmp_path) == [
        "prepare_script", "get_sources",
        "archive_cache_on_failure", "upload_artifacts_on_failure", "cleanup_file_variables",
    ]  # fmt: skip


def test_a_job_timeout_kills_the_whole_process_group(
    driver: RunnerSettings, tmp_path: Path
) -> None:
    mark(tmp_path, "hang-step_script")
    job = make_job(["true"], runner_info={"timeout": 1})
    started = time.monotonic()
    outcome, trace = drive(tmp_path, driver, job)
    took = time.monotonic() - started
    assert outcome.state == "failed" and outcome.failure_reason == "job_execution_timeout"
    assert 1 <= took < 10, took
    assert ("step_script", None) in outcome.stages
    # SIGTERM first (the driver noted it and went on), then SIGKILL to the group
    assert "TERM" in (tmp_path / "marks" / "signals").read_text()
    for name in ("driver.pid", "child.pid"):
        assert not alive(int((tmp_path / "marks" / name).read_text())), name
    assert b"hanging" in trace and b"SIGKILL" in trace
    assert calls(tmp_path)[-1].startswith("cleanup")  # always, after a timeout too


def test_a_stage_timeout_in_prepare_is_a_retried_system_failure(
    driver: RunnerSettings, tmp_path: Path
) -> None:
    script = tmp_path / "slow-prepare.sh"
    script.write_text('#!/usr/bin/env bash\necho "prepare $*" >> "$LOG"\nexec sleep 30\n')
    script.chmod(0o755)
    settings = RunnerSettings(**{**driver.__dict__, "prepare_exec": str(script)})
    settings = RunnerSettings(
        **{**settings.__dict__, "prepare_exec_timeout": 0.3, "graceful_kill_timeout": 1}
    )
    outcome, _ = drive(tmp_path, settings, make_job(["true"]))
    assert outcome.failure_reason == "runner_system_failure"
    assert [s for s, _ in outcome.stages] == ["config", "prepare", "cleanup"] * 3
    assert all(code is None for s, code in outcome.stages if s == "prepare")


def test_cancel_stops_the_job_and_still_cleans_up(driver: RunnerSettings, tmp_path: Path) -> None:
    mark(tmp_path, "hang-step_script")
    cancel = threading.Event()
    child = tmp_path / "marks" / "child.pid"

    def canceller() -> None:
        while not child.exists() and not cancel.wait(0.02):
            pass
        cancel.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    try:
        outcome, _ = drive(tmp_path, driver, make_job(["true"]), cancel=cancel)
    finally:
        cancel.set()
        thread.join()
    assert outcome.failure_reason == "canceled"
    assert calls(tmp_path)[-1].startswith("cleanup")
    assert not alive(int((tmp_path / "marks" / "child.pid").read_text()))


def test_exit_codes_can_be_chosen(driver: RunnerSettings, tmp_path: Path) -> None:
    outcome, _ = drive(
        tmp_path, driver, make_job(["exit 5"]),
        build_failure_exit_code=41, system_failure_exit_code=42,
    )  # fmt: skip
    assert (outcome.failure_reason, outcome.exit_code) == ("script_failure", 5)
    assert "codes=41/42" in (tmp_path / "marks" / "env.log").read_text()
    with pytest.raises(ValueError):
        drive(tmp_path, driver, make_job([]), build_failure_exit_code=2)


def test_file_variables_are_written_and_removed(driver: RunnerSettings, tmp_path: Path) -> None:
    job = make_job(['echo "file=$(cat "$MY_FILE") at $MY_FILE"'])
    job["variables"].append({"key": "MY_FILE", "value": "contents 1", "file": True})
    outcome, trace = drive(tmp_path, driver, job)
    assert outcome.state == "success", trace
    path = f"{tmp_path}/marks/builds/acme/app.tmp/MY_FILE"
    assert f"file=contents 1 at {path}".encode() in trace
    assert not Path(path).exists()  # cleanup_file_variables removed it


def test_masking_across_writes_and_the_trace_limit(driver: RunnerSettings, tmp_path: Path) -> None:
    job = make_job(["printf 's3cr3t-'; sleep 0.2; printf 'value-42\\n'", "head -c 5000 /dev/zero"])
    settings = RunnerSettings(**{**driver.__dict__, "output_limit": 4})
    outcome, trace = drive(tmp_path, settings, job)
    assert outcome.state == "success"
    assert b"s3cr3t-value-42" not in trace and b"\n[MASKED]\n" in trace
    assert len(trace) < 4096 + 200 and b"Job's log exceeded limit" in trace


def test_get_sources_clones_the_repository(driver: RunnerSettings, tmp_path: Path) -> None:
    work = tmp_path / "src"
    work.mkdir()
    (work / "README").write_text("hello from the repository\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}  # fmt: skip
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."],
                 ["git", "commit", "-q", "-m", "one"]):  # fmt: skip
        subprocess.run(argv, cwd=work, env=env, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=work, check=True, capture_output=True, text=True
    ).stdout.strip()
    job = make_job(["cat README", "git rev-parse HEAD"])
    job["variables"] = [v for v in job["variables"] if v["key"] != "GIT_STRATEGY"]
    job["git_info"].update(repo_url=f"file://{work}/.git", sha=sha)
    outcome, trace = drive(tmp_path, driver, job)
    assert outcome.state == "success", trace.decode()
    assert b"hello from the repository" in trace and sha.encode() in trace
    assert (tmp_path / "marks" / "builds" / "project-1" / "README").exists()
    job["git_info"]["sha"] = "f" * 40  # not in the repository: the stage fails
    outcome, _ = drive(tmp_path, driver, job)
    assert outcome.failure_reason == "script_failure" and "step_script" not in ran(tmp_path)[-4:]


def test_settings_from_config_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'concurrent = 1\n[[runners]]\nname = "x"\nid = 12\nurl = "http://127.0.0.1:1"\n'
        'token = "glrt-abcdefghijkl"\nexecutor = "custom"\nbuilds_dir = "/b"\ncache_dir = "/c"\n'
        'environment = ["A=1"]\n[runners.custom]\nconfig_exec = "/s"\n'
        'config_args = ["a", "config"]\nprepare_exec = "/s"\nrun_exec = "/s"\n'
        'cleanup_exec = "/s"\ngraceful_kill_timeout = 5\n'
    )
    settings = RunnerSettings.from_config_toml(path, "x")
    assert settings.config_args == ("a", "config") and settings.graceful_kill_timeout == 5
    assert settings.runner_id == 12 and settings.environment == ("A=1",)
    assert settings.force_kill_timeout == 600 and settings.shell == "bash"
    with pytest.raises(KeyError):
        RunnerSettings.from_config_toml(path, "y")


# ---------------------------------------------------------------------- layer 2


def test_the_manager_against_the_fake_gitlab(driver: RunnerSettings, tmp_path: Path) -> None:
    from stoker.ci.gitlab.fake_gitlab import FakeGitLab

    with FakeGitLab() as gl:
        gl.add_token("glpat-standin-test", {"create_runner", "manage_runner"})
        gl.add_project(1, "acme/app")
        import httpx

        created = httpx.post(
            f"{gl.api_url}/user/runners",
            headers={"PRIVATE-TOKEN": "glpat-standin-test"},
            json={"runner_type": "project_type", "project_id": 1, "run_untagged": True},
        )
        assert created.status_code == 201, created.text
        token = created.json()["token"]
        none = {"GIT_STRATEGY": "none"}
        ok = gl.queue_job(1, ["echo hi", "echo token=$CI_JOB_TOKEN"], variables=none)
        bad = gl.queue_job(1, ["exit 4"], variables=none)
        slow = gl.queue_job(1, ["echo started", "sleep 30"], variables=none)
        with StandInRunnerManager(
            gl.url, token, driver, system_id="s_test", work_dir=tmp_path / "work",
            retry_delay=0.01, keepalive_interval=0.2, update_interval=0.1,
        ) as manager:  # fmt: skip
            first = manager.run_once(10)
            second = manager.run_once(10)
            threading.Timer(1.0, gl.cancel_job, args=(slow,)).start()
            third = manager.run_once(10)
            assert manager.run_once(0.5) is None  # nothing left: polled until the timeout
        jobs = gl.jobs()
    assert first is not None and first.state == "success", first
    assert jobs[ok].state == "success" and b"hi\n" in jobs[ok].trace
    assert jobs[ok].token.encode() not in jobs[ok].trace and b"token=[MASKED]" in jobs[ok].trace
    assert b"Using Custom executor with driver test 1..." in jobs[ok].trace
    assert second is not None and (second.failure_reason, second.exit_code) == (
        "script_failure",
        4,
    )
    assert (jobs[bad].state, jobs[bad].exit_code, jobs[bad].failure_reason) == (
        "failed",
        4,
        "script_failure",
    )
    assert third is not None and third.failure_reason == "canceled", third
    assert jobs[slow].state == "canceled" and b"started" in jobs[slow].trace
    assert calls(tmp_path)[-1].startswith("cleanup")


def test_the_manager_resyncs_the_trace_after_416(driver: RunnerSettings, tmp_path: Path) -> None:
    from stoker.ci.gitlab.fake_gitlab import FakeGitLab

    with FakeGitLab() as gl:
        gl.add_token("glpat-standin-test", {"create_runner"})
        gl.add_project(1, "acme/app")
        import httpx

        token = httpx.post(
            f"{gl.api_url}/user/runners",
            headers={"PRIVATE-TOKEN": "glpat-standin-test"},
            json={"runner_type": "project_type", "project_id": 1, "run_untagged": True},
        ).json()["token"]
        job_id = gl.queue_job(
            1, ["echo one", "sleep 0.5", "echo two"], variables={"GIT_STRATEGY": "none"}
        )
        gl.fail_next("PATCH", f"/api/v4/jobs/{job_id}/trace", 416, count=2)
        with StandInRunnerManager(
            gl.url, token, driver, work_dir=tmp_path / "work", update_interval=0.1
        ) as manager:
            outcome = manager.run_once(10)
        job = gl.jobs()[job_id]
    assert outcome is not None and outcome.state == "success"
    assert job.state == "success" and b"one\n" in job.trace and b"two\n" in job.trace
    assert job.trace.count(b"Job succeeded") == 1
    assert json.dumps(job.exit_code) == "null"
