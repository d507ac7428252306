"""What a VM may use on the host: a frozen spec and the cgroup v2 files it becomes.

:func:`limits_for` turns a VM's shape (vCPUs, guest memory, accelerator) and a
:class:`LimitPolicy` into :class:`CgroupLimits`; :func:`limit_files` turns those
into ``{file name: value}`` for the controllers this host delegates.  Both are
pure and golden-tested (``tests/test_isolation.py``).

The memory budget is the guest's RAM plus what QEMU itself holds beyond it:

* its own heap, threads and mapped binaries: measured (``/proc/PID/smaps`` of a
  2-vCPU 512 MiB guest under TCG) 21 MiB anonymous and 42 MiB file-backed after
  a boot, 103 MiB anonymous (glibc arenas of its I/O threads grow with the
  guest's disk traffic) after writing 300 MB to its disk; hence
  :data:`DEFAULT_OVERHEAD_MB`, with room for the block layer's page cache
  (file pages are reclaimed at the limit, anonymous ones are not).
* under TCG, the translation-block cache: QEMU 7.2 reserves 1 GiB
  (``DEFAULT_CODE_GEN_BUFFER_SIZE``, or an eighth of the host's RAM when the host
  has less than 2 GiB) and fills it as the guest runs new code and never gives
  it back.  Measured: 56 MiB resident after a boot, 505 MiB after importing a
  dozen Python modules and gzipping a file in a 512 MiB guest, so the limit
  budgets the whole cache: a guest that merely runs a lot of code must not be
  killed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
#: QEMU's own memory beyond the guest and the TCG cache (heap, threads, page cache).
DEFAULT_OVERHEAD_MB = 256
#: QEMU's default translation cache (``-accel tcg,tb-size=``) on a 64-bit host.
QEMU_TB_CACHE_MB = 1024
#: Processes and threads of one VM: QEMU's main, RCU and vCPU threads, its block
#: layer's worker pool (up to 64 threads) and any helper the VM is given.
DEFAULT_PIDS = 256
#: ``cpu.max`` period; the quota is a multiple of it.
CPU_PERIOD_US = 100_000
#: ``cpu.weight`` of one vCPU: the kernel's default weight of a cgroup.
WEIGHT_PER_CPU = 100


@dataclass(frozen=True)
class LimitPolicy:
    """How a VM's host-side limits follow from its shape (a pool's or ``stoker run``'s)."""

    #: QEMU's memory beyond the guest (and beyond the TCG cache), MiB.
    overhead_mb: int = DEFAULT_OVERHEAD_MB
    #: ``pids.max``: threads and processes of the VM's cgroup.
    pids: int = DEFAULT_PIDS
    #: ``cpu.weight`` (1-10000); None: :data:`WEIGHT_PER_CPU` per vCPU.
    cpu_weight: int | None = None
    #: ``cpu.max`` in CPUs (1.5: one and a half host CPUs); None: no quota.
    cpu_quota: float | None = None
    #: Swap the VM may use, MiB (0: none; over its memory it is killed, not slowed).
    swap_mb: int = 0


@dataclass(frozen=True)
class CgroupLimits:
    """The limits of one VM's cgroup, in the units of the cgroup files."""

    memory_max: int
    swap_max: int
    pids_max: int
    cpu_weight: int
    #: ``cpu.max`` quota per :attr:`cpu_period_us`; None: ``max`` (no quota).
    cpu_quota_us: int | None
    cpu_period_us: int = CPU_PERIOD_US
    #: ``memory.oom.group``: an OOM kill takes the whole VM, never half of QEMU.
    oom_group: bool = True

    @property
    def memory_max_mb(self) -> int:
        return self.memory_max // MIB


def tb_cache_mb(host_memory_mb: int) -> int:
    """QEMU 7.2's default TCG translation cache for a host with this much RAM.

    ``tcg/region.c``: 1 GiB, unless the host has less than twice that, then an
    eighth of its RAM.
    """
    if 0 < host_memory_mb < 2 * QEMU_TB_CACHE_MB:
        return host_memory_mb // 8
    return QEMU_TB_CACHE_MB


def limits_for(
    policy: LimitPolicy, *, cpus: int, memory_mb: int, accel: str, host_memory_mb: int
) -> CgroupLimits:
    """The limits of a VM with ``cpus`` vCPUs and ``memory_mb`` of guest RAM (pure)."""
    budget = memory_mb + policy.overhead_mb
    if accel != "kvm":
        budget += tb_cache_mb(host_memory_mb)
    weight = policy.cpu_weight or min(10_000, WEIGHT_PER_CPU * cpus)
    quota = None if policy.cpu_quota is None else round(policy.cpu_quota * CPU_PERIOD_US)
    return CgroupLimits(
        memory_max=budget * MIB,
        swap_max=policy.swap_mb * MIB,
        pids_max=policy.pids,
        cpu_weight=weight,
        cpu_quota_us=quota,
    )


#: The controllers a VM's cgroup uses, in the order their files are written.
CONTROLLERS = ("memory", "pids", "cpu")


def limit_files(limits: CgroupLimits, controllers: frozenset[str]) -> dict[str, str]:
    """``{file: value}`` to write into the VM's cgroup, for the controllers it has (pure).

    A controller the host does not delegate contributes nothing: its files do
    not exist in the cgroup.
    """
    files: dict[str, str] = {}
    if "memory" in controllers:
        files["memory.max"] = str(limits.memory_max)
        files["memory.swap.max"] = str(limits.swap_max)
        files["memory.oom.group"] = "1" if limits.oom_group else "0"
    if "pids" in controllers:
        files["pids.max"] = str(limits.pids_max)
    if "cpu" in controllers:
        files["cpu.weight"] = str(limits.cpu_weight)
        quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
        files["cpu.max"] = f"{quota} {limits.cpu_period_us}"
    return files


def describe(limits: CgroupLimits, controllers: frozenset[str]) -> str:
    """One line saying which limits a VM gets, for logs and ``stoker doctor``."""
    parts = []
    if "memory" in controllers:
        parts.append(f"memory.max {limits.memory_max_mb} MiB")
    if "pids" in controllers:
        parts.append(f"pids.max {limits.pids_max}")
    if "cpu" in controllers:
        quota = (
            "no quota"
            if limits.cpu_quota_us is None
            else f"quota {limits.cpu_quota_us / limits.cpu_period_us:g} CPUs"
        )
        parts.append(f"cpu.weight {limits.cpu_weight}, {quota}")
    return ", ".join(parts) or "no limits (no controller delegated)"
