"""Debian root filesystems built with mmdebstrap and packed as erofs.

The pipeline is three plain steps, each a pure function turned into a command
line or a small filesystem edit:

1. :func:`mmdebstrap_argv` — a ``minbase`` chroot with the requested packages,
   documentation and translations left out, using the host's apt sources for
   the requested suite (see :func:`select_sources`), run in throw-away mount and
   PID namespaces (:func:`isolated_argv`) so an interrupted build leaves neither
   processes nor mounts behind.
2. :func:`prepare_tree` — mount points, ``/etc/hostname``, ``/etc/hosts``, no
   host ``/etc/resolv.conf``, and a check that python3 is where the manifest
   will say it is.
3. :func:`mkfs_erofs_argv` — a compressed erofs with fixed timestamps and a UUID
   derived from the digest.

With ``SOURCE_DATE_EPOCH`` fixed (it is part of the spec) two builds against the
same mirror content produce byte-identical erofs files.

mmdebstrap runs in ``root`` mode, so building requires root.  Its ``unshare``
mode would work unprivileged but leaves a directory owned by subordinate ids,
and erofs-utils 1.5 cannot pack from a tarball (``--tar`` arrived in 1.6), so a
non-root build fails early with a hint instead.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.base import canonical_digest, log_line, remove_tree
from stoker.procs import run_checked

BUILDER_NAME = "debian"
#: Bump whenever a change here alters the produced filesystem for the same spec.
BUILDER_VERSION = 2

#: What a typical build needs, and nothing else; recommends are not installed.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "build-essential",
    "ca-certificates",
    "git",
    "gzip",
    "make",
    "procps",
    "python3",
    "tar",
    "xz-utils",
)

#: Debian 12 "bookworm" release date, 2023-06-10T00:00:00Z.
BOOKWORM_RELEASE_EPOCH = 1686355200

HOSTNAME = "stoker"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

_VARIANTS = frozenset(
    {"extract", "custom", "essential", "apt", "required", "minbase", "buildd", "important"}
)
_COMPRESSORS = frozenset({"lz4", "lz4hc", "lzma", "deflate", "zstd"})
_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{0,63}")
# Debian policy 5.6.1 package names, optionally with :arch and =version.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
_COMPRESSION_RE = re.compile(r"(?P<algo>[a-z0-9]+)(,(?P<level>[0-9]{1,2}))?")
# Suites that have no -updates / -security companions.
_ROLLING_SUITES = frozenset({"sid", "unstable", "experimental", "rc-buggy"})

# dpkg path filters: no docs (except copyright), man pages, info or translations.
_DPKG_OPTIONS: tuple[str, ...] = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
_APT_PARTIAL_DIRS = ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial")
_APT_OPTIONS: tuple[str, ...] = (
    'APT::Install-Recommends "false"',
    'APT::Install-Suggests "false"',
)


@dataclass(frozen=True)
class DebianSpec:
    """What goes into a Debian image.  Validated on creation (raises UsageError)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    #: erofs compressor, optionally with a level: ``"lz4hc"``, ``"lz4hc,12"``, ``"none"``.
    compression: str = "lz4hc"
    #: Physical cluster size for compressed files; bigger compresses better.
    pcluster_size: int = 65536
    #: Timestamp given to every file, and to mmdebstrap for reproducibility.
    source_date_epoch: int = BOOKWORM_RELEASE_EPOCH
    #: Where python3 must be inside the image (the guest agent runs with it).
    python: str = "/usr/bin/python3"

    def __post_init__(self) -> None:
        if not _SUITE_RE.fullmatch(self.suite):
            raise UsageError(f"invalid Debian suite {self.suite!r}")
        if self.variant not in _VARIANTS:
            raise UsageError(
                f"invalid mmdebstrap variant {self.variant!r}",
                hint=f"use one of {', '.join(sorted(_VARIANTS))}",
            )
        if isinstance(self.packages, str):
            raise UsageError("packages must be a list of package names, not one string")
        for pkg in self.packages:
            if not _PACKAGE_RE.fullmatch(pkg):
                raise UsageError(f"invalid Debian package name {pkg!r}")
        if self.compression != "none":
            match = _COMPRESSION_RE.fullmatch(self.compression)
            if match is None or match["algo"] not in _COMPRESSORS:
                raise UsageError(
                    f"invalid erofs compression {self.compression!r}",
                    hint="use lz4, lz4hc, lz4hc,<level> or none",
                )
        if self.pcluster_size < 4096 or self.pcluster_size % 4096:
            raise UsageError(f"pcluster_size must be a multiple of 4096, not {self.pcluster_size}")
        if self.source_date_epoch < 0:
            raise UsageError("source_date_epoch must not be negative")
        if not self.python.startswith("/") or ".." in PurePosixPath(self.python).parts:
            raise UsageError(f"python must be an absolute path, not {self.python!r}")
        # Normalise: package order and duplicates do not change the result.
        object.__setattr__(self, "packages", tuple(sorted(set(self.packages))))

    def to_json(self) -> dict[str, object]:
        """The normalised spec as JSON-compatible data (for digests and manifests)."""
        return {
            "suite": self.suite,
            "variant": self.variant,
            "packages": list(self.packages),
            "compression": self.compression,
            "pcluster_size": self.pcluster_size,
            "source_date_epoch": self.source_date_epoch,
            "python": self.python,
        }


