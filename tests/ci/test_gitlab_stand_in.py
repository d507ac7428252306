"""The stand-in runner manager follows the custom executor contract (drivers made by the test).

The drivers are small bash scripts in the test's directory ("local shell"
drivers): they record what they were called with, so the order of stages,
their arguments and environment, the exit-code handling and the
termination of process groups can be checked.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from stoker.ci.gitlab.stand_in import (
    BUILD_FAILURE,
    SYSTEM_FAILURE,
    JobOutcome,
    RunnerSettings,
    run_custom_job,
)

DRIVER = r"""#!/usr/bin/env bash
# A local-shell custom executor driver written by the test.
stage="$1"; shift
log="$LOG"
echo "$stage $*" >> "$log"
case "$stage" in
config)
    readable=$(test -r "$JOB_RESPONSE_FILE" && echo yes)
    echo "config env: job=$CUSTOM_ENV_CI_JOB_ID resp=$readable" >> "$log"
    if [ -e "$MARKS/bad-config" ] && [ ! -e "$MARKS/config-retried" ]; then
        touch "$MARKS/config-retried"; echo "not json"; exit 0
    fi
    printf '{"builds_dir": "%s/builds", "driver": {"name": "test", "version": "1"}, ' "$MARKS"
    printf '"job_env": {"FROM_CONFIG": "yes"}}\n'
    ;;
prepare)
    echo "prepare env: from_config=$FROM_CONFIG" >> "$log"
    if [ -e "$MARKS/prepare-fails" ]; then exit "$SYSTEM_FAILURE_EXIT_CODE"; fi
    ;;
run)
    script="$1"; name="$2"
    echo "run $name from_config=$FROM_CONFIG" >> "$log"
    if [ -e "$MARKS/unknown-$name" ]; then exit 77; fi
    if [ -e "$MARKS/hang-$name" ]; then
        trap '' TERM                    # ignores SIGTERM: only SIGKILL ends it
        ( trap '' TERM; sleep 300 ) &   # and a child in the same group
        echo $! > "$MARKS/child.pid"
        sleep 300
    fi
    bash "$script" || { echo $? > "$BUILD_EXIT_CODE_FILE"; exit "$BUILD_FAILURE_EXIT_CODE"; }
    ;;
cleanup)
    echo "cleanup from_config=$FROM_CONFIG" >> "$log"
    ;;
