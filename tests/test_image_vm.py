"""Images from the shipped specs and from OCI bases, built for real and booted.

The runner images are built from the shipped ``github-runner`` and
``gitlab-runner`` specs with stand-ins for the remote artifacts (this machine
cannot reach GitHub or GitLab): a tarball and a binary made here, with their
own checksums written into a copy of the spec.  Everything else (packages,
users, run steps, env) is the shipped spec's.  They go into the shared cache
under ``test-*`` names, so a second run finds them built.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from stoker.artifacts import BootArtifacts, resolve_artifacts
from stoker.ci import github, gitlab
from stoker.errors import UsageError
from stoker.images import ImageStore, SpecBuilder
from stoker.images.builder import resolve_kernel
from stoker.images.catalog import SPECS_DIR
from stoker.images.oci import write_layout
from stoker.images.spec import load_spec_file
from stoker.paths import Dirs
from stoker.vm import VM

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="image builds run as root"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap missing"),
]

STOKER = [sys.executable, "-m", "stoker.cli"]
JITCONFIG = "eyJydW5uZXIiOiAic3RhbmQtaW4ifQ=="  # base64 of {"runner": "stand-in"}


def _stand_in_runner_tarball(path: Path) -> Path:
    """What the shipped spec unpacks into /opt/actions-runner, played by shell scripts."""
    run_sh = b"""#!/bin/bash