# --- apt sources -------------------------------------------------------------------------------

# one-line option name -> deb822 field (sources.list(5))
_ONE_LINE_OPTIONS = {
    "arch": "Architectures",
    "lang": "Languages",
    "target": "Targets",
    "pdiffs": "PDiffs",
    "by-hash": "By-Hash",
    "allow-insecure": "Allow-Insecure",
    "allow-weak": "Allow-Weak",
    "allow-downgrade-to-insecure": "Allow-Downgrade-To-Insecure",
    "trusted": "Trusted",
    "signed-by": "Signed-By",
    "check-valid-until": "Check-Valid-Until",
    "valid-until-min": "Valid-Until-Min",
    "valid-until-max": "Valid-Until-Max",
    "check-date": "Check-Date",
    "date-max-future": "Date-Max-Future",
    "inrelease-path": "InRelease-Path",
    "snapshot": "Snapshot",
}
_LIST_OPTIONS = frozenset({"Architectures", "Languages", "Targets", "Signed-By"})


@dataclass(frozen=True)
class SourceEntry:
    """One apt source, in deb822 terms (one-line entries are converted)."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...] = ()
    #: Other deb822 fields (Signed-By, Architectures, ...), in file order.
    options: tuple[tuple[str, str], ...] = field(default=())

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key.lower() == name.lower():
                return value
        return None


def parse_one_line_sources(text: str) -> list[SourceEntry]:
    """Parse ``sources.list`` one-line style; malformed lines are skipped."""
    entries: list[SourceEntry] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind not in ("deb", "deb-src"):
            continue
        rest = rest.strip()
        options: list[tuple[str, str]] = []
        if rest.startswith("["):
            inner, sep, rest = rest[1:].partition("]")
            if not sep:
                continue
            for item in inner.split():
                key, eq, value = item.partition("=")
                if not eq:
                    continue
                suffix = ""
                if key.endswith(("+", "-")):
                    suffix = "-Add" if key.endswith("+") else "-Remove"
                    key = key[:-1]
                name = _ONE_LINE_OPTIONS.get(key)
                if name is None:
                    continue
                if name in _LIST_OPTIONS:
                    value = " ".join(v for v in value.split(",") if v)
                options.append((name + suffix, value))
        words = rest.split()
        if len(words) < 2:
            continue
        entries.append(
            SourceEntry(
                types=(kind,),
                uris=(words[0],),
                suites=(words[1],),
                components=tuple(words[2:]),
                options=tuple(options),
            )
        )
    return entries


def parse_deb822_sources(text: str) -> list[SourceEntry]:
    """Parse ``*.sources`` deb822 style; stanzas with ``Enabled: no`` are skipped."""
    entries: list[SourceEntry] = []
    stanzas: list[list[tuple[str, str]]] = [[]]
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanzas[-1]:
                stanzas.append([])
            continue
        if raw[0] in " \t":
            if stanzas[-1]:
                key, value = stanzas[-1][-1]
                stanzas[-1][-1] = (key, value + "\n" + raw[1:])
            continue
        key, sep, value = raw.partition(":")
        if sep:
            stanzas[-1].append((key.strip(), value.strip()))
    for stanza in stanzas:
        fields = {key.lower(): value for key, value in stanza}
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        types = tuple(fields.get("types", "").split())
        uris = tuple(fields.get("uris", "").split())
        suites = tuple(fields.get("suites", "").split())
        if not (types and uris and suites):
            continue
        core = {"types", "uris", "suites", "components", "enabled"}
        entries.append(
            SourceEntry(
                types=types,
                uris=uris,
                suites=suites,
                components=tuple(fields.get("components", "").split()),
                options=tuple((k, v) for k, v in stanza if k.lower() not in core),
            )
        )
    return entries


def _is_debian_archive(entry: SourceEntry) -> bool:
    # Third-party repositories (docker, nodesource, ...) often reuse the suite
    # name; keep only what looks like the Debian archive or a mirror of it.
    if "main" not in entry.components:
        return False
    signed_by = entry.option("Signed-By")
    if signed_by is not None and "debian-archive" not in signed_by:
        return False
    for uri in entry.uris:
        segments = uri.split("://", 1)[-1].split("/")[1:]
        if not any(seg.startswith("debian") for seg in segments):
            return False
    return True


def filter_sources(entries: Iterable[SourceEntry], suite: str) -> list[SourceEntry]:
    """Keep the binary Debian-archive entries of ``suite`` and its updates/security suites."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security", f"{suite}/updates"}
    kept: list[SourceEntry] = []
    for entry in entries:
        if "deb" not in entry.types or not _is_debian_archive(entry):
            continue
        suites = tuple(s for s in entry.suites if s in wanted)
        if suites:
            kept.append(replace(entry, types=("deb",), suites=suites))
    return kept


