"""NixOS images: a flake's ``nixosConfiguration``, its store booted through stoker's initramfs.

A spec with ``base = "nixos:FLAKEREF#ATTR"`` names a NixOS configuration; the
configuration, not the spec, declares packages, users and files.  Building it
takes three steps, each a command line returned by a pure function:

1. :func:`nix_build_argv` evaluates the configuration extended with
   ``stoker-agent.nix`` (the guest agent as a systemd unit, the disk layout of
   the boot contract below) and builds one small derivation whose entries are
   symlinks to the system's ``toplevel``, kernel image, initrd, the agent's
   python and the store registration (``closureInfo``).

   Why one derivation of named links: ``nix build --expr`` on an attribute set
   does build every derivation in it, but ``--print-out-paths`` prints bare
   paths in an order Nix does not document and ``--json`` names derivations,
   not attributes, so telling the kernel from the initrd would rest on
   undocumented behaviour; three ``nix build`` calls would evaluate the
   configuration three times.  The links are unambiguous, cost one evaluation,
   and the ``--out-link`` (instead of ``--no-link``) is a GC root that keeps
   every one of them alive while the closure is packed.  Reading the links also
   spares us parsing ``nix build``'s output, which goes to the log mixed with
   its progress messages.

2. :func:`closure_argv` lists the closure of the toplevel and the registration;
   :func:`parse_closure` accepts nothing but ``/nix/store/<hash>-<name>`` lines.

3. :func:`pack_store_closure` copies exactly those paths (not the whole store)
   into a staging directory and packs it as an erofs whose root *is* the store,
   ``<hash>-<name>`` entries at the top, as microvm.nix builds its store disk.

Evaluation uses ``builtins.getFlake`` with ``--impure``: ``getFlake`` refuses
unlocked references (a local checkout) in pure mode, and our module and the
agent sources are host paths outside the store.  A local flake is referred to
as Nix's own command line would (:func:`flake_url`).  Evaluating a flake runs
its Nix code on the host with the user's privileges (with ``--impure`` it can
read any file the user can): build NixOS bases only from flakes you would
``nix build`` yourself.

Boot contract
-------------
For a manifest whose ``boot.kind`` is ``"nixos"`` the VM (see
:func:`stoker.artifacts.nixos_boot`)

* boots stoker's kernel with stoker's busybox initramfs as stage 1 and the
  parameters ``stoker.init=<toplevel>/init`` and ``boot.params`` (the
  configuration's ``kernel-params`` and microvm.nix ``kernelParams``);
* attaches the image as the first virtio-blk disk (``/dev/vda``, read-only),
  which init.sh mounts on ``/nix/store``, and the ext4 scratch disk as the
  second (``/dev/vdb``), which becomes ``/``; then runs the system's stage 2;
* exposes the virtio-serial port ``org.stoker.agent`` as for every image.

``boot.kernel``, ``boot.initrd`` and ``boot.cmdline`` record the system's
own kernel, initrd and command line (:func:`nixos_kernel_cmdline`), which
are not booted: the configuration's stage 1 would look for disks by its own
rules.  Configurations without ``extendModules`` are built as they are
(:mod:`~stoker.images.nixos_toplevel`); their ``init`` starts the agent.

With ``stoker-agent.nix`` the agent runs as a systemd service, not as PID 1
(its ``ready`` message says ``pid1: false``): it leaves mounts to systemd, does
not set the clock or the hostname on ``init``, unpacks the seed disk with
Python's ``tarfile`` (there is no ``/usr/bin/tar`` on NixOS; slower under
emulation), and its exit after ``shutdown`` powers the VM off through the
unit's ``SuccessAction`` instead of its own ``reboot(2)``.  Commands get
:data:`NIXOS_GUEST_PATH` first on ``PATH`` (the manifest's ``env``): NixOS
has no ``/usr/bin``.  Booting a real NixOS system this way is untested here
(no nixpkgs); the tests boot a stand-in system closure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from stoker.agent.bundle import agent_files
from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.base import canonical_digest, log_line
from stoker.images.nixcmd import (
    NIX_BUILD_TIMEOUT,
    NIX_FEATURES,
    NIX_METADATA_TIMEOUT,
    NIX_QUERY_TIMEOUT,
    flake_identity,
    flake_metadata_argv,
    nix_user_error,
    require_nix,
    run_nix,
)
from stoker.images.spec import DEFAULT_KERNEL, AgentOptions, ImageSpec
from stoker.paths import GUEST_PATH
from stoker.procs import run_checked

BUILDER_NAME = "nixos"
#: Bump whenever a change here alters the produced image for the same configuration.
BUILDER_VERSION = 2

NIX_STORE = Path("/nix/store")
#: Nix's base-32 alphabet (no e, o, t, u); store path hashes are 32 of these.
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
# A store path's last component: Nix's name rules (no leading '.', at most 211 characters).
_STORE_NAME_RE = re.compile(rf"[{NIX_BASE32}]{{32}}-(?!\.)[A-Za-z0-9+\-._?=]{{1,211}}")
# The attribute rule of ImageSpec's base (spec.py), repeated here rather than
# imported: this module must not rely on spec.py's private names.
_NIX_ATTR_RE = re.compile(r"[A-Za-z0-9_.+\"'-]+")

#: The mtime of everything packed: what Nix gives every file in its store.
STORE_EPOCH = 1
#: ``PATH`` for commands in a NixOS guest (setuid wrappers first, as NixOS sets it).
NIXOS_GUEST_PATH = "/run/wrappers/bin:/run/current-system/sw/bin"
#: The module added to every configuration (packaged next to this file).
AGENT_MODULE = "stoker-agent.nix"

#: Kernel parameters for -M microvm that do not depend on the image: the serial
#: console (placed after the configuration's parameters, so it wins over a
#: ``console=`` there), reboot on panic (QEMU runs with -no-reboot, so the VM
#: ends), no keyboard controller.
MICROVM_PARAMS: tuple[str, ...] = (
    "console=ttyS0",
    "panic=-1",
    "oops=panic",
    "reboot=t",
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
)
#: x86's COMMAND_LINE_SIZE, terminating NUL included.
MAX_CMDLINE = 2048

MKFS_TIMEOUT = 3600.0


# --- Nix syntax ---------------------------------------------------------------------------------


def nix_string(value: str) -> str:
    """``value`` as a double-quoted Nix string literal that evaluates to exactly ``value``.

    Escapes ``\\``, ``"`` and every ``$`` (so ``${`` never starts an
    interpolation), and writes newline, carriage return and tab as escapes.
    Raises ``ValueError`` for NUL, which Nix strings cannot hold.
    """
    if "\0" in value:
        raise ValueError("Nix strings cannot contain NUL characters")
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("$", "\\$")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def split_nixos_base(base_ref: str) -> tuple[str, str]:
    """``("FLAKEREF", "ATTR")`` of a spec's ``base_ref`` (``FLAKEREF#ATTR``).

    Raises :class:`UsageError` for a missing or malformed attribute and for a
    flake reference that could be taken for an option.
    """
    flake, sep, attr = base_ref.partition("#")
    if not flake or not sep or not _NIX_ATTR_RE.fullmatch(attr):
        raise UsageError(
            f'expected "FLAKEREF#ATTR", e.g. "./flake#ci", got {base_ref!r}',
            hint="ATTR names a nixosConfiguration of the flake",
        )
    return check_flake_ref(flake), attr


def check_flake_ref(flake: str) -> str:
    """``flake`` itself, unless it is empty, holds whitespace or NUL, or looks like an option."""
    # A leading '-' would make `nix flake metadata REF` read REF as an option.
    if not flake or flake.startswith("-") or "\0" in flake or any(c.isspace() for c in flake):
        raise UsageError(f"invalid flake reference {flake!r}")
    return flake


def nixos_attr_name(attr: str) -> str:
    """The ``nixosConfigurations`` attribute that ``attr`` names.

    As with ``nixos-rebuild --flake .#ATTR``, ``ATTR`` is one attribute name
    even when it contains dots; surrounding double quotes are dropped.
    """
    if not _NIX_ATTR_RE.fullmatch(attr):
        raise UsageError(f"invalid nixosConfiguration name {attr!r}")
    name = attr[1:-1] if len(attr) >= 2 and attr[0] == attr[-1] == '"' else attr
    if not name:
        raise UsageError(f"invalid nixosConfiguration name {attr!r}")
    return name


def find_git_root(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` that holds ``.git``, or None."""
    for candidate in (path, *path.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def local_flake_url(path: Path, *, git_root: Path | None, shallow: bool = False) -> str:
    """The flake URL Nix's command line would make of the local directory ``path``.

    Inside a Git work tree (``git_root``) that is ``git+file://ROOT?dir=SUBDIR``,
    so only tracked files are seen, exactly as ``nix build ./flake#x`` would;
    elsewhere ``path:PATH``.  ``builtins.getFlake`` makes a ``path:`` of every
    local path, copying untracked files too, hence this conversion.
    """
    if not path.is_absolute():
        raise ValueError(f"local flake path must be absolute, got {path}")
    if git_root is None:
        return "path:" + quote(str(path), safe="/")
    subdir = path.relative_to(git_root).as_posix()
    query = []
    if subdir != ".":
        query.append("dir=" + quote(subdir, safe="/"))
    if shallow:
        query.append("shallow=1")
    url = "git+file://" + quote(str(git_root), safe="/")
    return url + ("?" + "&".join(query) if query else "")


def flake_url(flake: str) -> str:
    """``flake`` as a URL for ``builtins.getFlake``; local paths via :func:`local_flake_url`.

    ImageSpec resolves local references to absolute paths; anything else
    (``github:...``, ``git+https://...``, ``path:...``) is passed on unchanged.
    """
    if not flake.startswith("/"):
        if flake.startswith("."):
            raise UsageError(
                f"local flake reference {flake!r} must be resolved to an absolute path"
            )
        return flake
    path = Path(flake)
    root = find_git_root(path)
    shallow = root is not None and (root / ".git" / "shallow").exists()
    return local_flake_url(path, git_root=root, shallow=shallow)


# --- command lines ------------------------------------------------------------------------------


def nix_build_expr(flake: str, attr: str, *, agent_module: Path, agent_src: Path) -> str:
    """The Nix expression building the boot links of ``flake``'s ``nixosConfigurations.ATTR``.

    ``flake`` is a URL (:func:`flake_url`), ``agent_module`` the absolute path
    of ``stoker-agent.nix`` and ``agent_src`` the directory holding the agent's
    ``stoker`` package.  Every interpolated value is a Nix string literal.
    """
    for path in (agent_module, agent_src):
        if not path.is_absolute():
            raise ValueError(f"expected an absolute path, got {path}")
    name = nixos_attr_name(attr)
    lines = [
        "let",
        f"  flake = builtins.getFlake {nix_string(flake)};",
        f"  base = flake.nixosConfigurations.{nix_string(name)};",
        f"  agent = import (/. + {nix_string(str(agent_module))}) {{",
        '    agentSrc = builtins.path { name = "stoker-agent";'
        f" path = /. + {nix_string(str(agent_src))}; }};",
        "  };",
        "  system = base.extendModules { modules = [ agent ]; };",
        "  config = system.config;",
        "  pkgs = system.pkgs;",
        "  build = config.system.build;",
        "  loader = config.system.boot.loader;",
        "  registration = pkgs.closureInfo { rootPaths = [ build.toplevel ]; };",
        "in",
        'pkgs.linkFarm "stoker-nixos-boot" [',
        '  { name = "toplevel"; path = build.toplevel; }',
        '  { name = "kernel"; path = "${build.kernel}/${loader.kernelFile}"; }',
        '  { name = "initrd"; path = "${build.initialRamdisk}/${loader.initrdFile}"; }',
        '  { name = "python"; path = "${config.stoker.agent.python}/bin/python3"; }',
        '  { name = "registration"; path = "${registration}/registration"; }',
        "]",
    ]
    return "\n".join(lines) + "\n"


def nix_build_argv(
    flake: str, attr: str, *, agent_module: Path, agent_src: Path, out_link: Path
) -> list[str]:
    """``nix build`` of :func:`nix_build_expr`; the result is linked (a GC root) at ``out_link``."""
    # fmt: off
    return [
        "nix", *NIX_FEATURES,
        "build",
        # getFlake of an unlocked (local) flake, and imports of host paths.
        "--impure",
        "--print-build-logs",
        "--out-link", str(out_link),
        "--expr", nix_build_expr(flake, attr, agent_module=agent_module, agent_src=agent_src),
    ]
    # fmt: on


def closure_argv(paths: Iterable[str]) -> list[str]:
    """``nix-store --query --requisites``: every store path ``paths`` depend on, themselves too."""
    items = list(paths)
    if not items or not all(p.startswith("/") for p in items):
        raise ValueError(f"expected absolute store paths, got {items!r}")
    return ["nix-store", "--query", "--requisites", *items]


def store_mkfs_argv(output: Path, tree: Path, *, source_date_epoch: int, fs_uuid: str) -> list[str]:
    """mkfs.erofs packing the staged store ``tree`` into ``output`` reproducibly."""
    # fmt: off
    return [
        "mkfs.erofs", "--quiet",
        "-zlz4hc",
        # Nix keeps no extended attributes in the store; host labels must not leak in.
        "-x-1",
        f"-T{source_date_epoch}",
        f"-U{fs_uuid}",
        "--all-root",
        str(output),
        str(tree),
    ]
    # fmt: on


def nixos_kernel_cmdline(
    toplevel: str,
    *,
    registration: str | None = None,
    kernel_params: str = "",
    extra: Sequence[str] = (),
) -> str:
    """The kernel command line booting the NixOS system ``toplevel``.

    ``kernel_params`` is the configuration's ``boot.kernelParams`` (the text of
    ``TOPLEVEL/kernel-params``, which boot loaders put on the command line); it
    comes first so :data:`MICROVM_PARAMS` win over it.  ``init=`` is what NixOS
    stage 1 switches to, ``boot.panic_on_fail`` turns a stage-1 failure into a
    panic (and so the end of the VM) instead of a prompt nobody answers, and
    ``regInfo=`` names the registration ``stoker-agent.nix`` loads into the Nix
    database.  Raises :class:`ProvisionError` when it exceeds the x86 limit.
    """
    check_store_path(toplevel, NIX_STORE, what="toplevel")
    if registration is not None:
        check_store_path(_store_path_of(registration, NIX_STORE), NIX_STORE, what="registration")
    # Verbatim, not split: the kernel allows quoted values with spaces (foo="a b").
    configured = kernel_params.strip()
    if "\0" in configured or "\n" in configured:
        raise ProvisionError("the configuration's kernel-params hold a NUL or newline character")
    params = [configured] if configured else []
    params += [*MICROVM_PARAMS, "boot.panic_on_fail", f"init={toplevel}/init"]
    if registration is not None:
        params.append(f"regInfo={registration}")
    params.extend(extra)
    cmdline = " ".join(params)
    if len(cmdline) >= MAX_CMDLINE:
        raise ProvisionError(
            f"the kernel command line is {len(cmdline)} bytes; x86 allows {MAX_CMDLINE - 1}",
            hint="shorten boot.kernelParams in the NixOS configuration",
        )
    return cmdline


# --- store paths --------------------------------------------------------------------------------


def check_store_path(path: str, store_dir: Path, *, what: str) -> str:
    """``path`` itself when it is ``STORE_DIR/<hash>-<name>``; else :class:`ProvisionError`."""
    pure = PurePosixPath(path)
    if (
        not path.startswith("/")
        or str(pure) != path
        or pure.parent != PurePosixPath(store_dir)
        or not _STORE_NAME_RE.fullmatch(pure.name)
    ):
        shown = path if len(path) <= 200 else path[:200] + "..."
        raise ProvisionError(f"{what}: {shown!r} is not a store path under {store_dir}")
    return path


def _store_path_of(path: str, store_dir: Path) -> str:
    """The store path that ``path`` (a file inside one) belongs to."""
    try:
        rel = PurePosixPath(path).relative_to(PurePosixPath(store_dir))
    except ValueError:
        raise ProvisionError(f"{path!r} is not inside {store_dir}") from None
    if not rel.parts:
        raise ProvisionError(f"{path!r} is the store itself, not a path in it")
    return str(PurePosixPath(store_dir) / rel.parts[0])


def parse_closure(output: str, *, store_dir: Path = NIX_STORE) -> list[str]:
    """The store paths in ``nix-store --query --requisites`` output, sorted, without duplicates.

    Every non-empty line must be exactly ``STORE_DIR/<32 base-32 characters>-<name>``;
    anything else (a warning, a nested path, ``..``) raises :class:`ProvisionError`:
    this list decides what is copied into the image.
    """
    paths: set[str] = set()
    for number, line in enumerate(output.split("\n"), start=1):
        if not line:
            continue
        paths.add(check_store_path(line, store_dir, what=f"closure line {number}"))
    if not paths:
        raise ProvisionError("nix-store reported an empty closure")
    return sorted(paths)


@dataclass(frozen=True)
class BootLinks:
    """What the boot derivation of :func:`nix_build_expr` links to (host paths in the store)."""

    toplevel: str
    #: The kernel image file, e.g. ``/nix/store/...-linux-6.6.30/bzImage``.
    kernel: str
    #: The initrd file, e.g. ``/nix/store/...-initrd-linux-6.6.30/initrd``.
    initrd: str
    #: The interpreter the agent unit runs.
    python: str
    #: The ``closureInfo`` registration file (``regInfo=``).
    registration: str

    @classmethod
    def read(cls, links: Path, *, store_dir: Path = NIX_STORE) -> BootLinks:
        """Read the links in the directory ``links`` (the ``nix build`` out-link)."""
        targets: dict[str, str] = {}
        for name in ("toplevel", "kernel", "initrd", "python", "registration"):
            try:
                target = str((links / name).readlink())
            except OSError as exc:
                raise ProvisionError(f"nix build produced no {name} link: {exc}") from None
            check_store_path(_store_path_of(target, store_dir), store_dir, what=name)
            targets[name] = target
        check_store_path(targets["toplevel"], store_dir, what="toplevel")
        return cls(**targets)


# --- packing ------------------------------------------------------------------------------------


def copy_store_entry(src: Path, dst: Path) -> int:
    """Copy ``src`` (not following symlinks) to ``dst``; returns the bytes of regular files.

    Modes keep their permission bits only (the store holds no setuid files);
    owners and times are set by mkfs.erofs.  Copies, not hard links: Nix's
    store optimisation hard-links identical files, and packing that sharing
    would make the image depend on the host's store history instead of its content.
    """
    st = src.lstat()
    if stat.S_ISLNK(st.st_mode):
        # os.readlink: Path.readlink would normalise the target (drop a trailing '/').
        dst.symlink_to(os.readlink(src))  # noqa: PTH115
        return 0
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
        dst.chmod(stat.S_IMODE(st.st_mode) & 0o777)
        return st.st_size
    if stat.S_ISDIR(st.st_mode):
        # Writable while filling; the real mode (0555 in a store) is set afterwards.
        dst.mkdir(mode=0o700)
        total = 0
        with os.scandir(src) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            total += copy_store_entry(src / name, dst / name)
        dst.chmod(stat.S_IMODE(st.st_mode) & 0o777)
        return total
    raise ProvisionError(f"{src}: not a file, directory or symlink; a store holds nothing else")


def _remove_staging(path: Path) -> None:
    # Store directories are read-only (0555); unprivileged removal needs them writable.
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            full = Path(root) / name
            if not full.is_symlink():
                full.chmod(0o700)
    shutil.rmtree(path)


def pack_store_closure(
    store_paths: Iterable[str | Path],
    output: Path,
    *,
    store_dir: Path = NIX_STORE,
    source_date_epoch: int = STORE_EPOCH,
    fs_uuid: str,
    log: Path,
    workdir: Path | None = None,
) -> int:
    """Pack ``store_paths`` into the erofs ``output``, whose root holds them as ``<hash>-<name>``.

    Every path must be a top-level entry of ``store_dir`` (the parameter lets
    tests pack a stand-in store); anything else is refused with
    :class:`ProvisionError`.  The paths are copied into a staging directory in
    ``workdir`` (default: next to ``output``), removed afterwards.  All files
    are owned by root with mtime ``source_date_epoch`` and the filesystem UUID
    is ``fs_uuid``, so packing the same closure twice gives identical bytes.
    Returns the total size of the regular files packed.
    """
    paths = sorted({str(p) for p in store_paths})
    if not paths:
        raise ProvisionError("refusing to pack an empty closure")
    sources: list[Path] = []
    for path in paths:
        check_store_path(path, store_dir, what="closure")
        source = Path(path)
        try:
            source.lstat()
        except OSError as exc:
            raise ProvisionError(f"store path {path} cannot be read: {exc}") from None
        sources.append(source)
    staging = Path(tempfile.mkdtemp(prefix=".stoker-store-", dir=workdir or output.parent))
    try:
        tree = staging / "store"
        tree.mkdir()
        # The image's root becomes the guest's /nix/store: world-readable whatever our umask.
        tree.chmod(0o755)
        total = sum(copy_store_entry(source, tree / source.name) for source in sources)
        log_line(log, f"packing {len(sources)} store paths, {total} bytes, as erofs")
        run_checked(
            store_mkfs_argv(output, tree, source_date_epoch=source_date_epoch, fs_uuid=fs_uuid),
            log=log,
            timeout=MKFS_TIMEOUT,
            hint="apt-get install erofs-utils",
        )
    finally:
        _remove_staging(staging)
    return total


def nixos_base_digest(flake_ref: str, *, environ: Mapping[str, str] | None = None) -> str:
    """The identity (hex sha256) of the flake a ``nixos:`` base evaluates.

    ``flake_ref`` is a flake reference, or a spec's whole ``FLAKEREF#ATTR``
    (the attribute is part of the spec digest already and is ignored here).
    Runs ``nix flake metadata``; raises :class:`ProvisionError` without Nix.
    """
    env = os.environ if environ is None else environ
    require_nix(env)
    flake = split_nixos_base(flake_ref)[0] if "#" in flake_ref else check_flake_ref(flake_ref)
    output = run_nix(
        flake_metadata_argv(flake_url(flake)), environ=env, log=None, timeout=NIX_METADATA_TIMEOUT
    )
    try:
        metadata = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ProvisionError(f"nix flake metadata printed invalid JSON: {exc}") from None
    if not isinstance(metadata, dict):
        raise ProvisionError("nix flake metadata printed JSON that is not an object")
    return flake_identity(metadata)


# --- the builder --------------------------------------------------------------------------------


def agent_module_text() -> str:
    """The text of ``stoker-agent.nix``."""
    return resources.files("stoker.images").joinpath(AGENT_MODULE).read_text(encoding="utf-8")


def nixos_builder_version() -> str:
    """A builder version for :func:`~stoker.images.spec.spec_digest` of NixOS bases.

    The agent runs from inside a NixOS image (not from the initramfs, as with
    other bases), so the image changes with the agent's sources and the module
    as well as with :data:`BUILDER_VERSION`.
    """
    document: dict[str, object] = {
        "builder_version": BUILDER_VERSION,
        "module": hashlib.sha256(agent_module_text().encode()).hexdigest(),
        "agent": {path: hashlib.sha256(data).hexdigest() for path, data in agent_files().items()},
    }
    return f"{BUILDER_NAME}-{BUILDER_VERSION}-{canonical_digest(document)[:16]}"


def write_agent_sources(directory: Path) -> tuple[Path, Path]:
    """Write ``stoker-agent.nix`` and the agent's ``stoker`` package into ``directory``.

    Returns ``(module path, agent source directory)``.  The file contents (and
    so the store path Nix copies them to) depend on nothing but the sources.
    """
    module = directory / AGENT_MODULE
    src = directory / "agent"
    directory.mkdir(parents=True, exist_ok=True)
    module.write_text(agent_module_text(), encoding="utf-8")
    for rel, data in sorted(agent_files().items()):
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o644)
    return module, src


