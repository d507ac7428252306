"""The ``[github]`` table of ``stoker.toml``: credentials, targets and the pools' labels.

Example (every optional key with its default)::

    [github]
    api_url = "https://api.github.com"        # GitHub Enterprise Server: https://HOST/api/v3
    app_id = 12345                            # a GitHub App (or client_id = "Iv1.abc")
    private_key_file = "github-app.pem"       # the App's private key (PEM)
    # installation_id = 678                   # discovered from the targets when not given
    # token_file = "github-token"             # instead of an App: a fine-grained token
    webhook_secret_file = "github-webhook-secret"
    reconcile_seconds = 30                    # how often GitHub is asked what webhooks missed
    recheck_after = "2m"                      # a job queued this long is asked about
    boot_timeout = "10m"                      # runner VM queued/booting -> runner online
    idle_timeout = "1h"                       # an online runner that got no job
    job_timeout = "6h"                        # a runner running one job (GitHub's own limit)

    [[github.targets]]                        # where runners are registered
    repository = "acme/app"                   # or organization = "acme" / enterprise = "acme"
    runner_group = "Default"                  # organisations and enterprises only

    [github.pools.linux]                      # names a [pools.NAME] of this file
    labels = ["self-hosted", "linux", "x64"]  # the runs-on labels this pool serves

A job is served by a pool when the job's labels (case-insensitive) are a subset
of the pool's; when several pools qualify, the one with the fewest labels (the
most specific match) wins.  Runners carry the pool's labels plus two of
stoker's own: :func:`controller_label` (this service's runners, so garbage
collection never touches anyone else's) and ``stoker-pool-NAME``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from stoker.fields import HostPath, Name, Seconds
from stoker.images.spec import Items

#: A GitHub label: what ``runs-on`` accepts (GitHub allows up to 256 characters).
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,254}")
_OWNER_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")
_REPO_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _check_label(value: str) -> str:
    if not _LABEL_RE.fullmatch(value):
        raise ValueError(f"expected a runner label (letters, digits, ._:/+-), got {value!r}")
    return value


def _check_owner(value: str) -> str:
    if not _OWNER_RE.fullmatch(value):
        raise ValueError(f"expected a GitHub account name, got {value!r}")
    return value


def _check_repository(value: str) -> str:
    owner, slash, name = value.partition("/")
    if not slash or not _OWNER_RE.fullmatch(owner) or not _REPO_RE.fullmatch(name):
        raise ValueError(f"expected OWNER/REPOSITORY, got {value!r}")
    if name in (".", ".."):
        raise ValueError(f"expected OWNER/REPOSITORY, got {value!r}")
    return value


def _check_api_url(value: str) -> str:
    if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._/-]*)?", value):
        raise ValueError(
            "expected https://api.github.com or https://HOST/api/v3 (GitHub Enterprise "
            f"Server), got {value!r}"
        )
    return value.rstrip("/")


Label = Annotated[str, AfterValidator(_check_label)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Target(_Model):
    """Where runners are registered: one repository, organisation or enterprise."""

    repository: Annotated[str, AfterValidator(_check_repository)] | None = None
    organization: Annotated[str, AfterValidator(_check_owner)] | None = None
    enterprise: Annotated[str, AfterValidator(_check_owner)] | None = None
    #: The runner group new runners join (organisations and enterprises).
    runner_group: str = "Default"

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        given = [k for k in ("repository", "organization", "enterprise") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "name exactly one of repository, organization or enterprise"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.repository is not None and self.runner_group != "Default":
            raise ValueError("runner_group is for organisations and enterprises only")
        return self

    @property
    def kind(self) -> Literal["repository", "organization", "enterprise"]:
        """What the target is."""
        if self.repository is not None:
            return "repository"
        return "organization" if self.organization is not None else "enterprise"

    @property
    def name(self) -> str:
        """``owner/repo``, the organisation or the enterprise."""
        return self.repository or self.organization or self.enterprise or ""

    @property
    def scope(self) -> str:
        """The REST path prefix of the target's runners (``repos/OWNER/REPO``, ...)."""
        prefix = {"repository": "repos", "organization": "orgs", "enterprise": "enterprises"}
        return f"{prefix[self.kind]}/{self.name}"

    @property
    def owner(self) -> str:
        """The account that owns the target (whose installation serves it)."""
        return self.name.split("/", 1)[0]

    def covers(self, repository: str) -> bool:
        """Whether a job of ``repository`` (``owner/repo``) can run on this target's runners."""
        if self.repository is not None:
            return self.repository.lower() == repository.lower()
        if self.organization is not None:
            return repository.split("/", 1)[0].lower() == self.organization.lower()
        # An enterprise's runners serve its organisations; which those are only GitHub knows.
        return True


