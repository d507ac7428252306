"""Records and helpers of :mod:`stoker.ci.gitlab.fake_gitlab` (a **fake** GitLab; tests only)."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response

API = "/api/v4"
#: Largest body of an ordinary API call (trace patches have their own bound).
MAX_BODY = 1 << 20
#: Default bound of one job's trace (GitLab's instance limit is configurable too).
MAX_TRACE = 64 << 20
RUNNER_TYPES = ("instance_type", "group_type", "project_type")
ACCESS_LEVELS = ("not_protected", "ref_protected")
NULL_SHA = "0" * 40
_CHECKSUM_RE = re.compile(r"crc32:([0-9a-fA-F]{8})")
_RANGE_RE = re.compile(r"(\d{1,15})-(\d{1,15})")
_FINAL_STATES = ("success", "failed")


@dataclass
class FakeToken:
    """A personal access token of the fake: its scopes and whether its user is an admin."""

    value: str = field(repr=False)
    scopes: frozenset[str]
    admin: bool = False


@dataclass
class FakeGroup:
    """A group (namespace) of the fake: runners of ``group_type`` belong to one."""

    id: int
    path: str


@dataclass
class FakeProject:
    """A project of the fake; ``repo_dir`` is a bare repository served over dumb HTTP."""

    id: int
    path: str
    repo_dir: Path | None = None

    @property
    def name(self) -> str:
        """The last component of the path (GitLab's ``CI_PROJECT_NAME``)."""
        return self.path.rsplit("/", 1)[-1]


@dataclass
class FakeGitLabRunner:
    """A runner created through ``POST /user/runners``."""

    id: int
    type: str
    # repr=False: a failing assertion's message must not print credentials.
    token: str = field(repr=False)
    tags: list[str]
    run_untagged: bool
    description: str = ""
    paused: bool = False
    locked: bool = False
    access_level: str = "not_protected"
    maximum_timeout: int | None = None
    maintenance_note: str = ""
    group_id: int | None = None
    project_id: int | None = None
    #: system_id -> when it last contacted the fake (``time.time()``).
    system_ids: dict[str, float] = field(default_factory=dict)
    #: When the runner last contacted the fake (verify or job requests).
    contacted_at: float | None = None
    deleted: bool = False


@dataclass
class FakeGitLabJob:
    """A CI job queued by a test; ``state`` is pending/running/success/failed/canceled."""

    id: int
    project_id: int
    script: list[str]
    tags: list[str]
    variables: dict[str, str]
    after_script: list[str] | None
    name: str
    stage: str
    timeout: int
    sha: str
    ref: str
    pipeline_id: int
    token: str = field(repr=False)
    state: str = "pending"
    runner_id: int | None = None
    exit_code: int | None = None
    failure_reason: str | None = None
    trace: bytes = field(default=b"", repr=False)


@dataclass
class _Fault:
    method: str
    prefix: str
    status: int
    count: int
    retry_after: int | None


class _BadRequest(Exception):
    """A malformed parameter: GitLab (Grape) answers 400 ``{"error": ...}``."""


def _message(
    status: int, text: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    if text is None:
        # Injected faults may use any status, even one without a standard phrase.
        try:
            text = f"{status} {HTTPStatus(status).phrase}"
        except ValueError:
            text = f"{status} Error"
    return JSONResponse({"message": text}, status_code=status, headers=dict(headers or {}))


def _bad(text: str) -> Response:
    return JSONResponse({"error": text}, status_code=400)


def _str(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise _BadRequest(f"{key} is invalid")
    return str(value)


def _int(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _BadRequest(f"{key} is invalid")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        return int(value)
    raise _BadRequest(f"{key} is invalid")


def _bool(params: Mapping[str, Any], key: str) -> bool | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    # Grape's Boolean coercion of form values.
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "t", "y"):
        return True
    if text in ("false", "0", "no", "f", "n"):
        return False
    raise _BadRequest(f"{key} is invalid")


def _tags(raw: Any) -> list[str]:
    """``tag_list`` as a JSON array or a comma-separated string, as a clean list."""
    items: list[Any] = raw if isinstance(raw, list) else [raw]
    tags: list[str] = []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, str):
            raise _BadRequest("tag_list is invalid")
        for tag in item.split(","):
            tag = tag.strip()
            if tag and tag not in tags:
                tags.append(tag)
    return tags


def _crc32(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"
