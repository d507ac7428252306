"""Cloud Hypervisor backend, tested without Cloud Hypervisor.

* Every request body the backend can send is validated against Cloud Hypervisor's
  own OpenAPI document (``../shared/reference/cloud-hypervisor/``), with unknown keys
  refused too (the document does not forbid them itself).
* Command lines and request plans are golden files (``tests/golden/cloud-hypervisor-*``).
* The HTTP client, the backend and kill() are exercised against
  :class:`FakeCloudHypervisor`, a test peer that plays the documented API contract
  (and hybrid vsock, serial socket/file, event monitor): in-process for the client,
  and as a stand-in ``cloud-hypervisor`` executable for launch/kill/snapshot/restore.
* A real boot runs only where the binary and KVM are usable.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from referencing import Registry
from referencing.jsonschema import DRAFT4

from stoker.backends import cloud_hypervisor as ch
from stoker.backends.base import MachineSpec
from stoker.backends.cloud_hypervisor import (
    ApiRequest,
    CloudHypervisorApiError,
    CloudHypervisorBackend,
    CloudHypervisorConfig,
    CloudHypervisorVM,
    EventDecoder,
    boot_requests,
    cloud_hypervisor_argv,
    cloud_hypervisor_status,
    file_url,
    parse_version,
    prepare_restore_dir,
    relocate_snapshot_config,
    restore_argv,
    restore_requests,
    shutdown_requests,
    snapshot_requests,
    vm_config,
    vmm_argv,
)
from stoker.errors import (
    AccelError,
    GuestProtocolError,
    InfrastructureError,
    LaunchError,
    UsageError,
)
from stoker.protocol.transport import HybridVsockTransport
from stoker.protocol.wire import VSOCK_PORT

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
SPEC_FILE = (
    # A vendored copy of ../shared/reference (see tests/reference/README.md).
    TESTS / "reference" / "cloud-hypervisor" / "cloud-hypervisor.yaml"
)
SPEC_URI = "urn:stoker:cloud-hypervisor-openapi"

# --------------------------------------------------------------------------- the spec


def _str_keys(value: Any) -> Any:
    # The YAML has unquoted response codes (ints); JSON Schema tooling wants str keys.
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


@functools.cache
def ch_openapi() -> dict[str, Any]:
    """Cloud Hypervisor's OpenAPI 3.0 document, as kept in ``shared/reference``."""
    if not SPEC_FILE.is_file():
        raise FileNotFoundError(
            f"{SPEC_FILE} is missing: the Cloud Hypervisor OpenAPI document lives in "
            "../shared/reference beside the repository"
        )
    spec: dict[str, Any] = _str_keys(yaml.safe_load(SPEC_FILE.read_text()))
    assert spec["openapi"].startswith("3.0")
    return spec


@functools.cache
def _registry() -> Registry[Any]:
    """The spec as one resource, so ``#/components/schemas/X`` refs resolve inside it."""
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, DRAFT4.create_resource(ch_openapi())
    )
    return registry


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = ch_openapi()
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        schema = node
    return schema


