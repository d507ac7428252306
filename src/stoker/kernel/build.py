"""Build stoker's own guest kernel, ``stoker-microvm``, from Debian's ``linux-source``.

Debian's cloud kernel keeps its virtio drivers as modules (hence the initramfs
that loads them) and lacks virtio-mmio command-line devices, which Firecracker
needs.  This module builds a small kernel with everything built in, from the
checked-in fragment ``microvm.config``:

1. **Source.**  ``apt-cache show linux-source`` names the versioned source
   package (``linux-source-6.1 (= 6.1.192-2)``); ``apt-get download`` fetches it,
   ``dpkg-deb -x`` unpacks it (never installed) and the ``.tar.xz`` inside is
   extracted once into the cache.  The tree stays pristine: builds are out of
   tree (``make O=...``), so concurrent builds can share it.
2. **Configure.**  ``make allnoconfig`` with ``KCONFIG_ALLCONFIG=microvm.config``
   (what ``scripts/kconfig/merge_config.sh -n`` does): every option the fragment
   does not name is off where Kconfig allows.  Then every fragment option is
   checked against the resulting ``.config``; Kconfig silently drops options
   whose dependencies are missing, so a mismatch is an error listing them.
3. **Compile.**  ``nice -n 19 make -jN bzImage vmlinux``, output to a log,
   progress (phases, a count of compiled files) through a callback.
4. **Publish** with one ``rename``, under a per-digest lock.

Layout of the cache (next to the Debian kernels of :mod:`stoker.kernel.debian`)::

    kernels/
      stoker-microvm.json                 pointer: the last kernel built (kernel.json)
      stoker-microvm-<digest12>/
        bzImage                           compressed image (QEMU; Linux boot protocol)
        vmlinux                           ELF with a PVH note (Firecracker, Cloud Hypervisor,
                                          QEMU's PVH boot)
        config                            the resolved .config
        build.log                         the full make output
        kernel.json                       BuiltKernel.to_json(), a superset of Kernel's
        lib/modules/<release>/            modules.builtin and an empty kernel/: lets the
                                          initramfs builder treat this as a Kernel with
                                          every guest module built in
      src/linux-source-6.1_6.1.192-2/     the unpacked source tree (about 1.5 GB)
      .locks/*.lock                       fcntl locks: one per digest, one per source
      .build/<digest12>-<random>/         a build in progress (or the remains of a killed one)

``.build`` is deliberately not named ``.tmp-*``: the Debian provisioner deletes
those under its own lock, which a kernel build does not hold.

The digest covers the fragment, the source package and version, the builder
version and the make variables; ``-j`` and ``nice`` do not change the output
and are left out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from stoker.errors import LaunchError, ProvisionError
from stoker.kernel.debian import Kernel
from stoker.paths import Dirs
from stoker.procs import DIE_WITH_PARENT, run_checked

Say = Callable[[str], None]
BootImage = Literal["bzImage", "vmlinux"]

#: The kernel's name in image specs (``kernel = "stoker-microvm"``) and in the cache.
KERNEL_NAME = "stoker-microvm"
#: The Debian metapackage whose ``Depends`` names the versioned source package.
SOURCE_META_PACKAGE = "linux-source"
#: Bump when the build procedure changes in a way that changes the output.
BUILDER_VERSION = 1
#: The make targets; both images come out of one build.
TARGETS: tuple[str, ...] = ("bzImage", "vmlinux")
#: Variables on every make command line.  Fixed user, host and timestamp make
#: ``uname -v`` reproducible; they enter the digest.
MAKE_VARIABLES: tuple[str, ...] = (
    "ARCH=x86_64",
    "KBUILD_BUILD_USER=stoker",
    "KBUILD_BUILD_HOST=stoker",
    "KBUILD_BUILD_TIMESTAMP=1970-01-01",
    "KBUILD_BUILD_VERSION=1",
)
#: Build-host programs (``apt-get``/``dpkg-deb`` come with Debian).
BUILD_TOOLS: tuple[str, ...] = (
    "apt-cache",
    "apt-get",
    "dpkg-deb",
    "tar",
    "xz",
    "make",
    "gcc",
    "ld",
    "flex",
    "bison",
    "bc",
    "perl",
    "nice",
)
BUILD_DEPS_HINT = "apt-get install build-essential flex bison bc libelf-dev xz-utils"
#: Niceness of the compile: builds share the host with running VMs.
NICENESS = 19

_POINTER = f"{KERNEL_NAME}.json"
_BUILD_DIR = ".build"
_LOCKS_DIR = ".locks"
_SOURCE_DIR = "src"
_APT_HINT = "run `apt-get update` (the package lists may be missing or out of date)"
_APT_TIMEOUT = 900.0
_CONFIG_TIMEOUT = 600.0
_BUILD_TIMEOUT = 4 * 3600.0
_HEARTBEAT = 30.0
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9.+~:-]+$")
_OPTION_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_COMPILE_RE = re.compile(r"^\s+CC\s+\S")


# --- the fragment and the .config check ----------------------------------------------


def fragment_text() -> str:
    """The checked-in config fragment, ``stoker/kernel/microvm.config``."""
    return resources.files("stoker.kernel").joinpath("microvm.config").read_text()


def parse_config(text: str) -> dict[str, str]:
    """Options of a ``.config`` or fragment: ``{"CONFIG_X": "y"}``.

    ``# CONFIG_X is not set`` and ``CONFIG_X=n`` both read as ``"n"``; string
    values keep their quotes, as Kconfig writes them.  Other comments and blank
    lines are ignored; any other line raises ``ValueError`` (a typo in the
    fragment must not pass silently).
    """
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if m := _UNSET_RE.match(line):
            options[m.group(1)] = "n"
        elif m := _OPTION_RE.match(line):
            options[m.group(1)] = m.group(2)
        elif line and not line.startswith("#"):
            raise ValueError(f"line {number}: not a config option: {raw!r}")
    return options


@dataclass(frozen=True)
class Mismatch:
    """A fragment option that did not survive configuration."""

    option: str
    wanted: str
    got: str | None  # None: absent from .config (its dependencies are not met)

    def __str__(self) -> str:
        got = "absent (unmet dependencies)" if self.got is None else f"{self.got!r}"
        return f"{self.option}: wanted {self.wanted!r}, got {got}"


def check_config(fragment: Mapping[str, str], config: Mapping[str, str]) -> list[Mismatch]:
    """The options of ``fragment`` whose value in ``config`` differs, in fragment order.

    An option the fragment turns off (``n``) may be absent from the ``.config``:
    that also means off.
    """
    mismatches = []
    for option, wanted in fragment.items():
        got = config.get(option)
        if got == wanted or (wanted == "n" and got is None):
            continue
        mismatches.append(Mismatch(option, wanted, got))
    return mismatches


# --- identity ----------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePackage:
    """A versioned Debian kernel source package, e.g. linux-source-6.1 6.1.192-2."""

    package: str
    version: str

    @property
    def dir_name(self) -> str:
        # Epochs ("1:2.3") are legal in versions; keep file names colon-free like apt does.
        return f"{self.package}_{self.version.replace(':', '%3a')}"


def kernel_digest(
    fragment: str,
    source: SourcePackage,
    *,
    builder_version: int = BUILDER_VERSION,
    make_variables: Sequence[str] = MAKE_VARIABLES,
    targets: Sequence[str] = TARGETS,
) -> str:
    """The hex sha256 naming a build: a pure function of everything that shapes it."""
    h = hashlib.sha256()
    for label, value in (
        ("builder", str(builder_version)),
        ("fragment", fragment),
        ("package", source.package),
        ("version", source.version),
        ("make", "\0".join(make_variables)),
        ("targets", "\0".join(targets)),
    ):
        data = value.encode()
        # Length-prefixed, so no two input sets can hash the same byte stream.
        h.update(f"{label}:{len(data)}:".encode() + data)
    return h.hexdigest()


def fragment_sha256(fragment: str) -> str:
    return hashlib.sha256(fragment.encode()).hexdigest()


# --- command lines -------------------------------------------------------------------


def config_argv(source: Path, objdir: Path, fragment: Path) -> list[str]:
    """``make allnoconfig`` with the fragment applied, building into ``objdir``."""
    return [
        "make",
        "-C", str(source),
        f"O={objdir}",
        *MAKE_VARIABLES,
        f"KCONFIG_ALLCONFIG={fragment}",
        "allnoconfig",
    ]  # fmt: skip


def build_argv(source: Path, objdir: Path, *, jobs: int, niceness: int = NICENESS) -> list[str]:
    """The compile: ``nice -n 19 make -jN bzImage vmlinux`` into ``objdir``."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    return [
        "nice", "-n", str(niceness),
        "make",
        "-C", str(source),
        f"O={objdir}",
        f"-j{jobs}",
        *MAKE_VARIABLES,
        *TARGETS,
    ]  # fmt: skip


