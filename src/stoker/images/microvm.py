"""microvm.nix compatibility: a configuration's ``microvm.*`` settings as a stoker VM shape.

A ``nixosConfiguration`` that imports microvm.nix declares its VM under
``config.microvm``.  :func:`microvm_eval_argv` reads the options stoker knows
with ``nix eval --json`` (a fixed selection: evaluating the whole attribute set
would force options that need a host, such as the runner scripts), and
:func:`microvm_shape` maps them to a :class:`MicrovmShape`, which the nixos
builder records as the image's defaults: VMs made from it get the same vCPUs,
memory, root disk and network, whatever VMM runs them.

=========================== ==================================================
microvm.nix option          stoker
=========================== ==================================================
``vcpu``                    ``defaults.cpus``
``mem`` (MiB)               ``defaults.memory``
``hypervisor``              ``qemu``, ``firecracker`` and ``cloud-hypervisor``
                            are recorded (``--vmm`` still picks the VMM);
                            others are refused
``volumes``                 one volume mounted on ``/``: its ``size`` becomes
                            ``defaults.disk`` (the throw-away writable root);
                            any other volume is refused (nothing persists)
``shares``                  the host store share (``source = "/nix/store"``)
                            is replaced by the image's erofs store; any other
                            share is refused
``interfaces``              at most one of ``type = "user"``: network ``nat``;
                            ``tap``, ``macvtap``, ``bridge`` are refused (stoker
                            owns the network: use the spec's ``[network]``)
``kernelParams``            appended to the kernel command line
``writableStoreOverlay``    refused: the store is read-only in stoker VMs
``forwardPorts``            refused when not empty
``devices``                 refused when not empty (no device passthrough)
``graphics.enable``         refused when true
=========================== ==================================================

Every other ``microvm.*`` option is not read, so it has no effect.  A refusal
is a :class:`~stoker.errors.UsageError` naming every offending option at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.nixcmd import NIX_FEATURES, NIX_QUERY_TIMEOUT, nix_user_error, run_nix

#: The VMMs microvm.nix names that stoker has backends for.
SUPPORTED_HYPERVISORS = ("qemu", "firecracker", "cloud-hypervisor")
#: Where microvm.nix mounts the host's store share in the guest.
STORE_SHARE_SOURCE = "/nix/store"
_MIN_MEMORY_MB = 128
_MIN_DISK_MB = 64

# The selection read from config.microvm; `or` defaults keep a configuration
# that lacks an option (or a stand-in module) evaluating.
_SELECT = (
    "m: { vcpu = m.vcpu or null; mem = m.mem or null; hypervisor = m.hypervisor or null;"
    " volumes = m.volumes or []; shares = m.shares or []; interfaces = m.interfaces or [];"
    " kernelParams = m.kernelParams or []; writableStoreOverlay = m.writableStoreOverlay or null;"
    " forwardPorts = m.forwardPorts or []; devices = m.devices or [];"
    " graphics = (m.graphics or {}).enable or false; }"
)


def microvm_eval_argv(flake_url: str, name: str, *, features: Sequence[str]) -> list[str]:
    """``nix eval --json`` of the ``microvm.*`` selection of ``nixosConfigurations.NAME``."""
    quoted = json.dumps(name)  # a JSON string is a valid Nix string for attribute names
    target = f"{flake_url}#nixosConfigurations.{quoted}.config.microvm"
    return ["nix", *features, "eval", "--json", target, "--apply", _SELECT]


def has_microvm_argv(flake_url: str, name: str, *, features: Sequence[str]) -> list[str]:
    """``nix eval``: whether ``nixosConfigurations.NAME.config`` has a ``microvm`` attribute."""
    quoted = json.dumps(name)
    target = f"{flake_url}#nixosConfigurations.{quoted}.config"
    return ["nix", *features, "eval", "--json", target, "--apply", "c: c ? microvm"]


@dataclass(frozen=True)
class MicrovmShape:
    """A stoker VM shape from microvm.nix settings; ``None``: stoker's default."""

    cpus: int | None = None
    memory_mb: int | None = None
    #: The writable root disk, MiB.
    disk_mb: int | None = None
    #: The microvm.nix ``hypervisor`` (one of :data:`SUPPORTED_HYPERVISORS`).
    vmm: str | None = None
    #: ``"nat"`` for a ``user`` interface, else ``None`` (no network device).
    network: str | None = None
    kernel_params: tuple[str, ...] = ()

    def defaults(self) -> dict[str, int]:
        """The manifest's ``defaults`` entries this shape sets."""
        pairs = (("cpus", self.cpus), ("memory", self.memory_mb), ("disk", self.disk_mb))
        return {key: value for key, value in pairs if value is not None}

    def to_json(self) -> dict[str, object]:
        """The manifest's record of the shape."""
        return {
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "vmm": self.vmm,
            "network": self.network,
            "kernel_params": list(self.kernel_params),
        }


def _int_option(
    settings: Mapping[str, object], key: str, low: int, problems: list[str]
) -> int | None:
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        problems.append(f"microvm.{key} = {value!r}: expected a whole number >= {low}")
        return None
    return value


def _root_disk(volumes: object, problems: list[str]) -> int | None:
    if not isinstance(volumes, list):
        problems.append("microvm.volumes: expected a list")
        return None
    disk = None
    for index, volume in enumerate(volumes):
        mount = volume.get("mountPoint") if isinstance(volume, dict) else None
        size = volume.get("size") if isinstance(volume, dict) else None
        if mount == "/" and isinstance(size, int) and size >= _MIN_DISK_MB:
            disk = size
        else:
            problems.append(
                f"microvm.volumes[{index}] (mountPoint {mount!r}): only a volume on / "
                f"with a size of at least {_MIN_DISK_MB} MiB is supported (nothing persists "
                "in a stoker VM; its root disk is made for every VM)"
            )
    return disk


def _check_shares(shares: object, problems: list[str]) -> None:
    if not isinstance(shares, list):
        problems.append("microvm.shares: expected a list")
        return
    for index, share in enumerate(shares):
        source = share.get("source") if isinstance(share, dict) else None
        if source != STORE_SHARE_SOURCE:
            problems.append(
                f"microvm.shares[{index}] (source {source!r}): host directories are not "
                "shared with stoker VMs; only the store share is supported (the image "
                "carries the store)"
            )


def _network(interfaces: object, problems: list[str]) -> str | None:
    if not isinstance(interfaces, list):
        problems.append("microvm.interfaces: expected a list")
        return None
    kinds = [i.get("type") if isinstance(i, dict) else None for i in interfaces]
    for index, kind in enumerate(kinds):
        if kind != "user":
            problems.append(
                f"microvm.interfaces[{index}] (type {kind!r}): stoker attaches its own "
                'network; only type "user" is supported (use the spec\'s [network] table)'
            )
    if kinds.count("user") > 1:
        problems.append("microvm.interfaces: more than one interface of type 'user'")
    return "nat" if "user" in kinds else None


def microvm_shape(settings: Mapping[str, object]) -> MicrovmShape:
    """Map :func:`microvm_eval_argv`'s output to a :class:`MicrovmShape`.

    Raises :class:`UsageError` naming every unsupported option and value.
    """
    problems: list[str] = []
    cpus = _int_option(settings, "vcpu", 1, problems)
    memory = _int_option(settings, "mem", _MIN_MEMORY_MB, problems)
    hypervisor = settings.get("hypervisor")
    if hypervisor is not None and hypervisor not in SUPPORTED_HYPERVISORS:
        problems.append(
            f"microvm.hypervisor = {hypervisor!r}: stoker runs {', '.join(SUPPORTED_HYPERVISORS)}"
        )
    disk = _root_disk(settings.get("volumes", []), problems)
    _check_shares(settings.get("shares", []), problems)
    network = _network(settings.get("interfaces", []), problems)
    params = settings.get("kernelParams", [])
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        problems.append("microvm.kernelParams: expected a list of strings")
        params = []
    if settings.get("writableStoreOverlay") is not None:
        problems.append(
            "microvm.writableStoreOverlay: the store is read-only in stoker VMs; remove it"
        )
    for key, what in (("forwardPorts", "port forwarding"), ("devices", "device passthrough")):
        if settings.get(key):
            problems.append(f"microvm.{key}: {what} is not supported")
    if settings.get("graphics"):
        problems.append("microvm.graphics.enable: stoker VMs have no display")
    if problems:
        raise UsageError(
            "unsupported microvm.nix settings:\n  " + "\n  ".join(problems),
            hint="see the README's microvm.nix table for what stoker maps",
        )
    return MicrovmShape(
        cpus=cpus,
        memory_mb=memory,
        disk_mb=disk,
        vmm=hypervisor if isinstance(hypervisor, str) else None,
        network=network,
        kernel_params=tuple(params),
    )


def read_microvm_shape(flake_url: str, name: str, *, environ: Mapping[str, str]) -> MicrovmShape:
    """The shape of ``nixosConfigurations.NAME``: its microvm.nix settings, else stoker's defaults.

    Runs ``nix eval`` (twice: whether ``config.microvm`` exists, then the
    selection).  Evaluation errors raise :class:`UsageError` with Nix's message.
    """

    def evaluate(argv: list[str]) -> object:
        try:
            output = run_nix(argv, environ=environ, log=None, timeout=NIX_QUERY_TIMEOUT)
        except LaunchError as exc:
            raise nix_user_error(f"evaluating nixosConfigurations.{name}", exc) from None
        try:
            return json.loads(output)
        except json.JSONDecodeError as exc:
            raise ProvisionError(f"nix eval printed invalid JSON: {exc}") from None

    if evaluate(has_microvm_argv(flake_url, name, features=NIX_FEATURES)) is not True:
        return MicrovmShape()
    settings = evaluate(microvm_eval_argv(flake_url, name, features=NIX_FEATURES))
    if not isinstance(settings, dict):
        raise ProvisionError("nix eval of config.microvm printed no attribute set")
    return microvm_shape(settings)