def check_nixos_spec(spec: ImageSpec) -> None:
    """Refuse spec keys a NixOS base cannot honour (the configuration declares those).

    ``packages``, ``users``, ``files``, ``run`` and ``artifacts`` belong in the
    configuration; ``kernel`` and ``agent.python`` are chosen by it too (the
    image boots its own kernel and the agent runs on its python).  Raises
    :class:`UsageError` naming every offending key.
    """
    if spec.base_kind != "nixos":
        raise UsageError(f"image {spec.name!r}: base {spec.base!r} is not a nixos base")
    offending = [
        key
        for key, is_set in (
            ("packages", bool(spec.packages)),
            ("users", bool(spec.users)),
            ("files", bool(spec.files)),
            ("run", bool(spec.run)),
            ("artifacts", bool(spec.artifacts)),
            ("kernel", spec.kernel != DEFAULT_KERNEL),
            ("agent.python", spec.agent.python != AgentOptions().python),
        )
        if is_set
    ]
    if offending:
        raise UsageError(
            f"image {spec.name!r}: {', '.join(offending)} cannot be used with a nixos base; "
            "the NixOS configuration declares them",
            hint="use environment.systemPackages, users.users, environment.etc, "
            "boot.kernelPackages and stoker.agent.python in the configuration",
        )