# --- the record ----------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltKernel:
    """A ``stoker-microvm`` kernel in the cache."""

    digest: str  # hex sha256, see kernel_digest()
    source: SourcePackage
    release: str  # `uname -r`, e.g. "6.1.192"
    root: Path  # kernels/stoker-microvm-<digest12>
    fragment_sha256: str
    builder_version: int
    build_seconds: float
    compiler: str  # first line of `gcc --version`, for diagnostics

    @property
    def bzimage(self) -> Path:
        return self.root / "bzImage"

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def is_complete(self) -> bool:
        """True when every file this record names is present."""
        return (
            self.bzimage.is_file()
            and self.vmlinux.is_file()
            and self.config.is_file()
            and (self.modules_dir / "modules.builtin").is_file()
            and (self.modules_dir / "kernel").is_dir()
        )

    def as_kernel(self, *, boot: BootImage = "bzImage") -> Kernel:
        """This kernel as a :class:`Kernel` record, for :func:`build_initramfs` and backends.

        Its module tree is empty and ``modules.builtin`` lists every built-in
        driver, so the initramfs gets an empty ``load.order`` (``modules=()``
        or the default guest module list alike).  ``vmlinuz`` is the image to
        boot: the bzImage, or with ``boot="vmlinux"`` the ELF that QEMU enters
        through PVH (no decompression) and Firecracker and Cloud Hypervisor
        load as it is.  The initramfs is the same for both.
        """
        return Kernel(
            package=KERNEL_NAME,
            version=self.digest,
            release=self.release,
            root=self.root,
            vmlinuz=self.vmlinux if boot == "vmlinux" else self.bzimage,
            modules_dir=self.modules_dir,
            config=self.config,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            # Kernel.to_json()'s keys, so stoker.kernel.cached_kernel(dirs, "stoker-microvm")
            # can read the pointer too.
            **self.as_kernel().to_json(),
            "name": KERNEL_NAME,
            "digest": self.digest,
            "source_package": self.source.package,
            "source_version": self.source.version,
            "bzimage": str(self.bzimage),
            "vmlinux": str(self.vmlinux),
            "fragment_sha256": self.fragment_sha256,
            "builder_version": self.builder_version,
            "build_seconds": self.build_seconds,
            "compiler": self.compiler,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BuiltKernel:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a malformed mapping."""
        strings: dict[str, str] = {}
        for key in (
            "digest",
            "source_package",
            "source_version",
            "release",
            "root",
            "fragment_sha256",
            "compiler",
        ):
            value = d.get(key)
            if not isinstance(value, str) or (not value and key != "compiler"):
                raise ValueError(f"kernel record: {key!r} missing or not a string")
            strings[key] = value
        version = d.get("builder_version")
        seconds = d.get("build_seconds")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("kernel record: 'builder_version' missing or not an integer")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise ValueError("kernel record: 'build_seconds' missing or not a number")
        if "/" in strings["release"] or strings["release"] in (".", ".."):
            raise ValueError(f"kernel record: bad release {strings['release']!r}")
        return cls(
            digest=strings["digest"],
            source=SourcePackage(strings["source_package"], strings["source_version"]),
            release=strings["release"],
            root=Path(strings["root"]),
            fragment_sha256=strings["fragment_sha256"],
            builder_version=version,
            build_seconds=float(seconds),
            compiler=strings["compiler"],
        )


def entry_name(digest: str) -> str:
    """The cache directory name of the build ``digest``."""
    return f"{KERNEL_NAME}-{digest[:12]}"


# --- cache lookups -------------------------------------------------------------------


def load_entry(root: Path) -> BuiltKernel | None:
    """The kernel published in ``root``, or None if absent, malformed or incomplete."""
    try:
        kernel = BuiltKernel.from_json(json.loads((root / "kernel.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None
    if kernel.root != root or not kernel.is_complete():
        return None
    return kernel


def cached_microvm_kernel(dirs: Dirs, *, fragment: str | None = None) -> BuiltKernel | None:
    """The kernel last built, if complete and built from the current fragment and builder.

    Never runs apt or make: a file read and a few ``stat`` calls, fit for the
    boot path.  A newer ``linux-source`` is picked up only by
    :func:`build_microvm_kernel` with ``refresh=True``.
    """
    text = fragment_text() if fragment is None else fragment
    try:
        record = json.loads((dirs.kernels / _POINTER).read_text())
        kernel = BuiltKernel.from_json(record)
    except (OSError, ValueError, AttributeError):
        return None
    if kernel.fragment_sha256 != fragment_sha256(text) or kernel.builder_version != (
        BUILDER_VERSION
    ):
        return None
    return load_entry(kernel.root)


def _write_json_atomic(path: Path, document: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        with tmp.open("w") as fh:
            json.dump(document, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_pointer(dirs: Dirs, kernel: BuiltKernel) -> None:
    """Make ``kernel`` the one :func:`cached_microvm_kernel` returns."""
    _write_json_atomic(dirs.kernels / _POINTER, kernel.to_json())


# --- locking and publishing ----------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, calling ``on_wait`` first if someone else has it.

    Lock files are never deleted (that would race with other lockers).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def publish(staged: Path, target: Path, *, complete: Callable[[Path], bool]) -> bool:
    """Rename the finished directory ``staged`` to ``target``.

    Returns True when ``staged`` became ``target``.  When ``target`` already
    exists and ``complete(target)`` holds, it wins and ``staged`` is deleted
    (False); an incomplete leftover is moved aside and replaced.  Callers hold
    the target's lock, so only leftovers of killed builds are ever replaced.
    """
    try:
        staged.rename(target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise ProvisionError(f"cannot publish {target}: {exc}") from exc
    else:
        return True
    if complete(target):
        shutil.rmtree(staged)
        return False
    doomed = staged.with_name(f"{staged.name}-broken")
    target.rename(doomed)
    staged.rename(target)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def _remove_stale(build_root: Path, prefix: str) -> None:
    # Entries are named <prefix>-<random> and created only under the lock of
    # <prefix>, which the caller holds: any we see now belong to a dead build.
    if not build_root.is_dir():
        return
    pattern = re.compile(re.escape(prefix) + r"-[0-9a-f]{8}")
    for entry in build_root.iterdir():
        if pattern.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


# --- the source ----------------------------------------------------------------------


def source_dependency(depends: str) -> SourcePackage | None:
    """``linux-source-X.Y (= V)`` from a ``Depends`` field, or None."""
    for clause in depends.split(","):
        for alternative in clause.split("|"):
            m = re.match(
                r"^\s*(linux-source-\d[a-z0-9+.-]*)(?::\w+)?\s*\(\s*=\s*([^)\s]+)\s*\)",
                alternative,
            )
            if m:
                return SourcePackage(m.group(1), m.group(2))
    return None


def resolve_source(meta_package: str = SOURCE_META_PACKAGE) -> SourcePackage:
    """The source package ``meta_package`` currently points at (apt's local lists only)."""
    if not _PACKAGE_RE.match(meta_package):
        raise ProvisionError(f"invalid Debian package name {meta_package!r}")
    text = run_checked(
        ["apt-cache", "show", "--no-all-versions", meta_package],
        timeout=120,
        hint=_APT_HINT,
    )
    fields = _control_fields(text)
    if re.match(r"^linux-source-\d", meta_package):
        version = fields.get("Version", "")
        found = SourcePackage(meta_package, version) if version else None
    else:
        found = source_dependency(fields.get("Depends", ""))
    if found is None or not _VERSION_RE.match(found.version):
        raise ProvisionError(
            f"{meta_package} does not name a versioned linux-source-* package",
            hint=_APT_HINT,
        )
    return found


def _control_fields(text: str) -> dict[str, str]:
    """The fields of the first stanza of Debian control text (continuations joined)."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[:1] in (" ", "\t") and key is not None:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


def ensure_source(dirs: Dirs, source: SourcePackage, say: Say) -> Path:
    """The unpacked source tree of ``source``, downloading and extracting it once."""
    tree = dirs.kernels / _SOURCE_DIR / source.dir_name
    if (tree / "Makefile").is_file():
        return tree
    lock = dirs.kernels / _LOCKS_DIR / f"src-{source.dir_name}.lock"
    waiting = f"waiting for another process unpacking {source.package}"
    with locked(lock, on_wait=lambda: say(waiting)):
        if (tree / "Makefile").is_file():
            return tree
        build_root = dirs.kernels / _BUILD_DIR
        prefix = f"src-{source.dir_name}"
        _remove_stale(build_root, prefix)
        work = build_root / f"{prefix}-{secrets.token_hex(4)}"
        work.mkdir(parents=True)
        try:
            say(f"downloading {source.package} {source.version}")
            run_checked(
                ["apt-get", "download", "-q", f"{source.package}={source.version}"],
                cwd=work,
                timeout=_APT_TIMEOUT,
                hint=_APT_HINT,
            )
            debs = sorted(work.glob("*.deb"))
            if len(debs) != 1:
                raise ProvisionError(
                    f"apt-get download {source.package} produced {len(debs)} .deb files"
                )
            say(f"unpacking {source.package} {source.version}")
            extracted = work / "deb"
            run_checked(["dpkg-deb", "-x", str(debs[0]), str(extracted)], timeout=600)
            debs[0].unlink()
            tarball = extracted / "usr" / "src" / f"{source.package}.tar.xz"
            if not tarball.is_file():
                raise ProvisionError(f"{source.package} holds no usr/src/{tarball.name}")
            unpacked = work / "tree"
            unpacked.mkdir()
            run_checked(
                ["tar", "-xf", str(tarball), "-C", str(unpacked), "--no-same-owner"],
                timeout=1800,
            )
            top = unpacked / source.package
            if not (top / "Makefile").is_file():
                raise ProvisionError(f"{tarball.name} has no {source.package}/Makefile")
            tree.parent.mkdir(parents=True, exist_ok=True)
            publish(top, tree, complete=lambda p: (p / "Makefile").is_file())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tree


# --- the build -----------------------------------------------------------------------


def missing_tools(tools: Sequence[str] = BUILD_TOOLS) -> list[str]:
    """The build-host programs that are not on ``PATH``."""
    return [tool for tool in tools if shutil.which(tool) is None]


def build_microvm_kernel(
    dirs: Dirs,
    *,
    refresh: bool = False,
    jobs: int | None = None,
    progress: Say | None = None,
) -> BuiltKernel:
    """Return the ``stoker-microvm`` kernel, building it if needed (minutes).

    Without ``refresh`` the last kernel built from the current fragment is
    returned at once; with it, ``linux-source`` is resolved again and a new
    kernel is built only if that changes the digest.  Safe to call
    concurrently: builders of one digest serialise on its lock and the loser
    returns the winner's kernel.  Raises :class:`ProvisionError` (missing
    build tools, dropped config options) or :class:`LaunchError` (apt, make).
    """
    say = progress or (lambda _msg: None)
    fragment = fragment_text()
    if not refresh:
        kernel = cached_microvm_kernel(dirs, fragment=fragment)
        if kernel is not None:
            return kernel
    missing = missing_tools()
    if missing:
        raise ProvisionError(
            f"building a kernel needs {', '.join(missing)}, not found on PATH",
            hint=BUILD_DEPS_HINT,
        )
    say(f"resolving {SOURCE_META_PACKAGE}")
    source = resolve_source()
    digest = kernel_digest(fragment, source)
    target = dirs.kernels / entry_name(digest)
    kernel = load_entry(target)
    if kernel is None:
        lock = dirs.kernels / _LOCKS_DIR / f"{entry_name(digest)}.lock"
        waiting = f"waiting for another build of {entry_name(digest)}"
        with locked(lock, on_wait=lambda: say(waiting)):
            kernel = load_entry(target)
            if kernel is None:
                kernel = _build(dirs, fragment, source, digest, jobs or os.cpu_count() or 1, say)
    write_pointer(dirs, kernel)
    return kernel


def _build(
    dirs: Dirs, fragment: str, source: SourcePackage, digest: str, jobs: int, say: Say
) -> BuiltKernel:
    name = entry_name(digest)
    log = dirs.logs / f"kernel-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"building {name} ({digest}) from {source.package} {source.version}\n")
    started = time.monotonic()
    tree = ensure_source(dirs, source, say)
    build_root = dirs.kernels / _BUILD_DIR
    _remove_stale(build_root, name)
    work = build_root / f"{name}-{secrets.token_hex(4)}"
    objdir = work / "obj"
    objdir.mkdir(parents=True)
    try:
        fragment_path = work / "microvm.config"
        fragment_path.write_text(fragment)
        say(f"configuring {name} (log: {log})")
        run_checked(
            config_argv(tree, objdir, fragment_path),
            timeout=_CONFIG_TIMEOUT,
            log=log,
            hint=BUILD_DEPS_HINT,
        )
        config_text = (objdir / ".config").read_text()
        dropped = check_config(parse_config(fragment), parse_config(config_text))
        if dropped:
            listing = "\n    ".join(str(m) for m in dropped)
            raise ProvisionError(
                f"the kernel configuration dropped {len(dropped)} option(s) "
                f"of microvm.config:\n    {listing}\n  full log: {log}",
                hint="add the options they depend on to src/stoker/kernel/microvm.config",
            )
        say(f"compiling {source.package} {source.version} with {jobs} job(s); takes a while")
        run_make(build_argv(tree, objdir, jobs=jobs), log=log, say=say, timeout=_BUILD_TIMEOUT)

        release = (objdir / "include" / "config" / "kernel.release").read_text().strip()
        staged = work / "out"
        modules_dir = staged / "lib" / "modules" / release
        (modules_dir / "kernel").mkdir(parents=True)
        builtin = objdir / "modules.builtin"
        (modules_dir / "modules.builtin").write_bytes(
            builtin.read_bytes() if builtin.is_file() else b""
        )
        for src, dst in (
            (objdir / "arch" / "x86" / "boot" / "bzImage", "bzImage"),
            (objdir / "vmlinux", "vmlinux"),
            (objdir / ".config", "config"),
        ):
            shutil.copyfile(src, staged / dst)
        kernel = BuiltKernel(
            digest=digest,
            source=source,
            release=release,
            root=dirs.kernels / name,
            fragment_sha256=fragment_sha256(fragment),
            builder_version=BUILDER_VERSION,
            build_seconds=round(time.monotonic() - started, 1),
            compiler=_compiler_version(),
        )
        shutil.copyfile(log, staged / "build.log")
        (staged / "kernel.json").write_text(json.dumps(kernel.to_json(), indent=2) + "\n")
        published = publish(staged, kernel.root, complete=lambda p: load_entry(p) is not None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    final = load_entry(kernel.root)
    if final is None:
        raise ProvisionError(f"kernel {name} is incomplete right after publishing (see {log})")
    if published:
        say(f"built {name} (Linux {release}) in {kernel.build_seconds:.0f}s: {kernel.root}")
    return final


def _compiler_version() -> str:
    with contextlib.suppress(LaunchError):
        return run_checked(["gcc", "--version"], timeout=30).splitlines()[0].strip()
    return ""


class MakeProgress:
    """Turns make's output lines into a few progress messages.

    Phases are announced as they start (linking ``vmlinux``, the ``bzImage``);
    while compiling, a count of compiled files at most every ``interval``
    seconds.
    """

    def __init__(self, say: Say, *, interval: float = _HEARTBEAT) -> None:
        self._say = say
        self._interval = interval
        self._started = time.monotonic()
        self._last = self._started
        self.compiled = 0
        self._phases: set[str] = set()

    def line(self, text: str) -> None:
        if _COMPILE_RE.match(text):
            self.compiled += 1
        words = text.split()
        if words[:2] == ["LD", "vmlinux"] or (len(words) >= 2 and words[-1] == "vmlinux.o"):
            self._phase("linking vmlinux")
        elif words[:1] == ["BUILD"] and words[-1].endswith("bzImage"):
            self._phase("building bzImage")
        self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._say(f"compiling: {self.compiled} files, {_minutes(now - self._started)}")

    def _phase(self, phase: str) -> None:
        if phase not in self._phases:
            self._phases.add(phase)
            self._say(f"{phase} ({self.compiled} files compiled)")


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d} elapsed"


def run_make(argv: Sequence[str], *, log: Path, say: Say, timeout: float) -> None:
    """Run a long make, appending its output to ``log`` and reporting progress.

    make and its compilers run in their own process group, killed as a whole
    on timeout or interruption (make itself also dies with us: PDEATHSIG).
    Raises :class:`LaunchError` with the output's tail when make fails.
    """
    progress = MakeProgress(say)
    tail: list[str] = []
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=DIE_WITH_PARENT,
            )
        except FileNotFoundError as exc:
            raise LaunchError(
                f"{argv[0]} is not installed", argv=argv, hint=BUILD_DEPS_HINT
            ) from exc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                pending = b""
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise LaunchError(
                            f"make timed out after {timeout:.0f}s",
                            argv=argv,
                            output="\n".join(tail),
                        )
                    if not sel.select(timeout=min(left, _HEARTBEAT)):
                        progress.tick()
                        continue
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out.write(chunk)
                    *lines, pending = (pending + chunk).split(b"\n")
                    for raw in lines:
                        text = raw.decode(errors="replace")
                        progress.line(text)
                        tail.append(text)
                    del tail[:-40]
            returncode = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            proc.stdout.close()
    if returncode != 0:
        raise LaunchError(
            "make failed",
            argv=argv,
            returncode=returncode,
            output="\n".join(tail),
            hint=f"{BUILD_DEPS_HINT}; full log: {log}",
        )
