"""Applying a spec's customisations to a root tree, the same way for every base.

After the base is in place (mmdebstrap, OCI layers), the spec's keys are
applied in a fixed order: ``users``, ``files``, ``artifacts``, ``env``,
``run``; then the size limit is checked.  Everything except ``run`` is done
from the host in Python or with the host's ``useradd -R``; nothing from the
tree is executed until the ``run`` steps, which the spec author asked for.

Trust: ``run`` steps execute as root in a chroot of the tree, in private mount
and PID namespaces, with the host's network.  A chroot is not a sandbox; a spec
is trusted like a Makefile is.  The *files* a spec names must stay inside the
spec's own directory (checked by :mod:`stoker.images.spec`), and every write
into the tree resolves symlinks as the guest would (:mod:`stoker.images.tree`),
so a hostile base image cannot make stoker write to the host.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from stoker.archive import ExtractLimits, safe_extract
from stoker.errors import LaunchError, ProvisionError, StokerError
from stoker.images.base import log_line
from stoker.images.fetch import FetchedArtifact
from stoker.images.spec import FileSpec, ImageSpec, UserSpec
from stoker.images.tree import make_guest_dirs, resolve_in_tree, write_guest_file
from stoker.procs import run_checked

Say = Callable[[str], None]

#: The PATH run steps see (Debian's default for root).
RUN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where the image's environment is recorded inside the image, for introspection.
ENV_FILE = "/etc/stoker/env.json"
#: How much of a failing step's output goes into the error message.
FAILURE_TAIL_LINES = 40

# Runs in fresh mount and PID namespaces (see run_step_argv): give the chroot
# /proc and the basic device nodes, then exec the step.  The step and the tree
# are positional parameters, never interpolated into this text.
_RUN_STEP_SCRIPT = r"""set -eu
tree=$1
mount -t proc -o nosuid,nodev,noexec proc "$tree/proc"
mount -t tmpfs -o nosuid,noexec,mode=0755 stoker-dev "$tree/dev"
for node in null zero full random urandom tty; do
    : > "$tree/dev/$node"
    mount --bind "/dev/$node" "$tree/dev/$node"
done
mkdir -p "$tree/dev/pts" "$tree/dev/shm"
ln -s /proc/self/fd "$tree/dev/fd"
ln -s /proc/self/fd/0 "$tree/dev/stdin"
ln -s /proc/self/fd/1 "$tree/dev/stdout"
ln -s /proc/self/fd/2 "$tree/dev/stderr"
mount -t tmpfs -o nosuid,nodev,mode=1777 stoker-shm "$tree/dev/shm"
exec chroot "$tree" /bin/sh -c "$2"
"""


def useradd_argv(tree: Path, user: UserSpec) -> list[str]:
    """``useradd`` creating ``user`` in ``tree`` (with a home and a same-named group)."""
    argv = ["useradd", "--root", str(tree), "--create-home", "--user-group"]
    argv += ["--shell", user.shell]
    if user.uid is not None:
        argv += ["--uid", str(user.uid)]
    if user.groups:
        argv += ["--groups", ",".join(user.groups)]
    argv.append(user.name)
    return argv


def groupadd_argv(tree: Path, group: str) -> list[str]:
    """``groupadd`` creating ``group`` in ``tree`` unless it exists (``--force``)."""
    return ["groupadd", "--root", str(tree), "--force", group]


def run_step_argv(tree: Path, step: str) -> list[str]:
    """The command running the shell command ``step`` chrooted in ``tree``.

    ``unshare --kill-child`` makes the step PID 1's child in a private PID
    namespace: killing stoker kills every process the step started, and the
    mounts live in a private mount namespace that vanishes with it.
    """
    # fmt: off
    return [
        "unshare", "--mount", "--pid", "--fork", "--kill-child", "--",
        "/bin/sh", "-c", _RUN_STEP_SCRIPT, "stoker-run-step", str(tree), step,
    ]
    # fmt: on


def step_environment(spec: ImageSpec, *, source_date_epoch: int) -> dict[str, str]:
    """The complete environment of a run step: a clean base plus the spec's ``env``."""
    return {
        "PATH": RUN_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        **spec.env,
    }


def apply_users(tree: Path, users: Sequence[UserSpec], *, log: Path, epoch: int) -> None:
    """Create the spec's users (and the groups they join) in ``tree``."""
    if not users:
        return
    passwd = resolve_in_tree(tree, "/etc/passwd")
    if passwd is None or not passwd.is_file():
        raise ProvisionError(
            "the spec declares users but the image has no /etc/passwd",
            hint="use a base that has one (every Debian base does)",
        )
    # shadow honours SOURCE_DATE_EPOCH for the "last password change" field.
    env = {"SOURCE_DATE_EPOCH": str(epoch)}
    for group in sorted({g for user in users for g in user.groups}):
        run_checked(groupadd_argv(tree, group), env=env, log=log, timeout=60)
    for user in users:
        log_line(log, f"creating user {user.name}")
        try:
            run_checked(useradd_argv(tree, user), env=env, log=log, timeout=60)
        except LaunchError as exc:
            raise ProvisionError(
                f"cannot create user {user.name!r}: {exc.output.strip() or exc}"
            ) from exc


