"""The Firecracker backend, without Firecracker where possible.

* Pure plans (command lines, API calls, ``--config-file``, snapshot bodies) are
  golden-tested and every body is validated against Firecracker's own OpenAPI
  document (``../shared/reference/firecracker/firecracker.yaml``), strictly: like
  Firecracker, the validator refuses fields the spec does not define.
* The HTTP client and the vsock transport talk to local Unix-socket peers that
  implement the documented contracts.
* ``launch``/``kill``/``snapshot``/``restore`` run against a stand-in VMM process:
  this file run as a program (see ``_fake_firecracker_main``) serves the API on
  ``--api-sock`` with the same spec validation, writes to the log FIFO and the
  console, and plays the guest on the vsock socket once started.
* Real boots run when ``firecracker`` and a usable ``/dev/kvm`` are present, and
  are skipped with the reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from stoker.backends import firecracker as fc
from stoker.backends.base import LaunchedVM, MachineSpec
from stoker.backends.firecracker import (
    ApiCall,
    FirecrackerAPIError,
    FirecrackerBackend,
    FirecrackerClient,
    FirecrackerConfig,
    FirecrackerSnapshot,
    FirecrackerVM,
    JailerConfig,
    Placement,
    TapInterface,
    VmmLayout,
)
from stoker.errors import (
    AccelError,
    GuestProtocolError,
    InfrastructureError,
    LaunchError,
    UsageError,
)
from stoker.protocol import wire
from stoker.protocol.client import AgentClient
from stoker.protocol.transport import HybridVsockTransport

GOLDEN = Path(__file__).parent / "golden"
# A vendored copy of ../shared/reference (see tests/reference/README.md).
REFERENCE = Path(__file__).resolve().parent / "reference/firecracker/firecracker.yaml"
READY = {"type": "ready", "protocol": 1, "agent": "t", "python": "3", "kernel": "k", "pid1": True}
EXEC_FILE = "/usr/bin/firecracker"
WORKDIR = Path("/run/stoker/stoker-test-abcd")
VMLINUX = Path("/cache/kernels/k/boot/vmlinux-6.1.0-56-cloud-amd64")

needs_spec = pytest.mark.skipif(
    not REFERENCE.is_file(), reason=f"Firecracker's OpenAPI spec is not at {REFERENCE}"
)


# ---------------------------------------------------------------------------- the spec


@functools.cache
def _openapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(REFERENCE.read_text())
    # Response codes are unquoted numbers in the file (see the reference README).
    for item in doc["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"] = {str(k): v for k, v in op["responses"].items()}
    return doc


def _strict(node: Any) -> Any:
    """Close every object schema: Firecracker rejects unknown fields (serde
    ``deny_unknown_fields``), while Swagger 2.0 allows them by default."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def _definitions() -> dict[str, Any]:
    return _strict(copy.deepcopy(_openapi()["definitions"]))  # type: ignore[no-any-return]


def validate_schema(schema: dict[str, Any], instance: Any) -> None:
    """Validate against a Swagger 2.0 schema (a JSON Schema draft 4 subset), refs resolved."""
    full = {**_strict(schema), "definitions": _definitions()}
    jsonschema.Draft4Validator(full).validate(instance)


def validate_definition(name: str, instance: Any) -> None:
    validate_schema({"$ref": f"#/definitions/{name}"}, instance)


def _operation(method: str, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The spec's operation for a concrete request path, and the path parameters."""
    for template, item in _openapi()["paths"].items():
        pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
        match = re.fullmatch(pattern, path)
        if match and method.lower() in item:
            return item[method.lower()], match.groupdict()
    raise LookupError(f"{method} {path} is not an operation of Firecracker's API")


def validate_call(method: str, path: str, body: Any) -> None:
    """The operation exists and ``body`` matches its ``in: body`` parameter."""
    op, params = _operation(method, path)
    body_params = [p for p in op.get("parameters", []) if p["in"] == "body"]
    if body is None:
        assert not any(p.get("required") for p in body_params), f"{method} {path} needs a body"
        return
    assert body_params, f"{method} {path} takes no body"
    validate_schema(body_params[0]["schema"], body)
    # Firecracker insists that the id in the path and in the body agree.
    for name, value in params.items():
        assert body.get(name) == value, f"{name} {body.get(name)!r} != path's {value!r}"


# ---------------------------------------------------------------------------- fixtures


def _spec(**kw: Any) -> MachineSpec:
    base: dict[str, Any] = dict(
        name="stoker-test",
        kernel=Path("/cache/kernels/k/boot/vmlinuz-6.1.0-56-cloud-amd64"),
        initrd=Path("/cache/initrd.cpio.gz"),
        rootfs=Path("/cache/images/abc/rootfs.erofs"),
        accel="kvm",
        cpus=2,
        memory_mb=1024,
        scratch=WORKDIR / "scratch.img",
    )
    base.update(kw)
    return MachineSpec(**base)


JAILER = JailerConfig(uid=123, gid=100)

PLANS: dict[str, tuple[MachineSpec, FirecrackerConfig]] = {
    "api-default": (_spec(), FirecrackerConfig()),
    "api-seed-tap": (
        _spec(seed=WORKDIR / "seed.tar", cpus=4),
        FirecrackerConfig(network=TapInterface("tap0", guest_mac="06:00:ac:10:00:02")),
    ),
    "api-probe": (_spec(cpus=1, memory_mb=256, probe=True, scratch=None), FirecrackerConfig()),
    "config-file": (_spec(), FirecrackerConfig(use_config_file=True)),
    "jailed": (_spec(seed=WORKDIR / "seed.tar"), FirecrackerConfig(jailer=JAILER)),
    "jailed-cgroup-v1-config-file": (
        _spec(),
        FirecrackerConfig(
            use_config_file=True,
            jailer=JailerConfig(
                uid=123,
                gid=100,
                chroot_base=Path("/var/lib/stoker/jails"),
                cgroup_version=1,
                parent_cgroup="stoker",
                extra_cgroups=("cpuset.cpus=0-3",),
                resource_limits=("no-file=1024",),
            ),
        ),
    ),
}


def _plan(case: str) -> fc.FirecrackerPlan:
    spec, config = PLANS[case]
    return fc.plan_launch(spec, config, workdir=WORKDIR, vmlinux=VMLINUX, exec_file=EXEC_FILE)


def _golden(name: str, data: Any) -> None:
    path = GOLDEN / f"firecracker-{name}.json"
    if os.environ.get("STOKER_UPDATE_GOLDEN"):
        path.write_text(json.dumps(data, indent=1) + "\n")
    assert data == json.loads(path.read_text()), (
        f"regenerate with STOKER_UPDATE_GOLDEN=1 if intended ({path})"
    )


# ---------------------------------------------------------------------------- plans


@pytest.mark.parametrize("case", sorted(PLANS))
def test_golden_plan(case: str) -> None:
    _golden(f"plan-{case}", _plan(case).as_json())


@needs_spec
@pytest.mark.parametrize("case", sorted(PLANS))
def test_plan_validates_against_the_openapi_spec(case: str) -> None:
    plan = _plan(case)
    for call in plan.calls:
        validate_call(call.method, call.path, call.body)
    if plan.config is not None:
        validate_definition("FullVmConfiguration", plan.config)
    else:
        assert plan.calls[-1] == ApiCall("PUT", "/actions", {"action_type": "InstanceStart"})


@needs_spec
def test_the_validator_is_strict() -> None:
    good = fc.drives(_spec(), VmmLayout(WORKDIR))[0]
    validate_call("PUT", "/drives/rootfs", good)
    with pytest.raises(jsonschema.ValidationError):
        validate_call("PUT", "/drives/rootfs", {**good, "is_readonly": True})  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_call("PUT", "/drives/rootfs", {**good, "is_read_only": "yes"})
    with pytest.raises(jsonschema.ValidationError):
        validate_call("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128})
    with pytest.raises(AssertionError, match="drive_id"):
        validate_call("PUT", "/drives/scratch", good)
    with pytest.raises(LookupError):
        validate_call("PUT", "/disks/rootfs", good)
    with pytest.raises(LookupError):
        validate_call("DELETE", "/drives/rootfs", None)


def test_config_file_has_the_same_content_as_the_api_calls() -> None:
    for spec, config in PLANS.values():
        layout = VmmLayout(WORKDIR)
        calls = fc.api_calls(spec, layout, network=config.network)
        doc = fc.config_file(spec, layout, network=config.network)
        by_path = {c.path: c.body for c in calls}
        assert doc["machine-config"] == by_path["/machine-config"]
        assert doc["boot-source"] == by_path["/boot-source"]
        assert doc["drives"] == [b for p, b in by_path.items() if p.startswith("/drives/")]
        assert doc.get("vsock") == by_path.get("/vsock")
        assert doc["entropy"] == by_path["/entropy"]
        nets = [b for p, b in by_path.items() if p.startswith("/network-interfaces/")]
        assert doc["network-interfaces"] == nets


def test_boot_args_extend_the_initramfs_contract() -> None:
    spec = _spec()
    words = fc.boot_args(spec).split()
    assert words[: len(spec.kernel_cmdline().split())] == spec.kernel_cmdline().split()
    assert "stoker.transport=vsock" in words and "pci=off" in words
    assert "stoker.root=/dev/vda" in words and "stoker.scratch=/dev/vdb" in words
    # The kernel honours the last reboot=: Firecracker's i8042 reset, not QEMU's triple fault.
    assert [w for w in words if w.startswith("reboot=")][-1] == "reboot=k"


def test_drives_read_only_root_writable_scratch_and_no_root_device() -> None:
    spec = _spec(seed=WORKDIR / "seed.tar")
    disks = fc.drives(spec, VmmLayout(WORKDIR))
    assert [(d["drive_id"], d["is_read_only"]) for d in disks] == [
        ("rootfs", True),
        ("scratch", False),
        ("seed", True),
    ]
    assert not any(d["is_root_device"] for d in disks)
    assert fc.guest_block_devices(spec) == {
        "rootfs": "/dev/vda",
        "scratch": "/dev/vdb",
        "seed": "/dev/vdc",
    }
    assert fc.guest_block_devices(_spec(scratch=None, seed=WORKDIR / "s.tar"))["seed"] == "/dev/vdb"
    assert fc.drives(_spec(probe=True), VmmLayout(WORKDIR)) == []


def test_machine_config() -> None:
    assert fc.machine_config(_spec(cpus=3, memory_mb=768)) == {
        "vcpu_count": 3,
        "mem_size_mib": 768,
        "smt": False,
    }
    with pytest.raises(UsageError, match="1 to 32"):
        fc.machine_config(_spec(cpus=33))


def test_path_mapping_unjailed_and_jailed() -> None:
    plain = VmmLayout(WORKDIR)
    assert plain.vmm_path("rootfs") == "rootfs"  # relative to the VMM's cwd, the workdir
    assert plain.host_path("api.sock") == WORKDIR / "api.sock"
    root = fc.jail_dir(JAILER, EXEC_FILE, "stoker-test") / "root"
    assert root == Path("/srv/jailer/firecracker/stoker-test/root")
    jailed = VmmLayout(root, jailed=True)
    assert jailed.vmm_path("rootfs") == "/rootfs"
    assert jailed.host_path("vsock.sock") == root / "vsock.sock"
    plan = _plan("jailed")
    assert plan.layout == jailed
    assert plan.cgroup == Path("/sys/fs/cgroup/firecracker/stoker-test")
    # No host path reaches the VMM: bodies name files only.
    for call in plan.calls:
        assert "/cache" not in json.dumps(call.body) and str(WORKDIR) not in json.dumps(call.body)
    assert {p.name: p.source for p in plan.files}["rootfs"] == Path(
        "/cache/images/abc/rootfs.erofs"
    )


def test_instance_id() -> None:
    assert fc.instance_id("stoker-1a2b") == "stoker-1a2b"
    assert fc.instance_id("a b/c_d") == "a-b-c-d"
    assert len(fc.instance_id("x" * 100)) == 64
    assert fc.instance_id("___") == "stoker"


def test_cgroup_limits() -> None:
    assert fc.cgroup_limits(JAILER, cpus=2, memory_mb=1024) == [
        "cpu.max=200000 100000",
        f"memory.max={(1024 + 256) << 20}",
    ]
    v1 = JailerConfig(uid=1, gid=1, cgroup_version=1, memory_overhead_mb=None)
    assert fc.cgroup_limits(v1, cpus=1, memory_mb=512) == [
        "cpu.cfs_period_us=100000",
        "cpu.cfs_quota_us=100000",
    ]


def _snapshot_fixture() -> FirecrackerSnapshot:
    return FirecrackerSnapshot(
        Path("/var/lib/snaps/one"),
        (
            Placement("rootfs", Path("/cache/images/abc/rootfs.erofs")),
            Placement("scratch.img", Path("/var/lib/snaps/one/scratch.img"), writable=True),
            Placement("seed.tar", Path("/var/lib/snaps/one/seed.tar")),
        ),
        cpus=2,
        memory_mb=1024,
    )


def test_golden_snapshot_bodies() -> None:
    layout = VmmLayout(WORKDIR)
    snap = _snapshot_fixture()
    data = {
        "pause": fc.vm_state("Paused"),
        "create": fc.snapshot_create_body(
            layout.vmm_path(fc.SNAPSHOT_STATE), layout.vmm_path(fc.SNAPSHOT_MEMORY)
        ),
        "resume": fc.vm_state("Resumed"),
        "load-with-vsock-override": fc.snapshot_load_body(
            "snapshot.vmstate", "snapshot.mem", vsock_uds="vsock.sock"
        ),
        "restore": fc.plan_restore(
            snap, FirecrackerConfig(), workdir=WORKDIR, exec_file=EXEC_FILE, name="stoker-r1"
        ).as_json(),
        "restore-jailed": fc.plan_restore(
            snap,
            FirecrackerConfig(jailer=JAILER),
            workdir=WORKDIR,
            exec_file=EXEC_FILE,
            name="stoker-r1",
        ).as_json(),
        "tap": fc.network_interface(TapInterface("tap7")),
    }
    _golden("snapshot", data)


@needs_spec
def test_snapshot_bodies_validate_against_the_spec() -> None:
    validate_call("PATCH", "/vm", fc.vm_state("Paused"))
    validate_call("PATCH", "/vm", fc.vm_state("Resumed"))
    validate_call("PUT", "/snapshot/create", fc.snapshot_create_body("s", "m"))
    validate_call("PUT", "/snapshot/load", fc.snapshot_load_body("s", "m"))
    validate_call("PUT", "/snapshot/load", fc.snapshot_load_body("s", "m", vsock_uds="v.sock"))
    validate_call("PUT", "/network-interfaces/eth0", fc.network_interface(TapInterface("tap0")))
    for call in fc.plan_restore(
        _snapshot_fixture(), FirecrackerConfig(), workdir=WORKDIR, exec_file=EXEC_FILE, name="r"
    ).calls:
        validate_call(call.method, call.path, call.body)


def test_snapshot_manifest_round_trip(tmp_path: Path) -> None:
    snap = _snapshot_fixture()
    moved = FirecrackerSnapshot(tmp_path, snap.files, snap.cpus, snap.memory_mb)
    (tmp_path / fc.SNAPSHOT_MANIFEST).write_text(json.dumps(moved.to_json()))
    assert FirecrackerSnapshot.load(tmp_path) == moved
    (tmp_path / fc.SNAPSHOT_MANIFEST).write_text("{}")
    with pytest.raises(UsageError, match="not a stoker Firecracker snapshot"):
        FirecrackerSnapshot.load(tmp_path)


# ---------------------------------------------------------------------------- files


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    with src.open("wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"data in the middle")
    dest = tmp_path / "copy.img"
    fc.sparse_copy(src, dest)
    assert dest.stat().st_size == 64 << 20
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_blocks * 512 < 8 << 20  # not written out in full
    with pytest.raises(FileExistsError):
        fc.sparse_copy(src, dest)


def test_place_files_unjailed_symlinks_jailed_hard_links(tmp_path: Path) -> None:
    cache, work, jail = tmp_path / "cache", tmp_path / "work", tmp_path / "jail"
    for d in (cache, work, jail):
        d.mkdir()
    (cache / "rootfs.erofs").write_bytes(b"root")
    (work / "scratch.img").write_bytes(b"scratch")
    files = [
        Placement("rootfs", cache / "rootfs.erofs"),
        Placement("scratch.img", work / "scratch.img", writable=True, owned=True),
    ]
    fc.place_files(VmmLayout(work), files)
    assert (work / "rootfs").is_symlink() and (work / "rootfs").read_bytes() == b"root"
    assert not (work / "scratch.img").is_symlink()  # already in place
    owner = (os.getuid(), os.getgid())
    fc.place_files(VmmLayout(jail, jailed=True), files, owner)
    for name, source in (("rootfs", cache / "rootfs.erofs"), ("scratch.img", work / "scratch.img")):
        assert not (jail / name).is_symlink()
        assert (jail / name).stat().st_ino == source.stat().st_ino  # a hard link
    restored = tmp_path / "restored"
    restored.mkdir()
    fc.place_files(VmmLayout(restored), [Placement("scratch.img", work / "scratch.img", copy=True)])
    assert (restored / "scratch.img").stat().st_ino != (work / "scratch.img").stat().st_ino


async def test_jail_is_prepared_and_removed(tmp_path: Path) -> None:
    jailer = JailerConfig(uid=os.getuid(), gid=os.getgid(), chroot_base=tmp_path / "jails")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("vmlinux", "initrd", "rootfs.erofs", "scratch.img"):
        (inputs / name).write_bytes(name.encode())
    spec = _spec(
        initrd=inputs / "initrd", rootfs=inputs / "rootfs.erofs", scratch=inputs / "scratch.img"
    )
    config = FirecrackerConfig(jailer=jailer, use_config_file=True)
    plan = fc.plan_launch(
        spec, config, workdir=tmp_path, vmlinux=inputs / "vmlinux", exec_file=EXEC_FILE
    )
    root = tmp_path / "jails/firecracker/stoker-test/root"
    assert plan.layout.root == root
    async with AsyncExitStack() as stack:
        await FirecrackerBackend(config)._prepare(plan, stack)
        assert sorted(p.name for p in root.iterdir()) == sorted(
            ["vmlinux", "initrd", "rootfs", "scratch.img", "firecracker.log", "vm-config.json"]
        )
        assert (root / "rootfs").stat().st_ino == (inputs / "rootfs.erofs").stat().st_ino
        assert json.loads((root / "vm-config.json").read_text()) == plan.config
        assert plan.config is not None
        assert plan.config["drives"][0]["path_on_host"] == "/rootfs"
        with pytest.raises(FileExistsError):  # a jail is never reused
            await FirecrackerBackend(config)._prepare(plan, AsyncExitStack())
    assert not (tmp_path / "jails/firecracker/stoker-test").exists()
    assert (inputs / "rootfs.erofs").read_bytes() == b"rootfs.erofs"  # the original stays


# ---------------------------------------------------------------------------- the API peer


class FakeFirecrackerAPI:
    """Firecracker's side of the API socket, as documented.

    HTTP/1.1 with keep-alive; every request is checked against the OpenAPI spec
    and answered ``400 {"fault_message": ...}`` when it does not fit (as
    Firecracker's parser would); ``GET /`` answers an ``InstanceInfo``; other
    valid requests ``204``.  ``fail`` ("PUT /drives/rootfs") injects a fault;
    ``hooks`` run on a request and may return a fault message.
    """

    def __init__(self, *, fail: str | None = None, record: Path | None = None) -> None:
        self.requests: list[list[Any]] = []
        self.fail = fail
        self.record = record
        self.state = "Not started"
        self.hooks: dict[tuple[str, str], Callable[[Any], Awaitable[str | None]]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")[:-2]
                method, path, version = request_line.split(" ")
                assert version == "HTTP/1.1"
                headers = {
                    k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)
                }
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else None
                status, reply = await self.respond(method, path, body)
                payload = b"" if reply is None else json.dumps(reply).encode()
                reason = {200: "OK", 204: "No Content", 400: "Bad Request"}[status]
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\n"
                    f"Connection: keep-alive\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def respond(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method != "GET":
            self.requests.append([method, path, body])
            if self.record is not None:
                with self.record.open("a") as fh:
                    fh.write(json.dumps([method, path, body]) + "\n")
        try:
            validate_call(method, path, body)
        except (LookupError, AssertionError, jsonschema.ValidationError) as exc:
            return 400, {"fault_message": f"invalid request: {str(exc).splitlines()[0]}"}
        if self.fail == f"{method} {path}":
            return 400, {"fault_message": f"injected fault for {method} {path}"}
        if (method, path) == ("GET", "/"):
            info = {"app_name": "Firecracker", "id": "t", "state": self.state}
            return 200, {**info, "vmm_version": "1.16.1"}
        hook = self.hooks.get((method, path))
        fault = await hook(body) if hook is not None else None
        if fault is not None:
            return 400, {"fault_message": fault}
        return 204, None


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def uds(tmp_path: Path) -> AsyncIterator[Callable[[Handler], Awaitable[Path]]]:
    servers: list[asyncio.AbstractServer] = []

    async def serve(handler: Handler) -> Path:
        path = tmp_path / f"peer-{len(servers)}.sock"
        servers.append(await asyncio.start_unix_server(handler, path=str(path)))
        return path

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


@needs_spec
async def test_client_sends_the_calls_in_order(
    uds: Callable[[Handler], Awaitable[Path]],
) -> None:
    peer = FakeFirecrackerAPI()
    client = FirecrackerClient(await uds(peer.handle), timeout=5)
    info = await client.get("/")
    validate_definition("InstanceInfo", info)
    plan = _plan("api-seed-tap")
    for call in plan.calls:
        assert await client.call(call.method, call.path, call.body) is None
    assert peer.requests == [c.as_json() for c in plan.calls]


@needs_spec
async def test_client_surfaces_faults(uds: Callable[[Handler], Awaitable[Path]]) -> None:
    peer = FakeFirecrackerAPI(fail="PUT /boot-source")
    client = FirecrackerClient(await uds(peer.handle), timeout=5)
    with pytest.raises(FirecrackerAPIError) as caught:
        await client.put("/boot-source", {"kernel_image_path": "vmlinux"})
    assert caught.value.status == 400
    assert caught.value.fault == "injected fault for PUT /boot-source"
    assert "PUT /boot-source failed (HTTP 400)" in str(caught.value)
    # A body the spec refuses is refused by the peer, as by Firecracker.
    with pytest.raises(FirecrackerAPIError, match="invalid request"):
        await client.put("/machine-config", {"vcpu_count": 2})
    response = await client.request("PUT", "/nonexistent", {})
    assert response.status == 400 and "not an operation" in response.body["fault_message"]


async def _reply_with(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(2)
        writer.close()

    return handler


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"HTTP/1.1 204\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", None),
        (b"SMTP ready\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 20000 + b"\r\n\r\n", "headers longer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "no response within"),
    ],
)
async def test_client_bounds_and_rejects_malformed_responses(
    uds: Callable[[Handler], Awaitable[Path]], raw: bytes, why: str | None
) -> None:
    client = FirecrackerClient(await uds(await _reply_with(raw)), timeout=0.5)
    if why is None:
        await client.get("/")
        return
    with pytest.raises(FirecrackerAPIError, match=why) as caught:
        await client.get("/")
    assert caught.value.status is None


async def test_client_error_body_that_is_not_json(
    uds: Callable[[Handler], Awaitable[Path]],
) -> None:
    raw = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"
    client = FirecrackerClient(await uds(await _reply_with(raw)), timeout=2)
    with pytest.raises(FirecrackerAPIError, match=r"HTTP 500.*oops"):
        await client.put("/actions", fc.instance_start())


async def test_client_without_a_socket(tmp_path: Path) -> None:
    with pytest.raises(FirecrackerAPIError, match="connection failed") as caught:
        await FirecrackerClient(tmp_path / "missing.sock").get("/")
    assert caught.value.status is None


# ---------------------------------------------------------------------------- vsock


async def test_vsock_retries_until_the_guest_listens(
    uds: Callable[[Handler], Awaitable[Path]],
) -> None:
    attempts: list[bytes] = []

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(await reader.readline())
        if len(attempts) < 3:  # the agent is not listening yet: Firecracker hangs up
            writer.close()
            return
        writer.write(b"OK 1073741824\n" + wire.encode_msg(0, READY))
        await writer.drain()
        await reader.read()
        writer.close()

    reader, writer = await HybridVsockTransport(await uds(vmm), wire.VSOCK_PORT).connect(timeout=5)
    client = AgentClient(reader, writer)
    try:
        assert (await client.wait_ready(5)).agent == "t"
    finally:
        await client.aclose()
    assert attempts == [b"CONNECT 1024\n"] * 3


async def test_vsock_waits_for_the_socket_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "vsock.sock"

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"OK 5\n")
        await writer.drain()

    async def start_later() -> asyncio.AbstractServer:
        await asyncio.sleep(0.3)
        return await asyncio.start_unix_server(vmm, path=str(path))

    later = asyncio.create_task(start_later())
    _, writer = await HybridVsockTransport(path, 1024).connect(timeout=5)
    writer.close()
    server = await later
    server.close()
    await server.wait_closed()