def default_sources(suite: str) -> list[SourceEntry]:
    """deb.debian.org entries for ``suite``, used when the host has none for it."""
    if suite in _ROLLING_SUITES:
        return [SourceEntry(("deb",), (DEBIAN_MIRROR,), (suite,), ("main",))]
    return [
        SourceEntry(("deb",), (DEBIAN_MIRROR,), (suite, f"{suite}-updates"), ("main",)),
        SourceEntry(("deb",), (DEBIAN_SECURITY_MIRROR,), (f"{suite}-security",), ("main",)),
    ]


def render_deb822(entries: Sequence[SourceEntry]) -> str:
    """Format entries as a deb822 ``.sources`` file."""
    stanzas: list[str] = []
    for entry in entries:
        lines = [
            f"Types: {' '.join(entry.types)}",
            f"URIs: {' '.join(entry.uris)}",
            f"Suites: {' '.join(entry.suites)}",
        ]
        if entry.components:
            lines.append(f"Components: {' '.join(entry.components)}")
        for key, value in entry.options:
            first, *rest = value.split("\n")
            lines.append(f"{key}: {first}".rstrip())
            lines.extend(f" {line}" for line in rest)
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)


def read_host_sources(etc_apt: Path = Path("/etc/apt")) -> list[SourceEntry]:
    """All entries of the host's ``sources.list`` and ``sources.list.d``."""
    entries: list[SourceEntry] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        entries += parse_one_line_sources(main.read_text(errors="replace"))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.name.endswith(".list") and path.is_file():
                entries += parse_one_line_sources(path.read_text(errors="replace"))
            elif path.name.endswith(".sources") and path.is_file():
                entries += parse_deb822_sources(path.read_text(errors="replace"))
    return entries


def select_sources(suite: str, etc_apt: Path = Path("/etc/apt")) -> tuple[list[SourceEntry], bool]:
    """The host's entries for ``suite``, or deb.debian.org; second item: from the host."""
    kept = filter_sources(read_host_sources(etc_apt), suite)
    if kept:
        return kept, True
    return default_sources(suite), False


