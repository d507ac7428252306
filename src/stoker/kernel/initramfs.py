"""Build the guest initramfs: busybox, ``init.sh``, the kernel modules and the agent.

Layout of the (gzip-compressed, ``newc``) archive::

    /init                      init.sh (see it for the boot contract)
    /bin/busybox               static busybox; /bin/sh and every applet link to it
    /lib/modules/*.ko          uncompressed, loaded in the order of load.order
    /lib/modules/load.order    one file name per line, dependencies first
    /stoker-agent/...          the agent's Python package tree (copied into the root)
    /dev/console               so the kernel can give /init a console
    /proc /sys /newroot /lower /rw /tmp

Images are cached as ``<digest>.cpio.gz`` where the digest covers every input,
so :func:`build_initramfs` is a few file reads and one ``stat`` when nothing
changed.  The module closure (which needs a scan of the whole module tree) is
cached separately, keyed by kernel and wanted set.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from stoker.agent.bundle import bytecode, bytecode_key
from stoker.errors import ProvisionError
from stoker.kernel.cpio import CpioWriter, Writable
from stoker.kernel.debian import Kernel
from stoker.kernel.modules import (
    GUEST_MODULES,
    NIC_MODULES,
    PCI_MODULES,
    is_static_elf,
    module_name,
    normalize_name,
    read_module,
    resolve_closure,
)
from stoker.paths import Dirs

#: Bump when the archive layout changes, so old cache entries are not reused.
LAYOUT_VERSION = 1
AGENT_DIR = "stoker-agent"
_EMPTY_DIRS = ("dev", "proc", "sys", "newroot", "lower", "rw", "tmp")
_BUSYBOX_HINT = "apt-get install busybox-static"


@dataclass(frozen=True)
class Initramfs:
    """A built initramfs image in the cache."""

    path: Path  # gzip-compressed newc cpio
    digest: str  # hex sha256 of the inputs
    modules: tuple[str, ...]  # load order (names)


def init_script() -> str:
    """The text of ``init.sh``, the guest's PID 1 in the initramfs."""
    return resources.files("stoker.kernel").joinpath("init.sh").read_text()