def _undeclared(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    """Keys the schema does not declare (the spec leaves additionalProperties open)."""
    schema = _resolve(schema)
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += _undeclared(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += _undeclared(item, schema["items"], f"{where}[{i}]")
    return found


def validate_schema(pointer: str, value: Any) -> None:
    """Validate ``value`` against the schema at ``pointer`` in the spec, strictly."""
    OAS30Validator({"$ref": SPEC_URI + pointer}, registry=_registry()).validate(value)
    unknown = _undeclared(value, {"$ref": pointer}, "body")
    assert not unknown, f"keys the Cloud Hypervisor API does not declare: {unknown}"


def validate_request(method: str, path: str, body: Any) -> None:
    """The endpoint exists for ``method``; the body matches its requestBody schema, or is absent."""
    paths = ch_openapi()["paths"]
    assert path in paths, f"{path} is not a Cloud Hypervisor API endpoint"
    operation = paths[path].get(method.lower())
    assert operation is not None, f"{method} is not defined for {path}"
    request_body = operation.get("requestBody")
    if request_body is None:
        assert body is None, f"{method} {path} takes no body"
        return
    if body is None:
        assert not request_body.get("required"), f"{method} {path} requires a body"
        return
    validate_schema(
        _pointer(
            "paths", path, method.lower(), "requestBody", "content", "application/json", "schema"
        ),
        body,
    )


def validate(request: ApiRequest) -> None:
    validate_request(request.method, request.path, request.body)


def test_validator_catches_mistakes() -> None:
    from jsonschema.exceptions import ValidationError

    good = vm_config(_spec(), CFG)
    validate_request("PUT", "/vm.create", good)
    with pytest.raises(AssertionError, match="not a Cloud Hypervisor API endpoint"):
        validate_request("PUT", "/vm.start", None)
    with pytest.raises(AssertionError, match="not defined"):
        validate_request("GET", "/vm.create", None)
    with pytest.raises(AssertionError, match="takes no body"):
        validate_request("PUT", "/vm.boot", {})
    with pytest.raises(AssertionError, match="requires a body"):
        validate_request("PUT", "/vm.create", None)
    with pytest.raises(AssertionError, match=r"body\.cpus\.boot_vcpu"):
        typo = {"boot_vcpus": 1, "max_vcpus": 1, "boot_vcpu": 1}
        validate_request("PUT", "/vm.create", good | {"cpus": typo})
    for broken in (
        {k: v for k, v in good.items() if k != "payload"},  # required
        good | {"memory": {"size": "1G"}},  # type
        good | {"serial": {"mode": "Unix"}},  # enum
        good | {"vsock": {"cid": 2, "socket": "/x"}},  # minimum (2 is the host)
    ):
        with pytest.raises(ValidationError):
            validate_request("PUT", "/vm.create", broken)


# --------------------------------------------------------------------------- plans


def _spec(**kw: Any) -> MachineSpec:
    base: dict[str, Any] = dict(
        name="stoker-test",
        kernel=Path("/cache/vmlinuz"),
        initrd=Path("/cache/initrd.cpio.gz"),
        rootfs=Path("/cache/images/abc/rootfs.erofs"),
        accel="kvm",
        cpus=2,
        memory_mb=1024,
        scratch=Path("/run/stoker/vm/scratch.img"),
    )
    base.update(kw)
    return MachineSpec(**base)


WORKDIR = Path("/run/stoker/vm")
CFG = CloudHypervisorConfig.in_workdir(WORKDIR)
#: As launched: the parent made the API socket (fd 3) and event-monitor pair (fd 4).
CFG_FDS = replace(CFG, api_fd=3, event_fd=4)
CASES: dict[str, tuple[MachineSpec, CloudHypervisorConfig]] = {
    "kvm-2cpu": (_spec(), CFG_FDS),
    "kvm-1cpu-noscratch": (_spec(cpus=1, scratch=None), CFG_FDS),
    "probe": (_spec(cpus=1, memory_mb=256, probe=True, scratch=None), CFG_FDS),
    "seed": (_spec(seed=WORKDIR / "seed.tar"), CFG_FDS),
    "file-console": (
        _spec(),
        replace(CloudHypervisorConfig.in_workdir(WORKDIR, console="file"), api_fd=3, event_fd=4),
    ),
    "api-by-path": (_spec(), CFG),
    # stoker.VM snapshots: a template runs in a shared memory file; a clone maps it
    # private, over a qcow2 overlay of the template's disk.  (A clone's launch only
    # starts the VMM; load_state relocates the snapshot's config to these devices.)
    "template": (
        _spec(memory_file=Path("/cache/snapshots/k/memory"), memory_shared=True),
        CFG_FDS,
    ),
    "clone-devices": (
        _spec(
            scratch=WORKDIR / "scratch.qcow2",
            scratch_format="qcow2",
            memory_file=Path("/cache/snapshots/k/memory"),
            incoming=True,
        ),
        CFG_FDS,
    ),
}
SNAPSHOT = Path("/var/tmp/stoker snapshots/one")  # a space: file URLs are not %-encoded


def _check_golden(name: str, data: Any) -> None:
    path = GOLDEN / f"cloud-hypervisor-{name}.json"
    if os.environ.get("STOKER_UPDATE_GOLDEN"):
        path.write_text(json.dumps(data, indent=1) + "\n")
    assert data == json.loads(path.read_text()), (
        f"regenerate with STOKER_UPDATE_GOLDEN=1 if intended ({path})"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_launch_plan(case: str) -> None:
    spec, cfg = CASES[case]
    plan = {
        "cli": cloud_hypervisor_argv(spec, cfg),
        "rest": {
            "argv": vmm_argv(cfg),
            "requests": [r.as_json() for r in boot_requests(spec, cfg)],
        },
    }
    _check_golden(case, plan)


def test_golden_lifecycle_plan() -> None:
    plan = {
        "snapshot": [r.as_json() for r in snapshot_requests(SNAPSHOT)],
        "snapshot-paused": [r.as_json() for r in snapshot_requests(SNAPSHOT, resume=False)],
        "restore": {
            "rest": {
                "argv": vmm_argv(CFG_FDS),
                "requests": [r.as_json() for r in restore_requests(SNAPSHOT)],
            },
            "cli": restore_argv(CFG_FDS, SNAPSHOT),
        },
        "shutdown": [r.as_json() for r in shutdown_requests()],
    }
    _check_golden("lifecycle", plan)


def _all_requests() -> list[ApiRequest]:
    requests = [*snapshot_requests(SNAPSHOT), *restore_requests(SNAPSHOT), *shutdown_requests()]
    requests += [ApiRequest("GET", "/vmm.ping"), ApiRequest("GET", "/vm.info")]
    for spec, cfg in CASES.values():
        requests += boot_requests(spec, cfg)
    return requests


@pytest.mark.parametrize("request_", _all_requests(), ids=lambda r: f"{r.method}{r.path}")
def test_every_request_matches_the_openapi_spec(request_: ApiRequest) -> None:
    validate(request_)


def test_vm_config_describes_the_machine() -> None:
    spec = _spec(seed=WORKDIR / "seed.tar")
    body = vm_config(spec, CFG)
    assert body["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert body["memory"] == {"size": 1024 << 20, "shared": False}
    assert body["payload"]["kernel"] == "/cache/vmlinuz"
    assert body["payload"]["initramfs"] == "/cache/initrd.cpio.gz"
    cmdline = body["payload"]["cmdline"].split()
    assert cmdline[-2:] == ["stoker.transport=vsock", "stoker.pci=1"]
    assert {"console=ttyS0", "stoker.root=/dev/vda", "stoker.scratch=/dev/vdb"} <= set(cmdline)
    # virtio-pci disks enumerate in this order: vda, vdb, vdc.
    assert [(d["id"], d["readonly"]) for d in body["disks"]] == [
        ("root", True),
        ("scratch", False),
        ("seed", True),
    ]
    assert body["disks"][2]["serial"] == "stoker-seed"
    assert body["serial"] == {"mode": "Socket", "socket": str(WORKDIR / "ch.console")}
    assert body["console"] == {"mode": "Off"}
    assert body["vsock"] == {"cid": 3, "socket": str(WORKDIR / "ch.vsock")}
    assert "net" not in body


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_line_and_rest_describe_the_same_machine(case: str) -> None:
    spec, cfg = CASES[case]
    from_argv = config_from_argv(parse_ch_argv(cloud_hypervisor_argv(spec, cfg)[1:]))
    body = vm_config(spec, cfg)
    for key in ("payload", "cpus", "memory", "serial", "console", "rng", "vsock", "disks"):
        assert from_argv.get(key) == body.get(key), key


def test_commas_in_paths_are_quoted_on_the_command_line() -> None:
    spec = _spec(rootfs=Path("/a,b/root.erofs"))
    argv = cloud_hypervisor_argv(spec, CFG)
    assert 'path="/a,b/root.erofs",readonly=on,id=root' in argv
    assert config_from_argv(parse_ch_argv(argv[1:]))["disks"][0]["path"] == "/a,b/root.erofs"
    assert vm_config(spec, CFG)["disks"][0]["path"] == "/a,b/root.erofs"  # JSON needs nothing
    with pytest.raises(UsageError, match="cannot be passed") as err:
        cloud_hypervisor_argv(_spec(rootfs=Path('/a"b/root.erofs')), CFG)
    assert err.value.hint and "REST mode" in err.value.hint


def test_file_urls() -> None:
    assert file_url(SNAPSHOT) == "file:///var/tmp/stoker snapshots/one"
    with pytest.raises(UsageError, match="absolute"):
        file_url(Path("relative/snap"))


def test_relocating_a_snapshot_moves_only_its_sockets() -> None:
    old = CloudHypervisorConfig.in_workdir(Path("/run/stoker/old"))
    new = CloudHypervisorConfig.in_workdir(Path("/run/stoker/new"), console="file")
    saved = vm_config(_spec(), old)
    saved["serial"]["iommu"] = False
    before = json.dumps(saved, sort_keys=True)
    moved = relocate_snapshot_config(saved, new)
    assert json.dumps(saved, sort_keys=True) == before  # pure
    assert moved["serial"] == {
        "iommu": False,
        "mode": "File",
        "file": "/run/stoker/new/ch.console.fifo",
    }
    assert moved["vsock"] == {"cid": 3, "socket": "/run/stoker/new/ch.vsock"}
    assert {k: v for k, v in moved.items() if k not in ("serial", "vsock")} == {
        k: v for k, v in saved.items() if k not in ("serial", "vsock")
    }
    # CH's own config.json carries extras the API document lacks (serial.iommu);
    # relocating what stoker sent yields a body the API accepts.
    plain = relocate_snapshot_config(vm_config(_spec(), old), new)
    validate_schema(_pointer("components", "schemas", "VmConfig"), plain)


def test_relocating_for_a_clone_swaps_its_files() -> None:
    template_spec, _ = CASES["template"]
    clone_spec, _ = CASES["clone-devices"]
    old = CloudHypervisorConfig.in_workdir(Path("/cache/snapshots/.tmp/x"))
    saved = vm_config(
        replace(template_spec, scratch=Path("/cache/snapshots/.tmp/x/scratch.img")), old
    )
    saved["disks"][1]["num_queues"] = 1  # CH's own config.json has every field
    moved = relocate_snapshot_config(saved, CFG, clone_spec)
    assert moved["disks"][1] == {
        "path": str(WORKDIR / "scratch.qcow2"),
        "readonly": False,
        "id": "scratch",
        "num_queues": 1,
        "image_type": "Qcow2",
        "backing_files": True,
    }
    assert moved["memory"]["zones"] == [
        {"id": "mem0", "size": 1024 << 20, "file": "/cache/snapshots/k/memory", "shared": False}
    ]
    assert moved["vsock"]["socket"] == str(CFG.vsock_socket)
    assert moved["payload"] == saved["payload"]
    with pytest.raises(UsageError, match="disks of its snapshot"):
        relocate_snapshot_config(saved, CFG, replace(clone_spec, seed=WORKDIR / "seed.tar"))
    with pytest.raises(UsageError, match="memory file"):
        relocate_snapshot_config(saved, CFG, replace(clone_spec, memory_file=None))


def test_prepare_restore_dir_leaves_the_snapshot_alone(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    saved = vm_config(_spec(), CloudHypervisorConfig.in_workdir(tmp_path / "old"))
    (snap / "config.json").write_text(json.dumps(saved))
    (snap / "state.json").write_text("{}")
    (snap / "memory-ranges").write_bytes(b"\0" * 4096)
    cfg = CloudHypervisorConfig.in_workdir(tmp_path / "new")
    view = prepare_restore_dir(snap, tmp_path / "view", cfg)
    assert json.loads((snap / "config.json").read_text()) == saved
    assert (view / "memory-ranges").is_symlink()
    assert (view / "memory-ranges").resolve() == (snap / "memory-ranges").resolve()
    assert (view / "state.json").is_symlink()
    assert json.loads((view / "config.json").read_text())["vsock"]["socket"] == str(
        cfg.vsock_socket
    )
    with pytest.raises(InfrastructureError, match="not a Cloud Hypervisor snapshot"):
        prepare_restore_dir(tmp_path / "nothing", tmp_path / "view2", cfg)


def test_socket_paths_must_fit_sun_path(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 120)
    with pytest.raises(LaunchError, match="longer than 107 bytes"):
        CloudHypervisorBackend().config_for(long_dir)


def test_versions() -> None:
    assert parse_version("cloud-hypervisor v53.0") == (53, 0)
    assert parse_version("cloud-hypervisor v39.0.0-12-gabcdef") == (39, 0)
    assert parse_version("nothing") is None


# --------------------------------------------------------------------------- CH option syntax


def _split_commas(text: str) -> list[str]:
    """Cloud Hypervisor's option_parser::split_commas, re-implemented for the test."""
    parts, current, brackets, quoted = [], "", 0, False
    for c in text.strip():
        if c == "[":
            brackets += 1
            current += c
        elif c == "]":
            brackets -= 1
            assert brackets >= 0, text
            current += c
        elif c == '"':
            quoted = not quoted
        elif c == "," and not brackets and not quoted:
            parts.append(current)
            current = ""
        else:
            current += c
    parts.append(current)
    assert not brackets and not quoted, text
    return parts


def ch_options(text: str) -> dict[str, str]:
    """``key=value,...`` as Cloud Hypervisor parses it."""
    return dict(part.split("=", 1) for part in _split_commas(text))


def parse_ch_argv(argv: list[str]) -> dict[str, list[str]]:
    """``--option value...`` groups, as clap hands them to Cloud Hypervisor."""
    opts: dict[str, list[str]] = {}
    current = None
    for arg in argv:
        if arg.startswith("--"):
            assert arg not in opts, f"{arg} repeated"
            current = opts.setdefault(arg, [])
        else:
            assert current is not None, arg
            current.append(arg)
    return opts


def config_from_argv(opts: dict[str, list[str]]) -> dict[str, Any]:
    """The VmConfig Cloud Hypervisor builds from a command line (the parts stoker uses)."""
    onoff = {"on": True, "off": False}
    cpus = ch_options(opts["--cpus"][0])
    memory = ch_options(opts["--memory"][0])
    if memory["size"] == "0":
        (zone_text,) = opts["--memory-zone"]
        zone = ch_options(zone_text)
        assert zone["size"].endswith("M")
        zone_body = {"id": zone["id"], "size": int(zone["size"][:-1]) << 20, "file": zone["file"]}
        memory_body = {"size": 0, "zones": [zone_body | {"shared": onoff[zone["shared"]]}]}
    else:
        assert memory["size"].endswith("M")
        memory_body = {"size": int(memory["size"][:-1]) << 20, "shared": onoff[memory["shared"]]}
    serial = ch_options(opts["--serial"][0])
    config: dict[str, Any] = {
        "payload": {
            "kernel": opts["--kernel"][0],
            "initramfs": opts["--initramfs"][0],
            "cmdline": opts["--cmdline"][0],
        },
        "cpus": {"boot_vcpus": int(cpus["boot"]), "max_vcpus": int(cpus["max"])},
        "memory": memory_body,
        "rng": {"src": ch_options(opts["--rng"][0])["src"]},
        "serial": {"mode": "Socket", "socket": serial["socket"]}
        if "socket" in serial
        else {"mode": "File", "file": serial["file"]},
        "console": {"mode": opts["--console"][0].capitalize()},
    }
    if "--disk" in opts:
        config["disks"] = []
        for value in opts["--disk"]:
            disk = ch_options(value)
            entry: dict[str, Any] = {
                "path": disk["path"],
                "readonly": onoff[disk["readonly"]],
                "id": disk["id"],
            }
            if "serial" in disk:
                entry["serial"] = disk["serial"]
            if "image_type" in disk:
                entry["image_type"] = {"qcow2": "Qcow2"}[disk["image_type"]]
                entry["backing_files"] = onoff[disk["backing_files"]]
            config["disks"].append(entry)
    if "--vsock" in opts:
        vsock = ch_options(opts["--vsock"][0])
        config["vsock"] = {"cid": int(vsock["cid"]), "socket": vsock["socket"]}
    return config


# --------------------------------------------------------------------------- the fake VMM


def _http_response(status: int, reply: Any) -> bytes:
    reason = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found"}.get(status, "X")
    head = f"HTTP/1.1 {status} {reason}\r\nServer: Cloud Hypervisor API\r\n"
    if reply is None:  # like micro_http: no body, no Content-Length
        return (head + "\r\n").encode()
    body = (json.dumps(reply) if not isinstance(reply, str) else reply).encode()
    return (
        head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class FakeCloudHypervisor:
    """The documented Cloud Hypervisor contract, played by a test peer.

    API (state machine of vm.create/boot/pause/resume/snapshot/restore/shutdown),
    serial console (socket: listens from vm.create, buffers until a client attaches;
    file), hybrid vsock (``CONNECT <port>`` -> ``OK <n>``, then echo), event monitor.
    Every request is recorded (and logged as JSON lines when run as a process).
    """

    def __init__(
        self,
        *,
        behaviour: str = "",
        log: Callable[[dict[str, Any]], None] | None = None,
        events: socket.socket | None = None,
    ) -> None:
        self.behaviour = behaviour
        self.state: str | None = None
        self.config: dict[str, Any] | None = None
        self.requests: list[tuple[str, str, Any]] = []
        self.exit = asyncio.Event()
        self._log = log
        self._events = events
        self._servers: list[asyncio.AbstractServer] = []
        self._console_clients: list[asyncio.StreamWriter] = []
        self._console_pending = bytearray()
        self._console_file: BinaryIO | None = None

    # -- HTTP
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode().split("\r\n")
                method, target, version = lines[0].split(" ")
                assert version == "HTTP/1.1" and target.startswith("/api/v1/"), lines[0]
                headers = {}
                for line in filter(None, lines[1:]):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = None
                if "content-length" in headers:
                    assert headers.get("content-type") == "application/json"
                    body = json.loads(await reader.readexactly(int(headers["content-length"])))
                path = target.removeprefix("/api/v1")
                self.requests.append((method, path, body))
                if self._log is not None:
                    self._log({"pid": os.getpid(), "method": method, "path": path, "body": body})
                status, reply = await self.dispatch(method, path, body)
                writer.write(_http_response(status, reply))
                await writer.drain()
                if path == "/vmm.shutdown" and "ignore-shutdown" not in self.behaviour:
                    self.exit.set()
        finally:
            writer.close()

    async def dispatch(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        created = self.config is not None
        match method, path:
            case "GET", "/vmm.ping":
                return 200, {"version": "v53.0", "pid": os.getpid()}
            case "PUT", "/vm.create":
                if created:
                    return 500, "VmAlreadyCreated"
                if not isinstance(body, dict) or "payload" not in body:
                    return 400, "invalid VmConfig"
                await self.create(body)
                return 204, None
            case "PUT", "/vm.boot":
                if not created:
                    return 404, "VmNotCreated"
                if "refuse-boot" in self.behaviour:
                    print("Error booting VM: fake kernel load failure", file=sys.stderr, flush=True)
                    return 500, "Error booting VM: fake kernel load failure"
                await self.boot()
                return 204, None
            case "GET", "/vm.info":
                if not created:
                    return 500, "VmNotCreated"
                return 200, {"config": self.config, "state": self.state}
            case "PUT", "/vm.pause":
                if self.state != "Running":
                    return 405, "VmNotRunning"
                self.state = "Paused"
                return 204, None
            case "PUT", "/vm.resume":
                if self.state != "Paused":
                    return 405, "VmNotPaused"
                self.state = "Running"
                return 204, None
            case "PUT", "/vm.snapshot":
                if self.state != "Paused":
                    return 405, "VmNotPaused"
                dest = Path(body["destination_url"].removeprefix("file://"))
                if not dest.is_dir():
                    return 500, f"snapshot destination {dest} is not a directory"
                (dest / "config.json").write_text(json.dumps(self.config))
                (dest / "state.json").write_text("{}")
                (dest / "memory-ranges").write_bytes(b"\0" * 4096)
                return 204, None
            case "PUT", "/vm.restore":
                if created:
                    return 404, "VmAlreadyCreated"
                await self.restore_from(body["source_url"])
                return 204, None
            case "PUT", "/vm.shutdown":
                if not created:
                    return 404, "VmNotCreated"
                self.state = "Shutdown"
                return 204, None
            case "PUT", "/vmm.shutdown":
                return 204, None
        return 404, f"no such endpoint {path}"

    # -- the VM
    async def create(self, config: dict[str, Any]) -> None:
        self.config = config
        self.state = "Created"
        if "console-at-boot" not in self.behaviour:  # as releases before v40 did
            await self._open_console()

    async def _open_console(self) -> None:
        assert self.config is not None
        serial = self.config.get("serial", {})
        if serial.get("mode") == "Socket":
            self._servers.append(
                await asyncio.start_unix_server(self._console_client, path=serial["socket"])
            )
        elif serial.get("mode") == "File":
            self._console_file = open(serial["file"], "wb", buffering=0)  # noqa: SIM115

    async def boot(self) -> None:
        if "console-at-boot" in self.behaviour:
            await self._open_console()
        await self._start_vsock()
        self.state = "Running"
        self.emit("vm", "booting")
        self.console_write(b"Linux version 6.1.0-fake (stoker test peer)\r\n")
        self.emit("vm", "booted")
        if "reset" in self.behaviour:
            asyncio.get_running_loop().call_later(0.2, self.emit, "vm", "rebooting")

    async def restore_from(self, url: str) -> None:
        source = Path(url.removeprefix("file://"))
        await self.create(json.loads((source / "config.json").read_text()))
        await self._start_vsock()
        self.state = "Paused"
        self.console_write(b"restored from snapshot\r\n")
        self.emit("vm", "restored")

    async def _start_vsock(self) -> None:
        assert self.config is not None
        if "vsock" in self.config:
            server = await asyncio.start_unix_server(
                self._vsock_client, path=self.config["vsock"]["socket"]
            )
            self._servers.append(server)

    async def _vsock_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if await reader.readline() != f"CONNECT {VSOCK_PORT}\n".encode():
                return
            writer.write(b"OK 1073741824\n")
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _console_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._console_clients.append(writer)
        writer.write(bytes(self._console_pending))
        self._console_pending.clear()
        await reader.read()  # until the client goes

    def console_write(self, data: bytes) -> None:
        if self._console_file is not None:
            self._console_file.write(data)
        elif self._console_clients:
            for writer in self._console_clients:
                writer.write(data)
        else:
            self._console_pending += data

    def emit(self, source: str, event: str) -> None:
        record = {
            "timestamp": {"secs": 0, "nanos": 1},
            "source": source,
            "event": event,
            "properties": None,
        }
        if self._events is not None:
            self._events.sendall((json.dumps(record, indent=2) + "\n\n").encode())

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in self._console_clients:
            writer.close()
        if self._console_file is not None:
            self._console_file.close()


def fake_vmm_main(argv: list[str]) -> int:
    """Entry point of the stand-in ``cloud-hypervisor`` executable (see ``fake_binary``)."""
    behaviour = os.environ.get("FAKE_CH_BEHAVIOUR", "")
    print("fake cloud-hypervisor: starting", file=sys.stderr, flush=True)
    if "exit-early" in behaviour:
        print("Error: fake VMM refuses to start", file=sys.stderr, flush=True)
        return 1
    if "ignore-term" in behaviour:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_fake_vmm(parse_ch_argv(argv), behaviour, os.environ.get("FAKE_CH_LOG")))
    return 0


async def _fake_vmm(opts: dict[str, list[str]], behaviour: str, log_path: str | None) -> None:
    api = ch_options(opts["--api-socket"][0])
    api_sock = socket.socket(fileno=int(api["fd"]))
    events = None
    if "--event-monitor" in opts:
        events = socket.socket(fileno=int(ch_options(opts["--event-monitor"][0])["fd"]))

    def log(entry: dict[str, Any]) -> None:
        if log_path:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")

    fake = FakeCloudHypervisor(behaviour=behaviour, log=log, events=events)
    fake.emit("vmm", "starting")
    server = await asyncio.start_unix_server(fake.handle, sock=api_sock)
    if "--kernel" in opts:
        await fake.create(config_from_argv(opts))
        await fake.boot()
    elif "--restore" in opts:
        await fake.restore_from(ch_options(opts["--restore"][0])["source_url"])
    await fake.exit.wait()
    fake.emit("vmm", "shutdown")
    server.close()
    await fake.close()


# --------------------------------------------------------------------------- HTTP client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def uds(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Path]]]:
    servers: list[asyncio.AbstractServer] = []

    async def serve(handler: Handler, path: Path | None = None) -> Path:
        path = path or tmp_path / f"peer-{len(servers)}.sock"
        servers.append(await asyncio.start_unix_server(handler, path=str(path)))
        return path

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_client_drives_the_documented_lifecycle(tmp_path: Path, uds: Any) -> None:
    fake = FakeCloudHypervisor()
    api = ch._ApiClient(await uds(fake.handle))
    cfg = CloudHypervisorConfig.in_workdir(tmp_path)
    snap = tmp_path / "snap"
    snap.mkdir()
    try:
        assert (await api.call(ApiRequest("GET", "/vmm.ping")))["version"] == "v53.0"
        for request in [*boot_requests(_spec(), cfg), *snapshot_requests(snap)]:
            assert await api.call(request) is None
        info = await api.call(ApiRequest("GET", "/vm.info"))
        assert info["state"] == "Running"
        assert info["config"] == vm_config(_spec(), cfg)
        for request in shutdown_requests():
            await api.call(request)
    finally:
        await fake.close()
    assert [(m, p) for m, p, _ in fake.requests] == [
        ("GET", "/vmm.ping"),
        ("PUT", "/vm.create"),
        ("PUT", "/vm.boot"),
        ("PUT", "/vm.pause"),
        ("PUT", "/vm.snapshot"),
        ("PUT", "/vm.resume"),
        ("GET", "/vm.info"),
        ("PUT", "/vm.shutdown"),
        ("PUT", "/vmm.shutdown"),
    ]
    assert fake.requests[1][2] == vm_config(_spec(), cfg)
    assert fake.requests[4][2] == {"destination_url": f"file://{snap}"}
    for method, path, body in fake.requests:
        validate_request(method, path, body)
    assert json.loads((snap / "config.json").read_text()) == vm_config(_spec(), cfg)


async def test_client_surfaces_api_errors_with_their_text(uds: Any) -> None:
    fake = FakeCloudHypervisor()
    api = ch._ApiClient(await uds(fake.handle))
    with pytest.raises(CloudHypervisorApiError, match="HTTP 404: VmNotCreated") as err:
        await api.call(ApiRequest("PUT", "/vm.boot"))
    assert (err.value.status, err.value.path, err.value.text) == (404, "/vm.boot", "VmNotCreated")
    assert isinstance(err.value, InfrastructureError)
    with pytest.raises(CloudHypervisorApiError, match="HTTP 405"):
        await api.call(ApiRequest("PUT", "/vm.resume"))


async def test_client_request_bytes(uds: Any) -> None:
    seen: list[bytes] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.startswith(b"Content-Length")
            ),
            0,
        )
        seen.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await reader.read()  # the client closes after the reply

    api = ch._ApiClient(await uds(peer))
    await api.call(ApiRequest("PUT", "/vm.snapshot", {"destination_url": "file:///s"}))
    await api.call(ApiRequest("PUT", "/vm.boot"))
    body = b'{"destination_url": "file:///s"}'
    assert seen[0] == (
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    assert (
        seen[1]
        == b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    )


def _reply(data: bytes, *, then_wait: bool = True) -> Handler:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()
        if then_wait:
            await reader.read()
        writer.close()

    return peer


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "exceed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "exceeds"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{]", "not JSON"),
    ],
)
async def test_client_refuses_bad_replies(uds: Any, reply: bytes, error: str) -> None:
    api = ch._ApiClient(await uds(_reply(reply)), timeout=5)
    with pytest.raises(InfrastructureError, match=error):
        await api.call(ApiRequest("GET", "/vm.info"))


async def test_client_truncation_silence_and_absence(uds: Any, tmp_path: Path) -> None:
    truncated = _reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", then_wait=False)
    with pytest.raises(InfrastructureError, match="truncated after 2 of 10"):
        await ch._ApiClient(await uds(truncated)).call(ApiRequest("GET", "/vm.info"))
    hangup = _reply(b"HTTP/1.1 2", then_wait=False)
    with pytest.raises(InfrastructureError, match="connection closed before a complete reply"):
        await ch._ApiClient(await uds(hangup)).call(ApiRequest("GET", "/vm.info"))
    silent = _reply(b"")
    with pytest.raises(InfrastructureError, match=r"did not answer within 0\.3s"):
        await ch._ApiClient(await uds(silent), timeout=0.3).call(ApiRequest("GET", "/vm.info"))
    with pytest.raises(InfrastructureError, match="cannot talk to"):
        await ch._ApiClient(tmp_path / "nobody.sock").call(ApiRequest("GET", "/vmm.ping"))
    no_length = _reply(b"HTTP/1.1 200 OK\r\n\r\n")
    assert await ch._ApiClient(await uds(no_length)).call(ApiRequest("GET", "/vm.info")) is None


# --------------------------------------------------------------------------- events

EVENTS = [
    {
        "timestamp": {"secs": 0, "nanos": 1},
        "source": "vmm",
        "event": "starting",
        "properties": None,
    },
    {"timestamp": {"secs": 0, "nanos": 2}, "source": "vm", "event": "booted", "properties": None},
    {
        "timestamp": {"secs": 1, "nanos": 3},
        "source": "virtio-device",
        "event": "activated",
        "properties": {"id": "_disk0"},
    },
    {
        "timestamp": {"secs": 2, "nanos": 4},
        "source": "vm",
        "event": "rebooting",
        "properties": None,
    },
]
EVENT_STREAM = "".join(json.dumps(e, indent=2) + "\n\n" for e in EVENTS).encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(EVENT_STREAM)), max_size=12))
def test_event_stream_splits_anywhere(cuts: list[int]) -> None:
    decoder = EventDecoder()
    got = []
    bounds = [0, *sorted(cuts), len(EVENT_STREAM)]
    for start, end in itertools.pairwise(bounds):
        got += decoder.feed(EVENT_STREAM[start:end])
    assert got == EVENTS
    assert [ch.event_name(e) for e in got][-1] == "vm.rebooting"


def test_event_decoder_skips_garbage_and_stays_bounded() -> None:
    decoder = EventDecoder()
    assert decoder.feed(b"not json\n\n" + EVENT_STREAM[:50]) == []
    assert decoder.feed(EVENT_STREAM[50:]) == EVENTS
    assert decoder.feed(b"{" * 70_000) == []
    assert len(decoder._buffer) == 0
    assert decoder.feed(b"[1, 2]\n\n" + EVENT_STREAM) == EVENTS  # non-objects are ignored


# --------------------------------------------------------------------------- vsock transport


async def test_vsock_transport_retries_until_the_agent_listens(uds: Any) -> None:
    attempts = 0

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        assert await reader.readline() == b"CONNECT 1024\n"
        if attempts < 3:  # nothing listens in the guest yet: the VMM hangs up
            writer.close()
            return
        writer.write(b"OK 1073741824\nhello")
        await writer.drain()
        await reader.read()
        writer.close()

    transport = HybridVsockTransport(await uds(vmm), VSOCK_PORT)
    reader, writer = await transport.connect(timeout=5)
    assert await reader.readexactly(5) == b"hello"
    assert attempts == 3
    writer.close()


async def test_vsock_transport_waits_for_the_socket(uds: Any, tmp_path: Path) -> None:
    path = tmp_path / "late.vsock"

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"OK 5\n")
        await reader.read()
        writer.close()

    loop = asyncio.get_running_loop()
    later = loop.create_task(asyncio.sleep(0.3))
    later.add_done_callback(lambda _: loop.create_task(uds(vmm, path)))
    _, writer = await HybridVsockTransport(path, VSOCK_PORT).connect(timeout=5)
    writer.close()