def proxy_env(apt_config_dump: str) -> dict[str, str]:
    """Proxy environment variables from ``apt-config dump`` output.

    Only the global ``Acquire::{http,https,ftp}::Proxy`` settings are carried
    over; per-host settings and ``DIRECT`` are ignored.  They are passed as
    environment to mmdebstrap (apt honours ``http_proxy``) so nothing host
    specific ends up in the image's apt configuration.
    """
    env: dict[str, str] = {}
    pattern = re.compile(r'Acquire::(http|https|ftp)::Proxy "(.*)";', re.IGNORECASE)
    for line in apt_config_dump.splitlines():
        match = pattern.fullmatch(line.strip())
        if match is None:
            continue
        value = match[2].strip()
        if value and value.upper() != "DIRECT":
            env[f"{match[1].lower()}_proxy"] = value
    return env


def host_proxy_env(log: Path) -> dict[str, str]:
    """Proxy settings of the host's apt as environment variables (empty if none)."""
    keys = ["Acquire::http::Proxy", "Acquire::https::Proxy", "Acquire::ftp::Proxy"]
    try:
        out = run_checked(["apt-config", "dump", *keys], log=log, timeout=60)
    except LaunchError:
        log_line(log, "apt-config unavailable; not passing an apt proxy")
        return {}
    return proxy_env(out)


# --- command lines -----------------------------------------------------------------------------


def mmdebstrap_argv(spec: DebianSpec, target: Path, mirror_file: Path) -> list[str]:
    """The mmdebstrap command building ``spec`` into the directory ``target``.

    ``mirror_file`` is a sources file (deb822 or one-line) that mmdebstrap reads
    as its only mirror.  No hooks: post-processing happens in Python.
    """
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        f"--variant={spec.variant}",
    ]
    if spec.packages:
        argv.append(f"--include={','.join(spec.packages)}")
    argv += [f"--aptopt={opt}" for opt in _APT_OPTIONS]
    argv += [f"--dpkgopt={opt}" for opt in _DPKG_OPTIONS]
    argv += [spec.suite, str(target), str(mirror_file)]
    return argv


