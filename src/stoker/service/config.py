"""``stoker serve`` configuration: one frozen model, read from TOML with located errors.

Everything the service does is decided here; the TOML file, the CLI and the
REST API read the same :class:`ServiceConfig` (a JSON round-trip gives it back
unchanged).  Example, with the defaults of every optional key::

    state_dir = "/var/lib/stoker"       # SQLite database, lock file, job files
    database_url = "sqlite:////var/lib/stoker/stoker.db"   # or postgresql://...
    storage_dir = "/var/lib/stoker/jobs"  # sources and artifacts; shared by all hosts
    backend = "qemu"
    retry_limit = 3                     # infrastructure retries of one job
    lease_seconds = 15                  # a host silent this long has lost its jobs
    heartbeat_seconds = 5
    shutdown_grace_seconds = 60
    on_stop = "drain"                   # or "hand-over": running jobs go on for the next process
    poll_seconds = 1.0                  # how often to look for work other processes queued

    [listen]
    host = "127.0.0.1"
    port = 8765

    [host]
    name = "build-1"                    # default: the machine's host name
    cpus = 16                           # default: what the machine has
    memory_mb = "64G"                   # default: what the machine has
    overcommit = 1.0                    # multiplies both
    accel = "auto"
    cgroups = "auto"                    # a cgroup v2 per VM: auto, required or off
    cgroup_parent = ""                  # default: <the daemon's cgroup>/stoker (Delegate=yes)
    vmm_user = ""                       # run QEMU as this user (e.g. "stoker-vmm"); default:
    vmm_group = ""                      # the daemon's user; the group: the user's

    [limits]
    max_upload_bytes = "64M"            # a compressed source tarball
    max_source_bytes = "1G"             # the tree it unpacks to (or a git checkout)
    max_log_bytes = "16M"               # per job; the rest is dropped, marked truncated
    max_artifact_bytes = "1G"           # per job
    max_queued_per_submitter = 10000

    [git]
    allow_protocols = ["https"]
    timeout = "5m"

    [submitters]                        # every submitter (token name) ...
    max_concurrent = 4                  # ... runs at most this many jobs at once
    priority = 0                        # ... and may ask for at most this priority
    [submitters.overrides.release-bot]
    max_concurrent = 8
    priority = 10

    [pools.small]                       # at least one pool
    image = "default"                   # or a flake base, "nixos:./flake#NAME" or
                                        # "nix:./flake#ATTR", built at start (the pool's
                                        # shape wins over microvm.nix's; see pool_images)
    cpus = 1
    memory = "512M"
    disk = "2G"
    labels = ["linux"]
    min_idle = 1                        # VMs kept booted at agent-ready, ahead of demand
    max = 4                             # idle + busy VMs of this pool on one host
    timeout = "30m"                     # default and maximum job timeout
    cpu_weight = 100                    # cgroup cpu.weight per VM (default: 100 per vCPU)
    cpu_quota = 1.5                     # cgroup cpu.max in host CPUs (default: no quota)
    memory_overhead = "256M"            # QEMU's own memory beyond the guest (and TCG cache)
    pids_max = 256                      # threads and processes of a VM's QEMU
    snapshot = "auto"                   # restore VMs from a snapshot (made after the first boot)
    network = { mode = "egress", allow = ["@pypi", "github.com"] }   # default: the image's
    job_pids_limit = 2048               # processes of a job's command in the guest (a fork
                                        # bomb is killed); default: the image's, else 1 per
                                        # MiB of guest memory, at least 512
    job_memory_limit = "400M"           # its memory in the guest (beyond: the guest's OOM
                                        # killer); default: the image's, else the guest's
                                        # memory minus 128 MiB for the agent

    [[tokens]]                          # read by the REST API
    name = "ci"
    sha256 = "<sha256 of the token>"
    scopes = ["submit", "read"]

Errors name the file, the line and the key, like image specs::

    stoker.toml:12: pools.small.min_idle: expected a number <= 4, got 9
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from stoker.ci.github.config import GitHubConfig
from stoker.ci.gitlab.config import GitLabConfig
from stoker.errors import UsageError
from stoker.fields import (
    Bytes,
    HostPath,
    Name,
    Scope,
    Seconds,
    _check_name,
    _check_sha256,
    _parse_duration,
)
from stoker.images.nix import flake_image_name, is_flake_base
from stoker.images.spec import DiskMB, Items, JobMemoryMB, MemoryMB
from stoker.images.spec_errors import KeyPath, _describe, _key_path, _Locator
from stoker.images.spec_fields import _size
from stoker.isolation import CgroupMode, Isolation, LimitPolicy
from stoker.isolation.limits import DEFAULT_OVERHEAD_MB, DEFAULT_PIDS
from stoker.isolation.vmmuser import resolve_user
from stoker.net.policy import NetworkPolicy
from stoker.paths import Dirs
from stoker.service.pool_images import check_pool_image

#: QEMU's threads beyond one per vCPU that ``pids_max`` must leave room for.
MIN_PIDS_BEYOND_CPUS = 16
#: Environment variable that must be ``1`` for ``backend = "fake"`` to be accepted.
ALLOW_FAKE_ENV = "STOKER_ALLOW_FAKE_BACKEND"


def _host_cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


def _host_memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1024


# --- models -------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ListenConfig(_Model):
    """Where the REST API listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=1, le=65535)


class HostConfig(_Model):
    """This machine: its name among the hosts sharing a database, and its capacity."""

    name: Name = Field(default_factory=lambda: _check_name(socket.gethostname().split(".")[0]))
    cpus: int = Field(default_factory=_host_cpus, ge=1, le=4096)
    memory_mb: MemoryMB = Field(default_factory=_host_memory_mb)
    #: Both budgets are multiplied by this (VMs rarely use all they are given).
    overcommit: float = Field(default=1.0, gt=0, le=16)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: A cgroup v2 per VM with the pool's limits: ``auto`` (when the host allows,
    #: else a warning at start), ``required`` (refuse to run VMs without) or ``off``.
    cgroups: CgroupMode = "auto"
    #: Where VM cgroups go, relative to the cgroup2 mount (or absolute under it);
    #: default: ``stoker`` under the daemon's own cgroup (systemd ``Delegate=yes``).
    cgroup_parent: str | None = None
    #: Run QEMU as this unprivileged user (the daemon must be root); default: the
    #: daemon's own user.
    vmm_user: str | None = None
    #: The VMM's group (default: ``vmm_user``'s); it is given access to VM files.
    vmm_group: str | None = None

    @model_validator(mode="after")
    def _vmm_user_exists(self) -> HostConfig:
        if self.vmm_group is not None and self.vmm_user is None:
            raise ValueError("vmm_group is set but vmm_user is not")
        if self.vmm_user is not None:
            try:
                resolve_user(self.vmm_user, self.vmm_group)
            except UsageError as exc:
                raise ValueError(f"{exc}" + (f" ({exc.hint})" if exc.hint else "")) from None
        return self

    @property
    def cpu_budget(self) -> float:
        """vCPUs that may be handed out at once."""
        return self.cpus * self.overcommit

    @property
    def memory_budget_mb(self) -> float:
        """Guest memory (MiB) that may be handed out at once."""
        return self.memory_mb * self.overcommit


class Limits(_Model):
    """Bounds on what one job may store (sizes take K/M/G suffixes; plain numbers are bytes)."""

    max_upload_bytes: Bytes = 64 << 20
    max_source_bytes: Bytes = 1 << 30
    max_log_bytes: Bytes = 16 << 20
    max_artifact_bytes: Bytes = 1 << 30
    #: Bound on the JSON size of a job's environment (names and values).
    max_env_bytes: Bytes = 64 << 10
    max_queued_per_submitter: int = Field(default=10_000, ge=1)


