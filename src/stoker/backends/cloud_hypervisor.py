"""Cloud Hypervisor backend: one ``cloud-hypervisor`` process per VM, driven over its REST API.

Plan, prepare, launch:

* **Plan** - pure functions of a frozen :class:`~stoker.backends.base.MachineSpec` and a
  frozen :class:`CloudHypervisorConfig`: :func:`vm_config` (the ``VmConfig`` body of
  ``PUT /vm.create``), :func:`boot_requests`, :func:`snapshot_requests`,
  :func:`restore_requests`, :func:`shutdown_requests`, and the equivalent command lines
  :func:`cloud_hypervisor_argv` (everything on the command line), :func:`vmm_argv` (the
  bare VMM for REST mode) and :func:`restore_argv`.  They are golden-tested, and every
  request body is validated against Cloud Hypervisor's own OpenAPI document in
  ``tests/test_cloud_hypervisor.py``.
* **Prepare** - the parent creates the API listening socket and an event-monitor
  socketpair and passes them as descriptors (``--api-socket fd=N``,
  ``--event-monitor fd=M``), so there is no start-up race on the API and nothing is
  shared with our stdio.
* **Launch** - :class:`CloudHypervisorBackend` starts the VMM with
  ``PR_SET_PDEATHSIG=SIGKILL``, creates and boots the VM (REST mode, the default) or
  lets the VMM do it from its command line (CLI mode), and returns a
  :class:`CloudHypervisorVM`.

Facts this relies on (Cloud Hypervisor documentation and source):

* Direct kernel boot takes a PVH ``vmlinux`` or, since **v39.0** (PR #6200), an x86_64
  ``bzImage``.  stoker boots Debian's ``vmlinuz`` (a bzImage), so v39 is the minimum
  (:data:`MIN_VERSION`).
* Devices are virtio-**pci**: the guest needs the ``virtio_pci`` transport (stoker's
  QEMU machine uses virtio-mmio).  Disks appear as ``/dev/vda``, ``/dev/vdb``, ... in
  the order of ``disks``; the seed disk is found by its serial, as with QEMU.
* The legacy serial port is a 16550 (``ttyS0``).  Its ``Socket`` mode makes the VMM
  listen on a Unix socket (bound at ``vm.create``); only the serial port, not the
  virtio console, supports sockets.  ``File`` mode writes to a path, which stoker
  makes a FIFO it reads.
* vsock is "hybrid vsock" (Firecracker's design): the VMM listens on a Unix socket;
  the host connects and sends ``CONNECT <port>\\n``; the VMM answers ``OK <port>\\n``.
  If nothing in the guest listens yet, the VMM closes the connection, so the
  transport here retries until its deadline.
* Cloud Hypervisor reboots the guest *in-process* on a guest reset and has no
  ``-no-reboot``.  stoker's guests reset on panic (``panic=-1``), so the backend
  watches the event monitor and stops the VMM on ``vm.rebooting`` / ``guest.panic``,
  which makes a panic look like QEMU's ``-no-reboot`` exit to the layers above.
* Snapshots (``vm.snapshot``) need a paused VM and write ``config.json``,
  ``state.json`` and the guest memory (``memory-ranges``) into a directory;
  ``vm.restore`` brings the VM back *paused*.  RAM in a shared, linked memory-zone
  file is left out of ``memory-ranges`` (the file is the RAM), which is what
  :meth:`CloudHypervisorVM.save_state`/:meth:`~CloudHypervisorVM.load_state` use
  for stoker's templates and copy-on-write clones (the clone maps the file
  private).  Disk images are not part of a snapshot.  A restore goes through a
  view of the snapshot whose ``config.json`` names the new VM's sockets and files
  (:func:`relocate_snapshot_config`); the snapshot itself is never modified.

The HTTP/1.1 client is private to this module; the Firecracker backend has a similar
one, and the two should become one ``stoker.backends.http`` module.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from stoker.backends.base import (
    Backend,
    LaunchedVM,
    MachineSpec,
    pump,
    terminate,
    wait_for,
)
from stoker.backends.qemu import SEED_SERIAL, kvm_device_status
from stoker.errors import (
    AccelError,
    InfrastructureError,
    LaunchError,
    UsageError,
)
from stoker.procs import DIE_WITH_PARENT
from stoker.protocol.transport import HybridVsockTransport
from stoker.protocol.wire import VSOCK_PORT

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOUD_HYPERVISOR_BINARY = "cloud-hypervisor"
#: Oldest release that boots a bzImage directly (Debian's ``vmlinuz``): v39.0.
MIN_VERSION = (39, 0)
#: Base path of every endpoint (the spec's ``servers`` URL is ``http://localhost/api/v1``).
API_PREFIX = "/api/v1"
#: The guest's vsock context id; 0-2 are reserved (hypervisor, loopback, host).
GUEST_CID = 3
#: Kernel parameter that tells the guest agent to listen on AF_VSOCK port
#: :data:`stoker.protocol.wire.VSOCK_PORT` instead of a virtio-serial port.
VSOCK_TRANSPORT_PARAM = "stoker.transport=vsock"
INSTALL_HINT = (
    f"install a Cloud Hypervisor release binary (v{MIN_VERSION[0]} or newer) and put it on PATH"
)

LaunchMode = Literal["rest", "cli"]
ConsoleMode = Literal["socket", "file"]
Method = Literal["GET", "PUT"]

#: How long the VMM may take to start answering its API, create and boot.
START_TIMEOUT = 10.0
#: How long one ordinary API request may take.
REQUEST_TIMEOUT = 10.0
#: Snapshots write all of guest memory to disk.
SNAPSHOT_TIMEOUT = 300.0
#: How long ``vm.shutdown``/``vmm.shutdown`` may take before we escalate to signals.
QUIT_GRACE = 2.0

#: ``sun_path`` holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107
_MAX_RESPONSE_HEAD = 16 * 1024
#: ``vm.info`` (the largest answer we read) is tens of KiB; anything near this is hostile.
_MAX_RESPONSE_BODY = 4 * 1024 * 1024
#: One event-monitor record is a few hundred bytes.
_MAX_EVENT = 64 * 1024
_MIB = 1024 * 1024


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class CloudHypervisorConfig:
    """Where one VMM's sockets live and how it is driven (frozen; pure data).

    ``api_fd``/``event_fd`` are descriptor numbers (identical in parent and child)
    once the parent has created those sockets; without them the command line names
    the API socket by path and has no event monitor.
    """

    api_socket: Path
    vsock_socket: Path
    #: The serial console: a Unix socket the VMM listens on (``socket``), or a FIFO
    #: stoker creates and the VMM writes to (``file``).
    console_path: Path
    binary: str = CLOUD_HYPERVISOR_BINARY
    console: ConsoleMode = "socket"
    mode: LaunchMode = "rest"
    api_fd: int | None = None
    event_fd: int | None = None
    rng_source: str = "/dev/urandom"

    @classmethod
    def in_workdir(
        cls,
        workdir: Path,
        *,
        binary: str = CLOUD_HYPERVISOR_BINARY,
        console: ConsoleMode = "socket",
        mode: LaunchMode = "rest",
    ) -> CloudHypervisorConfig:
        """The standard layout: short names, so socket paths fit in ``sun_path``."""
        return cls(
            api_socket=workdir / "ch.api",
            vsock_socket=workdir / "ch.vsock",
            console_path=workdir / ("ch.console" if console == "socket" else "ch.console.fifo"),
            binary=binary,
            console=console,
            mode=mode,
        )

    def socket_paths(self) -> tuple[Path, ...]:
        """Every Unix socket address this VM uses (their length is limited)."""
        paths = [self.api_socket, self.vsock_socket]
        if self.console == "socket":
            paths.append(self.console_path)
        return tuple(paths)

    def check(self) -> None:
        """Refuse socket paths the kernel cannot bind (too long for ``sun_path``)."""
        for path in self.socket_paths():
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                raise LaunchError(
                    f"socket path {path} is longer than {_SUN_PATH_MAX} bytes",
                    hint="use a shorter runtime directory (STOKER_RUNTIME_DIR)",
                )


@dataclass(frozen=True)
class ApiRequest:
    """One REST call: method, endpoint path as the spec spells it, JSON body or None."""

    method: Method
    path: str
    body: Mapping[str, Any] | None = None

    def as_json(self) -> list[Any]:
        """``[method, path, body]`` for golden files."""
        return [self.method, self.path, None if self.body is None else dict(self.body)]


@dataclass(frozen=True)
class _Disk:
    id: str
    path: Path
    readonly: bool
    serial: str | None = None
    #: Only for a clone's qcow2 overlay; raw images are left to autodetection,
    #: which releases before v50.1 rely on (they reject ``image_type``).
    qcow2: bool = False

    def body(self) -> dict[str, Any]:
        """This disk's ``DiskConfig``."""
        body: dict[str, Any] = {"path": str(self.path), "readonly": self.readonly, "id": self.id}
        if self.serial:
            body["serial"] = self.serial
        if self.qcow2:
            # Its backing file is the template's disk; v51+ refuse backing files otherwise.
            body |= {"image_type": "Qcow2", "backing_files": True}
        return body

    def option(self) -> str:
        """This disk as one ``--disk`` value."""
        value = (
            f"path={_opt(str(self.path))},readonly={'on' if self.readonly else 'off'},id={self.id}"
        )
        if self.serial:
            value += f",serial={self.serial}"
        if self.qcow2:
            value += ",image_type=qcow2,backing_files=on"
        return value


