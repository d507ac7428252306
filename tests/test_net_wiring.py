"""Where network policies come from and what they turn into, without booting a VM.

Image specs' ``[network]`` (validation with file and line, digests, manifest),
the VM's choice between the caller's policy and the image's, nat support per
backend, ``stoker doctor``'s network lines, the guest environment, and the
summary ``stoker run --json`` prints.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from stoker.backends.cloud_hypervisor import CloudHypervisorBackend
from stoker.backends.firecracker import FirecrackerBackend
from stoker.backends.qemu import QemuBackend, has_user_networking
from stoker.doctor import network_checks
from stoker.errors import UsageError
from stoker.images.spec import digest_document, load_spec_file
from stoker.net.channel import proxy_env
from stoker.net.policy import NetworkPolicy, PolicyError, image_network_policy
from stoker.run import network_summary
from stoker.vm import VM

BASE = """
name = "t"
base = "debian:bookworm"
"""


def spec_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(BASE).lstrip() + textwrap.dedent(extra))
    return path


def test_image_network_table_is_parsed(tmp_path: Path) -> None:
    (spec,) = load_spec_file(
        spec_file(
            tmp_path,
            """
            [network]
            mode = "egress"
            allow = ["@pypi", "git.example.com:443"]
            [network.limits]
            max_connections = 8
            """,
        )
    ).values()
    assert spec.network is not None
    assert spec.network.mode == "egress"
    assert spec.network.limits.max_connections == 8
    assert spec.network.match_host("files.pythonhosted.org", 443) is not None
    assert spec.network.match_host("git.example.com", 80) is None


@pytest.mark.parametrize(
    "table, expected",
    [
        ('mode = "egress"\nallow = ["https://github.com"]', "https://github.com"),
        ('mode = "none"\nallow = ["github.com"]', "only apply to --network egress"),
        ('mode = "open"', "mode"),
        ('mode = "egress"\n[network.limits]\nidle_timeout = 5', "idle_timeout"),
        ('mode = "egress"\nallow = ["@nope"]', "@nope"),
    ],
)
def test_bad_network_tables_name_file_line_and_entry(
    tmp_path: Path, table: str, expected: str
) -> None:
    path = spec_file(tmp_path, "\n[network]\n" + table + "\n")
    with pytest.raises(UsageError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert "spec.toml:" in message and "network" in message, message
    assert expected in message, message


def test_images_without_network_keep_their_digest_document(tmp_path: Path) -> None:
    (plain,) = load_spec_file(spec_file(tmp_path, "")).values()
    assert "network" not in digest_document(plain)
    (networked,) = load_spec_file(
        spec_file(tmp_path, '[network]\nmode = "egress"\nallow = ["github.com"]\n')
    ).values()
    assert digest_document(networked)["network"]["allow"] == ["github.com"]


def test_image_manifest_policy() -> None:
    assert image_network_policy({}).mode == "none"
    policy = image_network_policy(
        {"network": {"mode": "egress", "allow": ["github.com"], "limits": {}}}
    )
    assert policy.mode == "egress" and policy.allow == ("github.com",)
    with pytest.raises(PolicyError, match="network policy is invalid"):
        image_network_policy({"network": {"mode": "egress", "allow": ["http://x"]}})


def _apply(vm: VM, manifest: dict[str, object]) -> None:
    vm._apply_image_defaults(SimpleNamespace(image=SimpleNamespace(manifest=manifest)))  # type: ignore[arg-type]


def test_the_callers_policy_wins_over_the_image() -> None:
    image = {"network": {"mode": "egress", "allow": ["github.com"]}}
    vm = VM()
    _apply(vm, image)
    assert vm.network.mode == "egress" and vm.network.allow == ("github.com",)
    vm = VM(network=NetworkPolicy(mode="none"))
    _apply(vm, image)
    assert vm.network.mode == "none"
    vm = VM()
    _apply(vm, {})
    assert vm.network.mode == "none"


def test_nat_support_per_backend() -> None:
    assert FirecrackerBackend().nat_support()[0] is False
    assert "tap" in FirecrackerBackend().nat_support()[1]
    assert CloudHypervisorBackend().nat_support()[0] is False
    offered, how = QemuBackend().nat_support()
    assert offered == has_user_networking()
    assert ("user-mode networking" in how) if offered else ("libslirp" in how)


def test_doctor_lists_the_network_modes() -> None:
    checks = {c.name: c for c in network_checks()}
    assert checks["network none"].status == "ok"
    assert checks["network egress"].status == "ok"
    if has_user_networking():
        assert checks["network nat (qemu)"].status == "ok"
        assert "unsafe for untrusted code" in checks["network nat (qemu)"].detail


def test_proxy_env_covers_the_usual_tools() -> None:
    env = proxy_env(3128)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "npm_config_https_proxy"):
        assert env[key] == "http://127.0.0.1:3128"
    assert "127.0.0.1" in env["no_proxy"].split(",")


def test_run_summary_of_a_vm_without_network() -> None:
    summary = network_summary(VM())
    assert summary["mode"] == "none" and "connections" not in summary
