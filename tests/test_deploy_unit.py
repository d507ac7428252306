"""The example systemd unit (deploy/stoker.service) is valid and shows the isolation it claims."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "deploy" / "stoker.service"


def _settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z]+)=(.*)", line.strip())
        if match:
            found.setdefault(match[1], []).append(match[2])
    return found


def test_unit_runs_qemu_unprivileged_with_delegated_cgroups() -> None:
    settings = _settings()
    assert settings["User"] == ["stoker"] and settings["SupplementaryGroups"] == ["kvm"]
    assert settings["Delegate"] == ["yes"]
    # A read-only /sys/fs/cgroup would leave the delegated subtree unusable.
    assert settings["ProtectControlGroups"] == ["no"]
    for hardening in ("NoNewPrivileges", "PrivateTmp", "RestrictSUIDSGID", "ProtectHome"):
        assert settings[hardening] == ["yes"], hardening
    assert settings["ProtectSystem"] == ["strict"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (no running systemd needed) finds nothing to say.

    The one change: ExecStart names an executable that exists here (verify
    checks that it does), so everything else in the unit is what is checked.
    """
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert exec_start is not None
    unit = tmp_path / "stoker.service"
    unit.write_text(text.replace(exec_start[0], "ExecStart=/bin/true"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr
