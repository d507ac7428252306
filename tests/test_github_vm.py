"""GitHub Actions runners in real VMs (TCG), against FakeGitHub, in a network namespace.

The runner image is the shipped ``github-runner`` spec built with ``--pin
actions-runner=2.999.0:SHA --artifact actions-runner=STAND-IN``: the stand-in
``run.sh`` (the official runner cannot be downloaded here) in place of the
release.  The scenario (tests/github_scenario.py) runs ``stoker serve`` as a
process in a fresh namespace with only loopback.  ``stoker github check`` is
tested here too, against the built image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stoker.ci.github.fake_github import FakeGitHub
from stoker.ci.github.stand_in import build_tarball
from stoker.images.catalog import SPECS_DIR
from stoker.images.store import ImageStore
from stoker.paths import Dirs

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and image builds need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing"),
]

HERE = Path(__file__).resolve().parent
IMAGE = "test-gh-standin"
STAND_IN_VERSION = "2.999.0"
sys.path.insert(0, str(HERE / "service"))

from github_harness import APP_ID, INSTALLATION, OWNER, REPO, app_key  # noqa: E402


@pytest.fixture(scope="module")
def gh_image(dirs: Dirs, boot_artifacts: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped github-runner spec, renamed, with the stand-in pinned as its runner."""
    tmp = tmp_path_factory.mktemp("gh-image")
    tarball = tmp / "actions-runner.tar.gz"
    sha = build_tarball(tarball)
    assert sha == hashlib.sha256(tarball.read_bytes()).hexdigest()
    text = (SPECS_DIR / "github-runner.toml").read_text()
    text, count = re.subn(r'(?m)^name = ".*"$', f'name = "{IMAGE}"', text, count=1)
    assert count == 1
    spec = tmp / f"{IMAGE}.toml"
    spec.write_text(text)
    env = {**os.environ, "STOKER_CACHE_DIR": str(dirs.cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stoker.cli",
            "image",
            "build",
            str(spec),
            "--pin",
            f"actions-runner={STAND_IN_VERSION}:{sha}",
            "--artifact",
            f"actions-runner={tarball}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return IMAGE


def test_the_pinned_runner_version_is_in_the_manifest(gh_image: str, dirs: Dirs) -> None:
    image = ImageStore(dirs).get(gh_image)
    assert image is not None
    (artifact,) = image.manifest["artifacts"]  # type: ignore[misc]
    assert artifact["name"] == "actions-runner" and artifact["version"] == STAND_IN_VERSION


def _check(tmp_path: Path, dirs: Dirs, url: str, network: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "hook").write_text("secret")
    config = tmp_path / "stoker.toml"
    config.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
cache_dir = "{dirs.cache}"
[pools.gh]
image = "{IMAGE}"
cpus = 1
memory = "1G"
{network}
[pools.other]
image = "not-built-anywhere"
cpus = 1
memory = "1G"
[github]
api_url = "{url}"
app_id = {APP_ID}
private_key_file = "{tmp_path / "app.pem"}"
webhook_secret_file = "{tmp_path / "hook"}"
[[github.targets]]
repository = "{REPO}"
[github.pools.gh]
labels = ["self-hosted", "linux"]
[github.pools.other]
labels = ["self-hosted", "linux", "big"]
"""
    )
    return subprocess.run(
        [sys.executable, "-m", "stoker.cli", "github", "check", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _findings(proc: subprocess.CompletedProcess[str]) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    for item in json.loads(proc.stdout):
        found.setdefault(item["subject"], []).append((item["level"], item["message"]))
    return found


def test_github_check_names_what_is_wrong(gh_image: str, dirs: Dirs, tmp_path: Path) -> None:
    _, public = app_key(tmp_path)
    with FakeGitHub(app_id=APP_ID, public_key_pem=public, runner_version="2.321.0") as github:
        github.install(OWNER, INSTALLATION)
        github.add_repo(REPO)
        port = github.url.rsplit(":", 1)[1]
        proc = _check(
            tmp_path,
            dirs,
            github.url,
            f'network = {{ mode = "egress", allow = ["127.0.0.1:{port}"] }}',
        )
    found = _findings(proc)
    assert proc.returncode == 1, proc.stdout  # pools.other's image is not built
    assert found["github credentials"][0][0] == "ok"
    assert "installation 77" in found["github credentials"][0][1]
    assert found[f"github.targets[0] ({REPO})"][0][0] == "ok"
    assert found["pools.gh.image"] == [("ok", f"runner {STAND_IN_VERSION}")]
    assert found["pools.gh.network"][0][0] == "ok"
    level, message = found["pools.other.image"][0]
    assert level == "error" and "not built" in message
    assert found["pools.other.network"][0][0] == "error"  # no network: cannot reach GitHub
    assert any(level == "warning" for level, _ in found["github.pools.gh / other"])


def test_github_check_flags_an_old_runner_and_a_wrong_key(
    gh_image: str, dirs: Dirs, tmp_path: Path
) -> None:
    _, public = app_key(tmp_path)
    with FakeGitHub(app_id=APP_ID, public_key_pem=public, runner_version="3.2.0") as github:
        github.install(OWNER, INSTALLATION)
        github.add_repo(REPO)
        old = _findings(_check(tmp_path, dirs, github.url, ""))
        level, message = old["pools.gh.image"][0]
        assert level == "error" and "older than GitHub's 3.2.0" in message
        # Another App's key: GitHub refuses the JWT, and the message says where to look.
        app_key(tmp_path)
        wrong = _findings(_check(tmp_path, dirs, github.url, ""))
    level, message = wrong["github credentials"][0]
    assert level == "error" and "private_key_file" in message


@pytest.fixture(scope="module")
def scenario(gh_image: str, dirs: Dirs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("gh-scenario")
    config = work / "scenario.json"
    config.write_text(json.dumps({"work": str(work), "cache": str(dirs.cache), "image": gh_image}))
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, str(HERE / "github_scenario.py"), str(config)],
        capture_output=True,
        text=True,
        timeout=2000,
        check=False,
        cwd=work,
    )
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in work.glob("serve-*.log")
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + logs
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_signed_webhook_runs_the_job_in_a_vm_then_cleans_up(scenario: Any) -> None:
    assert scenario["forged_status"] == 401
    assert scenario["first_conclusion"] == "success"
    assert scenario["webhook_statuses"] == [202] or set(scenario["webhook_statuses"]) <= {0, 202}


def test_a_dropped_webhook_is_caught_by_the_sweep_with_real_vms(scenario: Any) -> None:
    assert scenario["dropped_conclusion"] == "success"


def test_duplicates_and_reorders_spawn_no_extra_runner_with_real_vms(scenario: Any) -> None:
    assert scenario["runners_after_four_jobs"] == 4


def test_a_burst_of_twenty_with_max_three_finishes(scenario: Any) -> None:
    assert scenario["burst_conclusions"] == ["success"]
    assert 1 <= scenario["burst_peak_vms"] <= 3


def test_kill_9_mid_job_leaves_no_orphans_after_restart_with_real_vms(scenario: Any) -> None:
    # QEMU died with the daemon; the lost job failed on GitHub; the restarted
    # service deleted the dead runner, ran the job queued meanwhile, left nothing.
    assert scenario["after_restart_conclusion"] == "success"
    assert scenario["stuck_conclusion"] == "failure"
    assert scenario["runners_total"] == 26
    assert scenario["qemu_left"] == 0 and scenario["qemu_left_at_end"] == 0
