"""GitLab CI jobs in real VMs (TCG), against FakeGitLab, in a network namespace.

The image is the shipped ``gitlab-runner`` spec as it is: this host has no
gitlab-runner, so it is built without the helper (and says so), as a user
without one would get it.  The scenario (tests/gitlab_scenario.py) runs
``stoker serve`` as a process in a fresh namespace with only loopback, and
the stand-in runner manager drives ``stoker gitlab-executor`` as
gitlab-runner would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker.images.catalog import SPECS_DIR
from stoker.paths import Dirs

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and image builds need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing"),
    pytest.mark.skipif(shutil.which("git") is None, reason="git missing"),
]

HERE = Path(__file__).resolve().parent
IMAGE = "test-gitlab-job"


@pytest.fixture(scope="module")
def gl_image(dirs: Dirs, boot_artifacts: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped gitlab-runner spec, renamed; built without a helper binary."""
    tmp = tmp_path_factory.mktemp("gl-image")
    text = (SPECS_DIR / "gitlab-runner.toml").read_text()
    text, count = re.subn(r'(?m)^name = ".*"$', f'name = "{IMAGE}"', text, count=1)
    assert count == 1
    spec = tmp / f"{IMAGE}.toml"
    spec.write_text(text)
    # No gitlab-runner on PATH (this host has none; make sure of it).
    path = ":".join(
        p for p in os.environ["PATH"].split(":") if not (Path(p) / "gitlab-runner").exists()
    )
    proc = subprocess.run(
        [sys.executable, "-m", "stoker.cli", "image", "build", str(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "STOKER_CACHE_DIR": str(dirs.cache), "PATH": path},
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return IMAGE


@pytest.fixture(scope="module")
def scenario(gl_image: str, dirs: Dirs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("gl-scenario")
    config = work / "scenario.json"
    config.write_text(json.dumps({"work": str(work), "cache": str(dirs.cache), "image": gl_image}))
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, str(HERE / "gitlab_scenario.py"), str(config)],
        capture_output=True,
        text=True,
        timeout=2000,
        check=False,
        cwd=work,
    )
    log = work / "serve.log"
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    assert proc.returncode == 0, proc.stderr[-4000:] + "\n--- serve.log\n" + tail
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_job_runs_its_stages_in_a_fresh_vm(scenario: Any) -> None:
    assert scenario["runner"] == {"type": "project_type", "tags": ["vm"]}
    assert scenario["ok_state"] == "success", scenario["ok_trace_tail"]
    assert scenario["ok_gitlab_state"] == "success"
    # cloned from GitLab through the VM's egress proxy (the pool's default network)
    assert scenario["ok_trace_has_readme"], scenario["ok_trace_tail"]


def test_the_runner_token_is_nowhere_in_the_vm(scenario: Any) -> None:
    assert scenario["scan_done"], scenario["ok_trace_tail"]
    found = scenario["token_sha_found"]
    assert scenario["planted_sha"] in found  # the search finds a token where there is one
    assert scenario["runner_token_sha"] not in found


def test_a_failing_job_reports_its_exit_status(scenario: Any) -> None:
    assert scenario["bad"] == ["failed", 5, "script_failure"]


def test_killing_the_driver_mid_stage_leaves_no_vm(scenario: Any) -> None:
    state, reason, killed = scenario["killed"]
    assert killed and state == "failed" and reason == "runner_system_failure"
    assert scenario["killed_stages"][-1] == "cleanup"
    assert scenario["qemu_after_kill_seconds"] < 60
    assert scenario["qemu_left_at_end"] == 0
    # The killed stage's command was stopped in the VM when the next stage started
    # (gitlab-runner goes on with the on-failure stages, then cleanup closes the session).
    assert scenario["step_reasons"] == ["interrupted by a later step (its client had gone)"]
    assert scenario["sessions"] == ["succeeded", "succeeded", "succeeded"]
