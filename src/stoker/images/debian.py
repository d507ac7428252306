"""Debian (and Ubuntu) root trees bootstrapped with mmdebstrap.

:func:`bootstrap` runs :func:`mmdebstrap_argv`: a ``minbase`` chroot with the
requested packages, documentation and translations left out, using the host's
apt sources for the requested suite (see :func:`select_sources`), in throw-away
mount and PID namespaces (:func:`isolated_argv`) so an interrupted build leaves
neither processes nor mounts behind.  The rest of an image build (users, files,
run steps, packing) is the same for every base: :mod:`stoker.images.builder`.

With ``SOURCE_DATE_EPOCH`` fixed two builds against the same mirror content
produce identical trees.

mmdebstrap runs in ``root`` mode, so building requires root.  Its ``unshare``
mode would work unprivileged but leaves a directory owned by subordinate ids,
and erofs-utils 1.5 cannot pack from a tarball (``--tar`` arrived in 1.6), so a
non-root build fails early with a hint instead.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.base import log_line
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

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

_VARIANTS = frozenset(
    {"extract", "custom", "essential", "apt", "required", "minbase", "buildd", "important"}
)
_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{0,63}")
# Debian policy 5.6.1 package names, optionally with :arch and =version.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
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
_APT_OPTIONS: tuple[str, ...] = (
    'APT::Install-Recommends "false"',
    'APT::Install-Suggests "false"',
)


@dataclass(frozen=True)
class DebianSpec:
    """What mmdebstrap installs.  Validated on creation (raises UsageError)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    #: Given to mmdebstrap (and dpkg, apt) for reproducibility.
    source_date_epoch: int = BOOKWORM_RELEASE_EPOCH

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
        if self.source_date_epoch < 0:
            raise UsageError("source_date_epoch must not be negative")
        # Normalise: package order and duplicates do not change the result.
        object.__setattr__(self, "packages", tuple(sorted(set(self.packages))))

    def to_json(self) -> dict[str, object]:
        """The normalised spec as JSON-compatible data (for digests and manifests)."""
        return {
            "suite": self.suite,
            "variant": self.variant,
            "packages": list(self.packages),
            "source_date_epoch": self.source_date_epoch,
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


UBUNTU_MIRROR = "http://archive.ubuntu.com/ubuntu"
UBUNTU_KEYRING = Path("/usr/share/keyrings/ubuntu-archive-keyring.gpg")
UBUNTU_SUITES = frozenset({"noble", "jammy", "focal"})


def ubuntu_sources(suite: str, keyring: Path = UBUNTU_KEYRING) -> list[SourceEntry]:
    """archive.ubuntu.com entries for ``suite``, signed by the Ubuntu archive keyring."""
    options = (("Signed-By", str(keyring)),)
    suites = (suite, f"{suite}-updates", f"{suite}-security")
    return [SourceEntry(("deb",), (UBUNTU_MIRROR,), suites, ("main", "universe"), options)]


def check_ubuntu_host(
    keyring: Path = UBUNTU_KEYRING, *, mirror: str = UBUNTU_MIRROR, probe_timeout: float = 10.0
) -> None:
    """Fail early and clearly when this host cannot bootstrap Ubuntu.

    Needs the archive keyring (to verify what apt downloads) and the archive
    itself within reach.
    """
    import urllib.error
    import urllib.request

    if not keyring.is_file():
        raise ProvisionError(
            f"building an Ubuntu image needs the Ubuntu archive keyring ({keyring})",
            hint="apt-get install ubuntu-keyring",
        )
    url = f"{mirror}/dists/"
    try:
        with urllib.request.urlopen(url, timeout=probe_timeout):  # noqa: S310 - fixed http URL
            pass
    except (urllib.error.URLError, OSError) as exc:
        raise ProvisionError(
            f"this host cannot reach the Ubuntu archive {mirror}: {getattr(exc, 'reason', exc)}",
            hint="use a debian:* base, or make the archive reachable (proxy, mirror)",
        ) from None


def check_host() -> None:
    """Fail early, with a hint, when this host cannot bootstrap Debian trees."""
    if os.geteuid() != 0:
        raise ProvisionError(
            "building a Debian image needs root (mmdebstrap --mode=root)",
            hint="run the first build as root, or copy a built image into the cache",
        )
    tools = ("mmdebstrap", "unshare")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise ProvisionError(
            f"missing image build tools: {', '.join(missing)}",
            hint="apt-get install mmdebstrap util-linux",
        )


def bootstrap(
    spec: DebianSpec,
    tree: Path,
    workdir: Path,
    log: Path,
    *,
    distribution: str = "debian",
    etc_apt: Path = Path("/etc/apt"),
) -> str:
    """Bootstrap ``spec`` into the new directory ``tree`` with mmdebstrap.

    ``distribution`` is ``"debian"`` (the host's apt sources for the suite,
    else deb.debian.org) or ``"ubuntu"`` (archive.ubuntu.com).  Returns the
    apt sources used (for the manifest).
    """
    check_host()
    if distribution == "ubuntu":
        check_ubuntu_host()
        entries = ubuntu_sources(spec.suite)
    else:
        entries, from_host = select_sources(spec.suite, etc_apt)
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
    log_line(log, "bootstrapping with mmdebstrap")
    run_checked(
        isolated_argv(mmdebstrap_argv(spec, tree, sources_file)),
        env=env,
        log=log,
        timeout=3600,
        hint="check the network and the apt sources in the log",
    )
    return sources_text