async def test_vsock_transport_never_retries_a_bad_reply(uds: Any) -> None:
    attempts = 0

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.readline()
        writer.write(b"NOPE\n")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    with pytest.raises(GuestProtocolError, match="unexpected reply"):
        await HybridVsockTransport(await uds(vmm), VSOCK_PORT).connect(timeout=5)
    assert attempts == 1


async def test_vsock_transport_gives_up_at_its_deadline(tmp_path: Path) -> None:
    with pytest.raises(InfrastructureError, match=r"did not accept vsock port 1024 .* 0\.3s"):
        await HybridVsockTransport(tmp_path / "absent", VSOCK_PORT).connect(timeout=0.3)


# --------------------------------------------------------------------------- launch (fake VMM)


@pytest.fixture
def fake_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``cloud-hypervisor`` stand-in: this module's :class:`FakeCloudHypervisor` as a process."""
    script = tmp_path / "bin" / "cloud-hypervisor"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from test_cloud_hypervisor import fake_vmm_main\n"
        "sys.exit(fake_vmm_main(sys.argv[1:]))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_CH_LOG", str(tmp_path / "requests.jsonl"))
    monkeypatch.delenv("FAKE_CH_BEHAVIOUR", raising=False)
    return script


def logged(tmp_path: Path, name: str = "requests.jsonl") -> list[dict[str, Any]]:
    path = tmp_path / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def _workdir(tmp_path: Path, name: str = "vm") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


