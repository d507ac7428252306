"""``stoker github check``: everything the GitHub integration needs, verified before it runs.

Each finding names the setting it is about and says what to do.  Checks:
credentials (App key or token) and the installation; the webhook secret; per
target, that runners can be listed (the permission runner management needs)
and the runner group exists; per pool, that its image is built, that the
image's runner is not older than what GitHub offers (GitHub refuses runners
that fall too far behind), and that the pool's network lets the runner reach
GitHub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Literal
from urllib.parse import urlsplit

from stoker.ci.github.client import GitHubClient, GitHubConfigError, RunnerDownload
from stoker.ci.github.config import GitHubConfig, read_secret_file
from stoker.errors import StokerError
from stoker.images.store import ImageStore
from stoker.net.policy import NetworkPolicy, PolicyError, image_network_policy
from stoker.service.config import ServiceConfig

#: Where the runner's release tarball names its version.
_VERSION_RE = re.compile(r"actions-runner-linux-x64-(\d+)\.(\d+)\.(\d+)\.tar\.gz")
#: Hosts a runner must reach (a subset of GitHub's documented list; the preset has all).
_MUST_REACH = ("github.com", "api.github.com", "pipelines.actions.githubusercontent.com")


@dataclass(frozen=True)
class Finding:
    """One result of the check."""

    level: Literal["ok", "warning", "error"]
    subject: str
    message: str


def _reaches(policy: NetworkPolicy, host: str, port: int) -> bool:
    try:
        address = ip_address(host)
    except ValueError:
        return policy.match_host(host, port) is not None
    return policy.match_ip(address, port) is not None


def runner_version(text: str) -> tuple[int, int, int] | None:
    """The runner version in a release file name or URL (None: not one)."""
    match = _VERSION_RE.search(text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _artifact_version(artifact: dict[str, object]) -> tuple[int, int, int] | None:
    """The runner version of a manifest's artifact entry (its pinned version, else its file)."""
    if artifact.get("name") != "actions-runner":
        return None
    pinned = artifact.get("version")
    if isinstance(pinned, str):
        parts = pinned.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return (int(parts[0]), int(parts[1]), int(parts[2]))
    return runner_version(str(artifact.get("source", "")))