def isolated_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` in private mount and PID namespaces that die with their parent.

    If stoker is interrupted, :func:`~stoker.procs.run_checked` kills the
    process it started with SIGKILL.  Without this wrapper mmdebstrap would die
    but leave apt and dpkg running in the half-built tree and ``/proc``, ``/sys``
    and device nodes mounted inside it.  Here mmdebstrap is PID 1 of its own PID
    namespace and gets SIGKILL when ``unshare`` dies (``--kill-child``), which
    takes every process of the namespace with it; the mounts it made live only
    in the private mount namespace and vanish with it.
    """
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--", *argv]


def filesystem_uuid(digest: str) -> str:
    """A fixed filesystem UUID derived from the image digest (for reproducibility)."""
    return str(uuid.UUID(bytes=bytes.fromhex(digest)[:16], version=4))


def mkfs_erofs_argv(spec: DebianSpec, output: Path, tree: Path, *, fs_uuid: str) -> list[str]:
    """The mkfs.erofs command packing ``tree`` into ``output`` reproducibly."""
    argv = ["mkfs.erofs", "--quiet"]
    if spec.compression != "none":
        argv += [
            f"-z{spec.compression}",
            f"-C{spec.pcluster_size}",
            # pack file tails into the inode's metadata block (Linux >= 5.17)
            "-Eztailpacking",
        ]
    argv += [
        f"-T{spec.source_date_epoch}",
        f"-U{fs_uuid}",
        str(output),
        str(tree),
    ]
    return argv


# --- the tree ----------------------------------------------------------------------------------


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


def _write_file(path: Path, text: str) -> None:
    # Never write through a symlink: it could point outside the tree.
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(0o644)


def prepare_tree(tree: Path, spec: DebianSpec) -> None:
    """Make a freshly bootstrapped tree fit to boot as a read-only stoker root."""
    for name in ("proc", "sys", "dev", "run", "tmp"):
        (tree / name).mkdir(mode=0o755, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    if (tree / "var" / "tmp").is_dir():
        (tree / "var" / "tmp").chmod(0o1777)
    _write_file(tree / "etc" / "hostname", f"{HOSTNAME}\n")
    _write_file(
        tree / "etc" / "hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    )
    # mmdebstrap copies the host's resolv.conf; the VM sets up its own.
    resolv = tree / "etc" / "resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    # apt leaves these owned by _apt only when _apt could reach the build
    # directory (not under a 0700 home), which would make the image depend on
    # where the cache lives.  apt re-owns them itself when it next runs.
    for rel in _APT_PARTIAL_DIRS:
        partial = tree / rel
        if partial.is_dir() and not partial.is_symlink():
            os.chown(partial, 0, 0, follow_symlinks=False)
            partial.chmod(0o700)
    python = resolve_in_tree(tree, spec.python)
    if python is None or not python.is_file():
        raise ProvisionError(
            f"the image has no python3 at {spec.python}",
            hint="add python3 to the image's packages or set its python path",
        )
    if not python.stat().st_mode & stat.S_IXUSR:
        raise ProvisionError(f"{spec.python} in the image is not executable")


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


def tree_size(tree: Path) -> int:
    """Sum of the sizes of the regular files under ``tree`` (hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(tree):
        for name in files:
            st = (Path(root) / name).lstat()
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# --- the builder -------------------------------------------------------------------------------


def check_host() -> None:
    """Fail early, with a hint, when this host cannot build Debian images."""
    if os.geteuid() != 0:
        raise ProvisionError(
            "building a Debian image needs root (mmdebstrap --mode=root)",
            hint="run the first build as root, or copy a built image into the cache",
        )
    tools = ("mmdebstrap", "mkfs.erofs", "unshare")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise ProvisionError(
            f"missing image build tools: {', '.join(missing)}",
            hint="apt-get install mmdebstrap erofs-utils util-linux",
        )


class DebianBuilder:
    """Builds a :class:`DebianSpec` into an erofs image named ``name``."""

    def __init__(self, spec: DebianSpec, name: str, *, etc_apt: Path = Path("/etc/apt")) -> None:
        self.spec = spec
        self.name = name
        self._etc_apt = etc_apt

    def __repr__(self) -> str:
        return f"DebianBuilder({self.spec!r}, {self.name!r})"

    def spec_digest(self) -> str:
        return canonical_digest(
            {
                "builder": BUILDER_NAME,
                "builder_version": BUILDER_VERSION,
                "spec": self.spec.to_json(),
            }
        )

    def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
        check_host()
        spec = self.spec
        started = time.monotonic()
        entries, from_host = select_sources(spec.suite, self._etc_apt)
        if from_host:
            log_line(log, f"using the host's apt sources for {spec.suite}")
        else:
            log_line(
                log,
                f"no host apt source matches suite {spec.suite!r}; falling back to {DEBIAN_MIRROR}",
            )
        sources_text = render_deb822(entries)
        log_line(log, "apt sources:\n" + sources_text)
        sources_file = workdir / "mirror.sources"
        sources_file.write_text(sources_text)
        env: Mapping[str, str] = {
            "SOURCE_DATE_EPOCH": str(spec.source_date_epoch),
            **host_proxy_env(log),
        }
        tree = workdir / "tree"
        succeeded = False
        try:
            log_line(log, "bootstrapping with mmdebstrap")
            run_checked(
                isolated_argv(mmdebstrap_argv(spec, tree, sources_file)),
                env=env,
                log=log,
                timeout=3600,
                hint="check the network and the apt sources in the log",
            )
            prepare_tree(tree, spec)
            packages = installed_packages(
                (tree / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
            )
            uncompressed = tree_size(tree)
            log_line(log, f"packing {len(packages)} packages, {uncompressed} bytes, as erofs")
            run_checked(
                mkfs_erofs_argv(
                    spec, rootfs_out, tree, fs_uuid=filesystem_uuid(self.spec_digest())
                ),
                log=log,
                timeout=3600,
                hint="apt-get install erofs-utils",
            )
            succeeded = True
        finally:
            try:
                remove_tree(tree, log=log)
            except (OSError, ProvisionError) as exc:
                log_line(log, f"could not remove {tree}: {exc}")
                if succeeded:
                    raise
        log_line(log, f"built in {time.monotonic() - started:.1f}s")
        return {
            "builder": BUILDER_NAME,
            "builder_version": BUILDER_VERSION,
            "spec": spec.to_json(),
            "fstype": "erofs",
            "python": spec.python,
            "packages": packages,
            "uncompressed_size": uncompressed,
            "source_date_epoch": spec.source_date_epoch,
            "apt_sources": sources_text,
        }
