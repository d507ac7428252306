"""A VM's snapshot: which one it may restore from, and making the template.

Functions over a :class:`~stoker.vm.VM` (a friend module: they read its
shape, mode and private state), split out of :mod:`stoker.vm` to keep it
readable.  The store itself is :mod:`stoker.snapshots`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stoker import vmfiles
from stoker.artifacts import BootArtifacts
from stoker.backends.qemu import SEED_SERIAL
from stoker.errors import UsageError
from stoker.snapshots import Snapshot, SnapshotDamaged, SnapshotKey, SnapshotStore

if TYPE_CHECKING:
    from stoker.vm import VM


def snapshot_key(vm: VM, artifacts: BootArtifacts, accel: str) -> SnapshotKey:
    """What a snapshot of this VM is valid for (image, shape, kernel, backend, accel)."""
    return SnapshotKey(
        image_digest=artifacts.image.digest,
        cpus=vm.cpus,
        memory_mb=vm.memory_mb,
        disk_mb=vm.disk_mb,
        backend=vm.backend.name,
        backend_version=vm.backend.describe().get("version", "unknown"),
        # The file too: the same kernel booted as a bzImage or through PVH.
        kernel=f"{artifacts.kernel.package}={artifacts.kernel.version}:"
        f"{artifacts.kernel.vmlinuz.name}",
        initrd=artifacts.initrd.name,
        accel=accel,
        seed_slot_bytes=vmfiles.SEED_SLOT_BYTES,
    )


async def find_snapshot(vm: VM, artifacts: BootArtifacts, accel: str) -> Snapshot | None:
    """The snapshot to restore from, per the ``snapshot`` mode (None: boot)."""
    if vm.snapshot_mode == "never" or vm._template_dir is not None:
        return None
    if vm.network_mode == "nat":
        # Templates have no network device; a nat VM always boots with one.
        return None
    if not vm.backend.snapshots:
        if vm.snapshot_mode == "create":
            raise UsageError(
                f"snapshots are implemented for QEMU, not {vm.backend.name}",
                hint="use --snapshot never (or auto, which then boots)",
            )
        return None
    key = snapshot_key(vm, artifacts, accel)
    store = SnapshotStore(vm.dirs)
    found = _hold(vm, store, store.get(key))
    if found is not None:
        try:
            await asyncio.to_thread(store.verify, found)
        except SnapshotDamaged as exc:
            # Never restore half a VM: boot instead, and let the next run make a good one.
            if vm._on_warning:
                vm._on_warning(f"{exc}: removed it; booting instead")
            await asyncio.to_thread(store.discard, found)
            found = None
    if found is not None or vm.snapshot_mode in ("reuse", "auto"):
        if found is None and vm.snapshot_mode == "auto":
            vm.snapshot_missing = key
        return found
    made = await store.ensure(
        key, functools.partial(_make_template, vm, key), progress=vm._on_progress
    )
    return _hold(vm, store, made)


def _hold(vm: VM, store: SnapshotStore, snapshot: Snapshot | None) -> Snapshot | None:
    """``snapshot``, kept from eviction while this VM runs; None if it is gone already."""
    held = None if snapshot is None else store.hold(snapshot)
    if snapshot is None or held is None:
        return None
    vm._stack.callback(os.close, held)
    return store.get(snapshot.key)  # still there now that it is held


async def _make_template(vm: VM, key: SnapshotKey, directory: Path) -> dict[str, object]:
    """Boot a template VM like this one into ``directory`` and save it there."""
    from stoker.vm import VM  # a plain VM, whatever class ``vm`` is

    template = VM(
        vm.image,
        cpus=key.cpus,
        memory=key.memory_mb,
        disk=key.disk_mb,
        accel=key.accel,  # type: ignore[arg-type]
        backend=vm.backend,
        dirs=vm.dirs,
        boot_timeout=vm.boot_timeout,
        agent_files=vm._agent_files,
        hostname="stoker-template",
        template_dir=directory,
        isolation=vm.isolation,
    )
    async with template:
        # Walk once through what every clone does first (unpack its project from the
        # seed slot, run a command) so that the programs and the agent code it needs
        # are in the guest's memory in the snapshot, not read from the image by each
        # clone.  The slot is empty here: an empty archive.
        assert template._client is not None and template._vmm is not None
        await template._guarded(
            template._client.unpack(
                SEED_SERIAL, "/tmp", vm._seed_timeout, device=template._vmm.seed_device
            )
        )
        await template.exec(["true"], timeout=60, check=True)
        # Everything the guest wrote is on the disk before its state is saved.
        await template.exec(["sync"], timeout=60, check=True)
        t = time.monotonic()
        assert template._vmm is not None
        await template._guarded(template._vmm.save_state(directory, vm.boot_timeout))
        save_seconds = time.monotonic() - t
    return {
        "template_boot_seconds": round(template.timings.agent_ready, 3),
        "save_seconds": round(save_seconds, 3),
    }