def _disks(spec: MachineSpec) -> list[_Disk]:
    """The disks in guest order: root is /dev/vda, scratch /dev/vdb (kernel_cmdline says so)."""
    if spec.probe:
        return []
    disks = [_Disk("root", spec.rootfs, readonly=True)]
    if spec.scratch is not None:
        qcow2 = spec.scratch_format == "qcow2"
        disks.append(_Disk("scratch", spec.scratch, readonly=False, qcow2=qcow2))
    if spec.seed is not None:
        disks.append(_Disk("seed", spec.seed, readonly=True, serial=SEED_SERIAL))
    return disks


#: Where a restore's relocated view of a snapshot is made, in the new VM's work directory.
RESTORE_VIEW = "ch-snapshot"
#: The id of the one memory zone used when guest RAM is backed by a file.
MEMORY_ZONE = "mem0"


def _memory(spec: MachineSpec) -> dict[str, Any]:
    """``MemoryConfig``: anonymous private RAM, or one zone backed by ``spec.memory_file``.

    With a shared file the guest's RAM *is* the file, and ``vm.snapshot`` leaves
    such memory out of its own memory dump; a clone maps the same file private
    (copy-on-write).  Zones require the top-level size to be 0.
    """
    size = spec.memory_mb * _MIB
    if spec.memory_file is None:
        return {"size": size, "shared": False}
    zone = {
        "id": MEMORY_ZONE,
        "size": size,
        "file": str(spec.memory_file),
        "shared": spec.memory_shared,
    }
    return {"size": 0, "zones": [zone]}


