"""The ``[gitlab]`` table of ``stoker.toml``: where runners are registered, for which pools.

Example (every optional key with its default)::

    [gitlab]
    url = "https://gitlab.example.com"
    token_file = "gitlab-token"          # an access token with the create_runner scope
                                         # (and manage_runner, to delete runners)
    runner_config = "/etc/gitlab-runner/config.toml"   # gitlab-runner's file we keep
    # state_file = "<state_dir>/gitlab-runners.json"   # the runners' tokens (mode 0600)
    # stoker = "/usr/local/bin/stoker"   # what gitlab-runner runs (default: this stoker)
    # service_url = "http://127.0.0.1:8765"  # how the driver reaches this service
    #                                        # (default: the [listen] address)
    service_token_file = "gitlab-executor-token"   # a token with submit and read scopes
    builds_dir = "/builds"               # in the guest
    cache_dir = "/cache"
    register_on_start = true             # `stoker serve` registers and verifies at start

    [gitlab.pools.linux]                 # names a [pools.NAME] of this file
    runner_type = "project_type"         # instance_type | group_type | project_type
    project_id = 42                      # group_type: group_id = 7
    tags = ["stoker", "linux"]           # the job tags this pool's runner takes
    run_untagged = false
    # locked = false, paused = false, access_level = "not_protected",
    # maximum_timeout = "1h", description = "stoker linux (HOST)"

Every pool named here gets one GitLab runner whose jobs run through
``stoker gitlab-executor`` in that pool's VMs; its ``limit`` in
gitlab-runner's ``config.toml`` is the pool's ``max``.  A pool without a
``network`` of its own may reach GitLab's host and nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from stoker.fields import HostPath, Name, Seconds
from stoker.images.spec import Items

_TAG_RE = re.compile(r"[^,\s][^,]{0,254}")


def _check_tag(value: str) -> str:
    # GitLab splits tag strings on commas and strips them.
    if not _TAG_RE.fullmatch(value) or value != value.strip():
        raise ValueError(f"expected a runner tag (no commas, no surrounding spaces), got {value!r}")
    return value


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"expected GitLab's URL as https://HOST[/PATH], got {value!r}")
    if parts.username or parts.password:
        raise ValueError("GitLab's URL must not carry credentials (use token_file)")
    return value.rstrip("/")


def _check_guest_dir(value: str) -> str:
    if not value.startswith("/") or ".." in value.split("/") or "\0" in value:
        raise ValueError(f"expected an absolute guest path, got {value!r}")
    return value


Tag = Annotated[str, AfterValidator(_check_tag)]
GuestDir = Annotated[str, AfterValidator(_check_guest_dir)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GitLabPool(_Model):
    """The GitLab runner of one pool: where it is registered and which jobs it takes."""

    runner_type: Literal["instance_type", "group_type", "project_type"]
    group_id: int | None = Field(default=None, ge=1)
    project_id: int | None = Field(default=None, ge=1)
    tags: Annotated[Items[Tag], Field(max_length=50)] = ()
    run_untagged: bool = False
    locked: bool = False
    paused: bool = False
    access_level: Literal["not_protected", "ref_protected"] = "not_protected"
    maximum_timeout: Seconds | None = None
    description: str | None = Field(default=None, max_length=250)

    @model_validator(mode="after")
    def _target(self) -> GitLabPool:
        if self.runner_type == "group_type" and self.group_id is None:
            raise ValueError("runner_type group_type needs group_id")
        if self.runner_type == "project_type" and self.project_id is None:
            raise ValueError("runner_type project_type needs project_id")
        if self.runner_type != "group_type" and self.group_id is not None:
            raise ValueError(f"group_id is for runner_type group_type, not {self.runner_type}")
        if self.runner_type != "project_type" and self.project_id is not None:
            raise ValueError(f"project_id is for runner_type project_type, not {self.runner_type}")
        if not self.tags and not self.run_untagged:
            raise ValueError("a runner without tags must set run_untagged = true (else no job)")
        if self.maximum_timeout is not None and self.maximum_timeout < 600:
            raise ValueError("maximum_timeout must be at least 10 minutes (GitLab's minimum)")
        return self

    @property
    def target(self) -> str:
        """``instance``, ``group 7`` or ``project 42`` (for messages)."""
        if self.runner_type == "group_type":
            return f"group {self.group_id}"
        if self.runner_type == "project_type":
            return f"project {self.project_id}"
        return "the instance"


class GitLabConfig(_Model):
    """The whole ``[gitlab]`` table (see the module docstring)."""

    url: Annotated[str, AfterValidator(_check_url)]
    token_file: HostPath
    runner_config: HostPath = Path("/etc/gitlab-runner/config.toml")
    state_file: HostPath | None = None
    stoker: HostPath | None = None
    service_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+/?$")
    service_token_file: HostPath | None = None
    builds_dir: GuestDir = "/builds"
    cache_dir: GuestDir = "/cache"
    register_on_start: bool = True
    prepare_timeout: Seconds = 600.0
    pools: Annotated[dict[Name, GitLabPool], Field(min_length=1)]

    def endpoint(self) -> str:
        """``host:port`` of the GitLab instance (what job VMs must reach)."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def runner_name(self, pool: str) -> str:
        """The ``[[runners]]`` name of ``pool``'s runner in gitlab-runner's file."""
        return f"stoker-{pool}"
