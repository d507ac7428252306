"""Fetch Debian's cloud kernel and unpack it into stoker's cache, without installing it.

``apt-get download`` fetches the metapackage (``linux-image-cloud-amd64``),
whose ``Depends`` names the real image package; that one is downloaded and
unpacked with ``dpkg-deb -x``, and only what a guest needs is kept (vmlinuz,
config, the module tree).  Using apt respects the host's mirrors, proxies and
pinning.  Layout of the cache::

    kernels/
      .lock                                     serialises provisioners (fcntl)
      linux-image-cloud-amd64.json              pointer: Kernel.to_json()
      linux-image-6.1.0-56-cloud-amd64_6.1.192-2/
        boot/{vmlinuz,config,System.map}-<release>
        lib/modules/<release>/{modules.builtin,modules.order,kernel/}

The pointer makes :func:`cached_kernel` a couple of ``stat`` calls; trees are
published with one ``rename`` so no reader ever sees half a kernel.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.errors import ProvisionError
from stoker.paths import Dirs
from stoker.procs import run_checked

DEFAULT_META_PACKAGE = "linux-image-cloud-amd64"

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_APT_HINT = "run `apt-get update` (the package lists may be missing or out of date)"
_TMP_PREFIX = ".tmp-"
# Files under lib/modules/<release>/ worth keeping (kernel/ is kept whole).
_MODULE_META = ("modules.builtin", "modules.order", "modules.builtin.modinfo")
_DOWNLOAD_TIMEOUT = 900.0


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel in the cache."""

    package: str  # e.g. "linux-image-6.1.0-56-cloud-amd64"
    version: str  # Debian package version, e.g. "6.1.192-2"
    release: str  # `uname -r`, e.g. "6.1.0-56-cloud-amd64"
    root: Path  # the cache directory holding the unpacked tree
    vmlinuz: Path
    modules_dir: Path  # root/lib/modules/<release>
    config: Path  # root/boot/config-<release>

    def to_json(self) -> dict[str, str]:
        return {
            "package": self.package,
            "version": self.version,
            "release": self.release,
            "root": str(self.root),
            "vmlinuz": str(self.vmlinuz),
            "modules_dir": str(self.modules_dir),
            "config": str(self.config),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Kernel:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a malformed mapping."""
        values: dict[str, str] = {}
        for key in ("package", "version", "release", "root", "vmlinuz", "modules_dir", "config"):
            value = d.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"kernel record: {key!r} missing or not a string")
            values[key] = value
        return cls(
            package=values["package"],
            version=values["version"],
            release=values["release"],
            root=Path(values["root"]),
            vmlinuz=Path(values["vmlinuz"]),
            modules_dir=Path(values["modules_dir"]),
            config=Path(values["config"]),
        )

    def is_complete(self) -> bool:
        """True when the files this record names are all present."""
        return (
            self.vmlinuz.is_file()
            and self.config.is_file()
            and (self.modules_dir / "modules.builtin").is_file()
            and (self.modules_dir / "kernel").is_dir()
        )

    def config_value(self, option: str) -> str | None:
        """The value of ``CONFIG_<option>`` (``"y"``, ``"m"``, ...) or None when unset."""
        prefix = f"CONFIG_{option.removeprefix('CONFIG_')}="
        for line in self.config.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip('"')
        return None


def _pointer(dirs: Dirs, meta_package: str) -> Path:
    return dirs.kernels / f"{meta_package}.json"


def cached_kernel(dirs: Dirs, meta_package: str = DEFAULT_META_PACKAGE) -> Kernel | None:
    """The kernel last provisioned for ``meta_package``, if still complete.

    Never runs apt or touches the network: a file read and a few ``stat`` calls.
    """
    try:
        record = json.loads(_pointer(dirs, meta_package).read_text())
        kernel = Kernel.from_json(record)
    except (OSError, ValueError, AttributeError):
        return None
    return kernel if kernel.is_complete() else None


def provision_kernel(
    dirs: Dirs,
    *,
    meta_package: str = DEFAULT_META_PACKAGE,
    refresh: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Kernel:
    """Return the kernel for ``meta_package``, downloading and unpacking it if needed.

    Without ``refresh`` a kernel already in the cache is returned at once.  With
    it, the metapackage is resolved again (a new kernel is fetched only when the
    metapackage now points at one we do not have).  Safe to call concurrently
    from several processes.  Raises :class:`ProvisionError` or
    :class:`LaunchError` (apt-get / dpkg-deb failed).
    """
    if not refresh:
        kernel = cached_kernel(dirs, meta_package)
        if kernel is not None:
            return kernel
    if not _PACKAGE_RE.match(meta_package):
        raise ProvisionError(f"invalid Debian package name {meta_package!r}")
    say = progress or (lambda _msg: None)
    dirs.kernels.mkdir(parents=True, exist_ok=True)
    with _locked(dirs.kernels / ".lock"):
        if not refresh:
            # Another process may have finished while we waited for the lock.
            kernel = cached_kernel(dirs, meta_package)
            if kernel is not None:
                return kernel
        _remove_stale_temps(dirs.kernels)
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=dirs.kernels) as tmp:
            kernel = _fetch(dirs, meta_package, Path(tmp), say)
        _write_pointer(dirs, meta_package, kernel)
    say(f"kernel {kernel.release} ({kernel.package} {kernel.version}) ready")
    return kernel


def _fetch(dirs: Dirs, meta_package: str, tmp: Path, say: Callable[[str], None]) -> Kernel:
    say(f"resolving {meta_package}")
    meta_deb = _apt_download(meta_package, tmp)
    fields = _deb_fields(meta_deb)
    image = _image_dependency(meta_package, fields.get("Depends", ""))
    if image is None:
        # Not a metapackage: accept a concrete linux-image-<release> package too.
        if not re.match(r"^linux-image-\d", meta_package):
            raise ProvisionError(
                f"{meta_package} does not depend on a linux-image-* package",
                hint="pass a kernel metapackage such as linux-image-cloud-amd64",
            )
        image_deb = meta_deb
    else:
        package, version = image
        if version is not None:
            existing = _load_tree(dirs.kernels / _tree_name(package, version), package, version)
            if existing is not None:
                meta_deb.unlink()
                return existing
        say(f"downloading {package} {version or ''}".rstrip())
        image_deb = _apt_download(package if version is None else f"{package}={version}", tmp)
        meta_deb.unlink()
    fields = _deb_fields(image_deb)
    package, version = fields.get("Package", ""), fields.get("Version", "")
    if not package or not version:
        raise ProvisionError(f"{image_deb.name} has no Package/Version fields")
    target = dirs.kernels / _tree_name(package, version)
    existing = _load_tree(target, package, version)
    if existing is not None:
        image_deb.unlink()
        return existing

    say(f"unpacking {package} {version}")
    extracted = tmp / "extract"
    run_checked(["dpkg-deb", "-x", str(image_deb), str(extracted)], timeout=600)
    image_deb.unlink()
    tree = tmp / "tree"
    _keep_needed(extracted, tree)
    shutil.rmtree(extracted)
    _publish(tree, target)
    kernel = _load_tree(target, package, version)
    if kernel is None:
        raise ProvisionError(f"unpacked kernel in {target} is incomplete")
    return kernel


def _tree_name(package: str, version: str) -> str:
    # Epochs ("1:2.3") are legal in versions; keep file names colon-free like apt does.
    return f"{package}_{version.replace(':', '%3a')}"


def _apt_download(spec: str, dest: Path) -> Path:
    """``apt-get download spec`` into ``dest``; returns the .deb it fetched."""
    before = set(dest.glob("*.deb"))
    run_checked(
        ["apt-get", "download", "-q", spec],
        cwd=dest,
        timeout=_DOWNLOAD_TIMEOUT,
        hint=_APT_HINT,
    )
    fetched = sorted(set(dest.glob("*.deb")) - before)
    if len(fetched) != 1:
        raise ProvisionError(
            f"apt-get download {spec} produced {len(fetched)} .deb files, expected 1",
            hint=_APT_HINT,
        )
    return fetched[0]


def _deb_fields(deb: Path) -> dict[str, str]:
    """The control fields of a .deb (continuation lines joined)."""
    text = run_checked(["dpkg-deb", "-f", str(deb)], timeout=60)
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key is not None:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


def _image_dependency(meta_package: str, depends: str) -> tuple[str, str | None] | None:
    """Find ``linux-image-X (= V)`` in a Depends field: ``(X, V)`` (V may be None)."""
    for clause in depends.split(","):
        for alternative in clause.split("|"):
            m = re.match(
                r"^\s*(linux-image-[a-z0-9+.-]+)(?::\w+)?\s*(?:\(\s*=\s*([^)\s]+)\s*\))?",
                alternative,
            )
            if m and m.group(1) != meta_package:
                return m.group(1), m.group(2)
    return None


def _find_modules_root(extracted: Path) -> Path:
    # bookworm ships /lib/modules; merged-/usr kernels (trixie) ship /usr/lib/modules.
    for candidate in (extracted / "lib" / "modules", extracted / "usr" / "lib" / "modules"):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    raise ProvisionError("the kernel package contains no lib/modules directory")


def _keep_needed(extracted: Path, tree: Path) -> str:
    """Move what a guest needs from ``extracted`` into ``tree``; returns the release."""
    modroot = _find_modules_root(extracted)
    releases = sorted(p.name for p in modroot.iterdir() if p.is_dir())
    if len(releases) != 1:
        raise ProvisionError(f"expected one kernel release in the package, found {releases}")
    release = releases[0]
    src_mods = modroot / release
    boot = extracted / "boot"
    needed = {
        boot / f"vmlinuz-{release}": tree / "boot" / f"vmlinuz-{release}",
        boot / f"config-{release}": tree / "boot" / f"config-{release}",
        src_mods / "kernel": tree / "lib" / "modules" / release / "kernel",
        src_mods / "modules.builtin": tree / "lib" / "modules" / release / "modules.builtin",
    }
    optional = {boot / f"System.map-{release}": tree / "boot" / f"System.map-{release}"}
    for name in _MODULE_META:
        optional[src_mods / name] = tree / "lib" / "modules" / release / name
    for src in needed:
        if not src.exists():
            raise ProvisionError(f"the kernel package lacks {src.relative_to(extracted)}")
    for src, dst in {**needed, **optional}.items():
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
    return release


def _publish(tree: Path, target: Path) -> None:
    """Rename ``tree`` to ``target``; an existing complete ``target`` wins."""
    try:
        tree.rename(target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise ProvisionError(f"cannot publish kernel tree {target}: {exc}") from exc
    else:
        return
    # The target exists: complete (someone published it) or a broken leftover.
    if (target / "boot").is_dir() and (target / "lib" / "modules").is_dir():
        shutil.rmtree(tree)
        return
    doomed = target.with_name(f"{_TMP_PREFIX}broken-{target.name}")
    target.rename(doomed)
    tree.rename(target)
    shutil.rmtree(doomed, ignore_errors=True)


def _load_tree(root: Path, package: str, version: str) -> Kernel | None:
    """A :class:`Kernel` for an unpacked tree, or None if it is absent or incomplete."""
    modroot = root / "lib" / "modules"
    try:
        releases = [p.name for p in modroot.iterdir() if p.is_dir()]
    except OSError:
        return None
    if len(releases) != 1:
        return None
    release = releases[0]
    kernel = Kernel(
        package=package,
        version=version,
        release=release,
        root=root,
        vmlinuz=root / "boot" / f"vmlinuz-{release}",
        modules_dir=modroot / release,
        config=root / "boot" / f"config-{release}",
    )
    return kernel if kernel.is_complete() else None


def _write_pointer(dirs: Dirs, meta_package: str, kernel: Kernel) -> None:
    pointer = _pointer(dirs, meta_package)
    fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".json", dir=dirs.kernels)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(kernel.to_json(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        tmp.chmod(0o644)
        tmp.replace(pointer)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temps(kernels: Path) -> None:
    # Temporary entries are only created while holding the lock, so any we see
    # now were left by a provisioner that died.
    for entry in kernels.glob(f"{_TMP_PREFIX}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