def guest_cmdline(spec: MachineSpec) -> str:
    """The kernel command line: the spec's, the vsock switch for the agent, and
    ``stoker.pci=1`` (Cloud Hypervisor's virtio devices are on PCI: the
    initramfs loads the virtio-pci transport only when told)."""
    return f"{spec.kernel_cmdline()} {VSOCK_TRANSPORT_PARAM} stoker.pci=1"


def file_url(path: Path) -> str:
    """``file:///abs/path`` as Cloud Hypervisor parses it (prefix stripped, no %-decoding)."""
    if not path.is_absolute():
        raise UsageError(f"snapshot directory must be an absolute path, not {path}")
    return f"file://{path}"


def _serial_config(cfg: CloudHypervisorConfig) -> dict[str, Any]:
    if cfg.console == "socket":
        return {"mode": "Socket", "socket": str(cfg.console_path)}
    return {"mode": "File", "file": str(cfg.console_path)}


def vm_config(spec: MachineSpec, cfg: CloudHypervisorConfig) -> dict[str, Any]:
    """The ``VmConfig`` body of ``PUT /vm.create`` for ``spec`` (pure)."""
    body: dict[str, Any] = {
        "payload": {
            "kernel": str(spec.kernel),
            "initramfs": str(spec.initrd),
            "cmdline": guest_cmdline(spec),
        },
        "cpus": {"boot_vcpus": spec.cpus, "max_vcpus": spec.cpus},
        "memory": _memory(spec),
        "rng": {"src": cfg.rng_source},
        "serial": _serial_config(cfg),
        # The virtio console cannot be a socket, and the serial port already is the console.
        "console": {"mode": "Off"},
    }
    disks = _disks(spec)
    if disks:
        body["disks"] = [d.body() for d in disks]
    if not spec.probe:
        body["vsock"] = {"cid": GUEST_CID, "socket": str(cfg.vsock_socket)}
    return body


def _opt(value: str) -> str:
    """A value for Cloud Hypervisor's ``key=value,...`` option syntax.

    Commas are protected by double quotes (its parser drops the quotes); a value
    containing quotes or brackets cannot be expressed at all.
    """
    if any(c in value for c in '"[]'):
        raise UsageError(
            f"{value!r} cannot be passed on Cloud Hypervisor's command line",
            hint="use REST mode, which passes paths as JSON",
        )
    return f'"{value}"' if "," in value else value


def vmm_argv(cfg: CloudHypervisorConfig) -> list[str]:
    """The VMM with its API (and event monitor) only: REST mode creates the VM later."""
    api = f"fd={cfg.api_fd}" if cfg.api_fd is not None else f"path={_opt(str(cfg.api_socket))}"
    argv = [cfg.binary, "--api-socket", api]
    if cfg.event_fd is not None:
        argv += ["--event-monitor", f"fd={cfg.event_fd}"]
    return argv


def cloud_hypervisor_argv(spec: MachineSpec, cfg: CloudHypervisorConfig) -> list[str]:
    """The whole VM on the command line (CLI mode); same machine as :func:`vm_config`."""
    if cfg.console == "socket":
        serial = f"socket={_opt(str(cfg.console_path))}"
    else:
        serial = f"file={_opt(str(cfg.console_path))}"
    # One option and its value(s) per line:
    # fmt: off
    argv = [
        *vmm_argv(cfg),
        "--kernel", str(spec.kernel),
        "--initramfs", str(spec.initrd),
        "--cmdline", guest_cmdline(spec),
        "--cpus", f"boot={spec.cpus},max={spec.cpus}",
        *_memory_options(spec),
        "--rng", f"src={_opt(cfg.rng_source)}",
        "--serial", serial,
        "--console", "off",
    ]
    disks = _disks(spec)
    if disks:
        # One --disk with several values: newer releases (clap 4) refuse a repeated option.
        argv += ["--disk", *(d.option() for d in disks)]
    if not spec.probe:
        argv += ["--vsock", f"cid={GUEST_CID},socket={_opt(str(cfg.vsock_socket))}"]
    # fmt: on
    return argv


def _memory_options(spec: MachineSpec) -> list[str]:
    if spec.memory_file is None:
        return ["--memory", f"size={spec.memory_mb}M,shared=off"]
    share = "on" if spec.memory_shared else "off"
    zone = f"id={MEMORY_ZONE},size={spec.memory_mb}M,file={_opt(str(spec.memory_file))}"
    return ["--memory", "size=0", "--memory-zone", f"{zone},shared={share}"]


def restore_argv(cfg: CloudHypervisorConfig, source: Path) -> list[str]:
    """A fresh VMM restoring ``source`` from its command line (CLI mode; VM stays paused)."""
    return [*vmm_argv(cfg), "--restore", f"source_url={_opt(file_url(source))}"]


def boot_requests(spec: MachineSpec, cfg: CloudHypervisorConfig) -> list[ApiRequest]:
    """REST mode: create the VM, then boot it (the console is attached in between)."""
    return [ApiRequest("PUT", "/vm.create", vm_config(spec, cfg)), ApiRequest("PUT", "/vm.boot")]


def snapshot_requests(destination: Path, *, resume: bool = True) -> list[ApiRequest]:
    """Pause, write a snapshot into the existing directory ``destination``, resume."""
    calls = [
        ApiRequest("PUT", "/vm.pause"),
        ApiRequest("PUT", "/vm.snapshot", {"destination_url": file_url(destination)}),
    ]
    if resume:
        calls.append(ApiRequest("PUT", "/vm.resume"))
    return calls


def restore_requests(source: Path) -> list[ApiRequest]:
    """Restore ``source`` into a fresh VMM; the VM comes back paused, so resume it.

    The resume is a separate call (not ``RestoreConfig.resume``, which older releases
    lack) so that the console can be attached before the guest runs again.
    """
    return [
        ApiRequest("PUT", "/vm.restore", {"source_url": file_url(source)}),
        ApiRequest("PUT", "/vm.resume"),
    ]


def shutdown_requests() -> list[ApiRequest]:
    """Graceful teardown: stop the VM, then the VMM process."""
    return [ApiRequest("PUT", "/vm.shutdown"), ApiRequest("PUT", "/vmm.shutdown")]


def relocate_snapshot_config(
    saved: Mapping[str, Any], cfg: CloudHypervisorConfig, spec: MachineSpec | None = None
) -> dict[str, Any]:
    """A snapshot's ``config.json`` moved to ``cfg``'s sockets (and ``spec``'s files) (pure).

    A snapshot remembers the paths of the VM it was taken from; a restored VM
    lives in another work directory (and the original may still run), so its
    sockets must point there.  With ``spec`` (a clone), the disks and the memory
    file are the clone's too: same devices, new files.  Cloud Hypervisor documents
    ``config.json`` as editable between snapshot and restore.
    """
    config: dict[str, Any] = json.loads(json.dumps(saved))  # a deep copy of plain JSON data
    # Keep what we do not manage (e.g. iommu); drop the path key of the old mode.
    kept = {
        key: value
        for key, value in (config.get("serial") or {}).items()
        if key not in ("mode", "file", "socket")
    }
    config["serial"] = kept | _serial_config(cfg)
    if isinstance(config.get("vsock"), dict):
        config["vsock"]["socket"] = str(cfg.vsock_socket)
    if spec is None:
        return config
    disks = [d.body() for d in _disks(spec)]
    old_disks = config.get("disks") or []
    if [d.get("id") for d in old_disks] != [d["id"] for d in disks]:
        raise UsageError(
            "a restored VM must have the disks of its snapshot: "
            f"{[d.get('id') for d in old_disks]}, not {[d['id'] for d in disks]}"
        )
    config["disks"] = [old | new for old, new in zip(old_disks, disks, strict=True)]
    memory = _memory(spec)
    old_zones = {z.get("id"): z for z in (config.get("memory") or {}).get("zones") or []}
    if "zones" not in memory and old_zones:
        raise UsageError(
            "this snapshot's RAM lives in a memory file; restore it with spec.memory_file"
        )
    if "zones" in memory:
        memory["zones"] = [old_zones.get(z["id"], {}) | z for z in memory["zones"]]
    config["memory"] = (config.get("memory") or {}) | memory
    return config


def prepare_restore_dir(
    snapshot: Path, dest: Path, cfg: CloudHypervisorConfig, spec: MachineSpec | None = None
) -> Path:
    """Make ``dest`` a restorable view of ``snapshot`` (see :func:`relocate_snapshot_config`).

    The (possibly huge) memory and state files are symlinked, so one snapshot can be
    restored many times, concurrently, without copying or modifying it.
    """
    try:
        saved = json.loads((snapshot / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InfrastructureError(f"{snapshot} is not a Cloud Hypervisor snapshot: {exc}") from exc
    if not isinstance(saved, dict):
        raise InfrastructureError(f"{snapshot}/config.json is not a JSON object")
    config = relocate_snapshot_config(saved, cfg, spec)
    dest.mkdir(mode=0o700)
    for entry in snapshot.iterdir():
        if entry.name != "config.json":
            (dest / entry.name).symlink_to(entry.resolve())
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


# --------------------------------------------------------------------------- HTTP


class CloudHypervisorApiError(InfrastructureError):
    """The VMM answered an API request with an error status; carries its response text."""

    def __init__(self, method: str, path: str, status: int, text: str) -> None:
        detail = text.strip()[:2000]
        super().__init__(
            f"Cloud Hypervisor API {method} {path} failed with HTTP {status}"
            + (f": {detail}" if detail else "")
        )
        self.method = method
        self.path = path
        self.status = status
        self.text = text


class _ApiClient:
    """HTTP/1.1 over the VMM's Unix socket: one request per connection, bounded reads.

    Requests look like ``ch-remote``'s and the documented ``curl`` examples; replies
    without ``Content-Length`` have no body (the VMM keeps the connection open, so
    reading to EOF would hang).
    """

    def __init__(self, path: Path, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    async def call(self, request: ApiRequest, *, timeout: float | None = None) -> Any:
        """Perform ``request``; return the decoded JSON reply, or None when it has no body."""
        _, body = await self.request(request.method, request.path, request.body, timeout=timeout)
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError as exc:
            raise InfrastructureError(
                f"Cloud Hypervisor API {request.method} {request.path}: reply is not JSON"
                f" ({body[:200]!r})"
            ) from exc

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; return ``(status, body)`` for 2xx, else raise."""
        limit = self.timeout if timeout is None else timeout
        payload = None if body is None else json.dumps(body).encode()
        try:
            async with asyncio.timeout(limit):
                status, data = await self._exchange(method, path, payload)
        except TimeoutError:
            raise InfrastructureError(
                f"Cloud Hypervisor API {method} {path} did not answer within {limit:g}s"
            ) from None
        except OSError as exc:
            raise InfrastructureError(
                f"Cloud Hypervisor API {method} {path}: cannot talk to {self.path}: {exc}"
            ) from exc
        if not 200 <= status < 300:
            raise CloudHypervisorApiError(method, path, status, data.decode("utf-8", "replace"))
        return status, data

    async def _exchange(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_unix_connection(
            str(self.path), limit=_MAX_RESPONSE_HEAD
        )
        try:
            head = (
                f"{method} {API_PREFIX}{path} HTTP/1.1\r\n"
                "Host: localhost\r\n"
                "Accept: application/json\r\n"
            )
            if payload is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            writer.write(head.encode("ascii") + b"\r\n" + (payload or b""))
            await writer.drain()
            return await _read_response(reader, f"{method} {path}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader, what: str) -> tuple[int, bytes]:
    def bad(reason: str) -> InfrastructureError:
        return InfrastructureError(f"Cloud Hypervisor API {what}: {reason}")

    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise bad(f"connection closed before a complete reply ({exc.partial[:200]!r})") from None
    except asyncio.LimitOverrunError:
        raise bad(f"reply headers exceed {_MAX_RESPONSE_HEAD} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", lines[0])
    if match is None:
        raise bad(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
    status = int(match.group(1))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise bad(f"malformed header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
    if status in (204, 304) or 100 <= status < 200:
        return status, b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise bad("chunked replies are not supported")
    length_text = headers.get("content-length")
    if length_text is None:
        return status, b""
    if not length_text.isdigit():
        raise bad(f"bad Content-Length {length_text[:40]!r}")
    length = int(length_text)
    if length > _MAX_RESPONSE_BODY:
        raise bad(f"reply body of {length} bytes exceeds {_MAX_RESPONSE_BODY}")
    try:
        return status, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise bad(f"reply truncated after {len(exc.partial)} of {length} bytes") from None


# --------------------------------------------------------------------------- events


class EventDecoder:
    """Splits the event monitor's stream (pretty-printed JSON objects) into events.

    Records are separated by blank lines, which pretty-printed JSON never contains,
    so an unparseable record is skipped at the next blank line.  Bounded: a record
    longer than 64 KiB is dropped, never buffered without end.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._text = codecs.getincrementaldecoder("utf-8")("replace")
        self._json = json.JSONDecoder()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return the complete events it finished."""
        self._buffer += self._text.decode(data)
        events: list[dict[str, Any]] = []
        while text := self._buffer.lstrip():
            try:
                obj, end = self._json.raw_decode(text)
            except ValueError:
                separator = text.find("\n\n")
                if separator >= 0:  # a complete record that is not JSON: skip it
                    self._buffer = text[separator + 2 :]
                    continue
                self._buffer = "" if len(text) > _MAX_EVENT else text
                return events
            self._buffer = text[end:]
            if isinstance(obj, dict):
                events.append(obj)
        self._buffer = ""
        return events


def event_name(event: Mapping[str, Any]) -> str:
    """``source.event``, as the event-monitor documentation writes identifiers."""
    return f"{event.get('source')}.{event.get('event')}"


#: Events after which the guest is gone: CH would boot it again in the same process.
GUEST_RESET_EVENTS = frozenset({"vm.rebooting", "guest.panic"})


# --------------------------------------------------------------------------- transport


# --------------------------------------------------------------------------- VM


@dataclass
class CloudHypervisorVM(LaunchedVM):
    """A running ``cloud-hypervisor`` process and the VM inside it."""

    config: CloudHypervisorConfig | None = None
    proc: asyncio.subprocess.Process | None = None
    argv: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Objects to close on teardown (stream writers, pipe transports, sockets).
    keep: list[Any] = field(default_factory=list)
    #: The last event-monitor events, as ``source.event``.
    events: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=32))
    #: Set when the guest reset or panicked and stoker stopped the VMM for it.
    guest_reset: str | None = None
    api: _ApiClient | None = None
    #: What was launched (None for :meth:`CloudHypervisorBackend.restore`).
    spec: MachineSpec | None = None
    workdir: Path | None = None
    start_timeout: float = START_TIMEOUT
    _stderr_task: asyncio.Task[None] | None = None
    _killed: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.returncode is not None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def wait(self) -> int:
        if self.proc is None:
            raise InfrastructureError("cloud-hypervisor was never started")
        return await self.proc.wait()

    async def diagnostics(self) -> str:
        """Guest resets seen, the VM's state and the last VMM events (bounded, best effort)."""
        facts = []
        if self.guest_reset:
            facts.append(f"guest requested a reset ({self.guest_reset}); stoker stopped the VMM")
        if self.api is not None and self.returncode is None:
            with contextlib.suppress(Exception):
                info = await self.api.call(ApiRequest("GET", "/vm.info"), timeout=2)
                if isinstance(info, dict):
                    facts.append(f"VM state: {info.get('state')}")
        if self.events:
            facts.append("last VMM events: " + " ".join(list(self.events)[-5:]))
        return ", ".join(facts)

    def _require_running(self) -> _ApiClient:
        if self.api is None or self.returncode is not None or self._killed:
            raise InfrastructureError("the Cloud Hypervisor VM is not running")
        return self.api

    async def info(self) -> dict[str, Any]:
        """``GET /vm.info``: the VM's configuration and state."""
        reply = await self._require_running().call(ApiRequest("GET", "/vm.info"))
        if not isinstance(reply, dict):
            raise InfrastructureError("vm.info did not return a JSON object")
        return reply

    async def pause(self) -> None:
        """Stop the vCPUs (``PUT /vm.pause``)."""
        await self._require_running().call(ApiRequest("PUT", "/vm.pause"))

    async def resume(self) -> None:
        """Let a paused VM run again (``PUT /vm.resume``)."""
        await self._require_running().call(ApiRequest("PUT", "/vm.resume"))

    async def snapshot(self, destination: Path, *, resume: bool = True) -> Path:
        """Pause the VM and snapshot it into ``destination`` (created; must not exist).

        With ``resume`` the VM runs on afterwards.  Disk images are not copied: keep
        them where they are for as long as the snapshot may be restored.
        """
        api = self._require_running()
        destination.mkdir(mode=0o700)
        for request in snapshot_requests(destination, resume=resume):
            timeout = SNAPSHOT_TIMEOUT if request.path == "/vm.snapshot" else None
            await api.call(request, timeout=timeout)
        return destination

    async def save_state(self, directory: Path, timeout: float) -> None:
        """Pause the guest and snapshot it into the existing ``directory``; it stays paused.

        Cloud Hypervisor writes ``config.json``, ``state.json`` and ``memory-ranges``
        there.  RAM backed by a shared :attr:`MachineSpec.memory_file` is left out
        of ``memory-ranges``: the file is the RAM.
        """
        api = self._require_running()
        for request in snapshot_requests(directory, resume=False):
            await api.call(request, timeout=timeout)

    async def load_state(self, directory: Path, timeout: float) -> None:
        """Restore what :meth:`save_state` wrote into this VMM (launched ``incoming``); resume.

        The clone gets the snapshot's devices with its own files: the disks and
        memory file of the spec it was launched with, sockets in its work directory.
        """
        if self.spec is None or not self.spec.incoming:
            raise InfrastructureError("load_state needs a VMM launched with spec.incoming")
        await self._restore(directory, self.spec, timeout)

    async def _restore(self, snapshot: Path, spec: MachineSpec | None, timeout: float) -> None:
        api = self._require_running()
        assert self.config is not None and self.workdir is not None
        view = await asyncio.to_thread(
            prepare_restore_dir, snapshot, self.workdir / RESTORE_VIEW, self.config, spec
        )
        restore, resume = restore_requests(view)
        await _step(self, api.call(restore, timeout=timeout), "vm.restore", timeout)
        await _step(self, _attach_console(self, wait=True), "console attach", self.start_timeout)
        await _step(self, api.call(resume), "vm.resume", self.start_timeout)

    def _on_event(self, event: Mapping[str, Any]) -> None:
        name = event_name(event)
        self.events.append(name)
        if name in GUEST_RESET_EVENTS and self.guest_reset is None:
            self.guest_reset = name
            note = f"stoker: {name}: stopping the VMM instead of letting it reboot the guest\n"
            self.vmm_log.feed(note.encode())
            if self.proc is not None and self.proc.returncode is None:
                # The guest is gone already; nothing graceful is left to preserve.
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()

    async def kill(self) -> None:
        """``vm.shutdown``, ``vmm.shutdown``, SIGTERM, SIGKILL; reaps; removes the sockets.

        Idempotent.  Verified: raises :class:`InfrastructureError` if the process
        survives SIGKILL or a socket file cannot be removed.
        """
        if self._killed:
            return
        self._killed = True
        proc = self.proc
        try:
            if proc is not None and proc.returncode is None:
                if self.api is not None:
                    for request in shutdown_requests():
                        try:
                            await self.api.call(request, timeout=QUIT_GRACE)
                        except CloudHypervisorApiError:
                            continue  # e.g. no VM was created yet: still stop the VMM
                        except Exception:
                            break  # not answering at all: go straight to signals
                await wait_for(proc, QUIT_GRACE)
                await terminate(proc, what="cloud-hypervisor", grace=QUIT_GRACE)
        finally:
            await _cancel(*self.tasks)
            for obj in self.keep:
                with contextlib.suppress(Exception):
                    obj.close()
            leftovers = _remove_sockets(self.config)
        if leftovers:
            raise InfrastructureError(f"cannot remove VM sockets: {', '.join(leftovers)}")


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait for them; our own cancellation still propagates."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _remove_sockets(cfg: CloudHypervisorConfig | None) -> list[str]:
    """Unlink this VM's socket and FIFO files; return those that could not be removed."""
    if cfg is None:
        return []
    failed = []
    for path in (cfg.api_socket, cfg.vsock_socket, cfg.console_path):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed.append(f"{path} ({exc.strerror})")
    return failed


async def _watch_events(reader: asyncio.StreamReader, vm: CloudHypervisorVM) -> None:
    decoder = EventDecoder()
    while data := await reader.read(65536):
        for event in decoder.feed(data):
            vm._on_event(event)


# --------------------------------------------------------------------------- backend


class CloudHypervisorBackend(Backend):
    """Cloud Hypervisor (KVM only): REST mode by default, or everything on the command line."""

    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str = CLOUD_HYPERVISOR_BINARY,
        *,
        mode: LaunchMode = "rest",
        console: ConsoleMode = "socket",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.binary = binary
        self.mode: LaunchMode = mode
        self.console: ConsoleMode = console
        self.start_timeout = start_timeout

    def describe(self) -> dict[str, str]:
        ok, why = cloud_hypervisor_status(self.binary)
        return {
            "binary": self.binary,
            "version": cloud_hypervisor_version(self.binary) or "not installed",
            "usable": "yes" if ok else "no",
            "reason": why,
            "mode": self.mode,
            "console": self.console,
        }

    def config_for(self, workdir: Path) -> CloudHypervisorConfig:
        """This backend's socket layout in ``workdir`` (checked to fit ``sun_path``)."""
        cfg = CloudHypervisorConfig.in_workdir(
            workdir, binary=self.binary, console=self.console, mode=self.mode
        )
        cfg.check()
        return cfg

    def usable(self) -> tuple[bool, str]:
        """Whether this host can run Cloud Hypervisor VMs, and why not (cheap, no VM)."""
        return cloud_hypervisor_status(self.binary)

    async def launch(
        self, spec: MachineSpec, workdir: Path, stack: AsyncExitStack
    ) -> CloudHypervisorVM:
        """Start the VMM and boot ``spec``; with ``spec.incoming``, leave it for ``load_state``."""
        if spec.accel != "kvm":
            raise AccelError(
                "Cloud Hypervisor needs KVM; it has no emulation (TCG) fallback",
                hint="use the QEMU backend on hosts without usable /dev/kvm",
            )
        cfg = self.config_for(workdir)
        if spec.memory_file is not None and spec.memory_shared:
            _ensure_memory_file(spec.memory_file, spec.memory_mb * _MIB)
        if spec.incoming:
            # Only the VMM: CloudHypervisorVM.load_state() restores into it.
            return await self._spawn(cfg, vmm_argv, workdir, stack, spec)
        if cfg.mode == "cli":
            argv = functools.partial(cloud_hypervisor_argv, spec)
            vm = await self._spawn(cfg, argv, workdir, stack, spec)
            await _step(vm, _until_created(vm), "boot", self.start_timeout)
            await _step(vm, _attach_console(vm, wait=True), "console attach", self.start_timeout)
            return vm
        vm = await self._spawn(cfg, vmm_argv, workdir, stack, spec)
        create, boot = boot_requests(spec, cfg)
        assert vm.api is not None
        await _step(vm, vm.api.call(create), "vm.create", self.start_timeout)
        attached = await _attach_console(vm, wait=False)
        await _step(vm, vm.api.call(boot), "vm.boot", self.start_timeout)
        if not attached:
            await _step(vm, _attach_console(vm, wait=True), "console attach", self.start_timeout)
        return vm

    async def restore(
        self, snapshot: Path, workdir: Path, stack: AsyncExitStack
    ) -> CloudHypervisorVM:
        """Start a fresh VMM from the snapshot directory ``snapshot`` and resume the guest.

        The snapshot is not modified: a view of it with the sockets moved to
        ``workdir`` is made there.  Its disk images must still be where they were.
        """
        cfg = self.config_for(workdir)
        if cfg.mode == "rest":
            vm = await self._spawn(cfg, vmm_argv, workdir, stack)
            await vm._restore(snapshot, None, SNAPSHOT_TIMEOUT)
            return vm
        source = await asyncio.to_thread(prepare_restore_dir, snapshot, workdir / RESTORE_VIEW, cfg)
        vm = await self._spawn(cfg, lambda c: restore_argv(c, source), workdir, stack)
        await _step(vm, _until_created(vm), "restore", SNAPSHOT_TIMEOUT)
        await _step(vm, _attach_console(vm, wait=True), "console attach", self.start_timeout)
        _, resume = restore_requests(source)
        await _step(vm, vm._require_running().call(resume), "vm.resume", self.start_timeout)
        return vm

    async def _spawn(
        self,
        cfg: CloudHypervisorConfig,
        make_argv: Callable[[CloudHypervisorConfig], list[str]],
        workdir: Path,
        stack: AsyncExitStack,
        spec: MachineSpec | None = None,
    ) -> CloudHypervisorVM:
        """Create the sockets, start the VMM, and wait until its API answers."""
        vm = CloudHypervisorVM(
            transport=HybridVsockTransport(cfg.vsock_socket, VSOCK_PORT),
            config=cfg,
            spec=spec,
            workdir=workdir,
            start_timeout=self.start_timeout,
        )
        # From here on every resource is released by vm.kill, even if launching fails.
        stack.push_async_callback(vm.kill)
        loop = asyncio.get_running_loop()

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        events_ours, events_theirs = socket.socketpair()
        vm.keep.append(events_ours)
        try:
            listener.bind(str(cfg.api_socket))
            listener.listen(16)
            if cfg.console == "file":
                await self._open_console_fifo(vm, cfg.console_path)
            cfg = replace(cfg, api_fd=listener.fileno(), event_fd=events_theirs.fileno())
            vm.config = cfg
            vm.argv = make_argv(cfg)
            log.debug("launching: %s", " ".join(vm.argv))
            try:
                vm.proc = await asyncio.create_subprocess_exec(
                    *vm.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    pass_fds=[listener.fileno(), events_theirs.fileno()],
                    # Only calls a pre-resolved prctl(): safe between fork and exec.
                    preexec_fn=DIE_WITH_PARENT,
                    cwd=workdir,
                )
            except FileNotFoundError as exc:
                raise LaunchError(
                    f"{cfg.binary} is not installed", argv=vm.argv, hint=INSTALL_HINT
                ) from exc
        finally:
            # The child has its own copies.  Closing ours means that if it dies, API
            # clients see ECONNREFUSED/EOF instead of waiting in a dead listen queue.
            listener.close()
            events_theirs.close()
        assert vm.proc.stderr is not None
        vm._stderr_task = loop.create_task(pump(vm.proc.stderr, vm.vmm_log))
        vm.tasks.append(vm._stderr_task)
        ev_reader, ev_writer = await asyncio.open_unix_connection(sock=events_ours)
        vm.keep.append(ev_writer)
        vm.tasks.append(loop.create_task(_watch_events(ev_reader, vm)))
        vm.api = _ApiClient(cfg.api_socket)
        await _step(vm, vm.api.call(ApiRequest("GET", "/vmm.ping")), "start-up", self.start_timeout)
        return vm

    async def _open_console_fifo(self, vm: CloudHypervisorVM, path: Path) -> None:
        # O_RDWR: we are a writer too, so reads never see EOF before the VMM opens
        # it, and the VMM's open() for writing never blocks.
        os.mkfifo(path, 0o600)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        pipe = os.fdopen(fd, "rb", buffering=0)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
        except BaseException:
            pipe.close()
            raise
        vm.keep.append(transport)
        vm.tasks.append(loop.create_task(pump(reader, vm.console)))


async def _until_created(vm: CloudHypervisorVM) -> None:
    """CLI mode: wait until the VMM has created (and so bound the console of) the VM."""
    assert vm.api is not None
    while True:
        try:
            await vm.api.call(ApiRequest("GET", "/vm.info"), timeout=2)
            return
        except CloudHypervisorApiError:
            await asyncio.sleep(0.05)


def _ensure_memory_file(path: Path, size: int) -> None:
    """Create the file a template's RAM lives in (CH, unlike QEMU, only opens an existing one)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # sparse: costs nothing until the guest touches it
    finally:
        os.close(fd)


async def _attach_console(vm: CloudHypervisorVM, *, wait: bool) -> bool:
    """Connect to the serial console socket; False if it is not there yet and not ``wait``.

    Recent releases bind it at ``vm.create`` (so REST mode attaches before the
    guest prints anything); older ones only while booting or restoring, which is
    what ``wait`` (bounded by :func:`_step`) is for.
    """
    cfg = vm.config
    assert cfg is not None
    if cfg.console != "socket":
        return True  # the FIFO is read from before the VMM starts
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(cfg.console_path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if not wait:
                return False
            await asyncio.sleep(0.02)
    vm.keep.append(writer)
    vm.tasks.append(asyncio.get_running_loop().create_task(pump(reader, vm.console)))
    return True


async def _step(vm: CloudHypervisorVM, step: Awaitable[T], what: str, timeout: float) -> T:
    """Run one launch step; fail fast, with the VMM's stderr, if the VMM exits meanwhile."""
    assert vm.proc is not None
    proc = vm.proc
    task = asyncio.ensure_future(step)
    exited = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait(
            {task, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        await _cancel(*(t for t in (task, exited) if not t.done()))
    if task in done and task.exception() is None:
        return task.result()
    cause = task.exception() if task in done else None
    # The VMM's last words say most; let them arrive.  An API error means the
    # VMM is alive and answering, so there is no exit to wait for.
    if not isinstance(cause, CloudHypervisorApiError):
        await wait_for(proc, 1.0)
    if proc.returncode is not None and vm._stderr_task is not None:
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            async with asyncio.timeout(1.0):
                await asyncio.shield(vm._stderr_task)  # ends at EOF
    else:
        await asyncio.sleep(0.05)  # stderr written just before the reply
    if proc.returncode is not None:
        message = f"cloud-hypervisor exited during {what}"
    elif cause is not None:
        message = f"cloud-hypervisor failed during {what}: {cause}"
    else:
        message = f"cloud-hypervisor did not complete {what} within {timeout:g}s"
    raise LaunchError(
        message, argv=vm.argv, returncode=proc.returncode, output=vm.vmm_log.text()
    ) from cause


# --------------------------------------------------------------------------- doctor

_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int] | None:
    """``(53, 0)`` from ``cloud-hypervisor v53.0`` (or ``v39.0.0-12-gabc``), else None."""
    match = _VERSION_RE.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cloud_hypervisor_version(binary: str = CLOUD_HYPERVISOR_BINARY) -> str | None:
    """``53.0`` for an installed Cloud Hypervisor, else None."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    version = parse_version(out)
    return f"{version[0]}.{version[1]}" if version else None


def cloud_hypervisor_status(
    binary: str = CLOUD_HYPERVISOR_BINARY,
    *,
    kvm_check: Callable[[], tuple[bool, str]] = kvm_device_status,
) -> tuple[bool, str]:
    """Whether this host can run the Cloud Hypervisor backend, and why (for ``stoker doctor``)."""
    path = shutil.which(binary)
    if path is None:
        return False, f"{binary} not found on PATH ({INSTALL_HINT})"
    version = cloud_hypervisor_version(path)
    if version is None:
        return False, f"{path} --version did not report a version"
    parsed = parse_version(version)
    assert parsed is not None
    if parsed < MIN_VERSION:
        return False, (
            f"{path} is v{version}; stoker boots a bzImage directly, which needs"
            f" v{MIN_VERSION[0]}.{MIN_VERSION[1]} or newer"
        )
    kvm_ok, kvm_why = kvm_check()
    if not kvm_ok:
        return False, f"{kvm_why}; Cloud Hypervisor runs on KVM only"
    return True, f"{path} v{version}; {kvm_why}"
