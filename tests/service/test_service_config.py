"""The service configuration: defaults, TOML with located errors, JSON round-trip."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.errors import UsageError
from stoker.service.config import ServiceConfig, load_config, parse_config_text
from stoker.service.daemon import configure_logging

ORIGIN = Path("/etc/stoker/stoker.toml")

FULL = """\
state_dir = "/var/lib/stoker"
backend = "qemu"
retry_limit = 2
lease_seconds = "30s"
heartbeat_seconds = 10
shutdown_grace_seconds = "2m"

[listen]
host = "0.0.0.0"
port = 9000

[host]
name = "build-1"
cpus = 16
memory_mb = "64G"
overcommit = 1.5
accel = "tcg"

[limits]
max_upload_bytes = "32M"
max_log_bytes = 1048576

[git]
allow_protocols = ["https", "ssh"]
timeout = "1m"

[submitters]
max_concurrent = 2
[submitters.overrides.release-bot]
max_concurrent = 8
priority = 10

[pools.small]
cpus = 1
memory = "512M"
disk = "2G"
labels = ["linux", "small"]
min_idle = 2
max = 6
timeout = "30m"
job_pids_limit = 2048
job_memory_limit = "400M"

[pools.big]
image = "python"
cpus = 4
memory = "8G"

[[tokens]]
name = "ci"
sha256 = "%s"
scopes = ["submit", "read"]
""" % ("ab" * 32)


def test_full_file() -> None:
    config = parse_config_text(FULL, origin=ORIGIN)
    assert config.database_url == "sqlite:////var/lib/stoker/stoker.db"
    assert config.lease_seconds == 30 and config.shutdown_grace_seconds == 120
    assert config.host.memory_mb == 64 * 1024 and config.host.cpu_budget == 24
    assert config.limits.max_upload_bytes == 32 << 20 and config.limits.max_log_bytes == 1 << 20
    assert config.pools["small"].memory == 512 and config.pools["small"].disk == 2048
    assert config.pools["small"].timeout == 1800 and config.pools["small"].labels == (
        "linux",
        "small",
    )
    assert config.pools["big"].image == "python" and config.pools["big"].min_idle == 0
    assert (config.pools["small"].job_pids_limit, config.pools["small"].job_memory_limit) == (
        2048,
        400,
    )
    assert config.pools["big"].job_pids_limit is None  # the image's, else stoker's default
    assert config.submitters.policy("release-bot").priority == 10
    assert config.submitters.policy("anyone").max_concurrent == 2
    assert config.tokens[0].scopes == ("submit", "read")
    assert config.jobs_dir == Path("/var/lib/stoker/jobs")


def test_json_round_trip() -> None:
    config = parse_config_text(FULL, origin=ORIGIN)
    assert ServiceConfig.model_validate_json(config.model_dump_json()) == config


def test_defaults_describe_this_machine() -> None:
    config = parse_config_text('state_dir = "state"\n', origin=ORIGIN)
    assert config.state_dir == Path("/etc/stoker/state")
    assert config.database_url == "sqlite:////etc/stoker/state/stoker.db"
    assert config.host.cpus >= 1 and config.host.memory_mb >= 128
    assert list(config.pools) == ["default"] and config.retry_limit == 3
    assert config.backend == "qemu" and config.git.allow_protocols == ("https",)


def test_postgres_url_gets_the_psycopg_driver() -> None:
    config = parse_config_text('database_url = "postgresql://u@db/stoker"\n', origin=ORIGIN)
    assert config.database_url == "postgresql+psycopg://u@db/stoker" and not config.is_sqlite


def _error(text: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_config_text(text, origin=ORIGIN)
    return str(info.value)


def test_errors_name_file_line_and_key() -> None:
    message = _error('retry_limit = 1\n[pools.small]\ncpus = 1\nmemroy = "1G"\n')
    assert message.startswith(f"{ORIGIN}:4: pools.small.memroy: unknown key 'memroy'")
    assert "did you mean 'memory'?" in message


def test_several_errors_are_all_reported() -> None:
    message = _error('[host]\ncpus = "many"\n[[tokens]]\nname = "ci"\nsha256 = "zz"\n')
    assert "2 problems" in message
    assert f"{ORIGIN}:2: host.cpus: expected an integer, got a string" in message
    assert f"{ORIGIN}:5: tokens[0].sha256: expected the SHA-256" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("retry_limit = -1\n", "retry_limit: expected a number >= 0"),
        ('backend = "firecracker"\n', "backend: expected one of 'qemu' or 'fake'"),
        ("[pools]\n", "pools: no pools defined"),
        ("[pools.a]\nmin_idle = 5\nmax = 2\n", "min_idle (5) cannot exceed max (2)"),
        ('[pools."bad name"]\n', "expected a name of letters"),
        ('database_url = "mysql://root:hunter2@db/x"\n', "mysql://root:***@db/x"),
        ("lease_seconds = 4\nheartbeat_seconds = 3\n", "at most half of lease_seconds"),
        ('[limits]\nmax_log_bytes = "lots"\n', "expected a size like 64M"),
        ('shutdown_grace_seconds = "soon"\n', "expected a duration"),
        ("[pools.a]\njob_pids_limit = 0\n", "pools.a.job_pids_limit: expected a number >= 1"),
        (
            '[pools.a]\njob_memory_limit = "8M"\n',
            "job_memory_limit must be at least 16 MiB, got '8M'",
        ),
    ],
)
def test_bad_values(text: str, expected: str) -> None:
    assert expected in _error(text)


def test_pools_must_fit_the_host() -> None:
    text = "[host]\ncpus = 2\nmemory_mb = 4096\n[pools.huge]\ncpus = 4\n"
    assert "pool 'huge' needs 4 vCPUs" in _error(text)
    text = "[host]\ncpus = 2\nmemory_mb = 4096\n[pools.a]\ncpus = 1\nmin_idle = 3\nmax = 3\n"
    assert "min_idle VMs need 3 vCPUs" in _error(text)
    # Overcommit stretches the budget.
    ok = "[host]\ncpus = 2\nmemory_mb = 4096\novercommit = 2.0\n[pools.huge]\ncpus = 4\n"
    assert parse_config_text(ok, origin=ORIGIN).pools["huge"].cpus == 4


def test_fake_backend_needs_the_test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STOKER_ALLOW_FAKE_BACKEND", raising=False)
    assert "fake backend runs commands on this host" in _error('backend = "fake"\n')
    monkeypatch.setenv("STOKER_ALLOW_FAKE_BACKEND", "1")
    assert parse_config_text('backend = "fake"\n', origin=ORIGIN).backend == "fake"


def test_duplicate_tokens() -> None:
    one, two = "1" * 64, "2" * 64
    text = f'[[tokens]]\nname = "a"\nsha256 = "{one}"\n[[tokens]]\nname = "a"\nsha256 = "{two}"\n'
    assert "tokens[0] and tokens[1] have the same name" in _error(text)


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "stoker.toml"
    path.write_text('state_dir = "s"\nruntime_dir = "run"\n')
    config = load_config(path)
    assert config.state_dir == tmp_path / "s" and config.dirs.runtime == tmp_path / "run"
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    path.write_text("state_dir = [\n")
    with pytest.raises(UsageError, match="invalid TOML"):
        load_config(path)


def test_daemon_refuses_a_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text("[pools.small]\ncpus = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stoker.service", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{config}:2: pools.small.cpus: expected a number >= 1, got 0" in proc.stderr


def test_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "info")
        logging.getLogger("stoker.test").info(
            "job %s done", "j1", extra={"job": "j1", "state": "succeeded"}
        )
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["msg"] == "job j1 done" and entry["job"] == "j1" and entry["level"] == "info"
    assert entry["state"] == "succeeded" and entry["logger"] == "stoker.test" and "ts" in entry


def test_pool_network_policy() -> None:
    config = parse_config_text(
        '[pools.ci.network]\nmode = "egress"\nallow = ["@pypi", "github.com:443"]\n'
        "[pools.ci.network.limits]\nmax_connections = 8\n[pools.plain]\n",
        origin=ORIGIN,
    )
    net = config.pools["ci"].network
    assert net is not None and net.mode == "egress" and net.limits.max_connections == 8
    assert net.match_host("pypi.org", 443) is not None and net.match_host("evil.test", 443) is None
    assert config.pools["plain"].network is None  # the image's policy, else none
    assert ServiceConfig.model_validate_json(config.model_dump_json()) == config


def test_pool_network_errors_name_the_pool_and_entry() -> None:
    message = _error('[pools.ci]\nnetwork = { mode = "egress", allow = ["https://github.com"] }\n')
    assert f"{ORIGIN}:2:" in message and "pools.ci.network" in message
    assert "https://github.com" in message
