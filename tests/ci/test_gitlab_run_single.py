"""The unsafe ``stoker runner gitlab`` mode: opt-in only, instance runners' tokens refused.

Against FakeGitLab (a fake, on loopback); the VM part (run-single in a VM)
is tested by ``tests/test_image_vm.py``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stoker.ci.gitlab.fake_gitlab import FakeGitLab
from stoker.ci.gitlab.run_single import check_runner_scope
from stoker.errors import UsageError

ADMIN = "glpat-admin-0123456789"
STOKER = [sys.executable, "-m", "stoker.cli"]


@pytest.fixture
def gl() -> Iterator[FakeGitLab]:
    with FakeGitLab() as fake:
        fake.add_token(ADMIN, {"api"}, admin=True)
        fake.add_project(42, "acme/app")
        yield fake


def create(gl: FakeGitLab, **body: object) -> str:
    response = httpx.post(
        f"{gl.api_url}/user/runners",
        json={"tag_list": ["x"], **body},
        headers={"PRIVATE-TOKEN": ADMIN},
        trust_env=False,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


async def test_instance_runner_tokens_are_refused(gl: FakeGitLab) -> None:
    project = create(gl, runner_type="project_type", project_id=42)
    assert await check_runner_scope(gl.url, project, ADMIN) == "project_type"
    instance = create(gl, runner_type="instance_type")
    with pytest.raises(UsageError, match="instance runner") as refused:
        await check_runner_scope(gl.url, instance, ADMIN)
    assert "gitlab-executor" in (refused.value.hint or "")
    with pytest.raises(UsageError, match="does not accept this runner token"):
        await check_runner_scope(gl.url, "glrt-made-up-token", ADMIN)


def run_cli(
    gl: FakeGitLab, tmp_path: Path, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    access = tmp_path / "pat"
    access.write_text(ADMIN)
    return subprocess.run(
        [*STOKER, "runner", "gitlab", "--url", gl.url, "--token-file", "-",
         "--access-token-file", str(access), "--image", "no-such-image", *extra],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"STOKER_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_the_cli_needs_the_opt_in_and_refuses_instance_tokens(
    gl: FakeGitLab, tmp_path: Path
) -> None:
    project = create(gl, runner_type="project_type", project_id=42)
    refused = run_cli(gl, tmp_path, project)
    assert refused.returncode == 2 and "--unsafe-token-in-vm" in refused.stderr
    instance = create(gl, runner_type="instance_type")
    refused = run_cli(gl, tmp_path, instance, "--unsafe-token-in-vm")
    assert refused.returncode == 2 and "instance runner" in refused.stderr
    # a project runner passes the check; then the missing image is named
    proc = run_cli(gl, tmp_path, project, "--unsafe-token-in-vm")
    assert proc.returncode == 2, proc.stderr
    assert "job can read it" in proc.stderr
    assert "no image called 'no-such-image'" in proc.stderr
    for out in (refused.stderr, proc.stderr):
        assert project not in out and instance not in out and ADMIN not in out