class GitConfig(_Model):
    """Fetching ``git`` sources on the host."""

    #: URL schemes a job may name; ``file`` would let a submitter read this host's repositories.
    allow_protocols: Items[Literal["https", "http", "ssh", "git", "file"]] = ("https",)
    timeout: Seconds = 300.0


class SubmitterPolicy(_Model):
    """What one submitter may do."""

    max_concurrent: int = Field(default=4, ge=1, le=100_000)
    #: The highest priority this submitter's jobs may ask for (and their default).
    priority: int = Field(default=0, ge=-1000, le=1000)


class SubmittersConfig(_Model):
    """The policy of every submitter, with per-submitter overrides."""

    max_concurrent: int = Field(default=4, ge=1, le=100_000)
    priority: int = Field(default=0, ge=-1000, le=1000)
    overrides: dict[Name, SubmitterPolicy] = Field(default_factory=dict)

    def policy(self, submitter: str) -> SubmitterPolicy:
        """The policy that applies to ``submitter``."""
        found = self.overrides.get(submitter)
        if found is not None:
            return found
        return SubmitterPolicy(max_concurrent=self.max_concurrent, priority=self.priority)


class PoolConfig(_Model):
    """A pool: VMs of one image and shape, some kept warm ahead of demand."""

    #: An image name, or a ``nix:``/``nixos:`` flake base built at start
    #: (:mod:`stoker.service.pool_images`; stored with an absolute flake path).
    image: str = "default"
    cpus: int = Field(default=2, ge=1, le=64)
    #: MiB (``"512M"``, ``"2G"`` or a number of MiB).
    memory: MemoryMB = 1024
    #: Size of the VM's writable disk, MiB.
    disk: DiskMB = 4096
    labels: Items[Name] = ()
    min_idle: int = Field(default=0, ge=0, le=1000)
    max: int = Field(default=4, ge=1, le=10_000)
    #: Default and maximum timeout of a job's command.
    timeout: Seconds = 3600.0
    #: auto: restore from the pool's snapshot, made in the background after the first
    #: boot; reuse: restore when one exists, never make one; create: make it before
    #: the first VM; never: always boot.
    snapshot: Literal["never", "reuse", "auto", "create"] = "auto"
    #: The network of the pool's VMs (None: the image's ``[network]``, else none).
    network: NetworkPolicy | None = None
    #: Limits of a job's command inside the guest (None: the image's, else stoker's defaults).
    job_pids_limit: int | None = Field(default=None, ge=1, le=1 << 22)
    job_memory_limit: JobMemoryMB | None = None
    #: Host-side limits of each VM's QEMU (its cgroup; see :mod:`stoker.isolation`).
    #: ``cpu.weight`` (1-10000; None: 100 per vCPU).
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)
    #: ``cpu.max`` in host CPUs (None: no quota).
    cpu_quota: float | None = Field(default=None, gt=0, le=4096)
    #: QEMU's own memory beyond the guest, MiB; under TCG its translation cache
    #: (1 GiB in QEMU 7.2) is added on top.
    memory_overhead: Annotated[int, _size("memory_overhead", 32)] = DEFAULT_OVERHEAD_MB
    #: ``pids.max``: QEMU's threads (one per vCPU, up to 64 block-layer workers) and helpers.
    pids_max: int = Field(default=DEFAULT_PIDS, ge=1, le=1_000_000)

    @field_validator("image")
    @classmethod
    def _image_or_flake(cls, value: str, info: ValidationInfo) -> str:
        return check_pool_image(value, info.context)

    @property
    def image_base(self) -> str | None:
        """The flake base the pool's image is built from (None: ``image`` names a built one)."""
        return self.image if is_flake_base(self.image) else None

    @property
    def image_name(self) -> str:
        """The image the pool's VMs boot: ``image``, or the name its flake base is built under."""
        return self.image if self.image_base is None else flake_image_name(self.image)

    @model_validator(mode="after")
    def _min_idle_within_max(self) -> PoolConfig:
        if self.min_idle > self.max:
            raise ValueError(f"min_idle ({self.min_idle}) cannot exceed max ({self.max})")
        # QEMU starts a main, an RCU and a vCPU thread per vCPU, and block-layer
        # workers on demand: fewer would make it fail to boot, not limit the guest.
        floor = self.cpus + MIN_PIDS_BEYOND_CPUS
        if self.pids_max < floor:
            raise ValueError(
                f"pids_max ({self.pids_max}) is too low for QEMU with {self.cpus} vCPUs: "
                f"expected at least {floor} (vCPUs + {MIN_PIDS_BEYOND_CPUS})"
            )
        return self

    def limit_policy(self) -> LimitPolicy:
        """The host-side limits of this pool's VMs."""
        return LimitPolicy(
            overhead_mb=self.memory_overhead,
            pids=self.pids_max,
            cpu_weight=self.cpu_weight,
            cpu_quota=self.cpu_quota,
        )