def build_initramfs(
    dirs: Dirs,
    kernel: Kernel,
    *,
    agent_files: Mapping[str, bytes],
    busybox: Path = Path("/bin/busybox"),
    modules: Iterable[str] = GUEST_MODULES,
    pci_modules: Iterable[str] = PCI_MODULES,
    nic_modules: Iterable[str] = NIC_MODULES,
    agent_bytecode: bool = False,
) -> Initramfs:
    """Return the initramfs for these inputs, building it on a cache miss.

    ``agent_bytecode``: add the agent's ``.pyc`` files for this host's Python
    (:func:`stoker.agent.bundle.bytecode`), made on a cache miss only.

    ``agent_files`` maps relative paths (``stoker/agent/__main__.py``) to file
    contents; they end up under ``/usr/lib/stoker-agent`` in the guest.
    ``pci_modules`` (and what they need beyond ``modules``) are loaded only
    when the kernel command line says ``stoker.pci=1``: VMMs with virtio-pci
    devices (Cloud Hypervisor) need them, QEMU microvm's virtio-mmio guests
    would only pay their load time.  ``nic_modules`` likewise, with
    ``stoker.nic=1``: only VMs given a network device (``nat`` mode) load them.

    Raises :class:`ProvisionError` (missing or dynamic busybox, unknown module,
    bad agent path).
    """
    wanted = tuple(normalize_name(m) for m in modules)
    wanted_pci = tuple(normalize_name(m) for m in pci_modules)
    wanted_nic = tuple(normalize_name(m) for m in nic_modules)
    agent = _check_agent_files(agent_files)
    busybox_data = _read_busybox(busybox)
    init_text = init_script()
    closure = _closure(dirs, kernel, wanted)
    base_names = {name for name, _ in closure}
    pci_closure = [
        (name, path)
        for name, path in (_closure(dirs, kernel, wanted + wanted_pci) if wanted_pci else [])
        if name not in base_names
    ]
    nic_closure = [
        (name, path)
        for name, path in (_closure(dirs, kernel, wanted + wanted_nic) if wanted_nic else [])
        if name not in base_names
    ]
    module_data = [(name, path.read_bytes()) for name, path in closure]

    h = hashlib.sha256()
    _feed(h, b"layout", str(LAYOUT_VERSION).encode())
    _feed(h, b"kernel", f"{kernel.package}\0{kernel.version}\0{kernel.release}".encode())
    for name, data in module_data:
        _feed(h, b"module", name.encode() + b"\0" + hashlib.sha256(data).digest())
    for name, path in pci_closure:
        _feed(h, b"pci-module", name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    for name, path in nic_closure:
        _feed(h, b"nic-module", name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    _feed(h, b"busybox", hashlib.sha256(busybox_data).digest())
    _feed(h, b"init", init_text.encode())
    for rel, data in agent:
        _feed(h, b"agent", rel.encode() + b"\0" + hashlib.sha256(data).digest())
    if agent_bytecode:
        # Made from those sources, by this Python, on a cache miss.
        _feed(h, b"bytecode", bytecode_key())
    digest = h.hexdigest()

    names = tuple(name for name, _ in closure)
    out = dirs.initramfs / f"{digest}.cpio.gz"
    if out.is_file():
        return Initramfs(path=out, digest=digest, modules=names)

    applets = _busybox_applets(busybox)
    dirs.initramfs.mkdir(parents=True, exist_ok=True)
    # The suffix keeps half-written files out of globs for "*.cpio.gz".
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".partial", dir=dirs.initramfs)
    tmp = Path(name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        ):
            _write_archive(
                gz,
                init_text=init_text,
                busybox_data=busybox_data,
                applets=applets,
                modules=closure,
                pci_modules=pci_closure,
                nic_modules=nic_closure,
                agent=(
                    _check_agent_files({**dict(agent), **bytecode(dict(agent))})
                    if agent_bytecode
                    else agent
                ),
            )
        tmp.chmod(0o644)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Initramfs(path=out, digest=digest, modules=names)


def _feed(h: hashlib._Hash, label: bytes, data: bytes) -> None:
    # Length-prefixed, so no two input sets can hash the same byte stream.
    h.update(label + b":" + str(len(data)).encode() + b":" + data)


def _write_archive(
    out: Writable,
    *,
    init_text: str,
    busybox_data: bytes,
    applets: list[str],
    modules: list[tuple[str, Path]],
    pci_modules: list[tuple[str, Path]],
    nic_modules: list[tuple[str, Path]],
    agent: list[tuple[str, bytes]],
) -> None:
    cpio = CpioWriter(out)
    for d in ("bin", "lib", "lib/modules", *_EMPTY_DIRS):
        cpio.add_dir(d)
    cpio.add_chardev("dev/console", 5, 1, mode=0o600)
    cpio.add_file("init", init_text.encode(), mode=0o755)
    cpio.add_file("bin/busybox", busybox_data, mode=0o755)
    cpio.add_symlink("bin/sh", "busybox")
    for applet in applets:
        if applet not in ("busybox", "sh"):
            cpio.add_symlink(f"bin/{applet}", "busybox")
    order = []
    for name, path in modules:
        filename = f"{name}.ko"
        cpio.add_file(f"lib/modules/{filename}", read_module(path))
        order.append(filename)
    cpio.add_file("lib/modules/load.order", "".join(f"{f}\n" for f in order).encode())
    added = {f"{name}.ko" for name, _ in modules}
    for group, members in (("pci", pci_modules), ("nic", nic_modules)):
        group_order = []
        for name, path in members:
            filename = f"{name}.ko"
            if filename not in added:  # a module two groups need is stored once
                cpio.add_file(f"lib/modules/{filename}", read_module(path))
                added.add(filename)
            group_order.append(filename)
        cpio.add_file(f"lib/modules/load.{group}", "".join(f"{f}\n" for f in group_order).encode())
    cpio.add_dir(AGENT_DIR)
    made: set[str] = set()
    for rel, data in agent:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                cpio.add_dir(f"{AGENT_DIR}/{parent}")
                made.add(parent)
        cpio.add_file(f"{AGENT_DIR}/{rel}", data)
    cpio.close()


def _check_agent_files(agent_files: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """Validate the agent's relative paths; return them sorted (parents first)."""
    checked: dict[str, bytes] = {}
    for rel, data in agent_files.items():
        if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
            raise ProvisionError(f"invalid agent file path {rel!r}")
        if not isinstance(data, bytes):
            raise ProvisionError(f"agent file {rel!r}: contents must be bytes")
        checked[rel] = data
    names = set(checked)
    for rel in names:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                raise ProvisionError(f"agent file {rel!r} is inside another agent file")
    # Sorting by path components puts every directory before its contents.
    return sorted(checked.items(), key=lambda item: item[0].split("/"))


def _read_busybox(busybox: Path) -> bytes:
    try:
        data = busybox.read_bytes()
    except FileNotFoundError as exc:
        raise ProvisionError(
            f"{busybox} not found: the guest initramfs needs a static busybox",
            hint=_BUSYBOX_HINT,
        ) from exc
    except OSError as exc:
        raise ProvisionError(f"cannot read {busybox}: {exc}", hint=_BUSYBOX_HINT) from exc
    if not is_static_elf(data, str(busybox)):
        raise ProvisionError(
            f"{busybox} is dynamically linked, but the initramfs has no C library",
            hint=_BUSYBOX_HINT,
        )
    return data


def _busybox_applets(busybox: Path) -> list[str]:
    """The applets this busybox provides (it runs on the host: same binary, same arch)."""
    argv = [str(busybox), "--list"]
    try:
        proc = subprocess.run(argv, capture_output=True, check=False, timeout=30)
    except OSError as exc:
        raise ProvisionError(f"cannot run {busybox} --list: {exc}", hint=_BUSYBOX_HINT) from exc
    applets = sorted(
        {a for a in proc.stdout.decode(errors="replace").split() if a and "/" not in a}
    )
    if proc.returncode != 0 or not applets:
        raise ProvisionError(f"{busybox} --list failed", hint=_BUSYBOX_HINT)
    return applets


def _closure(dirs: Dirs, kernel: Kernel, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``resolve_closure`` for this kernel, cached: it reads the whole module tree."""
    key = hashlib.sha256(
        json.dumps(
            [kernel.package, kernel.version, kernel.release, str(kernel.root), list(wanted)]
        ).encode()
    ).hexdigest()[:32]
    sidecar = dirs.initramfs / f"closure-{key}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        record = json.loads(sidecar.read_text())
        rels = record["modules"]
        if isinstance(rels, list) and all(isinstance(r, str) for r in rels):
            paths = [kernel.modules_dir / r for r in rels]
            if all(p.is_file() for p in paths):
                return [(module_name(p), p) for p in paths]

    paths = resolve_closure(kernel.modules_dir, wanted)
    record = {
        "kernel": kernel.package,
        "version": kernel.version,
        "wanted": list(wanted),
        "modules": [str(p.relative_to(kernel.modules_dir)) for p in paths],
    }
    dirs.initramfs.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".partial", dir=dirs.initramfs)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2)
        tmp.chmod(0o644)
        tmp.replace(sidecar)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return [(module_name(p), p) for p in paths]
