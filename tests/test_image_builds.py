"""Real image builds through the spec pipeline (users, files, artifacts, env, run, packing).

The fast tests here build on a tiny OCI base made by the test: busybox and the
account files, one layer.  They exercise every step except mmdebstrap in a
couple of seconds each.  These images are inspected (extracted with
``fsck.erofs``), never booted, so their ``[agent] python`` points at busybox:
the build only checks that an executable is there.  Booted images come from
Debian bases in ``test_image_vm.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from stoker.errors import ProvisionError, UsageError
from stoker.images import ImageStore, SpecBuilder
from stoker.images.builder import KernelRef
from stoker.images.spec import load_spec_file
from stoker.paths import Dirs
from test_oci import M, oci_layout

IS_ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="image builds run as root (useradd -R, chroot)"),
    pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils missing"),
    pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="busybox-static missing"),
]

KERNEL = KernelRef(kind="debian-cloud", digest="test-kernel=1")
APPLETS = ("sh", "cat", "echo", "mkdir", "chmod", "ls", "id", "sleep", "printf", "env", "true")


def busybox_base(path: Path, *extra: M) -> Path:
    """An OCI layout: busybox with applet links, account files, and ``extra`` members."""
    busybox = Path("/bin/busybox").read_bytes()
    members = [
        M("bin", "dir"),
        M("bin/busybox", data=busybox, mode=0o755),
        *(M(f"bin/{a}", "symlink", target="busybox") for a in APPLETS),
        M("etc", "dir"),
        M("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        M("etc/group", data=b"root:x:0:\nusers:x:100:\n"),
        M("etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640),
        M("etc/gshadow", data=b"root:*::\nusers:*::\n", mode=0o640),
        M("root", "dir", mode=0o700),
        M("home", "dir"),
        *extra,
    ]
    return oci_layout(path, [members])


def write_spec(tmp_path: Path, body: str, *, name: str = "t") -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'[image.{name}]\nbase = "oci:base"\n'
        "# never booted: the build only needs an executable at the agent's python path\n"
        f'agent.python = "/bin/busybox"\n{body}'
    )
    return spec


def build(
    tmp_path: Path, spec_file: Path, *, cache: str = "cache", name: str = "t", **kwargs: object
) -> tuple[ImageStore, object]:
    dirs = Dirs(cache=tmp_path / cache, runtime=tmp_path / "run")
    spec = load_spec_file(spec_file)[name]
    store = ImageStore(dirs)
    image = store.ensure(SpecBuilder(spec, kernel=KERNEL, dirs=dirs, **kwargs))  # type: ignore[arg-type]
    return store, image


def extract(rootfs: Path, dest: Path) -> Path:
    subprocess.run(["fsck.erofs", f"--extract={dest}", str(rootfs)], check=True)
    return dest


def published(store: ImageStore) -> list[str]:
    if not store.root.is_dir():
        return []
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))


def tarball(members: dict[str, bytes], *, executable: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name in executable else 0o644
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


KITCHEN = """
packages = []
run = [
    "echo \\"$GREETING from step one\\" > /etc/greeting",
    "id ci > /etc/ci-id",
    "cat /opt/tool/bin/tool.sh > /etc/tool-copy",
]
size_limit = "64M"

[image.t.env]
GREETING = "hello"

[image.t.defaults]
cpus = 1
memory = "512M"
disk = "1G"

[[image.t.users]]
name = "ci"
uid = 1234
groups = ["builders", "users"]
shell = "/bin/sh"

[[image.t.files]]
src = "motd"
dest = "/etc/motd"
mode = "0600"

[[image.t.files]]
src = "motd"
dest = "/srv/new/dir/motd.copy"

[[image.t.artifacts]]
name = "tool"
url = "https://example.invalid/tool.tar.gz"
sha256 = "{tool_sha}"
dest = "/opt/tool"
extract = true

