"""The CI runner integrations: command lines and input checks (booted in test_image_vm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stoker.ci import github, gitlab
from stoker.errors import UsageError

STOKER = [sys.executable, "-m", "stoker.cli"]


def test_jit_runner_argv() -> None:
    assert github.jit_runner_argv(" eyJhIjogMX0=\n") == [
        "/opt/actions-runner/run.sh",
        "--jitconfig",
        "eyJhIjogMX0=",
    ]


@pytest.mark.parametrize(
    "bad", ["", "   ", "not base64!", "abc", "eyJh IjogMX0=", "a" * (64 * 1024 + 4), "--help"]
)
def test_malformed_jitconfig_is_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="JIT runner configuration"):
        github.check_jitconfig(bad)


def test_run_single_argv() -> None:
    # fmt: off
    assert gitlab.run_single_argv("https://gitlab.com", builds_dir="/home/g/builds") == [
        "/usr/local/bin/gitlab-runner", "run-single",
        "--url", "https://gitlab.com",
        "--executor", "shell",
        "--max-builds", "1",
        "--wait-timeout", "600",
        "--builds-dir", "/home/g/builds",
    ]
    # fmt: on


@pytest.mark.parametrize("url", ["gitlab.com", "ftp://gitlab.com", "https://", "--url=x"])
def test_run_single_refuses_bad_urls(url: str) -> None:
    with pytest.raises(UsageError, match="GitLab URL"):
        gitlab.run_single_argv(url, builds_dir="/b")


@pytest.mark.parametrize("token", ["", "two words", "line\nbreak", "x" * 5000, "tab\there"])
def test_bad_tokens_are_refused(token: str) -> None:
    with pytest.raises(UsageError, match="token"):
        gitlab.check_token(token)


def test_cli_refuses_a_bad_jitconfig_before_booting(tmp_path: Path) -> None:
    config = tmp_path / "jit"
    config.write_text("this is not base64\n")
    proc = subprocess.run(
        [*STOKER, "runner", "github", "--jitconfig-file", str(config), "--image", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "not base64" in proc.stderr
