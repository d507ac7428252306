"""The GitHub REST client against FakeGitHub (a fake, on 127.0.0.1): auth, limits, paging.

Waits are recorded by an injected ``sleep`` instead of slept.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from stoker.ci.github.client import (
    GitHubAPIError,
    GitHubClient,
    GitHubConfigError,
    GitHubUnavailable,
    RateLimited,
)
from stoker.ci.github.config import GitHubConfig
from stoker.ci.github.fake_github import FakeGitHub

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))

from github_harness import APP_ID, INSTALLATION, OWNER, REPO, app_key


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, bytes]:
    return app_key(tmp_path)


@pytest.fixture
def github(keys: tuple[Path, bytes]) -> Iterator[FakeGitHub]:
    with FakeGitHub(app_id=APP_ID, public_key_pem=keys[1]) as fake:
        fake.install(OWNER, INSTALLATION)
        fake.add_repo(REPO)
        fake.install("acme-org", 88)
        yield fake


def config(github: FakeGitHub, keys: tuple[Path, bytes], **extra: Any) -> GitHubConfig:
    return GitHubConfig.model_validate(
        {
            "api_url": github.url,
            "app_id": APP_ID,
            "private_key_file": str(keys[0]),
            "targets": [{"repository": REPO}],
            "pools": {"gh": {"labels": ["self-hosted"]}},
            **extra,
        }
    )


class Sleeps:
    """An injected sleep: records what would have been waited."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def client_of(github: FakeGitHub, keys: tuple[Path, bytes]) -> AsyncIterator[Any]:
    made: list[GitHubClient] = []

    def make(**kwargs: Any) -> GitHubClient:
        extra = kwargs.pop("config", {})
        client = GitHubClient(config(github, keys, **extra), **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


def target(cfg: GitHubConfig) -> Any:
    return cfg.targets[0]


async def test_app_jwt_claims_and_installation_token(client_of: Any, keys: Any) -> None:
    client: GitHubClient = client_of(clock=lambda: 1_000_000.0)
    claims = jwt.decode(
        client.app_jwt(), keys[1], algorithms=["RS256"], options={"verify_exp": False}
    )
    assert claims == {"iat": 1_000_000 - 60, "exp": 1_000_000 + 540, "iss": str(APP_ID)}
    assert "installation 77" in await client_of().check_auth()


async def test_the_installation_token_is_cached_and_refreshed_before_expiry(
    client_of: Any, github: FakeGitHub
) -> None:
    client: GitHubClient = client_of()
    cfg = client.config
    await client.list_runners(target(cfg))
    await client.list_runners(target(cfg))
    tokens = [c for c in github.api_calls() if c[1].endswith("/access_tokens")]
    assert len(tokens) == 1
    # Tokens that expire within stoker's 5-minute margin are replaced before use.
    github.token_lifetime = 240
    client._token_expires = None  # the cached one is forgotten; the next is short-lived
    for _ in range(2):
        await client.list_runners(target(cfg))
    tokens = [c for c in github.api_calls() if c[1].endswith("/access_tokens")]
    assert len(tokens) == 3


async def test_a_revoked_token_is_replaced_once(client_of: Any, github: FakeGitHub) -> None:
    client: GitHubClient = client_of()
    await client.list_runners(target(client.config))
    with github.lock:
        github.tokens.clear()  # revoked on GitHub's side
    assert await client.list_runners(target(client.config)) == []
    statuses = [c[2] for c in github.api_calls(prefix=f"/repos/{REPO}/actions/runners")]
    assert statuses == [200, 401, 200]


async def test_not_installed_and_bad_keys_name_the_setting(
    github: FakeGitHub, keys: Any, tmp_path: Path
) -> None:
    cfg = config(github, keys, targets=[{"repository": "elsewhere/repo"}])
    async with GitHubClient(cfg) as client:
        with pytest.raises(GitHubConfigError, match="not installed on repository elsewhere/repo"):
            await client.installation_id()
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(GitHubConfigError, match=r"github\.private_key_file: .* not an RSA"):
        GitHubClient(config(github, keys, private_key_file=str(bad)))


async def test_5xx_is_retried_with_backoff_then_gives_up(
    client_of: Any, github: FakeGitHub
) -> None:
    sleeps = Sleeps()
    client: GitHubClient = client_of(sleep=sleeps, max_retries=3)
    await client.check_auth()
    github.fail("GET", r"/actions/runners$", 502, times=2)
    assert await client.list_runners(target(client.config)) == []
    assert len(sleeps.waits) == 2 and sleeps.waits[1] > sleeps.waits[0] * 0.9
    github.fail("GET", r"/actions/runners$", 503, times=10)
    with pytest.raises(GitHubUnavailable, match="503 after 4 attempts"):
        await client.list_runners(target(client.config))


async def test_retry_after_and_secondary_limits_are_honoured(
    client_of: Any, github: FakeGitHub
) -> None:
    sleeps = Sleeps()
    client: GitHubClient = client_of(sleep=sleeps)
    await client.check_auth()
    github.fail("GET", r"/actions/runners$", 429, retry_after=7)
    await client.list_runners(target(client.config))
    assert sleeps.waits == [7.0]
    github.fail("GET", r"/actions/runners$", 403, times=2)  # secondary, no Retry-After
    await client.list_runners(target(client.config))
    assert sleeps.waits[1:] == [60.0, 120.0]
    assert client.stats.rate_limit_waits == 3


async def test_a_spent_budget_waits_for_the_reset(client_of: Any, github: FakeGitHub) -> None:
    sleeps = Sleeps()
    client: GitHubClient = client_of(sleep=sleeps)
    await client.check_auth()
    github.set_rate_limit(1, reset_in=30)
    await client.list_runners(target(client.config))  # spends the last one
    assert client.rate_limit.remaining == 0
    github.set_rate_limit(100)
    await client.list_runners(target(client.config))
    assert len(sleeps.waits) == 1 and 25 <= sleeps.waits[0] <= 32
    github.set_rate_limit(0, reset_in=3600)
    client.rate_limit.remaining = 0
    client.rate_limit.reset = time.time() + 3600
    with pytest.raises(RateLimited, match="longer than stoker waits"):
        await client.list_runners(target(client.config))


async def test_listings_follow_link_pages(client_of: Any, github: FakeGitHub) -> None:
    for i in range(230):
        github.add_runner(f"repos/{REPO}", f"r-{i}", ["self-hosted"])
    client: GitHubClient = client_of()
    runners = await client.list_runners(target(client.config))
    assert [r.name for r in runners] == [f"r-{i}" for i in range(230)]
    pages = [c for c in github.api_calls() if c[1] == f"/repos/{REPO}/actions/runners"]
    assert len(pages) == 3
    assert runners[0].labels == ["self-hosted"]


async def test_a_link_to_another_host_is_refused(keys: Any, tmp_path: Path) -> None:
    # A server (a fake GitHub responder, in memory) whose pagination points elsewhere.
    def respond(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/access_tokens"):
            return httpx.Response(201, json={"token": "t", "expires_at": "2999-01-01T00:00:00Z"})
        if request.url.path.endswith("/installation"):
            return httpx.Response(200, json={"id": 1})
        return httpx.Response(
            200,
            json={"total_count": 2, "runners": []},
            headers={"link": '<https://evil.example/steal?page=2>; rel="next"'},
        )

    cfg = GitHubConfig.model_validate(
        {
            "api_url": "https://api.github.example",
            "app_id": 1,
            "private_key_file": str(keys[0]),
            "targets": [{"repository": REPO}],
            "pools": {"gh": {"labels": ["self-hosted"]}},
        }
    )
    async with GitHubClient(cfg, transport=httpx.MockTransport(respond)) as client:
        with pytest.raises(GitHubAPIError, match=r"evil\.example"):
            await client.list_runners(cfg.targets[0])


async def test_delete_outcomes_and_conflicts(client_of: Any, github: FakeGitHub) -> None:
    # The first call is a mutation: its token is fetched without deadlocking on the
    # mutation lock.
    client: GitHubClient = client_of()
    t = target(client.config)
    jit = await client.generate_jitconfig(t, name="r1", labels=["self-hosted"], runner_group_id=1)
    assert jit.runner.name == "r1" and jit.encoded_jit_config
    with github.lock:
        runner = github.runner_table[jit.runner.id]
        runner.busy, runner.last_seen = True, time.monotonic()  # running a job, alive
    assert await client.delete_runner(t, jit.runner.id) == "busy"
    with github.lock:
        github.runner_table[jit.runner.id].busy = False
    assert await client.delete_runner(t, jit.runner.id) == "deleted"
    assert await client.delete_runner(t, jit.runner.id) == "gone"
    await client.generate_jitconfig(t, name="r2", labels=["x"], runner_group_id=1)
    with pytest.raises(GitHubAPIError, match="409"):
        await client.generate_jitconfig(t, name="r2", labels=["x"], runner_group_id=1)


async def test_mutations_never_overlap(client_of: Any, github: FakeGitHub) -> None:
    github.api_delay = 0.05
    client: GitHubClient = client_of()
    t = target(client.config)
    await client.check_auth()
    start = time.monotonic()
    await asyncio.gather(
        *(
            client.generate_jitconfig(t, name=f"m{i}", labels=["x"], runner_group_id=1)
            for i in range(5)
        )
    )
    # Five POSTs, one after another, each at least the fake's delay.
    assert time.monotonic() - start >= 5 * 0.05


async def test_runner_groups_and_queued_jobs(client_of: Any, github: FakeGitHub) -> None:
    group = github.add_group("acme-org", "builders")
    client: GitHubClient = client_of(
        config={"targets": [{"organization": "acme-org", "runner_group": "builders"}]}
    )
    org = client.config.targets[0]
    assert await client.runner_group_id(org, "Builders") == group
    with pytest.raises(GitHubConfigError, match="no runner group 'gpu'"):
        await client.runner_group_id(org, "gpu")
    repo_client: GitHubClient = client_of()
    job_ids = [github.queue_job(REPO, ["self-hosted"]) for _ in range(3)]
    with github.lock:  # one finished run: the listing must not ask for its jobs
        github.job_table[job_ids[0]].status = "completed"
    queued = await repo_client.queued_jobs(REPO)
    assert sorted(j.id for j in queued) == job_ids[1:]
    # Two runs listed (the status filter reached GitHub), then one call per queued run.
    listing = [c for c in github.calls if c[1] == f"/repos/{REPO}/actions/runs"]
    per_run = [c for c in github.calls if c[1].endswith("/jobs")]
    assert len(listing) == 1 and len(per_run) == 2
    job = await repo_client.get_job(REPO, job_ids[1])
    assert job is not None and job.status == "queued"
    assert await repo_client.get_job(REPO, 1) is None