class TokenConfig(_Model):
    """An API token: its holder's name (the submitter) and what it may do."""

    name: Name
    sha256: Annotated[str, AfterValidator(_check_sha256)]
    scopes: Items[Scope] = ("read",)


class ServiceConfig(_Model):
    """The whole configuration of ``stoker serve`` (see the module docstring)."""

    state_dir: HostPath = Path("/var/lib/stoker")
    database_url: str = ""
    storage_dir: HostPath | None = None
    #: VM work directories; must be private to this service (stray VMs in it are killed).
    runtime_dir: HostPath | None = None
    #: Kernels, images and snapshots (shared with ``stoker run``).
    cache_dir: HostPath | None = None
    backend: Literal["qemu", "fake"] = "qemu"
    retry_limit: int = Field(default=3, ge=0, le=100)
    lease_seconds: Seconds = 15.0
    heartbeat_seconds: Seconds = 5.0
    shutdown_grace_seconds: Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)] = 60.0
    #: On SIGTERM: ``drain`` (running jobs get ``shutdown_grace_seconds`` to finish)
    #: or ``hand-over`` (jobs running a command are left running in their VMs for
    #: the next process, which takes them over: restarts and upgrades).
    on_stop: Literal["drain", "hand-over"] = "drain"
    poll_seconds: Seconds = 1.0
    listen: ListenConfig = Field(default_factory=ListenConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    limits: Limits = Field(default_factory=Limits)
    git: GitConfig = Field(default_factory=GitConfig)
    submitters: SubmittersConfig = Field(default_factory=SubmittersConfig)
    pools: dict[Name, PoolConfig] = Field(default_factory=lambda: {"default": PoolConfig()})
    tokens: Items[TokenConfig] = ()
    #: GitHub Actions runners for the pools (see :mod:`stoker.ci.github.config`).
    github: GitHubConfig | None = None
    #: GitLab runners for the pools (see :mod:`stoker.ci.gitlab.config`).
    gitlab: GitLabConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_database(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and not data.get("database_url"):
            state = data.get("state_dir", "/var/lib/stoker")
            base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
            if isinstance(state, str | Path) and state:
                path = Path(state)
                if not path.is_absolute() and isinstance(base, Path):
                    path = base / path
                if path.is_absolute():
                    return {**data, "database_url": f"sqlite:///{path}/stoker.db"}
        return data

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            # A relative SQLite path: relative to the configuration file, like every path here.
            base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
            if isinstance(base, Path):
                return f"sqlite:///{base / value.removeprefix('sqlite:///')}"
        if value.startswith("postgresql://"):
            # psycopg (version 3) is the driver stoker ships with.
            return "postgresql+psycopg://" + value.removeprefix("postgresql://")
        if not value.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError(
                "expected sqlite:////ABSOLUTE/PATH or postgresql://USER@HOST/DB, "
                f"got {_redact_url(value)!r}"
            )
        return value

    @field_validator("backend")
    @classmethod
    def _fake_only_for_tests(cls, value: str) -> str:
        if value == "fake" and os.environ.get(ALLOW_FAKE_ENV) != "1":
            raise ValueError(
                "the fake backend runs commands on this host, not in VMs: it exists for "
                f"tests only (set {ALLOW_FAKE_ENV}=1 to allow it)"
            )
        return value

    @field_validator("pools")
    @classmethod
    def _at_least_one_pool(cls, value: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        if not value:
            raise ValueError("no pools defined; expected at least one [pools.NAME] table")
        return value

    @field_validator("tokens")
    @classmethod
    def _unique_tokens(cls, value: tuple[TokenConfig, ...]) -> tuple[TokenConfig, ...]:
        seen: dict[str, int] = {}
        for index, token in enumerate(value):
            for key, what in ((token.name, "name"), (token.sha256, "sha256")):
                if key in seen:
                    raise ValueError(
                        f"tokens[{seen[key]}] and tokens[{index}] have the same {what}"
                    )
                seen[key] = index
        return value

    @model_validator(mode="after")
    def _fits_the_host(self) -> ServiceConfig:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of "
                f"lease_seconds ({self.lease_seconds:g}), or one late heartbeat loses every job"
            )
        budget = self.host
        for name, pool in self.pools.items():
            if pool.cpu_quota is not None and pool.cpu_quota > budget.cpus:
                raise ValueError(
                    f"pool {name!r} has cpu_quota {pool.cpu_quota:g}, more CPUs than this "
                    f"host has ({budget.cpus})"
                )
            if budget.vmm_user is not None and pool.snapshot != "never":
                raise ValueError(
                    f"pool {name!r} uses snapshots (snapshot = {pool.snapshot!r}) but QEMU runs "
                    f"as vmm_user {budget.vmm_user!r}: QEMU 7.2 needs write access to a "
                    "snapshot's shared memory file, so one VM could alter every clone; set "
                    'snapshot = "never" for this pool, or leave vmm_user unset'
                )
            if pool.cpus > budget.cpu_budget or pool.memory > budget.memory_budget_mb:
                raise ValueError(
                    f"pool {name!r} needs {pool.cpus} vCPUs and {pool.memory} MiB per VM, more "
                    f"than this host's budget ({budget.cpu_budget:g} vCPUs, "
                    f"{budget.memory_budget_mb:g} MiB)"
                )
        named: dict[str, tuple[str, str]] = {}
        for name, pool in self.pools.items():
            # Flake images are stored under a name from the attribute alone: two
            # flakes with one attribute name would overwrite each other's image.
            seen = named.setdefault(pool.image_name, (name, pool.image))
            if seen[1] != pool.image:
                raise ValueError(
                    f"pools {seen[0]!r} and {name!r} both run image {pool.image_name!r}, from "
                    f"{seen[1]!r} and {pool.image!r}; use one flake base or rename an attribute"
                )
        warm_cpus = sum(p.cpus * p.min_idle for p in self.pools.values())
        warm_mem = sum(p.memory * p.min_idle for p in self.pools.values())
        if warm_cpus > budget.cpu_budget or warm_mem > budget.memory_budget_mb:
            raise ValueError(
                f"the pools' min_idle VMs need {warm_cpus} vCPUs and {warm_mem} MiB, more than "
                f"this host's budget ({budget.cpu_budget:g} vCPUs, "
                f"{budget.memory_budget_mb:g} MiB)"
            )
        if self.github is not None:
            unknown = sorted(set(self.github.pools) - set(self.pools))
            if unknown:
                raise ValueError(
                    f"github.pools names {', '.join(unknown)}, not a [pools.NAME] of this "
                    f"file (pools: {', '.join(sorted(self.pools))})"
                )
        if self.gitlab is not None:
            unknown = sorted(set(self.gitlab.pools) - set(self.pools))
            if unknown:
                raise ValueError(
                    f"gitlab.pools names {', '.join(unknown)}, not a [pools.NAME] of this "
                    f"file (pools: {', '.join(sorted(self.pools))})"
                )
            for name in self.gitlab.pools:
                pool = self.pools[name]
                if pool.network is None:
                    # GitLab jobs clone from and report to GitLab, and by default nothing else.
                    policy = NetworkPolicy.model_validate(
                        {"mode": "egress", "allow": [self.gitlab.endpoint()]}
                    )
                    self.pools[name] = pool.model_copy(update={"network": policy})
        return self

    # resolved locations

    @property
    def dirs(self) -> Dirs:
        """Cache and runtime directories for the VMs (environment defaults unless configured)."""
        env = Dirs.from_env()
        return Dirs(cache=self.cache_dir or env.cache, runtime=self.runtime_dir or env.runtime)

    @property
    def jobs_dir(self) -> Path:
        """Where job sources and artifacts are stored (must be shared by all hosts)."""
        return self.storage_dir or self.state_dir / "jobs"

    @property
    def orphan_seconds(self) -> float:
        """How long a service VM waits for a host before ending itself.

        Shorter than the time before another host may take its job over (the
        lease, counted from the last renewal, which can be a heartbeat before the
        process died), so that a job never runs twice at once.
        """
        return max(1.0, self.lease_seconds - self.heartbeat_seconds - 1.0)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def isolation(self, pool: str) -> Isolation:
        """Host-side isolation of ``pool``'s VMs: its limits, the host's cgroup and VMM user."""
        host = self.host
        run_as = None if host.vmm_user is None else resolve_user(host.vmm_user, host.vmm_group)
        return Isolation(
            cgroups=host.cgroups,
            parent=Path(host.cgroup_parent) if host.cgroup_parent else Isolation.from_env().parent,
            policy=self.pools[pool].limit_policy(),
            run_as=run_as,
        )

    def pools_for(self, image: str) -> list[str]:
        """Names of the pools that run ``image`` (for a flake base: the name it is built under)."""
        return [name for name, pool in self.pools.items() if pool.image_name == image]


def _redact_url(url: str) -> str:
    """``url`` without a password (database and git URLs may carry one)."""
    return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)


# --- loading ------------------------------------------------------------------------------------


def load_config(path: Path) -> ServiceConfig:
    """Read ``path``; raise :class:`UsageError` naming the line and key of every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"configuration file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read configuration file {path}: {exc}") from None
    return parse_config_text(text, origin=path)


def parse_config_text(text: str, *, origin: Path) -> ServiceConfig:
    """Parse a configuration text; relative paths are relative to ``origin``'s directory."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{origin}: invalid TOML: {exc}", hint="see https://toml.io") from None
    try:
        return ServiceConfig.model_validate(
            document, context={"base_dir": origin.parent.absolute()}
        )
    except ValidationError as exc:
        locator = _Locator(text)
        problems = sorted(
            {_format(origin, locator, err) for err in exc.errors()},
            key=lambda p: (p[0] or 0, p[1]),
        )
        lines = [line for _, line in problems]
        message = (
            lines[0]
            if len(lines) == 1
            else f"{origin}: {len(lines)} problems\n  " + ("\n  ".join(lines))
        )
        raise UsageError(message, hint="the format is described in stoker.service.config") from None


def _format(origin: Path, locator: _Locator, error: ErrorDetails) -> tuple[int | None, str]:
    loc: KeyPath = tuple(error["loc"])
    if loc and loc[-1] == "[key]":  # a bad key of a table (pools, overrides): point at the key
        loc = loc[:-1]
    line = locator.line_of(loc) if loc else None
    where = f"{origin}:{line}" if line is not None else str(origin)
    key = f"{_key_path(loc)}: " if loc else ""
    return line, f"{where}: {key}{_describe(error, loc, ServiceConfig)}"