async def test_vsock_bad_reply_is_not_retried(uds: Callable[[Handler], Awaitable[Path]]) -> None:
    seen: list[bytes] = []

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        writer.write(b"HELLO\n")
        await writer.drain()

    with pytest.raises(GuestProtocolError):
        await HybridVsockTransport(await uds(vmm), 1024).connect(timeout=5)
    assert len(seen) == 1


async def test_vsock_gives_up_at_the_deadline(tmp_path: Path) -> None:
    with pytest.raises(InfrastructureError, match=r"did not accept vsock port 1024.*0\.3s"):
        await HybridVsockTransport(tmp_path / "never.sock", 1024).connect(timeout=0.3)


# ---------------------------------------------------------------------------- the stand-in VMM


def _fake_firecracker_main(argv: list[str]) -> int:
    """A stand-in for the ``firecracker`` binary (this file run as a program).

    Environment: ``FAKE_FC_EXIT=N`` exit at once with status N; ``FAKE_FC_FAIL=
    "PUT /path"`` inject an API fault; ``FAKE_FC_IGNORE_TERM=1`` ignore SIGTERM.
    """
    parser = argparse.ArgumentParser()
    for option in ("--api-sock", "--id", "--log-path", "--level", "--config-file"):
        parser.add_argument(option)
    args = parser.parse_args(argv)
    if code := os.environ.get("FAKE_FC_EXIT"):
        print("fake-firecracker: refusing to start", file=sys.stderr, flush=True)
        return int(code)
    if os.environ.get("FAKE_FC_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path("fc.pid").write_text(str(os.getpid()))
    log_fd = os.open(args.log_path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(log_fd, f"fake-firecracker: started as {args.id} at level {args.level}\n".encode())
    print("fake-firecracker: console up", flush=True)
    asyncio.run(_fake_firecracker(args))
    return 0


async def _fake_guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if await reader.readline() != f"CONNECT {wire.VSOCK_PORT}\n".encode():
        writer.close()
        return
    writer.write(b"OK 1073741824\n" + wire.encode_msg(0, READY))
    await writer.drain()
    await reader.read()
    writer.close()


async def _fake_firecracker(args: argparse.Namespace) -> None:
    api = FakeFirecrackerAPI(fail=os.environ.get("FAKE_FC_FAIL"), record=Path("requests.jsonl"))
    guests: list[asyncio.AbstractServer] = []
    vsock: dict[str, Any] = {}

    async def boot(uds_path: str) -> None:
        guests.append(await asyncio.start_unix_server(_fake_guest, path=uds_path))
        api.state = "Running"
        print("fake-firecracker: guest booted", flush=True)

    async def on_vsock(body: Any) -> str | None:
        vsock.update(body)
        return None

    async def on_action(body: Any) -> str | None:
        if body["action_type"] != "InstanceStart" or api.state != "Not started":
            return "invalid action"
        await boot(vsock["uds_path"])
        return None

    async def on_vm(body: Any) -> str | None:
        api.state = "Paused" if body["state"] == "Paused" else "Running"
        return None

    async def on_create(body: Any) -> str | None:
        if api.state != "Paused":
            return "the microVM must be paused"
        Path(body["snapshot_path"]).write_text(json.dumps({"vsock": vsock}))
        Path(body["mem_file_path"]).write_bytes(b"\0" * 4096)
        return None

    async def on_load(body: Any) -> str | None:
        for drive in ("rootfs", "scratch.img"):
            if not Path(drive).exists():
                return f"cannot open {drive}"
        state = json.loads(Path(body["snapshot_path"]).read_text())
        Path(body["mem_backend"]["backend_path"]).read_bytes()
        vsock.update(state["vsock"])
        await boot(vsock["uds_path"])
        return None

    api.hooks = {
        ("PUT", "/vsock"): on_vsock,
        ("PUT", "/actions"): on_action,
        ("PATCH", "/vm"): on_vm,
        ("PUT", "/snapshot/create"): on_create,
        ("PUT", "/snapshot/load"): on_load,
    }
    if args.config_file:
        doc = json.loads(Path(args.config_file).read_text())
        validate_definition("FullVmConfiguration", doc)
        vsock.update(doc["vsock"])
        await boot(vsock["uds_path"])
    server = await asyncio.start_unix_server(api.handle, path=args.api_sock)
    async with server:
        await asyncio.Event().wait()  # until killed


@pytest.fixture
def fake_firecracker(tmp_path: Path) -> Path:
    """An executable named like Firecracker that runs :func:`_fake_firecracker_main`."""
    path = tmp_path / "bin" / "firecracker"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    path.chmod(0o755)
    return path


def _vm_files(tmp_path: Path, name: str = "vm") -> tuple[Path, MachineSpec]:
    """A work directory and a spec whose files exist (the kernel is already ELF)."""
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "vmlinux").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57))
    (cache / "initrd").write_bytes(b"initrd")
    (cache / "rootfs.erofs").write_bytes(b"root")
    workdir = tmp_path / name
    workdir.mkdir()
    with (workdir / "scratch.img").open("wb") as fh:
        fh.truncate(16 << 20)
    spec = _spec(
        kernel=cache / "vmlinux",
        initrd=cache / "initrd",
        rootfs=cache / "rootfs.erofs",
        scratch=workdir / "scratch.img",
    )
    return workdir, spec


