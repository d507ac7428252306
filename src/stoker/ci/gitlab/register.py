"""Register one GitLab runner per configured pool, and keep gitlab-runner's file in step.

:func:`register` makes what exists match ``[gitlab.pools]`` (it is
idempotent: a second run changes nothing):

* a pool with no stored runner gets one (``POST /user/runners``: the pool's
  runner type, target, tags, ``run_untagged``...); its ``glrt-`` token is
  saved at once in the state file (mode 0600): GitLab shows it only once;
* a stored runner is verified (``POST /runners/verify``); one GitLab has
  removed, or whose settings changed in the configuration, is replaced;
* runners of pools no longer configured are deleted (``DELETE /runners/:id``);
* gitlab-runner's ``config.toml`` gets a ``[[runners]]`` entry per pool
  (custom executor calling ``stoker gitlab-executor`` against this service,
  ``limit`` = the pool's ``max``), entries of removed pools go, everything
  else in the file is left as it was, and the file is only written when it
  changes.

:func:`unregister` deletes every runner this configuration registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stoker.ci.gitlab.client import GitLabClient
from stoker.ci.gitlab.config import GitLabConfig, GitLabPool
from stoker.ci.gitlab.runner_config import CustomSection, RunnerEntry
from stoker.ci.gitlab.runner_config import load as load_runner_config
from stoker.errors import UsageError

Say = Callable[[str], None]


@dataclass
class StoredRunner:
    """A runner this configuration created (what GitLab told us once)."""

    pool: str
    id: int
    token: str
    system_id: str
    #: Digest of the settings it was created with (a change means a new runner).
    settings: str
    created_at: float = field(default_factory=time.time)


@dataclass
class Report:
    """What a registration pass did, per pool."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    config_written: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.created or self.replaced or self.deleted or self.config_written)


class RunnerStore:
    """The state file: the runners' ids and tokens (mode 0600, written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, StoredRunner]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"the GitLab runner state {self.path} is unreadable: {exc}") from None
        try:
            return {name: StoredRunner(**item) for name, item in data["runners"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"the GitLab runner state {self.path} is malformed: {exc}") from None

    def save(self, runners: dict[str, StoredRunner]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"runners": {k: asdict(v) for k, v in sorted(runners.items())}}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)


def settings_digest(config: GitLabConfig, pool: GitLabPool, description: str) -> str:
    """What a runner was created with: GitLab instance, target, tags and options."""
    document = {"url": config.url, "description": description, **pool.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def description_of(pool_name: str, pool: GitLabPool, host: str) -> str:
    """The runner's description in GitLab (also how an operator recognises it)."""
    return pool.description or f"stoker {pool_name} ({host})"


def executor_args(
    config: GitLabConfig, pool: str, service_url: str, token_file: Path, stage: str
) -> list[str]:
    """``stoker gitlab-executor`` arguments gitlab-runner passes for ``stage`` (pure)."""
    # fmt: off
    return [
        "gitlab-executor",
        "--service", service_url,
        "--token-file", str(token_file),
        "--pool", pool,
        "--builds-dir", config.builds_dir,
        "--cache-dir", config.cache_dir,
        "--prepare-timeout", f"{config.prepare_timeout:g}s",
        stage,
    ]
    # fmt: on


def runner_entry(
    config: GitLabConfig,
    pool: str,
    stored: StoredRunner,
    *,
    limit: int,
    stoker: str,
    service_url: str,
    token_file: Path,
) -> RunnerEntry:
    """The ``[[runners]]`` entry of ``pool``'s runner (pure)."""

    def args(stage: str) -> list[str]:
        return executor_args(config, pool, service_url, token_file, stage)

    return RunnerEntry(  # noqa: S604 (shell is gitlab-runner's setting, not a subprocess)
        name=config.runner_name(pool),
        url=config.url,
        token=stored.token,
        executor="custom",
        builds_dir=config.builds_dir,
        cache_dir=config.cache_dir,
        shell="bash",
        limit=limit,
        custom=CustomSection(
            config_exec=stoker,
            config_args=args("config"),
            prepare_exec=stoker,
            prepare_args=args("prepare"),
            run_exec=stoker,
            run_args=args("run"),
            cleanup_exec=stoker,
            cleanup_args=args("cleanup"),
            # prepare waits for a VM itself and fails cleanly first.
            prepare_exec_timeout=int(config.prepare_timeout) + 60,
            config_exec_timeout=60,
            cleanup_exec_timeout=120,
            graceful_kill_timeout=30,
            force_kill_timeout=30,
        ),
    )


