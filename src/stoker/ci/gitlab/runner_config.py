"""gitlab-runner's ``config.toml``: our ``[[runners]]`` entries, the rest left alone.

Edited with tomlkit so that comments, key order and the user's other
runners survive.  An entry is matched by ``name``; only the keys stoker owns
are set (the user's additions to that entry, say a ``[runners.cache]``
table, stay).  The file holds runner tokens: it is written atomically with
mode 0600, and only when its text changes, so registering twice leaves it
untouched (its modification time included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Table

from stoker.errors import UsageError


@dataclass(frozen=True)
class CustomSection:
    """``[runners.custom]``: the driver's executables, arguments and deadlines."""

    config_exec: str
    config_args: list[str]
    prepare_exec: str
    prepare_args: list[str]
    run_exec: str
    run_args: list[str]
    cleanup_exec: str
    cleanup_args: list[str]
    config_exec_timeout: int = 60
    prepare_exec_timeout: int = 3600
    cleanup_exec_timeout: int = 3600
    graceful_kill_timeout: int = 600
    force_kill_timeout: int = 600


@dataclass(frozen=True)
class RunnerEntry:
    """One ``[[runners]]`` entry as stoker writes it."""

    name: str
    url: str
    token: str
    builds_dir: str
    cache_dir: str
    custom: CustomSection
    executor: str = "custom"
    shell: str = "bash"
    limit: int = 1
    request_concurrency: int = 1
    environment: list[str] = field(default_factory=list)

    def keys(self) -> dict[str, Any]:
        """The top-level keys of the entry (without ``custom``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "token": self.token,
            "executor": self.executor,
            "builds_dir": self.builds_dir,
            "cache_dir": self.cache_dir,
            "shell": self.shell,
            "limit": self.limit,
            "request_concurrency": self.request_concurrency,
        }
        if self.environment:
            out["environment"] = list(self.environment)
        return out


class RunnerConfig:
    """A parsed ``config.toml`` (see :func:`load`)."""

    def __init__(self, document: tomlkit.TOMLDocument, original: str, path: Path) -> None:
        self._doc = document
        self._original = original
        self._path = path

    def _runners(self, create: bool = False) -> AoT | None:
        runners = self._doc.get("runners")
        if runners is None:
            if not create:
                return None
            runners = tomlkit.aot()
            self._doc.append("runners", runners)
            return runners
        if isinstance(runners, list) and not runners:
            # `runners = []` (an earlier tomlkit-written file): no runners, an array of tables.
            del self._doc["runners"]
            return self._runners(create)
        if not isinstance(runners, AoT):
            raise UsageError(f"{self._path}: 'runners' must be an array of tables ([[runners]])")
        return runners

    def names(self) -> list[str]:
        """The ``name`` of every ``[[runners]]`` entry, in order."""
        runners = self._runners()
        return [str(t.get("name", "")) for t in runners] if runners is not None else []

    def get(self, name: str) -> dict[str, Any] | None:
        """The entry called ``name`` as plain data (None: no such entry)."""
        runners = self._runners()
        for table in runners or []:
            if table.get("name") == name:
                return dict(table.unwrap())
        return None

    def upsert(self, entry: RunnerEntry) -> bool:
        """Add or update ``entry``; whether anything changed."""
        runners = self._runners(create=True)
        assert runners is not None
        table: Table | None = next((t for t in runners if t.get("name") == entry.name), None)
        before = tomlkit.dumps(self._doc)
        if table is None:
            table = tomlkit.table()
            runners.append(table)
            table = runners[-1]
        for key, value in entry.keys().items():
            if table.get(key) != value:
                table[key] = value
        custom = table.get("custom")
        if not isinstance(custom, Table):
            custom = tomlkit.table()
            table["custom"] = custom
            custom = table["custom"]
        for key, value in entry.custom.__dict__.items():
            if custom.get(key) != value:
                custom[key] = value
        return tomlkit.dumps(self._doc) != before

    def remove(self, name: str) -> bool:
        """Remove the entry called ``name``; whether there was one."""
        runners = self._runners()
        if runners is None:
            return False
        for index, table in enumerate(runners):
            if table.get("name") == name:
                del runners[index]
                if not len(runners):
                    # An empty array of tables would be written as `runners = []`.
                    del self._doc["runners"]
                return True
        return False

    def ensure_concurrent(self, minimum: int) -> bool:
        """Raise the global ``concurrent`` to at least ``minimum`` (never lower it)."""
        current = self._doc.get("concurrent", 1)
        if isinstance(current, int) and current >= minimum:
            return False
        if "concurrent" in self._doc:
            self._doc["concurrent"] = minimum
        else:
            # gitlab-runner's own files start with the global keys.
            self._doc.body.insert(0, (tomlkit.key("concurrent"), tomlkit.item(minimum)))
        return True

    def text(self) -> str:
        return tomlkit.dumps(self._doc)

    def save(self, path: Path | None = None) -> bool:
        """Write atomically, mode 0600, if the text changed; whether it was written."""
        target = path or self._path
        text = self.text()
        if text == self._original and target.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._original = text
        return True


def load(path: Path) -> RunnerConfig:
    """Parse ``path`` (a missing file is an empty configuration)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read gitlab-runner's configuration {path}: {exc}") from None
    try:
        document = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise UsageError(
            f"{path}: invalid TOML: {exc}",
            hint="fix gitlab-runner's config.toml (gitlab-runner itself would refuse it too)",
        ) from None
    config = RunnerConfig(document, text, path)
    config.names()  # a [[runners]] that is not an array of tables fails here, with the file
    return config