[[image.t.artifacts]]
name = "blob"
url = "https://example.invalid/blob.bin"
sha256 = "{blob_sha}"
dest = "/usr/local/share/blob.bin"
"""


def kitchen_sink(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    busybox_base(tmp_path / "base")
    (tmp_path / "motd").write_text("welcome\n")
    tool = tmp_path / "tool.tar.gz"
    tool.write_bytes(
        tarball(
            {"bin/tool.sh": b"#!/bin/sh\necho tool\n", "README": b"r\n"},
            executable=("bin/tool.sh",),
        )
    )
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(4096))
    body = KITCHEN.replace("{tool_sha}", hashlib.sha256(tool.read_bytes()).hexdigest())
    body = body.replace("{blob_sha}", hashlib.sha256(blob.read_bytes()).hexdigest())
    return write_spec(tmp_path, body), {"tool": tool, "blob": blob}


def test_every_spec_key_is_applied(tmp_path: Path) -> None:
    spec, arts = kitchen_sink(tmp_path)
    store, image = build(
        tmp_path,
        spec,
        overrides={"tool": arts["tool"]},
        environ={"STOKER_ARTIFACT_BLOB": str(arts["blob"])},
    )
    root = extract(image.rootfs, tmp_path / "x")  # type: ignore[attr-defined]
    # users: account, groups, home owned by the user
    assert "ci:x:1234:1234::/home/ci:/bin/sh" in (root / "etc/passwd").read_text()
    group = (root / "etc/group").read_text()
    assert "builders:" in group and "ci" in group.split("builders:", 1)[1].splitlines()[0]
    assert (root / "home/ci").stat().st_uid == 1234
    # files: content and exact mode, root-owned; missing parents created
    motd = root / "etc/motd"
    assert motd.read_text() == "welcome\n"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o600 and motd.stat().st_uid == 0
    assert (root / "srv/new/dir/motd.copy").read_text() == "welcome\n"
    # artifacts: unpacked, and copied verbatim
    assert (root / "opt/tool/bin/tool.sh").read_text() == "#!/bin/sh\necho tool\n"
    assert (root / "opt/tool/bin/tool.sh").stat().st_mode & 0o111
    assert (root / "usr/local/share/blob.bin").read_bytes() == arts["blob"].read_bytes()
    # env: recorded in the image, visible to run steps
    assert json.loads((root / "etc/stoker/env.json").read_text()) == {"GREETING": "hello"}
    assert (root / "etc/greeting").read_text() == "hello from step one\n"
    # run steps ran after users and artifacts, in order
    assert "uid=1234(ci)" in (root / "etc/ci-id").read_text()
    assert (root / "etc/tool-copy").read_text() == "#!/bin/sh\necho tool\n"
    # prepared to boot; the build host's resolver configuration is gone
    assert (root / "etc/hostname").read_text() == "stoker\n"
    assert not (root / "etc/resolv.conf").exists()
    for mount_point in ("proc", "sys", "dev", "run", "tmp"):
        assert (root / mount_point).is_dir()
    assert list((root / "dev").iterdir()) == []  # the step's /dev was a private tmpfs

    manifest = image.manifest  # type: ignore[attr-defined]
    assert manifest["base"]["kind"] == "oci"
    assert manifest["env"] == {"GREETING": "hello"}
    assert manifest["defaults"] == {"cpus": 1, "memory": 512, "disk": 1024}
    assert manifest["kernel"] == KERNEL.to_json()
    assert {a["name"]: a["source"].split(":")[0] for a in manifest["artifacts"]} == {
        "tool": "override",
        "blob": "override",
    }
    assert manifest["fstype"] == "erofs" and manifest["pack"]["compression"] == "lz4hc"
    assert manifest["uncompressed_size"] > Path("/bin/busybox").stat().st_size
    assert set(manifest["step_seconds"]) == {"artifacts", "base", "customise", "run", "pack"}
    assert manifest["spec"]["name"] == "t"

    # Verified artifacts are cached by checksum: a rebuild needs no override.
    assert (tmp_path / "cache/downloads" / manifest["artifacts"][1]["sha256"]).is_file()


def test_same_spec_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    spec, arts = kitchen_sink(tmp_path)
    overrides = {"tool": arts["tool"], "blob": arts["blob"]}
    _, first = build(tmp_path, spec, cache="a", overrides=overrides)
    _, second = build(tmp_path, spec, cache="b", overrides=overrides)
    assert first.digest == second.digest  # type: ignore[attr-defined]
    assert first.rootfs.read_bytes() == second.rootfs.read_bytes()  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_other_formats_are_reproducible_and_readable(tmp_path: Path, fmt: str) -> None:
    if fmt == "squashfs" and shutil.which("mksquashfs") is None:
        pytest.skip("squashfs-tools missing")
    busybox_base(tmp_path / "base")
    spec = write_spec(tmp_path, f'format = "{fmt}"\nrun = ["echo built > /etc/marker"]\n')
    _, first = build(tmp_path, spec, cache="a")
    # In another second of the wall clock: a time that leaks into the image shows.
    time.sleep(1.1)
    _, second = build(tmp_path, spec, cache="b")
    rootfs = first.rootfs  # type: ignore[attr-defined]
    assert rootfs.name == f"rootfs.{fmt}"
    assert first.fstype == fmt  # type: ignore[attr-defined]
    assert rootfs.read_bytes() == second.rootfs.read_bytes()  # type: ignore[attr-defined]
    if fmt == "squashfs":
        listing = subprocess.run(
            ["unsquashfs", "-cat", str(rootfs), "etc/marker"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    else:
        listing = subprocess.run(
            ["debugfs", "-R", "cat /etc/marker", str(rootfs)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        subprocess.run(["e2fsck", "-fn", str(rootfs)], check=True, capture_output=True)
    assert listing == "built\n"


def test_failing_run_step_fails_the_build_with_its_output(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    spec = write_spec(
        tmp_path,
        'run = ["echo first-ok", "echo about to fail; echo oops >&2; exit 3", "echo never"]\n',
    )
    with pytest.raises(ProvisionError) as info:
        build(tmp_path, spec)
    message = str(info.value)
    assert "run step 2 failed (exit status 3)" in message
    assert "about to fail" in message and "oops" in message
    assert "full log:" in message
    store = ImageStore(Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run"))
    assert published(store) == []
    assert list((store.root / ".tmp").iterdir()) == []
    log = next((tmp_path / "cache/logs").glob("image-t-*.log")).read_text()
    assert "first-ok" in log and "never" not in log.split("run step 3")[0][-200:]


def test_wrong_checksum_fails_before_the_base_and_publishes_nothing(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    stand_in = tmp_path / "tool.bin"
    stand_in.write_bytes(b"not the pinned bytes")
    spec = write_spec(
        tmp_path,
        "[[image.t.artifacts]]\n"
        'name = "tool"\nurl = "https://example.invalid/tool"\n'
        f'sha256 = "{"ab" * 32}"\ndest = "/opt/tool"\n',
    )
    with pytest.raises(ProvisionError, match="SHA-256 mismatch") as info:
        build(tmp_path, spec, overrides={"tool": stand_in})
    assert "expected " + "ab" * 32 in str(info.value)
    assert hashlib.sha256(b"not the pinned bytes").hexdigest() in str(info.value)
    store = ImageStore(Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run"))
    assert published(store) == []
    assert not any((tmp_path / "cache/downloads").iterdir())  # nothing kept
    log = next((tmp_path / "cache/logs").glob("image-t-*.log")).read_text()
    assert "OCI layer" not in log and "applied" not in log  # failed before the base


def test_placeholder_checksum_is_refused(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    stand_in = tmp_path / "tool.bin"
    stand_in.write_bytes(b"x")
    spec = write_spec(
        tmp_path,
        "[[image.t.artifacts]]\n"
        'name = "tool"\nurl = "https://example.invalid/tool"\n'
        f'sha256 = "{"0" * 64}"\ndest = "/opt/tool"\n',
    )
    with pytest.raises(ProvisionError, match="placeholder sha256"):
        build(tmp_path, spec, overrides={"tool": stand_in})


def test_unreachable_artifact_names_the_way_out(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    spec = write_spec(
        tmp_path,
        "[[image.t.artifacts]]\n"
        'name = "tool"\nurl = "http://127.0.0.1:9/tool"\n'
        f'sha256 = "{"ab" * 32}"\ndest = "/opt/tool"\n',
    )
    with pytest.raises(ProvisionError, match="cannot download") as info:
        build(tmp_path, spec)
    hint = info.value.hint or ""
    assert "--artifact tool=PATH" in hint and "STOKER_ARTIFACT_TOOL=PATH" in hint


def test_size_limit(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    spec = write_spec(tmp_path, 'size_limit = "1M"\n')
    with pytest.raises(ProvisionError, match="above its size_limit of 1 MiB"):
        build(tmp_path, spec)


def test_missing_python_fails_the_build(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    spec = tmp_path / "spec.toml"
    spec.write_text('[image.t]\nbase = "oci:base"\n')
    with pytest.raises(ProvisionError, match="no python3 at /usr/bin/python3"):
        build(tmp_path, spec)


def test_hostile_base_cannot_redirect_writes_to_the_host(tmp_path: Path) -> None:
    outside = tmp_path / "host-etc"
    outside.mkdir()
    inner = str(outside).lstrip("/")
    # The base's /srv is an absolute symlink to a path that exists on the host;
    # it must be followed inside the image, as the guest would.
    parents = [M("/".join(inner.split("/")[: i + 1]), "dir") for i in range(inner.count("/") + 1)]
    busybox_base(tmp_path / "base", *parents, M("srv", "symlink", target=str(outside)))
    (tmp_path / "motd").write_text("inside\n")
    spec = write_spec(tmp_path, '[[image.t.files]]\nsrc = "motd"\ndest = "/srv/motd"\n')
    _, image = build(tmp_path, spec)
    assert list(outside.iterdir()) == []
    root = extract(image.rootfs, tmp_path / "x")  # type: ignore[attr-defined]
    assert (root / inner / "motd").read_text() == "inside\n"


def test_dangling_symlink_in_the_base_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "host-etc"
    outside.mkdir()
    busybox_base(tmp_path / "base", M("srv", "symlink", target=str(outside)))
    (tmp_path / "motd").write_text("inside\n")
    spec = write_spec(tmp_path, '[[image.t.files]]\nsrc = "motd"\ndest = "/srv/motd"\n')
    with pytest.raises(ProvisionError, match="/srv in the image is a dangling symlink"):
        build(tmp_path, spec)
    assert list(outside.iterdir()) == []


def test_users_need_account_files(tmp_path: Path) -> None:
    oci_layout(
        tmp_path / "base",
        [[M("bin", "dir"), M("bin/busybox", data=Path("/bin/busybox").read_bytes(), mode=0o755)]],
    )
    spec = write_spec(tmp_path, '[[image.t.users]]\nname = "ci"\n')
    with pytest.raises(ProvisionError, match="no /etc/passwd"):
        build(tmp_path, spec)


def test_packages_on_an_oci_base_are_refused_before_any_work(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    spec = write_spec(tmp_path, 'packages = ["curl"]\n')
    with pytest.raises(
        UsageError, match=r"spec.toml:5: .*image.t.packages: packages are installed with apt"
    ):
        load_spec_file(spec)


def test_interrupted_build_leaves_nothing_and_the_next_succeeds(tmp_path: Path) -> None:
    busybox_base(tmp_path / "base")
    marker = tmp_path / "step-started"
    spec = write_spec(tmp_path, 'run = ["echo started > /etc/s", "sleep 300"]\n')
    cache = tmp_path / "cache"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from stoker.images import ImageStore, SpecBuilder\n"
        "from stoker.images.builder import KernelRef\n"
        "from stoker.images.spec import load_spec_file\n"
        "from stoker.paths import Dirs\n"
        f"dirs = Dirs(cache=Path({str(cache)!r}), runtime=Path({str(tmp_path / 'run')!r}))\n"
        f"spec = load_spec_file(Path({str(spec)!r}))['t']\n"
        "kernel = KernelRef(kind='debian-cloud', digest='test-kernel=1')\n"
        "ImageStore(dirs).ensure(SpecBuilder(spec, kernel=kernel, dirs=dirs), progress=print)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "building image" in line:
                break
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _sleeping_step():
            time.sleep(0.1)
        assert _sleeping_step(), "the run step never started"
        marker.touch()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # unshare --kill-child took the step's processes with it
    deadline = time.monotonic() + 10
    while _sleeping_step() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _sleeping_step()
    store = ImageStore(Dirs(cache=cache, runtime=tmp_path / "run"))
    assert published(store) == []
    # The next build (without the sleep) cleans up the remains and succeeds.
    write_spec(tmp_path, 'run = ["echo started > /etc/s"]\n')
    _, image = build(tmp_path, spec)
    assert image.rootfs.is_file()  # type: ignore[attr-defined]
    assert [p.name for p in (store.root / ".tmp").iterdir()] == []


def _sleeping_step() -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline == b"sleep\x00300\x00":
            return True
    return False


def test_write_layout_round_trips_through_apply_layers(tmp_path: Path) -> None:
    from stoker.images.oci import apply_layers, open_image, write_layout

    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (tree / "usr/bin/tool").chmod(0o755)
    (tree / "bin").symlink_to("usr/bin")
    (tree / "etc").mkdir()
    (tree / "etc/motd").write_text("hello\n")
    image = open_image(write_layout(tree, tmp_path / "layout"))
    assert len(image.layers) == 1 and image.platform == "linux/amd64"
    out = tmp_path / "out"
    out.mkdir()
    apply_layers(image, out)
    assert (out / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert (out / "usr/bin/tool").stat().st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin") == "usr/bin"
    assert (out / "etc/motd").read_text() == "hello\n"
    # The same tree gives the same image digest.
    again = open_image(write_layout(tree, tmp_path / "layout2"))
    assert again.digest == image.digest
