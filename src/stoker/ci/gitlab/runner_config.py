"""gitlab-runner's ``config.toml``: our ``[[runners]]`` entries, the rest left alone.

Edited with tomlkit so that comments, key order and the user's other runners
survive.  An entry is matched by ``name``; only the keys stoker owns are set
(the user's additions to that entry, say a ``[runners.cache]`` table, stay).
The file holds runner tokens: it is written atomically (a temporary file in
the same directory, fsynced, renamed over) with mode 0600, and only when its
text changes, so registering twice leaves it untouched, modification time
included.

The format (gitlab-runner's "advanced configuration")::

    concurrent = 4                 # global: jobs at once over all runners (default 1)

    [[runners]]
      name = "stoker-linux"
      url = "https://gitlab.example.com"
      token = "glrt-..."
      executor = "custom"
      builds_dir = "/builds"
      cache_dir = "/cache"
      shell = "bash"
      limit = 4                    # jobs at once for this runner (0: no limit)
      request_concurrency = 1
      environment = ["A=b"]
      [runners.custom]
        config_exec = "/usr/local/bin/stoker"
        config_args = ["gitlab-executor", ..., "config"]
        ...
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, InlineTable, Item, Table

from stoker.errors import UsageError

#: The file's mode: it holds runner tokens.
MODE = 0o600


@dataclass(frozen=True)
class CustomSection:
    """``[runners.custom]``: the driver's executables, arguments and deadlines (seconds)."""

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

    def keys(self) -> dict[str, Any]:
        """The section's keys as TOML values (pure)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RunnerEntry:
    """One ``[[runners]]`` entry as stoker writes it (the keys stoker owns)."""

    name: str
    url: str
    # repr=False: an entry in a log line or traceback must not show the runner token.
    token: str = field(repr=False)
    builds_dir: str
    cache_dir: str
    custom: CustomSection
    executor: str = "custom"
    shell: str = "bash"
    limit: int = 1
    request_concurrency: int = 1
    environment: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            raise UsageError("a gitlab-runner entry needs a name")
        if self.limit < 0:
            raise UsageError(f"runner {self.name}: limit must be 0 (no limit) or more")
        if self.request_concurrency < 1:
            raise UsageError(f"runner {self.name}: request_concurrency must be at least 1")

    def keys(self) -> dict[str, Any]:
        """The entry's top-level keys (without ``custom``) as TOML values (pure).

        ``environment`` is left out when empty (gitlab-runner's own files omit it).
        """
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


def read_entry(data: Mapping[str, Any]) -> RunnerEntry:
    """A :class:`RunnerEntry` from one ``[[runners]]`` table as plain data (pure).

    Keys stoker does not own are ignored; a missing or mistyped owned key is a
    :class:`UsageError` naming it.
    """
    name = data.get("name", "?")
    custom = data.get("custom")
    if not isinstance(custom, Mapping):
        raise UsageError(f"runner {name}: no [runners.custom] table")
    section = CustomSection(**_fields_of(CustomSection, custom, f"runner {name}: custom."))
    return RunnerEntry(**_fields_of(RunnerEntry, data, f"runner {name}: "), custom=section)


#: The TOML types of the dataclasses' fields (their annotations are strings here).
_TYPES: dict[str, type] = {"str": str, "int": int, "list[str]": list}


def _fields_of(cls: type[Any], data: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in fields(cls):
        if spec.name == "custom":
            continue
        if spec.name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise UsageError(f"{where}{spec.name} is missing")
            continue
        value: Any = data[spec.name]
        if isinstance(value, list):
            ok = spec.type == "list[str]" and all(isinstance(v, str) for v in value)
            value = list(value)
        else:
            ok = isinstance(value, _TYPES[str(spec.type)]) and not isinstance(value, bool)
        if not ok:
            raise UsageError(f"{where}{spec.name} should be a {spec.type}, not {value!r:.40}")
        out[spec.name] = value
    return out


def _same(current: Any, wanted: Any) -> bool:
    """Equal with the same TOML type (``limit = 1.0`` or ``true`` is not ``1``)."""
    if isinstance(wanted, list):
        return (
            isinstance(current, list)
            and len(current) == len(wanted)
            and all(_same(c, w) for c, w in zip(current, wanted, strict=True))
        )
    if isinstance(wanted, bool) or isinstance(current, bool):
        return isinstance(current, bool) and isinstance(wanted, bool) and current == wanted
    return isinstance(current, type(wanted)) and bool(current == wanted)


def _child_indent(table: Table | InlineTable, default: str) -> str:
    """The indentation of ``table``'s keys (gitlab-runner's files indent by two)."""
    if isinstance(table, Table):
        for key, item in table.value.body:
            if key is not None and not isinstance(item, Table | AoT):
                return str(item.trivia.indent)
    return default


def _put(table: Table | InlineTable, key: str, value: Any, indent: str) -> None:
    """Set ``key`` unless it already holds ``value``; a new key gets ``indent``."""
    if _same(table.get(key), value):
        return
    new = key not in table
    # Replacing keeps the old value's indentation and comment.
    table[key] = value
    if new and isinstance(table, Table):
        item = table.value.item(key)
        if isinstance(item, Item):
            item.trivia.indent = indent


class RunnerConfig:
    """A parsed ``config.toml`` (see :func:`load`); edits keep everything else as it was."""

    def __init__(self, document: tomlkit.TOMLDocument, original: str, path: Path) -> None:
        self._doc = document
        self._original = original
        self._path = path

    @property
    def path(self) -> Path:
        """The file this configuration was read from."""
        return self._path

    def _runners(self, create: bool = False) -> AoT | None:
        runners = self._doc.get("runners")
        if runners is None:
            if not create:
                return None
            runners = tomlkit.aot()
            self._doc.append("runners", runners)
            return runners
        if isinstance(runners, list) and not isinstance(runners, AoT) and not runners:
            # `runners = []` (an earlier tomlkit-written file): no runners, an array of tables.
            del self._doc["runners"]
            return self._runners(create)
        if not isinstance(runners, AoT):
            raise UsageError(f"{self._path}: 'runners' must be an array of tables ([[runners]])")
        return runners

    def names(self) -> list[str]:
        """The ``name`` of every ``[[runners]]`` entry, in order."""
        return [str(t.get("name", "")) for t in self._runners() or []]

    def entries(self) -> list[dict[str, Any]]:
        """Every ``[[runners]]`` entry as plain data, in order (ours and the user's)."""
        return [dict(t.unwrap()) for t in self._runners() or []]

    def get(self, name: str) -> dict[str, Any] | None:
        """The entry called ``name`` as plain data (None: no such entry)."""
        for table in self._runners() or []:
            if table.get("name") == name:
                return dict(table.unwrap())
        return None

    def upsert(self, entry: RunnerEntry) -> bool:
        """Add or update the entry called ``entry.name``; whether anything changed.

        Only the keys stoker owns are written, and only those whose value
        differs; the entry's other keys and tables (``[runners.cache]``...) stay.
        Later entries with the same name (a copy gitlab-runner would also run,
        with a stale token) are removed.
        """
        runners = self._runners(create=True)
        assert runners is not None
        before = self.text()
        matches = [i for i, t in enumerate(runners) if t.get("name") == entry.name]
        for index in reversed(matches[1:]):
            del runners[index]
        if matches:
            table = runners[matches[0]]
        else:
            runners.append(tomlkit.table())
            table = runners[-1]
        indent = _child_indent(table, "  ")
        for key, value in entry.keys().items():
            _put(table, key, value, indent)
        if not entry.environment and "environment" in table:
            del table["environment"]
        custom = table.get("custom")
        if not isinstance(custom, Table | InlineTable):
            if "custom" in table:
                del table["custom"]
            table["custom"] = tomlkit.table()
            custom = table["custom"]
            custom.trivia.indent = indent
        inner = _child_indent(custom, indent + "  ")
        for key, value in entry.custom.keys().items():
            _put(custom, key, value, inner)
        return self.text() != before

    def remove(self, name: str) -> bool:
        """Remove every entry called ``name``; whether there was one."""
        runners = self._runners()
        if runners is None:
            return False
        matches = [i for i, t in enumerate(runners) if t.get("name") == name]
        for index in reversed(matches):
            del runners[index]
        if matches and not len(runners):
            # An empty array of tables would be written as `runners = []`.
            del self._doc["runners"]
        return bool(matches)

    def ensure_concurrent(self, minimum: int) -> bool:
        """Raise the global ``concurrent`` to at least ``minimum`` (never lower it).

        gitlab-runner's default is 1: an absent key counts as 1.  Whether it changed.
        """
        current = self._doc.get("concurrent", 1)
        if isinstance(current, int) and not isinstance(current, bool) and current >= minimum:
            return False
        if "concurrent" in self._doc:
            self._doc["concurrent"] = minimum
        else:
            # gitlab-runner's own files start with the global keys, before any table.
            item = tomlkit.item(minimum)
            if self._doc.body and isinstance(self._doc.body[0][1], Table | AoT):
                item.trivia.trail = "\n\n"  # a blank line before the first table
            self._doc.body.insert(0, (tomlkit.key("concurrent"), item))
        return True

    def text(self) -> str:
        """The document as it would be written."""
        return tomlkit.dumps(self._doc)

    def save(self, path: Path | None = None) -> bool:
        """Write to ``path`` (default: where it was read) if its text differs; whether it was.

        Atomic (a temporary file in the same directory, fsynced, renamed over
        the old one, the directory fsynced), mode 0600, owner kept when run as
        root.  An unchanged file is not touched, except that a mode letting
        others read it is tightened to 0600.
        """
        target = path or self._path
        data = self.text().encode("utf-8")
        try:
            old = target.stat()
            unchanged = target.read_bytes() == data
        except FileNotFoundError:
            old, unchanged = None, not data
        except OSError:
            old, unchanged = None, False
        if unchanged:
            if old is not None and old.st_mode & 0o777 != MODE:
                target.chmod(MODE)
            if target == self._path:
                self._original = self.text()
            return False
        _write_atomically(target, data, owner=(old.st_uid, old.st_gid) if old else None)
        if target == self._path:
            self._original = self.text()
        return True

    @property
    def changed(self) -> bool:
        """Whether the document differs from the text it was read from."""
        return self.text() != self._original


def _write_atomically(target: Path, data: bytes, *, owner: tuple[int, int] | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp: mode 0600 from the start, a name no other writer picks.
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if owner is not None and os.geteuid() == 0:
                # gitlab-runner may run as its own user: the new file keeps the old owner.
                os.fchown(fh.fileno(), *owner)
            os.fchmod(fh.fileno(), MODE)
            os.fsync(fh.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself survives a crash only once the directory is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def parse(text: str, path: Path) -> RunnerConfig:
    """A :class:`RunnerConfig` from ``text`` (``path``: where it is from, for messages)."""
    try:
        document = tomlkit.parse(text)
    except TOMLKitError as exc:
        # tomlkit's message carries the line and column ("... at line 2 col 10").
        raise UsageError(
            f"{path}: invalid TOML: {exc}",
            hint="fix gitlab-runner's config.toml (gitlab-runner itself would refuse it too)",
        ) from None
    config = RunnerConfig(document, text, path)
    config.names()  # a `runners` that is not an array of tables fails here, naming the file
    return config


def load(path: Path) -> RunnerConfig:
    """Parse ``path`` (a missing file is an empty configuration)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read gitlab-runner's configuration {path}: {exc}") from None
    return parse(text, path)