class PoolLabels(_Model):
    """The ``runs-on`` labels one pool serves."""

    labels: Annotated[Items[Label], Field(min_length=1, max_length=50)]
    #: Runners kept registered and listening ahead of demand (they take a job at once).
    min_idle: int = Field(default=0, ge=0, le=1000)


class GitHubConfig(_Model):
    """The whole ``[github]`` table (see the module docstring)."""

    api_url: Annotated[str, AfterValidator(_check_api_url)] = "https://api.github.com"
    app_id: int | None = Field(default=None, ge=1)
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    private_key_file: HostPath | None = None
    installation_id: int | None = Field(default=None, ge=1)
    token_file: HostPath | None = None
    webhook_secret_file: HostPath | None = None
    reconcile_seconds: Seconds = 30.0
    recheck_after: Seconds = 120.0
    boot_timeout: Seconds = 600.0
    idle_timeout: Seconds = 3600.0
    job_timeout: Seconds = 6 * 3600.0
    #: The image's account the runner runs as, and where the runner is installed.
    runner_user: Name = "runner"
    runner_dir: str = Field(default="/opt/actions-runner", pattern=r"^/[A-Za-z0-9._/-]*$")
    #: Runners created per reconcile pass and pool at most (bounds API bursts).
    max_create_per_pass: int = Field(default=20, ge=1, le=1000)
    targets: Annotated[Items[Target], Field(min_length=1)]
    pools: Annotated[dict[Name, PoolLabels], Field(min_length=1)]

    @model_validator(mode="after")
    def _credentials(self) -> GitHubConfig:
        app = self.app_id is not None or self.client_id is not None
        if app and self.token_file is not None:
            raise ValueError("give either a GitHub App (app_id/client_id) or token_file, not both")
        if not app and self.token_file is None:
            raise ValueError(
                "no credentials: give app_id (or client_id) and private_key_file, or token_file"
            )
        if app and self.private_key_file is None:
            raise ValueError("a GitHub App needs private_key_file (its private key, PEM)")
        if not app and self.installation_id is not None:
            raise ValueError("installation_id is for GitHub Apps only")
        if ".." in self.runner_dir.split("/"):
            raise ValueError(f"runner_dir {self.runner_dir!r} must not contain '..'")
        names = [t.name.lower() for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("the same target is listed twice")
        return self

    @property
    def uses_app(self) -> bool:
        """Whether the credentials are a GitHub App's (else a token)."""
        return self.token_file is None

    @property
    def issuer(self) -> str:
        """The JWT ``iss`` claim of the App (its client id, else its app id)."""
        return self.client_id or str(self.app_id)

    def controller_label(self, host_scope: str) -> str:
        """The label every runner of this stoker service carries.

        ``host_scope`` is what identifies the service (its database URL without
        secrets): two stoker installations on one organisation never collect
        each other's runners.
        """
        digest = hashlib.sha256(f"{self.api_url}\n{host_scope}".encode()).hexdigest()[:10]
        return f"stoker-{digest}"

    def target_for(self, repository: str) -> Target | None:
        """The first target whose runners may run ``repository``'s jobs (None: not ours)."""
        for target in self.targets:
            if target.covers(repository):
                return target
        return None

    def pool_for(self, labels: list[str] | tuple[str, ...]) -> str | None:
        """The pool serving a job with ``labels`` (None: no pool has them all).

        The smallest label set that covers the job's wins (the most specific
        pool), ties broken by name so every host picks the same one.
        """
        wanted = {label.lower() for label in labels}
        fitting = [
            (len(cfg.labels), name)
            for name, cfg in self.pools.items()
            if wanted <= {label.lower() for label in cfg.labels}
        ]
        return min(fitting)[1] if fitting else None

    def overlapping_pools(self) -> list[tuple[str, str]]:
        """Pairs of pools where one's labels contain the other's (warned about at start)."""
        items = sorted(self.pools.items())
        pairs = []
        for i, (a, ca) in enumerate(items):
            for b, cb in items[i + 1 :]:
                sa = {label.lower() for label in ca.labels}
                sb = {label.lower() for label in cb.labels}
                if sa <= sb or sb <= sa:
                    pairs.append((a, b))
        return pairs


def read_secret_file(path: Path, what: str, *, limit: int = 64 << 10) -> bytes:
    """The bytes of a secret file (surrounding whitespace removed); raises ``ValueError``."""
    try:
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ValueError(f"the {what} file {path} is larger than {limit // 1024} KiB")
    data = data.strip()
    if not data:
        raise ValueError(f"the {what} file {path} is empty")
    return data