esac
"""


def job(script: list[str], **extra: object) -> dict[str, object]:
    return {
        "id": 7,
        "token": "glcbt-job-token",
        "job_info": {"id": 7, "name": "t", "stage": "test", "project_id": 1, "project_name": "app"},
        "git_info": {"repo_url": "http://127.0.0.1:1/x.git", "sha": "0" * 40, "ref": "main"},
        "runner_info": {"timeout": 60},
        "variables": [
            {"key": "CI_JOB_ID", "value": "7", "public": True, "masked": False},
            {"key": "GIT_STRATEGY", "value": "none", "public": True, "masked": False},
            {"key": "SECRET", "value": "s3cr3t-value", "public": False, "masked": True},
        ],
        "steps": [{"name": "script", "script": script, "timeout": 60, "when": "on_success"}],
        **extra,
    }


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunnerSettings:
    path = tmp_path / "driver.sh"
    path.write_text(DRIVER)
    path.chmod(0o755)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("MARKS", str(marks))
    return RunnerSettings(
        url="http://127.0.0.1:1",
        builds_dir=str(tmp_path / "builds"),
        cache_dir=str(tmp_path / "cache"),
        config_exec=str(path),
        config_args=("config",),
        prepare_exec=str(path),
        prepare_args=("prepare",),
        run_exec=str(path),
        run_args=("run",),
        cleanup_exec=str(path),
        cleanup_args=("cleanup",),
        graceful_kill_timeout=1,
        force_kill_timeout=2,
    )


def drive(tmp_path: Path, settings: RunnerSettings, the_job: dict[str, object]) -> JobOutcome:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    trace = bytearray()
    outcome = run_custom_job(the_job, settings, trace=trace.extend, work_dir=work, retry_delay=0.01)
    (tmp_path / "trace").write_bytes(bytes(trace))
    assert not (work / "job-response.json").exists()  # removed at the end
    return outcome


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def ran(tmp_path: Path) -> list[str]:
    return [line.split()[2] for line in calls(tmp_path) if line.startswith("run /")]


def test_stage_order_arguments_and_environment(driver: RunnerSettings, tmp_path: Path) -> None:
    outcome = drive(tmp_path, driver, job(["echo hello"], steps=[
        {"name": "script", "script": ["true"]},
        {"name": "after_script", "script": ["echo after"]},
    ]))  # fmt: skip
    assert outcome.state == "success", outcome
    log = calls(tmp_path)
    assert log[0] == "config " and log[1] == "config env: job=7 resp=yes"
    assert log[2] == "prepare " and log[3] == "prepare env: from_config=yes"
    assert ran(tmp_path) == [
        "prepare_script", "get_sources", "restore_cache", "download_artifacts", "step_script",
        "after_script", "archive_cache", "upload_artifacts_on_success", "cleanup_file_variables",
    ]  # fmt: skip
    # run_args first, then the script's path and the stage's name
    first_run = next(line for line in log if line.startswith("run /"))
    assert first_run.split()[1].endswith("/script-prepare_script")
    assert "run prepare_script from_config=yes" in log
    assert log[-1] == "cleanup from_config=yes"
    assert b"Using Custom executor with driver test 1..." in (tmp_path / "trace").read_bytes()


def test_a_failing_script_is_a_build_failure(driver: RunnerSettings, tmp_path: Path) -> None:
    outcome = drive(tmp_path, driver, job(["echo before", "exit 3", "echo never"]))
    assert outcome.state == "failed" and outcome.failure_reason == "script_failure"
    assert outcome.exit_code == 3  # through BUILD_EXIT_CODE_FILE
    trace = (tmp_path / "trace").read_bytes()
    assert b"$ exit 3" in trace and b"before" in trace and b"never" not in trace
    assert ran(tmp_path)[-4:] == [
        "step_script",
        "archive_cache_on_failure", "upload_artifacts_on_failure", "cleanup_file_variables",
    ]  # fmt: skip
    assert calls(tmp_path)[-1].startswith("cleanup")


def test_system_failures_retries_and_unknown_codes(driver: RunnerSettings, tmp_path: Path) -> None:
    marks = Path(os.environ["MARKS"])
    (marks / "prepare-fails").touch()
    outcome = drive(tmp_path, driver, job(["true"]))
    assert outcome.state == "failed" and outcome.failure_reason == "runner_system_failure"
    assert [s for s, _ in outcome.stages].count("prepare") == 3  # three attempts
    assert calls(tmp_path)[-1].startswith("cleanup")  # always
    (marks / "prepare-fails").unlink()
    (tmp_path / "calls.log").unlink()
    (marks / "bad-config").touch()
    (marks / "unknown-prepare_script").touch()
    outcome = drive(tmp_path, driver, job(["true"]))
    assert calls(tmp_path).count("config ") == 2  # invalid JSON once, then retried
    assert outcome.failure_reason == "runner_system_failure"
    assert b"unknown Custom executor executable exit code 77" in (tmp_path / "trace").read_bytes()
    assert calls(tmp_path)[-1].startswith("cleanup")


def test_a_deadline_kills_the_whole_process_group(driver: RunnerSettings, tmp_path: Path) -> None:
    marks = Path(os.environ["MARKS"])
    (marks / "hang-prepare_script").touch()
    the_job = job(["true"])
    the_job["runner_info"] = {"timeout": 2}
    started = time.monotonic()
    outcome = drive(tmp_path, driver, the_job)
    assert outcome.failure_reason == "job_execution_timeout"
    assert time.monotonic() - started < 20
    child = int((marks / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the driver's child survived"
    assert b"terminating the driver's process group" in (tmp_path / "trace").read_bytes()
    assert calls(tmp_path)[-1].startswith("cleanup")


def test_cancel_stops_the_job_and_still_cleans_up(driver: RunnerSettings, tmp_path: Path) -> None:
    marks = Path(os.environ["MARKS"])
    (marks / "hang-prepare_script").touch()
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    work = tmp_path / "work"
    work.mkdir()
    outcome = run_custom_job(
        job(["true"]), driver, trace=lambda _: None, work_dir=work, cancel=cancel
    )
    assert outcome.failure_reason == "canceled"
    assert calls(tmp_path)[-1].startswith("cleanup")
    child = int((marks / "child.pid").read_text())
    for _ in range(100):
        if not Path(f"/proc/{child}").exists():
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()


def test_settings_from_config_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'concurrent = 1\n[[runners]]\nname = "x"\nurl = "http://127.0.0.1:1"\ntoken = "t"\n'
        'executor = "custom"\nbuilds_dir = "/b"\ncache_dir = "/c"\n[runners.custom]\n'
        'config_exec = "/s"\nconfig_args = ["a", "config"]\nprepare_exec = "/s"\n'
        'run_exec = "/s"\ncleanup_exec = "/s"\ngraceful_kill_timeout = 5\n'
    )
    settings = RunnerSettings.from_config_toml(path, "x")
    assert settings.config_args == ("a", "config") and settings.graceful_kill_timeout == 5
    with pytest.raises(KeyError):
        RunnerSettings.from_config_toml(path, "y")
    assert json.dumps(BUILD_FAILURE) and SYSTEM_FAILURE != BUILD_FAILURE
