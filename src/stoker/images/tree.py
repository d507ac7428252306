"""Edits to a root tree that every builder makes before packing.

A tree comes from mmdebstrap or from OCI layers; these functions make it fit to
boot as a read-only stoker root (mount points, host name, no host resolver
configuration, python3 where the agent expects it) and read facts from it (the
installed package list).  The tree is the image's view of the world: symlinks
inside it are resolved as if chrooted (:func:`resolve_in_tree`), never against
the host.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from stoker.errors import ProvisionError

HOSTNAME = "stoker"
# Written by apt as owned by _apt only when _apt could reach the build directory.
_APT_PARTIAL_DIRS = ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial")


def resolve_in_tree(tree: Path, path: str) -> Path | None:
    """Host path of ``path`` inside ``tree``, following symlinks as if chrooted.

    Absolute symlinks are re-rooted at ``tree``; returns None when it does not
    exist or symlinks loop.
    """
    parts = list(PurePosixPath(path).parts[1:])
    current = PurePosixPath("/")
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        host = tree / candidate.relative_to("/")
        if host.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = PurePosixPath(host.readlink())
            if target.is_absolute():
                current = PurePosixPath("/")
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        if not host.exists():
            return None
        current = candidate
    return tree / current.relative_to("/")


def guest_parent(tree: Path, path: str, *, mode: int = 0o755) -> Path:
    """Host path of the directory that will hold the guest path ``path``.

    Symlinks among the parents are followed as the guest would (absolute ones
    re-rooted at ``tree``), so a layer that made ``/etc`` a symlink to ``/etc``
    still leads into the tree, never to the host's ``/etc``.  Missing parents
    are created with ``mode``; raises :class:`ProvisionError` when a parent is
    not a directory or symlinks loop.
    """
    parts = PurePosixPath(path).parts
    if len(parts) < 2 or parts[0] != "/" or ".." in parts:
        raise ProvisionError(f"not an absolute guest path: {path!r}")
    current = "/"
    for part in parts[1:-1]:
        current = str(PurePosixPath(current) / part)
        host = resolve_in_tree(tree, current)
        if host is None:
            # missing (or a dangling symlink): create it where the guest would see it
            parent = resolve_in_tree(tree, str(PurePosixPath(current).parent))
            if parent is None:
                raise ProvisionError(f"cannot create {current} in the image (symlink loop?)")
            target = parent / part
            if target.is_symlink():
                raise ProvisionError(f"{current} in the image is a dangling symlink")
            target.mkdir(mode=mode)
            host = target
        if not host.is_dir():
            raise ProvisionError(f"{current} in the image is not a directory (needed for {path})")
    parent = resolve_in_tree(tree, current)
    if parent is None or not parent.is_dir():
        raise ProvisionError(f"{current} in the image is not a directory (needed for {path})")
    return parent


def make_guest_dirs(tree: Path, path: str, *, mode: int = 0o755) -> Path:
    """Create the guest directory ``path`` (and its parents) if missing; its host path."""
    # guest_parent creates every component above the last one: give it a leaf.
    return guest_parent(tree, str(PurePosixPath(path) / "leaf"), mode=mode)


def write_guest_file(tree: Path, path: str, data: bytes | Path, *, mode: int = 0o644) -> Path:
    """Write ``data`` (bytes, or a host file to copy) to the guest path ``path``.

    Whatever is at ``path`` is replaced, a symlink included (never written
    through); the owner is root and ``mode`` is applied exactly (umask does
    not matter).  Returns the host path written.
    """
    target = guest_parent(tree, path) / PurePosixPath(path).name
    if target.is_dir() and not target.is_symlink():
        raise ProvisionError(f"{path} in the image is a directory; cannot write a file there")
    if target.is_symlink() or target.exists():
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if isinstance(data, Path):
            with data.open("rb") as src:
                while chunk := src.read(1 << 20):
                    _write_all(fd, chunk)
        else:
            _write_all(fd, data)
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return target


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def remove_guest_path(tree: Path, path: str) -> None:
    """Remove the file or symlink ``path`` from the tree if present (not following it)."""
    try:
        parent = guest_parent(tree, path)
    except ProvisionError:
        return
    target = parent / PurePosixPath(path).name
    if target.is_symlink() or target.is_file():
        target.unlink()


def prepare_tree(tree: Path, python: str) -> None:
    """Make a finished tree fit to boot as a read-only stoker root.

    Raises :class:`ProvisionError` when python3 is not at ``python`` (the guest
    agent runs with it).
    """
    for name in ("proc", "sys", "dev", "run", "tmp"):
        target = tree / name
        if target.is_symlink():
            target.unlink()
        target.mkdir(mode=0o755, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    var_tmp = resolve_in_tree(tree, "/var/tmp")
    if var_tmp is not None and var_tmp.is_dir():
        var_tmp.chmod(0o1777)
    write_guest_file(tree, "/etc/hostname", f"{HOSTNAME}\n".encode())
    write_guest_file(
        tree,
        "/etc/hosts",
        (
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        ).encode(),
    )
    # mmdebstrap copies the host's resolv.conf; the VM sets up its own.
    remove_guest_path(tree, "/etc/resolv.conf")
    # apt leaves these owned by _apt only when _apt could reach the build
    # directory (not under a 0700 home), which would make the image depend on
    # where the cache lives.  apt re-owns them itself when it next runs.
    for rel in _APT_PARTIAL_DIRS:
        partial = resolve_in_tree(tree, "/" + rel)
        if partial is not None and partial.is_dir():
            os.chown(partial, 0, 0, follow_symlinks=False)
            partial.chmod(0o700)
    found = resolve_in_tree(tree, python)
    if found is None or not found.is_file():
        raise ProvisionError(
            f"the image has no python3 at {python} (the guest agent runs with it)",
            hint="add python3 to the image's packages, or set [agent] python to its path",
        )
    if not found.stat().st_mode & stat.S_IXUSR:
        raise ProvisionError(f"{python} in the image is not executable")


def installed_packages(dpkg_status: str) -> list[str]:
    """``"name version"`` for every installed package in a dpkg status file, sorted."""
    result: list[str] = []
    for stanza in dpkg_status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if fields.get("status", "").endswith(" installed") and "package" in fields:
            result.append(f"{fields['package']} {fields.get('version', '')}".strip())
    return sorted(result)