def filesystem_uuid(digest: str) -> str:
    """A fixed filesystem UUID derived from the image digest (for reproducibility)."""
    return str(uuid.UUID(bytes=bytes.fromhex(digest)[:16], version=4))


class NixosBuilder:
    """Builds a ``nixos:FLAKEREF#ATTR`` spec into an erofs store image.

    ``digest`` is the image digest the caller computed (from the spec,
    :func:`nixos_base_digest` and :func:`nixos_builder_version`); ``environ``
    is the environment Nix runs with (default: this process's).
    """

    def __init__(
        self,
        spec: ImageSpec,
        *,
        name: str,
        digest: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        self._digest = digest
        self._environ: Mapping[str, str] = dict(os.environ if environ is None else environ)

    def __repr__(self) -> str:
        return f"NixosBuilder(base={self.spec.base!r}, name={self.name!r})"

    def spec_digest(self) -> str:
        return self._digest

    def build(self, workdir: Path, rootfs_out: Path, log: Path) -> dict[str, object]:
        """Build the configuration, pack its closure into ``rootfs_out``, return manifest extras.

        A configuration made by nixpkgs gets ``stoker-agent.nix``; one without
        ``extendModules`` is built as it is (:mod:`~stoker.images.nixos_toplevel`).
        Its ``microvm.*`` settings, if any, become the image's defaults
        (:mod:`~stoker.images.microvm`).
        """
        from stoker.images.microvm import read_microvm_shape
        from stoker.images.nix import check_closure_size
        from stoker.images.nixos_toplevel import (
            Toplevel,
            build_as_is,
            extensible_argv,
            is_extensible,
            manifest_boot,
        )

        require_nix(self._environ)
        check_nixos_spec(self.spec)
        flake, attr = split_nixos_base(self.spec.base_ref)
        url = flake_url(flake)
        name = nixos_attr_name(attr)
        log_line(log, f"building nixosConfigurations.{name} of {url}")
        shape = read_microvm_shape(url, name, environ=self._environ)
        try:
            extensible = is_extensible(
                run_nix(
                    extensible_argv(url, name, features=NIX_FEATURES),
                    environ=self._environ,
                    log=log,
                    timeout=NIX_QUERY_TIMEOUT,
                )
            )
        except LaunchError as exc:
            raise nix_user_error(f"evaluating nixosConfigurations.{name} of {url}", exc) from None
        extra: dict[str, object] = {}
        # regInfo= lets stoker-agent.nix load the store's paths into the guest's Nix database.
        registration: list[str] = []
        if extensible:
            links, closure = self._build_with_module(url, attr, workdir=workdir, log=log)
            top = Toplevel.read(links.toplevel)
            extra = {
                "cmdline": nixos_kernel_cmdline(
                    links.toplevel,
                    registration=links.registration,
                    kernel_params=top.kernel_params,
                ),
                "kernel": links.kernel,
                "initrd": links.initrd,
            }
            python = links.python
            registration = [f"regInfo={links.registration}"]
        else:
            top, closure = build_as_is(url, name, environ=self._environ, workdir=workdir, log=log)
            # Started by the system's own init, which stoker does not look into.
            python = ""
        check_closure_size(closure, image=self.name, limit_mb=self.spec.size_limit)
        params = [*top.kernel_params.split(), *shape.kernel_params, *registration]
        uncompressed = pack_store_closure(
            closure,
            rootfs_out,
            source_date_epoch=STORE_EPOCH,
            fs_uuid=filesystem_uuid(self._digest),
            log=log,
            workdir=workdir,
        )
        return {
            "builder": BUILDER_NAME,
            "builder_version": BUILDER_VERSION,
            "spec": self.spec.model_dump(mode="json"),
            "fstype": "erofs",
            "flake": url,
            "attr": name,
            "boot": {**manifest_boot(top, params=params), **extra},
            "python": python,
            "guest_path": NIXOS_GUEST_PATH,
            # Applied to every command (vm.py): NixOS's programs first, then the usual places.
            "env": {"PATH": f"{NIXOS_GUEST_PATH}:{GUEST_PATH}"},
            "store_paths": closure,
            "uncompressed_size": uncompressed,
            "source_date_epoch": STORE_EPOCH,
            "microvm": shape.to_json(),
            "defaults": shape.defaults(),
            **({"network": {"mode": shape.network}} if shape.network else {}),
        }

    def _build_with_module(
        self, url: str, attr: str, *, workdir: Path, log: Path
    ) -> tuple[BootLinks, list[str]]:
        """Build the configuration extended with ``stoker-agent.nix``: links and closure."""
        module, agent_src = write_agent_sources(workdir / "nixos")
        out_link = workdir / "boot"
        run_nix(
            nix_build_argv(url, attr, agent_module=module, agent_src=agent_src, out_link=out_link),
            environ=self._environ,
            log=log,
            timeout=NIX_BUILD_TIMEOUT,
        )
        links = BootLinks.read(out_link)
        roots = [links.toplevel, _store_path_of(links.registration, NIX_STORE)]
        closure = parse_closure(
            run_nix(closure_argv(roots), environ=self._environ, log=log, timeout=NIX_QUERY_TIMEOUT)
        )
        python_path = _store_path_of(links.python, NIX_STORE)
        if python_path not in closure:
            raise ProvisionError(
                f"the agent's python ({python_path}) is not in the system closure; "
                "is stoker-agent.nix's service overridden?"
            )
        return links, closure