# stand-in for actions/runner's run.sh, made by the test
echo "stand-in actions runner"
echo "args: $*"
echo "user: $(id -un) home: $HOME cwd: $PWD"
ls /usr/lib/x86_64-linux-gnu/libicuuc.so.* >/dev/null && echo "libicu: present"
test -e "$PWD/.runner" && echo "registered in the image!" || echo "registration: none in the image"
echo "log to stdout: $ACTIONS_RUNNER_PRINT_LOG_TO_STDOUT"
"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, mode in (
            ("run.sh", run_sh, 0o755),
            ("config.sh", b"#!/bin/bash\necho stand-in config\n", 0o755),
            ("bin/Runner.Listener", b"stand-in\n", 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


STAND_IN_GITLAB_RUNNER = b"""#!/bin/bash
# stand-in for the gitlab-runner binary, made by the test
case "$1" in
--version) echo "Version: stand-in"; exit 0 ;;
run-single)
    echo "stand-in gitlab-runner: $*"
    echo "user: $(id -un) cwd: $PWD"
    echo "token from env: ${CI_SERVER_TOKEN:+set}"
    ;;
*) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""


def _spec_copy(tmp_path: Path, shipped: str, name: str, artifact: Path) -> Path:
    """The shipped spec, renamed, with the stand-in's checksum in place of the real one."""
    text = (SPECS_DIR / f"{shipped}.toml").read_text()
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', text, count=1)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    text, count = re.subn(r'(?m)^sha256 = "[0-9a-f]{64}"$', f'sha256 = "{digest}"', text)
    assert count == 1
    spec = tmp_path / f"{name}.toml"
    spec.write_text(text)
    return spec


def _build_cli(spec: Path, artifact: str, path: Path, dirs: Dirs) -> str:
    env = {**os.environ, "STOKER_CACHE_DIR": str(dirs.cache)}
    proc = subprocess.run(
        [*STOKER, "image", "build", str(spec), "--artifact", f"{artifact}={path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _erofs_extract(rootfs: Path, dest: Path) -> Path:
    subprocess.run(["fsck.erofs", f"--extract={dest}", str(rootfs)], check=True)
    return dest


async def test_github_runner_image(
    dirs: Dirs, boot_artifacts: BootArtifacts, tmp_path: Path
) -> None:
    tarball = _stand_in_runner_tarball(tmp_path / "actions-runner.tar.gz")
    spec = _spec_copy(tmp_path, "github-runner", "test-github-runner", tarball)
    out = _build_cli(spec, "actions-runner", tarball, dirs)
    assert out.startswith("test-github-runner ")
    image = ImageStore(dirs).get("test-github-runner")
    assert image is not None
    manifest = image.manifest
    names = {p.split()[0] for p in manifest["packages"]}  # type: ignore[union-attr]
    assert {"libicu72", "libssl3", "libkrb5-3", "git", "curl"} <= names
    assert "docker.io" not in names and "docker-ce" not in names
    assert manifest["defaults"] == {"cpus": 2, "memory": 4096, "disk": 16384}

    # Layout, without booting: runner unpacked and owned by the runner user.
    root = _erofs_extract(image.rootfs, tmp_path / "x")
    runner = root / "opt/actions-runner"
    uid = int(
        next(
            line.split(":")[2]
            for line in (root / "etc/passwd").read_text().splitlines()
            if line.startswith("runner:")
        )
    )
    assert (runner / "run.sh").stat().st_uid == uid == 1001
    assert not (runner / ".runner").exists() and not (runner / ".credentials").exists()

    # Booted: the entry point starts with the configuration passed at run time.
    async with VM("test-github-runner", memory="1G", disk="1G", dirs=dirs) as vm:
        assert vm.cpus == 2  # from the image's defaults
        result = await github.run_jit_runner(vm, JITCONFIG, timeout=120)
    text = result.stdout.decode()
    assert result.exit_code == 0, (text, result.stderr)
    assert f"args: --jitconfig {JITCONFIG}" in text
    assert "user: runner home: /home/runner cwd: /opt/actions-runner" in text
    assert "libicu: present" in text
    assert "registration: none in the image" in text
    assert "log to stdout: 1" in text  # the spec's env reaches the runner


async def test_gitlab_runner_image(
    dirs: Dirs, boot_artifacts: BootArtifacts, tmp_path: Path
) -> None:
    # The host's own gitlab-runner (a stand-in on PATH) goes into the image, pinned.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    binary = bindir / "gitlab-runner"
    binary.write_bytes(STAND_IN_GITLAB_RUNNER)
    binary.chmod(0o755)
    spec = tmp_path / "test-gitlab-runner.toml"
    text = (SPECS_DIR / "gitlab-runner.toml").read_text()
    spec.write_text(re.sub(r'(?m)^name = ".*"$', 'name = "test-gitlab-runner"', text, count=1))
    proc = subprocess.run(
        [*STOKER, "image", "build", str(spec)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "STOKER_CACHE_DIR": str(dirs.cache),
            "PATH": f"{bindir}:{os.environ['PATH']}",
        },
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    image = ImageStore(dirs).get("test-gitlab-runner")
    assert image is not None
    artifacts = image.manifest["artifacts"]
    assert isinstance(artifacts, list) and len(artifacts) == 1
    recorded = artifacts[0]
    assert recorded["sha256"] == hashlib.sha256(STAND_IN_GITLAB_RUNNER).hexdigest()
    # Provenance of the build that made this content: an earlier run with the same
    # bytes (a cache hit) recorded its own temporary path, so only the kind is fixed.
    assert recorded["source"].startswith("host:/")
    assert recorded["source"].endswith("/bin/gitlab-runner")
    async with VM("test-gitlab-runner", memory="1G", disk="1G", dirs=dirs) as vm:
        result = await gitlab.run_single_job(
            vm, "https://gitlab.example.com", "glrt-secret-token", timeout=120
        )
        ps = await vm.exec(["ps", "-eo", "args"])
    text = result.stdout.decode()
    assert result.exit_code == 0, (text, result.stderr)
    assert (
        "stand-in gitlab-runner: run-single --url https://gitlab.example.com --executor shell "
        "--max-builds 1 --wait-timeout 600 --builds-dir /home/gitlab-runner/builds"
    ) in text
    assert "user: gitlab-runner cwd: /home/gitlab-runner" in text
    assert "token from env: set" in text
    assert b"glrt-secret-token" not in ps.stdout


def test_runner_image_checksum_refusal_publishes_nothing(dirs: Dirs, tmp_path: Path) -> None:
    tarball = _stand_in_runner_tarball(tmp_path / "actions-runner.tar.gz")
    # The shipped spec as it is: its pinned checksum does not match the stand-in.
    spec = tmp_path / "github-runner.toml"
    spec.write_text(
        (SPECS_DIR / "github-runner.toml")
        .read_text()
        .replace('name = "github-runner"', 'name = "test-refused-runner"')
    )
    started = time.monotonic()
    proc = subprocess.run(
        [*STOKER, "image", "build", str(spec), "--artifact", f"actions-runner={tarball}"],
        capture_output=True,
        text=True,
        env={**os.environ, "STOKER_CACHE_DIR": str(dirs.cache)},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 125
    assert "SHA-256 mismatch" in proc.stderr and str(tarball) in proc.stderr
    assert time.monotonic() - started < 60  # refused before mmdebstrap
    assert ImageStore(dirs).get("test-refused-runner") is None


def test_runner_image_is_reproducible(dirs: Dirs, tmp_path: Path) -> None:
    """The same spec (users, artifacts, env, run steps) built twice: the same bytes."""
    tarball = _stand_in_runner_tarball(tmp_path / "actions-runner.tar.gz")
    spec_file = _spec_copy(tmp_path, "github-runner", "test-github-runner", tarball)
    spec = load_spec_file(spec_file)["test-github-runner"]
    kernel = resolve_kernel(spec, dirs)
    # The second store sits where the _apt user can reach it (pytest's tmp_path
    # is under a 0700 directory): apt's sandboxing must not change the result.
    open_dir = Path(tempfile.mkdtemp(prefix="stoker-repro-", dir="/tmp"))
    open_dir.chmod(0o755)
    try:
        images = []
        for cache in (tmp_path / "a", open_dir):
            private = Dirs(cache=cache, runtime=tmp_path / "run")
            builder = SpecBuilder(
                spec, kernel=kernel, dirs=private, overrides={"actions-runner": tarball}
            )
            images.append(ImageStore(private).ensure(builder, progress=print))
        first, second = images
        assert first.digest == second.digest
        different = {
            k for k in ("packages", "uncompressed_size") if first.manifest[k] != second.manifest[k]
        }
        if different:
            pytest.skip(f"the mirror changed between the two builds ({different})")
        assert first.rootfs.read_bytes() == second.rootfs.read_bytes()
    finally:
        shutil.rmtree(open_dir)


async def test_oci_image_boots(dirs: Dirs, boot_artifacts: BootArtifacts, tmp_path: Path) -> None:
    """A container image (here: the default image's tree as one layer) becomes a VM image."""
    tree = _erofs_extract(boot_artifacts.image.rootfs, tmp_path / "tree")
    write_layout(tree, tmp_path / "layout")
    shutil.rmtree(tree)
    spec = tmp_path / "oci.toml"
    spec.write_text(
        'name = "test-oci"\nbase = "oci:layout"\nformat = "squashfs"\n'
        'run = ["echo from-oci > /etc/oci-marker"]\n'
        "[env]\nFROM_IMAGE = 'yes'\n"
        "[defaults]\ncpus = 1\nmemory = '768M'\n"
    )
    proc = subprocess.run(
        [*STOKER, "image", "build", str(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "STOKER_CACHE_DIR": str(dirs.cache)},
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    image = ImageStore(dirs).get("test-oci")
    assert image is not None and image.fstype == "squashfs"
    async with VM("test-oci", dirs=dirs) as vm:
        assert (vm.cpus, vm.memory_mb) == (1, 768)
        result = await vm.exec(
            ["sh", "-c", "cat /etc/oci-marker; echo $FROM_IMAGE; nproc; grep ' / ' /proc/mounts"]
        )
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["from-oci", "yes", "1"], result


@pytest.mark.skipif(
    os.environ.get("STOKER_TEST_KERNEL_BUILD") == "0", reason="STOKER_TEST_KERNEL_BUILD=0"
)
async def test_image_on_the_microvm_kernel(
    dirs: Dirs, boot_artifacts: BootArtifacts, tmp_path: Path
) -> None:
    """kernel = "stoker-microvm": built once by stoker, no modules, booted via PVH."""
    spec = tmp_path / "microvm.toml"
    spec.write_text(
        (SPECS_DIR / "default.toml")
        .read_text()
        .replace('name = "default"', 'name = "test-microvm"')
        .replace('kernel = "auto"', 'kernel = "stoker-microvm"')
    )
    proc = subprocess.run(
        [*STOKER, "image", "build", str(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "STOKER_CACHE_DIR": str(dirs.cache)},
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    image = ImageStore(dirs).get("test-microvm")
    assert image is not None
    assert image.manifest["kernel"]["kind"] == "stoker-microvm"  # type: ignore[index]
    async with VM("test-microvm", dirs=dirs, snapshot="never") as vm:
        result = await vm.exec(["sh", "-c", "uname -r; cat /proc/modules | wc -l"], check=True)
        assert vm.restored_from is None
    release, modules = result.stdout.decode().split()
    assert release != boot_artifacts.kernel.release and modules == "0"


@pytest.mark.skipif(
    os.environ.get("STOKER_TEST_KERNEL_BUILD") == "0", reason="STOKER_TEST_KERNEL_BUILD=0"
)
async def test_auto_kernel_follows_the_microvm_build(
    dirs: Dirs, boot_artifacts: BootArtifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default image says kernel = "auto": once the microVM kernel is built, it boots that."""
    from stoker.kernel.build import build_microvm_kernel

    built = await asyncio.to_thread(build_microvm_kernel, dirs)  # cached by the test above
    assert ImageStore(dirs).get("default").manifest["kernel"]["kind"] == "auto"  # type: ignore[union-attr,index]
    monkeypatch.delenv("STOKER_AUTO_KERNEL", raising=False)
    async with VM("default", dirs=dirs, snapshot="never") as vm:
        result = await vm.exec(["uname", "-r"], check=True)
        assert vm.restored_from is None
    assert result.stdout.decode().strip() == built.release
    assert resolve_artifacts(dirs).kernel.vmlinuz == built.vmlinux
    # The override (what the rest of the suite runs with): Debian's kernel, through PVH.
    monkeypatch.setenv("STOKER_AUTO_KERNEL", "debian-cloud")
    async with VM("default", dirs=dirs, snapshot="never") as vm:
        result = await vm.exec(["uname", "-r"], check=True)
    assert result.stdout.decode().strip() == boot_artifacts.kernel.release
    assert resolve_artifacts(dirs).kernel.vmlinuz.name.startswith("vmlinux-")
    monkeypatch.setenv("STOKER_AUTO_KERNEL", "linux-4.4")
    with pytest.raises(UsageError, match=r"'linux-4\.4' is not a kernel"):
        async with VM("default", dirs=dirs, snapshot="never"):
            pass