def default_stoker() -> str:
    """The stoker executable gitlab-runner should run (this one)."""
    found = shutil.which("stoker")
    if found:
        return str(Path(found).resolve())
    return str(Path(sys.argv[0]).resolve())


@dataclass(frozen=True)
class Registrar:
    """Everything a registration pass needs besides GitLab itself."""

    config: GitLabConfig
    #: Pool name -> its ``max`` (the runner's ``limit``).
    limits: dict[str, int]
    service_url: str
    state_file: Path
    host: str = field(default_factory=lambda: os.uname().nodename)
    stoker: str = field(default_factory=default_stoker)

    def token_file(self) -> Path:
        if self.config.service_token_file is None:
            raise UsageError(
                "gitlab.service_token_file is not set: the executor needs a token of this "
                "service with the submit and read scopes",
                hint="make one with `stoker token new gitlab --scope submit --scope read`",
            )
        return self.config.service_token_file


async def register(registrar: Registrar, client: GitLabClient, say: Say) -> Report:
    """Make GitLab and gitlab-runner's file match the configuration (idempotent)."""
    config = registrar.config
    token_file = registrar.token_file()
    store = RunnerStore(registrar.state_file)
    runners = store.load()
    report = Report()
    for name, pool in sorted(config.pools.items()):
        description = description_of(name, pool, registrar.host)
        wanted = settings_digest(config, pool, description)
        stored = runners.get(name)
        if stored is not None and stored.settings == wanted:
            if await client.verify_runner(stored.token, stored.system_id):
                report.kept.append(name)
                continue
            say(f"pool {name}: GitLab no longer knows runner {stored.id}; creating another")
        elif stored is not None:
            say(f"pool {name}: its settings changed; replacing runner {stored.id}")
            await client.delete_runner(stored.id)
        created = await client.create_runner(
            runner_type=pool.runner_type,
            group_id=pool.group_id,
            project_id=pool.project_id,
            description=description,
            tags=list(pool.tags),
            run_untagged=pool.run_untagged,
            locked=pool.locked,
            paused=pool.paused,
            access_level=pool.access_level,
            maximum_timeout=int(pool.maximum_timeout) if pool.maximum_timeout else None,
        )
        runners[name] = StoredRunner(
            pool=name,
            id=created.id,
            token=created.token,
            system_id=stored.system_id if stored is not None else "s_" + secrets.token_hex(6),
            settings=wanted,
        )
        # GitLab shows the token once: keep it before anything else can fail.
        store.save(runners)
        (report.replaced if stored is not None else report.created).append(name)
        say(f"pool {name}: registered runner {created.id} for {pool.target}")
    for name in sorted(set(runners) - set(config.pools)):
        gone = runners[name]
        if await client.delete_runner(gone.id):
            say(f"pool {name} is no longer configured: deleted runner {gone.id}")
        del runners[name]
        store.save(runners)
        report.deleted.append(name)
    report.config_written = write_runner_config(registrar, runners, token_file, report.deleted)
    if report.config_written:
        say(f"updated {config.runner_config}")
    return report


def write_runner_config(
    registrar: Registrar,
    runners: dict[str, StoredRunner],
    token_file: Path,
    removed: list[str],
) -> bool:
    """Bring gitlab-runner's file in step with ``runners``; whether it was written.

    Only entries of this configuration's pools are touched (``removed``: pools
    whose runners were deleted); the user's other runners stay as they are.
    """
    config = registrar.config
    document = load_runner_config(config.runner_config)
    total = 0
    for name, stored in runners.items():
        limit = registrar.limits.get(name, 1)
        total += limit
        document.upsert(
            runner_entry(
                config,
                name,
                stored,
                limit=limit,
                stoker=registrar.stoker,
                service_url=registrar.service_url,
                token_file=token_file,
            )
        )
    for name in removed:
        document.remove(config.runner_name(name))
    document.ensure_concurrent(max(total, 1))
    return bool(document.save(config.runner_config))


async def unregister(registrar: Registrar, client: GitLabClient, say: Say) -> Report:
    """Delete every runner this configuration registered, and their config.toml entries."""
    store = RunnerStore(registrar.state_file)
    runners = store.load()
    report = Report()
    for name, stored in sorted(runners.items()):
        if await client.delete_runner(stored.id):
            say(f"deleted runner {stored.id} (pool {name})")
        else:
            say(f"runner {stored.id} (pool {name}) was already gone from GitLab")
        del runners[name]
        store.save(runners)
        report.deleted.append(name)
    document = load_runner_config(registrar.config.runner_config)
    for name in report.deleted:
        document.remove(registrar.config.runner_name(name))
    with contextlib.suppress(FileNotFoundError):
        report.config_written = bool(document.save(registrar.config.runner_config))
    return report