def apply_files(tree: Path, files: Sequence[FileSpec], *, log: Path) -> None:
    """Copy the spec's host files into ``tree`` with their modes, owned by root."""
    for file in files:
        log_line(log, f"file {file.src} -> {file.dest} ({file.mode})")
        write_guest_file(tree, file.dest, Path(file.src), mode=int(file.mode, 8))


@contextlib.contextmanager
def _decompressed(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading, decompressed by its magic (gzip, xz, bzip2 or none)."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(path.open("rb"))
        magic = raw.read(6)
        raw.seek(0)
        if magic.startswith(b"\x1f\x8b"):
            yield stack.enter_context(gzip.GzipFile(fileobj=raw))  # type: ignore[misc]
        elif magic.startswith(b"\xfd7zXZ\x00"):
            yield stack.enter_context(lzma.LZMAFile(raw))  # type: ignore[misc]
        elif magic.startswith(b"BZh"):
            yield stack.enter_context(bz2.BZ2File(raw))  # type: ignore[misc]
        else:
            yield raw


def apply_artifacts(tree: Path, fetched: Sequence[FetchedArtifact], *, log: Path) -> None:
    """Place verified artifacts: as a file at ``dest``, or unpacked into it."""
    for item in fetched:
        art = item.artifact
        if not art.extract:
            log_line(log, f"artifact {art.name} -> {art.dest}")
            write_guest_file(tree, art.dest, item.path, mode=0o644)
            continue
        dest = make_guest_dirs(tree, art.dest)
        log_line(log, f"artifact {art.name}: unpacking into {art.dest}")
        try:
            with _decompressed(item.path) as stream:
                report = safe_extract(
                    stream, dest, ExtractLimits(max_bytes=8 << 30, max_members=1_000_000)
                )
        except StokerError as exc:
            raise ProvisionError(
                f"artifact {art.name!r}: cannot unpack it into {art.dest}: {exc}"
            ) from exc
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise ProvisionError(
                f"artifact {art.name!r} is not a readable tar archive: {exc}"
            ) from exc
        log_line(log, f"artifact {art.name}: {len(report.files)} entries, {report.bytes} bytes")


def write_env(tree: Path, env: Mapping[str, str]) -> None:
    """Record the image's environment in the image (the host applies it to every command)."""
    document = json.dumps(dict(sorted(env.items())), indent=2, sort_keys=True) + "\n"
    write_guest_file(tree, ENV_FILE, document.encode(), mode=0o644)


def run_steps(
    tree: Path,
    spec: ImageSpec,
    *,
    log: Path,
    epoch: int,
    say: Say,
    resolv_conf: Path = Path("/etc/resolv.conf"),
) -> None:
    """Run the spec's ``run`` steps in order; the first failure stops the build.

    A step that exits non-zero raises :class:`ProvisionError` carrying the
    step, its exit status and the tail of its output (all of it is in ``log``).
    """
    if not spec.run:
        return
    for name in ("proc", "dev"):
        target = tree / name
        if target.is_symlink():
            target.unlink()
        target.mkdir(mode=0o755, exist_ok=True)
    # Steps that download (pip, curl) need name resolution; the file goes
    # again before packing (the VM configures its own).
    if resolv_conf.is_file():
        write_guest_file(tree, "/etc/resolv.conf", resolv_conf.read_bytes())
    env = step_environment(spec, source_date_epoch=epoch)
    for index, step in enumerate(spec.run, 1):
        say(f"run step {index}/{len(spec.run)}: {_one_line(step)}")
        log_line(log, f"run step {index}/{len(spec.run)}:\n{step}")
        try:
            run_checked(run_step_argv(tree, step), env=env, inherit_env=False, log=log)
        except LaunchError as exc:
            status = (
                f"exit status {exc.returncode}" if exc.returncode is not None else "did not run"
            )
            lines = (exc.output or "").rstrip().splitlines()[-FAILURE_TAIL_LINES:]
            output = "\n".join(f"    {line}" for line in lines) or "    (no output)"
            raise ProvisionError(
                f"run step {index} failed ({status}): {_one_line(step)}\n"
                f"  its output (last {FAILURE_TAIL_LINES} lines):\n{output}"
            ) from exc


def check_size_limit(spec: ImageSpec, tree_bytes: int) -> None:
    """Raise :class:`ProvisionError` when the tree is bigger than ``size_limit``."""
    if spec.size_limit is None:
        return
    limit = spec.size_limit << 20
    if tree_bytes > limit:
        raise ProvisionError(
            f"image {spec.name!r} is {tree_bytes / (1 << 20):.1f} MiB uncompressed, "
            f"above its size_limit of {spec.size_limit} MiB",
            hint="drop packages or raise size_limit in the spec",
        )


def _one_line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= 80 and "\n" not in text.strip() else first[:77] + "..."