def _recorded(workdir: Path) -> list[list[Any]]:
    lines = (workdir / "requests.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _agent_ready(vm: LaunchedVM) -> None:
    reader, writer = await vm.transport.connect(timeout=10)
    client = AgentClient(reader, writer)
    try:
        assert (await client.wait_ready(10)).agent == "t"
    finally:
        await client.aclose()


@needs_spec
async def test_launch_configures_boots_and_kills(tmp_path: Path, fake_firecracker: Path) -> None:
    workdir, spec = _vm_files(tmp_path)
    backend = FirecrackerBackend(FirecrackerConfig(binary=str(fake_firecracker)))
    async with AsyncExitStack() as stack:
        vm = await backend.launch(spec, workdir, stack)
        assert isinstance(vm, FirecrackerVM) and vm.plan is not None
        await _agent_ready(vm)
        # Every body passed the peer's spec check, in the planned order.
        assert _recorded(workdir) == [c.as_json() for c in vm.plan.calls]
        assert vm.plan.argv[0] == str(fake_firecracker.resolve())
        assert (workdir / "rootfs").resolve() == spec.rootfs.resolve()
        assert "Firecracker 1.16.1: Running" in await vm.diagnostics()
        assert "fake-firecracker: console up" in vm.console.text()
        assert "started as stoker-test at level Info" in vm.vmm_log.text()
        pid = vm.pid
        assert pid is not None
        await vm.kill()
        assert vm.returncode == -signal.SIGTERM and vm.pid is None and _gone(pid)
        await vm.kill()  # idempotent
        assert await vm.diagnostics() == ""


@needs_spec
async def test_launch_with_a_config_file(tmp_path: Path, fake_firecracker: Path) -> None:
    workdir, spec = _vm_files(tmp_path)
    config = FirecrackerConfig(binary=str(fake_firecracker), use_config_file=True)
    async with AsyncExitStack() as stack:
        vm = await FirecrackerBackend(config).launch(spec, workdir, stack)
        await _agent_ready(vm)
        assert not (workdir / "requests.jsonl").exists()  # only GET / was asked
        assert isinstance(vm, FirecrackerVM) and vm.plan is not None
        assert json.loads((workdir / "vm-config.json").read_text()) == vm.plan.config


@needs_spec
async def test_an_api_fault_fails_the_launch_and_nothing_survives(
    tmp_path: Path, fake_firecracker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /drives/scratch")
    workdir, spec = _vm_files(tmp_path)
    backend = FirecrackerBackend(FirecrackerConfig(binary=str(fake_firecracker)))
    with pytest.raises(FirecrackerAPIError) as caught:
        async with AsyncExitStack() as stack:
            await backend.launch(spec, workdir, stack)
    assert caught.value.status == 400 and caught.value.path == "/drives/scratch"
    assert "injected fault" in str(caught.value)
    assert "started as stoker-test" in caught.value.output  # the VMM's log is attached
    assert caught.value.argv[0] == str(fake_firecracker.resolve())
    assert _gone(int((workdir / "fc.pid").read_text()))


async def test_a_vmm_that_exits_at_start_is_reported(
    tmp_path: Path, fake_firecracker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_EXIT", "3")
    workdir, spec = _vm_files(tmp_path)
    backend = FirecrackerBackend(FirecrackerConfig(binary=str(fake_firecracker)))
    with pytest.raises(LaunchError, match="exited during start-up") as caught:
        async with AsyncExitStack() as stack:
            await backend.launch(spec, workdir, stack)
    assert caught.value.returncode == 3
    assert "refusing to start" in caught.value.output


@needs_spec
async def test_kill_escalates_to_sigkill(
    tmp_path: Path, fake_firecracker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_IGNORE_TERM", "1")
    monkeypatch.setattr(fc, "TERM_GRACE", 0.3)
    workdir, spec = _vm_files(tmp_path)
    backend = FirecrackerBackend(FirecrackerConfig(binary=str(fake_firecracker)))
    async with AsyncExitStack() as stack:
        vm = await backend.launch(spec, workdir, stack)
    assert vm.returncode == -signal.SIGKILL  # the stack killed it


@needs_spec
async def test_snapshot_and_restore_through_the_api(tmp_path: Path, fake_firecracker: Path) -> None:
    workdir, spec = _vm_files(tmp_path)
    seed = workdir / "seed.tar"
    seed.write_bytes(b"seed")
    spec = MachineSpec(**{**spec.__dict__, "seed": seed})
    backend = FirecrackerBackend(FirecrackerConfig(binary=str(fake_firecracker)))
    async with AsyncExitStack() as stack:
        vm = await backend.launch(spec, workdir, stack)
        assert isinstance(vm, FirecrackerVM)
        (workdir / "scratch.img").write_bytes(b"written by the guest")
        snap = await vm.snapshot(tmp_path / "snap")
        assert _recorded(workdir)[-3:] == [
            ["PATCH", "/vm", {"state": "Paused"}],
            [
                "PUT",
                "/snapshot/create",
                fc.snapshot_create_body("snapshot.vmstate", "snapshot.mem"),
            ],
            ["PATCH", "/vm", {"state": "Resumed"}],
        ]
        await _agent_ready(vm)  # the original goes on
    assert FirecrackerSnapshot.load(tmp_path / "snap") == snap
    names = {p.name: p for p in snap.files}
    assert set(names) == {"rootfs", "scratch.img", "seed.tar"}
    assert names["rootfs"].source == spec.rootfs  # shared input: referenced
    assert names["scratch.img"].source == tmp_path / "snap/scratch.img"  # the VM's own: copied
    assert names["seed.tar"].source.read_bytes() == b"seed"
    assert snap.state.exists() and snap.memory.exists()
    assert not workdir.joinpath("snapshot.vmstate").exists()

    restored_dir = tmp_path / "vm2"
    restored_dir.mkdir()
    async with AsyncExitStack() as stack:
        restored = await backend.restore(snap, restored_dir, stack, name="stoker-r1")
        await _agent_ready(restored)
        assert _recorded(restored_dir) == [
            ["PUT", "/snapshot/load", fc.snapshot_load_body("loaded.vmstate", "loaded.mem")]
        ]
        # Its own copy of the writable disk, links to the rest.
        scratch = restored_dir / "scratch.img"
        assert not scratch.is_symlink() and scratch.read_bytes() == b"written by the guest"
        assert (restored_dir / "rootfs").resolve() == spec.rootfs.resolve()
        # A snapshot of the restored VM leaves the one it came from alone.
        original_state = snap.state.read_bytes()
        again = await restored.snapshot(tmp_path / "snap2")
        assert snap.state.read_bytes() == original_state
        assert {p.name for p in again.files} == {"rootfs", "scratch.img", "seed.tar"}
        for name in ("scratch.img", "seed.tar"):  # copied again: snap may be deleted
            assert {p.name: p.source for p in again.files}[name] == tmp_path / "snap2" / name


async def test_firecracker_needs_kvm(tmp_path: Path) -> None:
    with pytest.raises(AccelError, match="needs KVM"):
        await FirecrackerBackend().launch(_spec(accel="tcg"), tmp_path, AsyncExitStack())


async def test_missing_binary(tmp_path: Path) -> None:
    backend = FirecrackerBackend(FirecrackerConfig(binary=str(tmp_path / "no-firecracker")))
    with pytest.raises(LaunchError, match="not installed") as caught:
        await backend.launch(_spec(), tmp_path, AsyncExitStack())
    assert caught.value.hint is not None and "releases" in caught.value.hint


def test_socket_paths_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="longer than 107 bytes"):
        fc._check_socket_path(tmp_path / ("x" * 120) / "api.sock")


# ---------------------------------------------------------------------------- doctor


def _fake_version(tmp_path: Path, output: str) -> str:
    path = tmp_path / "firecracker"
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return str(path)


def test_status_without_firecracker(tmp_path: Path) -> None:
    ok, why = fc.firecracker_status(str(tmp_path / "firecracker"))
    assert not ok and "not found on PATH" in why


def test_status_of_an_old_firecracker(tmp_path: Path) -> None:
    ok, why = fc.firecracker_status(_fake_version(tmp_path, "Firecracker v1.7.0"))
    assert not ok and "too old" in why and "1.7.0" in why


def test_status_without_kvm(tmp_path: Path) -> None:
    binary = _fake_version(tmp_path, "Firecracker v1.16.1\n\nSupported snapshot formats: v8")
    assert fc.firecracker_version(binary) == "1.16.1"
    ok, why = fc.firecracker_status(binary, kvm=str(tmp_path / "kvm"))
    assert not ok and "needs KVM" in why and "does not exist" in why


def test_status_with_kvm_follows_the_device(tmp_path: Path) -> None:
    from stoker.backends.qemu import kvm_device_status

    binary = _fake_version(tmp_path, "Firecracker v1.16.1")
    ok, why = fc.firecracker_status(binary)
    assert ok == kvm_device_status()[0]
    assert "Firecracker 1.16.1" in why


def test_describe(tmp_path: Path) -> None:
    binary = _fake_version(tmp_path, "Firecracker v1.16.1")
    facts = FirecrackerBackend(FirecrackerConfig(binary=binary, jailer=JAILER)).describe()
    assert facts["version"] == "1.16.1"
    assert facts["usable"] in ("yes", "no") and facts["why"]
    assert "jailer" in facts


# ---------------------------------------------------------------------------- real boots

_FC_USABLE, _FC_WHY = fc.firecracker_status()
real_firecracker = pytest.mark.skipif(
    not _FC_USABLE, reason=f"Firecracker cannot run here: {_FC_WHY}"
)


def _real_spec(artifacts: Any, name: str) -> MachineSpec:
    return MachineSpec(
        name=name,
        kernel=artifacts.kernel.vmlinuz,
        initrd=artifacts.initrd,
        rootfs=artifacts.image.rootfs,
        rootfs_type=artifacts.image.fstype,
        python=artifacts.image.python,
        accel="kvm",
        cpus=1,
        memory_mb=512,
    )


@pytest.mark.vm
@real_firecracker
async def test_real_boot_reaches_the_agent(boot_artifacts: Any, tmp_path: Path) -> None:
    backend = FirecrackerBackend()
    async with AsyncExitStack() as stack:
        vm = await backend.launch(_real_spec(boot_artifacts, "stoker-fc-boot"), tmp_path, stack)
        try:
            reader, writer = await vm.transport.connect(timeout=60)
            client = AgentClient(reader, writer)
            stack.push_async_callback(client.aclose)
            ready = await client.wait_ready(60)
            assert ready.pid1
        except BaseException:
            print(vm.console.tail(60), "\n--- VMM log ---\n", vm.vmm_log.text())
            raise


@pytest.mark.vm
@real_firecracker
async def test_real_snapshot_and_restore(boot_artifacts: Any, tmp_path: Path) -> None:
    backend = FirecrackerBackend()
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    async with AsyncExitStack() as stack:
        vm = await backend.launch(_real_spec(boot_artifacts, "stoker-fc-snap"), first, stack)
        assert isinstance(vm, FirecrackerVM)
        reader, writer = await vm.transport.connect(timeout=60)
        client = AgentClient(reader, writer)
        await client.wait_ready(60)
        await client.aclose()
        snap = await vm.snapshot(tmp_path / "snap", resume=False)
    async with AsyncExitStack() as stack:
        restored = await backend.restore(snap, second, stack)
        reader, writer = await restored.transport.connect(timeout=60)
        await AgentClient(reader, writer).aclose()


if __name__ == "__main__":
    sys.exit(_fake_firecracker_main(sys.argv[1:]))