async def _echo(vm: CloudHypervisorVM) -> None:
    reader, writer = await vm.transport.connect(timeout=5)
    writer.write(b"ping")
    await writer.drain()
    assert await reader.readexactly(4) == b"ping"
    writer.close()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("console", ["socket", "file"])
async def test_launch_rest_mode(fake_binary: Path, tmp_path: Path, console: ch.ConsoleMode) -> None:
    workdir = _workdir(tmp_path)
    backend = CloudHypervisorBackend(str(fake_binary), console=console)
    async with AsyncExitStack() as stack:
        vm = await backend.launch(_spec(), workdir, stack)
        pid = vm.pid
        assert pid is not None and vm.returncode is None
        assert vm.argv[1:3] == ["--api-socket", f"fd={vm.config.api_fd}"]  # type: ignore[union-attr]
        await eventually(lambda: "Linux version 6.1.0-fake" in vm.console.text())
        await eventually(lambda: "fake cloud-hypervisor: starting" in vm.vmm_log.text())
        await eventually(lambda: "vm.booted" in vm.events)
        await _echo(vm)
        assert (await vm.info())["state"] == "Running"
        assert "VM state: Running" in await vm.diagnostics()
        await vm.kill()
        await vm.kill()  # idempotent
        assert vm.returncode == 0 and vm.pid is None and _process_gone(pid)
        assert not [p for p in workdir.iterdir() if p.name.startswith("ch.")]
    requests = [(r["method"], r["path"]) for r in logged(tmp_path)]
    assert requests == [
        ("GET", "/vmm.ping"),
        ("PUT", "/vm.create"),
        ("PUT", "/vm.boot"),
        ("GET", "/vm.info"),
        ("GET", "/vm.info"),
        ("PUT", "/vm.shutdown"),
        ("PUT", "/vmm.shutdown"),
    ]
    for entry in logged(tmp_path):
        validate_request(entry["method"], entry["path"], entry["body"])
    assert logged(tmp_path)[1]["body"] == vm_config(_spec(), vm.config)  # type: ignore[arg-type]


