"""The service's host-side isolation settings: strict validation, clear errors, the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stoker.errors import UsageError
from stoker.isolation import LimitPolicy
from stoker.service.config import ServiceConfig, parse_config_text

ORIGIN = Path("/etc/stoker/stoker.toml")
HOST = '[host]\ncpus = 8\nmemory_mb = "16G"\n'


def _parse(text: str) -> ServiceConfig:
    return parse_config_text(HOST + text, origin=ORIGIN)


def test_pool_limits_and_host_settings_become_the_vms_isolation() -> None:
    config = _parse(
        'cgroups = "required"\ncgroup_parent = "stoker.slice"\n'
        "[pools.small]\ncpus = 2\ncpu_weight = 50\ncpu_quota = 1.5\n"
        'memory_overhead = "96M"\npids_max = 300\n'
    )
    isolation = config.isolation("small")
    assert isolation.cgroups == "required"
    assert isolation.parent == Path("stoker.slice")
    assert isolation.policy == LimitPolicy(overhead_mb=96, pids=300, cpu_weight=50, cpu_quota=1.5)
    assert isolation.run_as is None
    # The JSON round-trip gives the same configuration back.
    again = ServiceConfig.model_validate(json.loads(config.model_dump_json()))
    assert again == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[pools.p]\ncpus = 4\npids_max = 10\n",
            "stoker.toml:4: pools.p: pids_max (10) is too low for QEMU with 4 vCPUs: "
            "expected at least 20 (vCPUs + 16)",
        ),
        ("[pools.p]\ncpu_weight = 0\n", "pools.p.cpu_weight: expected a number >= 1, got 0"),
        (
            "[pools.p]\ncpu_quota = 12\n",
            "pool 'p' has cpu_quota 12, more CPUs than this host has (8)",
        ),
        ('[pools.p]\nmemory_overhead = "8M"\n', "pools.p.memory_overhead: "),
        ('cgroups = "on"\n', "host.cgroups: expected one of 'auto', 'required' or 'off'"),
        (
            'vmm_user = "no-such-user-x"\n',
            "host: vmm_user 'no-such-user-x' does not exist on this host (create it: "
            "useradd --system",
        ),
        ('vmm_user = "root"\n', "vmm_user 'root' is root: QEMU would run with every privilege"),
        ('vmm_group = "kvm"\n', "vmm_group is set but vmm_user is not"),
        (
            'vmm_user = "nobody"\nvmm_group = "no-such-group-x"\n',
            "vmm_group 'no-such-group-x' does not exist",
        ),
        (
            'vmm_user = "nobody"\n[pools.p]\nsnapshot = "auto"\n',
            "pool 'p' uses snapshots (snapshot = 'auto') but QEMU runs as vmm_user 'nobody'",
        ),
    ],
)
def test_bad_settings_are_named(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        _parse(text)
    assert message in str(info.value)


def test_vmm_user_resolved() -> None:
    config = _parse('vmm_user = "nobody"\n[pools.p]\nsnapshot = "never"\n')
    run_as = config.isolation("p").run_as
    assert run_as is not None and run_as.name == "nobody" and run_as.uid != 0