def _fmt(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def pool_network_findings(pool: str, policy: NetworkPolicy | None, api_url: str) -> list[Finding]:
    """Whether a pool's VMs can reach GitHub (``policy``: the pool's or its image's)."""
    subject = f"pools.{pool}.network"
    if policy is None or policy.mode == "none":
        return [
            Finding(
                "error",
                subject,
                "the pool's VMs have no network, so a runner cannot reach GitHub; set "
                'network = { mode = "egress", allow = ["@github-actions"] }',
            )
        ]
    if policy.mode == "nat":
        return [
            Finding(
                "warning",
                subject,
                "nat gives untrusted jobs the whole network; prefer "
                'mode = "egress" with allow = ["@github-actions"]',
            )
        ]
    if api_url == "https://api.github.com":
        places = [(h, 443) for h in _MUST_REACH]
    else:
        # GitHub Enterprise Server (or another API URL): its own host and port.
        url = urlsplit(api_url)
        default = 443 if url.scheme == "https" else 80
        places = [(url.hostname or "", url.port or default)]
    missing = [f"{h}:{port}" for h, port in places if not _reaches(policy, h, port)]
    if missing:
        return [
            Finding(
                "error",
                subject,
                f"the egress allowlist does not reach {', '.join(missing)}; add "
                '"@github-actions" (or the GitHub Enterprise host) to allow',
            )
        ]
    return [Finding("ok", subject, "egress allowlist reaches GitHub")]


async def run_check(service: ServiceConfig, *, client: GitHubClient | None = None) -> list[Finding]:
    """Every finding for ``service``'s ``[github]`` table (calls GitHub unless it fails early)."""
    cfg = service.github
    if cfg is None:
        return [Finding("error", "github", "the configuration has no [github] table")]
    findings: list[Finding] = []
    if cfg.webhook_secret_file is None:
        findings.append(
            Finding(
                "warning",
                "github.webhook_secret_file",
                "no webhook: queued jobs are only found by asking GitHub every "
                f"{cfg.reconcile_seconds:g}s",
            )
        )
    else:
        try:
            read_secret_file(cfg.webhook_secret_file, "webhook secret")
            findings.append(Finding("ok", "github.webhook_secret_file", "readable"))
        except ValueError as exc:
            findings.append(Finding("error", "github.webhook_secret_file", str(exc)))
    own = client is None
    try:
        client = client or GitHubClient(cfg)
    except (StokerError, ValueError) as exc:
        return [*findings, Finding("error", "github credentials", str(exc))]
    try:
        try:
            who = await client.check_auth()
        except GitHubConfigError as exc:
            return [*findings, Finding("error", "github credentials", str(exc))]
        except StokerError as exc:
            return [*findings, Finding("error", "github credentials", f"GitHub refused: {exc}")]
        findings.append(Finding("ok", "github credentials", who))
        latest = await _targets(cfg, client, findings)
        _pools(service, cfg, latest, findings)
    finally:
        if own:
            await client.aclose()
    return findings


async def _targets(
    cfg: GitHubConfig, client: GitHubClient, findings: list[Finding]
) -> tuple[int, int, int] | None:
    latest: tuple[int, int, int] | None = None
    for index, target in enumerate(cfg.targets):
        subject = f"github.targets[{index}] ({target.name})"
        try:
            runners = await client.list_runners(target)
            if target.kind != "repository":
                await client.runner_group_id(target, target.runner_group)
            downloads: list[RunnerDownload] = await client.runner_downloads(target)
        except GitHubConfigError as exc:
            findings.append(Finding("error", subject, str(exc)))
            continue
        except StokerError as exc:
            status = getattr(exc, "status", None)
            hint = (
                " (the credentials lack the permission to manage self-hosted runners: "
                "Administration read & write for a repository, Self-hosted runners for an "
                "organisation)"
                if status in (403, 404)
                else ""
            )
            findings.append(Finding("error", subject, f"{exc}{hint}"))
            continue
        for download in downloads:
            if download.os == "linux" and download.architecture == "x64":
                version = runner_version(download.filename)
                if version is not None and (latest is None or version > latest):
                    latest = version
        findings.append(
            Finding("ok", subject, f"runners can be managed ({len(runners)} registered now)")
        )
    return latest


def _pools(
    service: ServiceConfig,
    cfg: GitHubConfig,
    latest: tuple[int, int, int] | None,
    findings: list[Finding],
) -> None:
    store = ImageStore(service.dirs)
    for name, labels in cfg.pools.items():
        pool = service.pools[name]
        subject = f"github.pools.{name}"
        findings.append(Finding("ok", subject, f"serves runs-on {list(labels.labels)}"))
        image = store.get(pool.image_name)
        policy = pool.network
        if image is None and pool.image_base is not None:
            findings.append(
                Finding("ok", f"pools.{name}.image", f"{pool.image_base} is built at start")
            )
        elif image is None:
            findings.append(
                Finding(
                    "error",
                    f"pools.{name}.image",
                    f"image {pool.image!r} is not built; run `stoker image build {pool.image}`",
                )
            )
        else:
            if policy is None:
                try:
                    policy = image_network_policy(image.manifest)
                except PolicyError as exc:
                    findings.append(Finding("error", f"pools.{name}.image", str(exc)))
            artifacts = image.manifest.get("artifacts")
            versions = [
                v
                for a in (artifacts if isinstance(artifacts, list) else [])
                if isinstance(a, dict)
                for v in [_artifact_version(a)]
                if v is not None
            ]
            if not versions:
                findings.append(
                    Finding(
                        "warning",
                        f"pools.{name}.image",
                        f"image {pool.image!r} does not say which runner version it holds",
                    )
                )
            elif latest is not None and versions[0] < latest:
                level: Literal["warning", "error"] = (
                    "error"
                    if (versions[0][0], versions[0][1]) < (latest[0], latest[1])
                    else "warning"
                )
                findings.append(
                    Finding(
                        level,
                        f"pools.{name}.image",
                        f"the image's runner {_fmt(versions[0])} is older than GitHub's "
                        f"{_fmt(latest)}; GitHub refuses runners that fall behind: rebuild the "
                        "image with the new version",
                    )
                )
            else:
                findings.append(Finding("ok", f"pools.{name}.image", f"runner {_fmt(versions[0])}"))
        findings.extend(pool_network_findings(name, policy, cfg.api_url))
    for a, b in cfg.overlapping_pools():
        findings.append(
            Finding(
                "warning",
                f"github.pools.{a} / {b}",
                "their labels overlap: a job both serve goes to the one with fewer labels",
            )
        )
