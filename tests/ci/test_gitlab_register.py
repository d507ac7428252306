"""GitLab runner registration against FakeGitLab (a fake, on loopback).

The client, the runners' state file and gitlab-runner's config.toml.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stoker.ci.gitlab.client import GitLabClient, GitLabError, GitLabUnavailable
from stoker.ci.gitlab.config import GitLabConfig
from stoker.ci.gitlab.fake_gitlab import FakeGitLab
from stoker.ci.gitlab.register import Registrar, RunnerStore, register, unregister
from stoker.ci.gitlab.runner_config import load
from stoker.errors import UsageError
from stoker.service.config import ServiceConfig

PAT = "glpat-registration-token-0123"
READER = "glpat-read-only-token-0123"
USER_CONFIG = """\
# gitlab-runner's file, with a runner of the user's own
concurrent = 2
check_interval = 0

[[runners]]
  name = "theirs"   # not ours: left alone
  url = "https://gitlab.example.com"
  token = "glrt-theirs"
  executor = "shell"
"""


@pytest.fixture
def gl() -> Iterator[FakeGitLab]:
    with FakeGitLab() as fake:
        fake.add_token(PAT, {"create_runner", "manage_runner", "read_api"})
        fake.add_token(READER, {"read_api"})
        fake.add_group(7, "acme")
        fake.add_project(42, "acme/app")
        yield fake


def gitlab_table(tmp_path: Path, url: str, **pools: dict[str, Any]) -> dict[str, Any]:
    (tmp_path / "pat").write_text(PAT + "\n")
    (tmp_path / "svc-token").write_text("stk_executor\n")
    return {
        "url": url,
        "token_file": str(tmp_path / "pat"),
        "runner_config": str(tmp_path / "gitlab-runner" / "config.toml"),
        "service_token_file": str(tmp_path / "svc-token"),
        "stoker": "/usr/local/bin/stoker",
        "pools": pools
        or {
            "linux": {"runner_type": "project_type", "project_id": 42, "tags": ["stoker", "linux"]},
            "big": {"runner_type": "group_type", "group_id": 7, "tags": ["big", "x"]},
        },
    }


def registrar(tmp_path: Path, table: dict[str, Any]) -> Registrar:
    config = GitLabConfig.model_validate(table, context={"base_dir": tmp_path})
    return Registrar(
        config=config,
        limits={name: 3 for name in config.pools},
        service_url="http://127.0.0.1:8765",
        state_file=tmp_path / "state" / "gitlab-runners.json",
        host="build-1",
        stoker="/usr/local/bin/stoker",
    )


async def test_register_is_idempotent_and_keeps_the_users_file(
    gl: FakeGitLab, tmp_path: Path
) -> None:
    reg = registrar(tmp_path, gitlab_table(tmp_path, gl.url))
    reg.config.runner_config.parent.mkdir()
    reg.config.runner_config.write_text(USER_CONFIG)
    said: list[str] = []
    async with GitLabClient(gl.url, PAT) as client:
        first = await register(reg, client, said.append)
        assert sorted(first.created) == ["big", "linux"] and first.config_written
        runners = {r.description: r for r in gl.runners().values()}
        linux = runners["stoker linux (build-1)"]
        assert linux.type == "project_type" and linux.project_id == 42
        assert linux.tags == ["stoker", "linux"] and linux.run_untagged is False
        assert runners["stoker big (build-1)"].group_id == 7
        # the tokens are kept, readable by this user only
        state = reg.state_file
        assert state.stat().st_mode & 0o777 == 0o600
        stored = json.loads(state.read_text())["runners"]
        assert stored["linux"]["token"] == linux.token and stored["linux"]["id"] == linux.id
        # gitlab-runner's file: our entries added, theirs and the comments kept
        text = reg.config.runner_config.read_text()
        assert "# gitlab-runner's file" in text and 'name = "theirs"   # not ours' in text
        assert reg.config.runner_config.stat().st_mode & 0o777 == 0o600
        entry = load(reg.config.runner_config).get("stoker-linux")
        assert entry is not None
        assert entry["token"] == linux.token and entry["executor"] == "custom"
        assert entry["limit"] == 3 and entry["url"] == gl.url and entry["shell"] == "bash"
        custom = entry["custom"]
        assert custom["run_exec"] == "/usr/local/bin/stoker"
        assert custom["run_args"] == [
            "gitlab-executor", "--service", "http://127.0.0.1:8765",
            "--token-file", str(tmp_path / "svc-token"), "--pool", "linux",
            "--builds-dir", "/builds", "--cache-dir", "/cache",
            "--prepare-timeout", "600s", "run",
        ]  # fmt: skip
        assert custom["prepare_args"][-1] == "prepare" and custom["cleanup_args"][-1] == "cleanup"
        assert load(reg.config.runner_config).text().startswith("# gitlab-runner")
        assert "concurrent = 6" in text
        # twice: nothing changes, not even the file's modification time
        mtime = reg.config.runner_config.stat().st_mtime_ns
        calls = len(gl.requests())
        second = await register(reg, client, said.append)
        assert sorted(second.kept) == ["big", "linux"] and not second.changed
        assert reg.config.runner_config.stat().st_mtime_ns == mtime
        assert len(gl.runners()) == 2
        assert [p for _, p, _ in gl.requests()[calls:]] == ["/api/v4/runners/verify"] * 2


async def test_removed_changed_and_vanished_runners(gl: FakeGitLab, tmp_path: Path) -> None:
    table = gitlab_table(tmp_path, gl.url)
    async with GitLabClient(gl.url, PAT) as client:
        await register(registrar(tmp_path, table), client, lambda _: None)
        ids = {r.description.split()[1]: i for i, r in gl.runners().items()}
        # GitLab lost the linux runner; big's tags changed; a pool was added
        await client.delete_runner(ids["linux"])
        table["pools"]["big"]["tags"] = ["big", "y"]
        table["pools"]["any"] = {"runner_type": "instance_type", "run_untagged": True}
        with pytest.raises(GitLabError, match="403") as refused:
            await register(registrar(tmp_path, table), client, lambda _: None)
        assert "create_runner scope" in (refused.value.hint or "")  # instance needs an admin
        del table["pools"]["any"]
        report = await register(registrar(tmp_path, table), client, lambda _: None)
        assert sorted(report.replaced) == ["big", "linux"]
        live = {r.description.split()[1]: r for r in gl.runners().values() if not r.deleted}
        assert live["big"].tags == ["big", "y"] and gl.runners()[ids["big"]].deleted
        # a pool removed from the configuration: its runner and entry go
        del table["pools"]["big"]
        reg = registrar(tmp_path, table)
        report = await register(reg, client, lambda _: None)
        assert report.deleted == ["big"] and report.kept == ["linux"]
        assert live["big"].id in gl.runners() and gl.runners()[live["big"].id].deleted
        assert load(reg.config.runner_config).names() == ["stoker-linux"]
        assert set(RunnerStore(reg.state_file).load()) == {"linux"}
        # unregister: everything this configuration made is gone
        report = await unregister(reg, client, lambda _: None)
        assert report.deleted == ["linux"]
        assert all(r.deleted for r in gl.runners().values())
        assert load(reg.config.runner_config).names() == []
        assert RunnerStore(reg.state_file).load() == {}


async def test_the_client_names_what_is_wrong(gl: FakeGitLab) -> None:
    async with GitLabClient(gl.url, READER) as reader:
        with pytest.raises(GitLabError) as refused:
            await reader.create_runner(
                runner_type="project_type", project_id=42, description="x",
                tags=["a"], run_untagged=False,
            )  # fmt: skip
        assert refused.value.status == 403 and "create a runner for project 42" in str(
            refused.value
        )
        assert "create_runner scope" in (refused.value.hint or "")
        assert READER not in str(refused.value)
    async with GitLabClient(gl.url, PAT) as client:
        for kind, target, words in (
            ("project_type", {"project_id": 99}, "project 99"),
            ("group_type", {"group_id": 99}, "group 99"),
        ):
            with pytest.raises(GitLabError, match=f"could not create a runner for {words}"):
                await client.create_runner(
                    runner_type=kind,  # type: ignore[arg-type]
                    description="x",
                    tags=["a"],
                    run_untagged=False,
                    **target,
                )
        with pytest.raises(UsageError, match="project_id is given exactly"):
            await client.create_runner(
                runner_type="project_type", description="x", tags=[], run_untagged=True
            )
        assert await client.delete_runner(12345) is False
        assert await client.verify_runner("glrt-nope", "s_000000000000") is False
        # retried through GitLab's bad moments, then given up with a clear error
        gl.fail_next("POST", "/api/v4/runners/verify", 502, count=2)
        assert await client.verify_runner("glrt-nope", "s_000000000000") is False
    async with GitLabClient(gl.url, "glpat-unknown") as stranger:
        with pytest.raises(GitLabError, match=r"refused the access token \(401\)"):
            await stranger.delete_runner(1)
    async with GitLabClient(gl.url, PAT, retries=1, backoff=0.01) as impatient:
        gl.fail_next("DELETE", "/api/v4/runners/", 503, count=5)
        with pytest.raises(GitLabUnavailable, match="HTTP 503"):
            await impatient.delete_runner(1)
    async with GitLabClient("http://127.0.0.1:1", PAT, retries=0) as nowhere:
        with pytest.raises(GitLabUnavailable, match="cannot connect"):
            await nowhere.verify_runner("glrt-x", "s_1")


def test_gitlab_configuration_is_checked(tmp_path: Path) -> None:
    os.environ.setdefault("STOKER_ALLOW_FAKE_BACKEND", "1")
    base: dict[str, Any] = {
        "backend": "fake",
        "state_dir": str(tmp_path),
        "pools": {"linux": {"cpus": 1, "memory": 256}},
    }

    def problem(gitlab: dict[str, Any]) -> str:
        with pytest.raises(ValueError) as exc:
            ServiceConfig.model_validate({**base, "gitlab": gitlab}, context={"base_dir": tmp_path})
        return str(exc.value)

    good = {"url": "https://gl.example", "token_file": "t"}
    pool = {"runner_type": "project_type", "project_id": 1, "tags": ["a"]}
    assert "needs project_id" in problem(
        {**good, "pools": {"linux": {"runner_type": "project_type", "tags": ["a"]}}}
    )
    assert "group_id is for runner_type group_type" in problem(
        {**good, "pools": {"linux": {**pool, "group_id": 3}}}
    )
    assert "must set run_untagged" in problem(
        {**good, "pools": {"linux": {"runner_type": "project_type", "project_id": 1}}}
    )
    assert "not a [pools.NAME]" in problem({**good, "pools": {"nope": pool}})
    assert "must not carry credentials" in problem(
        {**good, "url": "https://u:p@gl.example", "pools": {"linux": pool}}
    )
    assert "no commas" in problem({**good, "pools": {"linux": {**pool, "tags": ["a,b"]}}})
    config = ServiceConfig.model_validate(
        {**base, "gitlab": {**good, "pools": {"linux": pool}}}, context={"base_dir": tmp_path}
    )
    network = config.pools["linux"].network
    assert network is not None and network.summary()["allow"] == ["gl.example:443"]


def test_a_malformed_runner_config_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("concurrent = 1\n[[runners]\nname = 'x'\n")
    with pytest.raises(UsageError, match=f"{bad}: invalid TOML"):
        load(bad)
    bad.write_text("runners = 3\n")
    with pytest.raises(UsageError, match="must be an array of tables"):
        load(bad)


def test_the_register_cli(gl: FakeGitLab, tmp_path: Path) -> None:
    import subprocess
    import sys

    table = gitlab_table(tmp_path, gl.url)
    pools = "\n".join(f"[pools.{name}]\ncpus = 1\nmemory = 256\nmax = 2" for name in table["pools"])
    gitlab_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items() if k != "pools")
    gitlab_pools = "\n".join(
        f"[gitlab.pools.{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in pool.items())
        for name, pool in table["pools"].items()
    )
    config = tmp_path / "stoker.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n{pools}\n[gitlab]\n{gitlab_lines}\n{gitlab_pools}\n'
    )

    def cli(action: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "stoker.cli", "gitlab", action, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert PAT not in proc.stdout + proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    assert sorted(cli("register")["created"]) == ["big", "linux"]
    again = cli("register")
    assert sorted(again["kept"]) == ["big", "linux"] and not again["config_written"]
    assert sorted(cli("unregister")["deleted"]) == ["big", "linux"]
    assert all(r.deleted for r in gl.runners().values())
    # a configuration without [gitlab] is named
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n{pools}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "stoker.cli", "gitlab", "register", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "has no [gitlab] table" in proc.stderr