@pytest.mark.parametrize("console", ["socket", "file"])
async def test_launch_cli_mode(fake_binary: Path, tmp_path: Path, console: ch.ConsoleMode) -> None:
    workdir = _workdir(tmp_path)
    backend = CloudHypervisorBackend(str(fake_binary), mode="cli", console=console)
    async with AsyncExitStack() as stack:
        vm = await backend.launch(_spec(), workdir, stack)
        assert vm.config is not None
        assert vm.argv == cloud_hypervisor_argv(_spec(), vm.config)
        # Output from before the console was attached is not lost.
        await eventually(lambda: "Linux version 6.1.0-fake" in vm.console.text())
        await _echo(vm)
    assert vm.returncode == 0
    requests = [(r["method"], r["path"]) for r in logged(tmp_path)]
    assert requests[0] == ("GET", "/vmm.ping")
    assert ("PUT", "/vm.create") not in requests  # the command line created it
    assert requests[-2:] == [("PUT", "/vm.shutdown"), ("PUT", "/vmm.shutdown")]


async def test_console_bound_only_at_boot_is_attached_after_boot(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_BEHAVIOUR", "console-at-boot")
    async with AsyncExitStack() as stack:
        vm = await CloudHypervisorBackend(str(fake_binary)).launch(
            _spec(), _workdir(tmp_path), stack
        )
        await eventually(lambda: "Linux version 6.1.0-fake" in vm.console.text())


async def test_launch_failure_carries_command_and_stderr(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_BEHAVIOUR", "exit-early")
    workdir = _workdir(tmp_path)
    with pytest.raises(LaunchError) as err:
        async with AsyncExitStack() as stack:
            await CloudHypervisorBackend(str(fake_binary)).launch(_spec(), workdir, stack)
    message = str(err.value)
    assert "exited during start-up" in message
    assert "exit status: 1" in message
    assert "fake VMM refuses to start" in message
    assert err.value.argv[:2] == [str(fake_binary), "--api-socket"]
    assert list(workdir.iterdir()) == []


async def test_refused_boot_reports_the_api_error(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_BEHAVIOUR", "refuse-boot")
    workdir = _workdir(tmp_path)
    with pytest.raises(LaunchError, match=r"during vm\.boot: .*HTTP 500: Error booting VM") as err:
        async with AsyncExitStack() as stack:
            await CloudHypervisorBackend(str(fake_binary)).launch(_spec(), workdir, stack)
    assert "fake kernel load failure" in err.value.output
    assert list(workdir.iterdir()) == []


async def test_missing_binary_and_tcg(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        with pytest.raises(LaunchError, match="not installed") as err:
            await CloudHypervisorBackend(str(tmp_path / "nope")).launch(
                _spec(), _workdir(tmp_path), stack
            )
        assert err.value.hint and "v39" in err.value.hint
        with pytest.raises(AccelError, match="KVM"):
            await CloudHypervisorBackend().launch(_spec(accel="tcg"), tmp_path, stack)


async def test_guest_reset_stops_the_vmm(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_BEHAVIOUR", "reset")
    async with AsyncExitStack() as stack:
        vm = await CloudHypervisorBackend(str(fake_binary)).launch(
            _spec(), _workdir(tmp_path), stack
        )
        async with asyncio.timeout(5):
            status = await vm.wait()
        assert status == -signal.SIGKILL
        assert vm.guest_reset == "vm.rebooting"
        assert "guest requested a reset (vm.rebooting)" in await vm.diagnostics()
        assert "instead of letting it reboot the guest" in vm.vmm_log.text()


async def test_kill_escalates_to_sigkill(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CH_BEHAVIOUR", "ignore-shutdown,ignore-term")
    monkeypatch.setattr(ch, "QUIT_GRACE", 0.3)
    async with AsyncExitStack() as stack:
        vm = await CloudHypervisorBackend(str(fake_binary)).launch(
            _spec(), _workdir(tmp_path), stack
        )
        await vm.kill()
        assert vm.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode", ["rest", "cli"])
async def test_snapshot_and_restore(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: ch.LaunchMode
) -> None:
    backend = CloudHypervisorBackend(str(fake_binary), mode=mode)
    snap = tmp_path / "snap"
    async with AsyncExitStack() as stack:
        vm = await backend.launch(_spec(), _workdir(tmp_path, "vm1"), stack)
        assert await vm.snapshot(snap) == snap
        assert (await vm.info())["state"] == "Running"
        await vm.kill()
    saved = json.loads((snap / "config.json").read_text())
    assert saved["vsock"]["socket"] == str(tmp_path / "vm1" / "ch.vsock")

    monkeypatch.setenv("FAKE_CH_LOG", str(tmp_path / "restore.jsonl"))
    workdir = _workdir(tmp_path, "vm2")
    async with AsyncExitStack() as stack:
        restored = await backend.restore(snap, workdir, stack)
        await eventually(lambda: "restored from snapshot" in restored.console.text())
        await _echo(restored)  # the vsock socket moved to the new work directory
        assert (await restored.info())["state"] == "Running"
    assert json.loads((snap / "config.json").read_text()) == saved  # untouched

    first = [(r["method"], r["path"], r["body"]) for r in logged(tmp_path)]
    snapshot_calls = [c for c in first if c[1] in ("/vm.pause", "/vm.snapshot", "/vm.resume")]
    assert [list(c) for c in snapshot_calls] == [r.as_json() for r in snapshot_requests(snap)]
    second = [(r["method"], r["path"], r["body"]) for r in logged(tmp_path, "restore.jsonl")]
    if mode == "rest":
        assert second[:3] == [
            ("GET", "/vmm.ping", None),
            ("PUT", "/vm.restore", {"source_url": f"file://{workdir / 'ch-snapshot'}"}),
            ("PUT", "/vm.resume", None),
        ]
    else:
        assert ("PUT", "/vm.resume", None) in second and all(c[1] != "/vm.restore" for c in second)
    for method, path, body in first + second:
        validate_request(method, path, body)


async def test_template_save_state_and_clone_load_state(
    fake_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LaunchedVM snapshot interface stoker.VM uses: save_state, then incoming + load_state."""
    backend = CloudHypervisorBackend(str(fake_binary))
    template_dir = tmp_path / "template"
    template_dir.mkdir()
    template = _spec(
        scratch=template_dir / "scratch.img",
        memory_file=template_dir / "memory",
        memory_shared=True,
        memory_mb=64,
    )
    async with AsyncExitStack() as stack:
        vm = await backend.launch(template, _workdir(tmp_path, "t"), stack)
        # Cloud Hypervisor opens the memory file; it does not create it.
        assert (template_dir / "memory").stat().st_size == 64 << 20
        await vm.save_state(template_dir, timeout=30)
        assert (await vm.info())["state"] == "Paused"
    assert {"config.json", "state.json", "memory-ranges", "memory"} <= {
        p.name for p in template_dir.iterdir()
    }

    monkeypatch.setenv("FAKE_CH_LOG", str(tmp_path / "clone.jsonl"))
    workdir = _workdir(tmp_path, "clone")
    clone = replace(
        template,
        scratch=workdir / "scratch.qcow2",
        scratch_format="qcow2",
        memory_shared=False,
        incoming=True,
    )
    async with AsyncExitStack() as stack:
        vm = await backend.launch(clone, workdir, stack)
        assert [r["path"] for r in logged(tmp_path, "clone.jsonl")] == ["/vmm.ping"]
        await vm.load_state(template_dir, timeout=30)
        await _echo(vm)
        info = await vm.info()
        assert info["state"] == "Running"
        assert info["config"]["disks"][1]["path"] == str(workdir / "scratch.qcow2")
        assert info["config"]["memory"]["zones"][0]["shared"] is False
        assert info["config"]["serial"]["socket"] == str(workdir / "ch.console")
    calls = [(r["method"], r["path"], r["body"]) for r in logged(tmp_path, "clone.jsonl")]
    assert calls[:3] == [
        ("GET", "/vmm.ping", None),
        ("PUT", "/vm.restore", {"source_url": f"file://{workdir / 'ch-snapshot'}"}),
        ("PUT", "/vm.resume", None),
    ]
    for method, path, body in calls + [
        (r["method"], r["path"], r["body"]) for r in logged(tmp_path)
    ]:
        validate_request(method, path, body)
    booted = CloudHypervisorVM(transport=vm.transport, spec=_spec())
    with pytest.raises(InfrastructureError, match=r"launched with spec\.incoming"):
        await booted.load_state(template_dir, timeout=1)


async def test_snapshot_needs_a_running_vm(fake_binary: Path, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        vm = await CloudHypervisorBackend(str(fake_binary)).launch(
            _spec(), _workdir(tmp_path), stack
        )
        await vm.kill()
        with pytest.raises(InfrastructureError, match="not running"):
            await vm.snapshot(tmp_path / "snap")


# --------------------------------------------------------------------------- doctor


def _version_script(tmp_path: Path, text: str) -> str:
    script = tmp_path / "ch-version"
    script.write_text(f"#!/bin/sh\necho '{text}'\n")
    script.chmod(0o755)
    return str(script)


def test_status_explains_itself(tmp_path: Path) -> None:
    kvm_ok = lambda: (True, "/dev/kvm is present (KVM API 12)")  # noqa: E731
    kvm_bad = lambda: (False, "/dev/kvm does not exist")  # noqa: E731
    ok, why = cloud_hypervisor_status(str(tmp_path / "absent"), kvm_check=kvm_ok)
    assert not ok and "not found on PATH" in why
    ok, why = cloud_hypervisor_status(
        _version_script(tmp_path, "cloud-hypervisor v38.0"), kvm_check=kvm_ok
    )
    assert not ok and "v38.0" in why and "v39.0 or newer" in why
    script = _version_script(tmp_path, "cloud-hypervisor v53.0")
    ok, why = cloud_hypervisor_status(script, kvm_check=kvm_bad)
    assert not ok and why == "/dev/kvm does not exist; Cloud Hypervisor runs on KVM only"
    ok, why = cloud_hypervisor_status(script, kvm_check=kvm_ok)
    assert ok and "v53.0" in why
    described = CloudHypervisorBackend(script).describe()
    assert described["version"] == "53.0" and described["mode"] == "rest"
    assert CloudHypervisorBackend(str(tmp_path / "absent")).usable()[0] is False


# --------------------------------------------------------------------------- real boot

CH_USABLE, CH_WHY = cloud_hypervisor_status()


@pytest.mark.vm
@pytest.mark.skipif(not CH_USABLE, reason=f"Cloud Hypervisor backend not usable: {CH_WHY}")
async def test_real_boot_agent_and_snapshot(boot_artifacts: Any, tmp_path: Path) -> None:
    """Boot the default artifacts under Cloud Hypervisor, reach the agent, snapshot, restore."""
    from stoker.protocol.client import AgentClient

    art = boot_artifacts
    spec = MachineSpec(
        name="stoker-ch-test",
        kernel=art.kernel.vmlinuz,
        initrd=art.initrd,
        rootfs=art.image.rootfs,
        rootfs_type=art.image.fstype,
        python=art.image.python,
        accel="kvm",
        cpus=1,
        memory_mb=512,
    )
    backend = CloudHypervisorBackend()
    snap = tmp_path / "snap"
    async with AsyncExitStack() as stack:
        vm = await backend.launch(spec, _workdir(tmp_path, "vm1"), stack)
        try:
            reader, writer = await vm.transport.connect(timeout=60)
            client = AgentClient(reader, writer)
            stack.push_async_callback(client.aclose)
            ready = await client.wait_ready(60)
        except Exception:
            print(f"console:\n{vm.console.tail(60)}\nVMM:\n{vm.vmm_log.text()}")
            raise
        assert ready.protocol == 1
        assert "Linux version" in vm.console.text()
        await vm.snapshot(snap)
    async with AsyncExitStack() as stack:
        restored = await backend.restore(snap, _workdir(tmp_path, "vm2"), stack)
        assert (await restored.info())["state"] == "Running"
