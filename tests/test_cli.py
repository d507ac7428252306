"""The `stoker` command as users run it: exit statuses, streaming, artifacts, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stoker.cli import parse_duration, parse_env
from stoker.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
STOKER = [sys.executable, "-m", "stoker.cli"]
EXAMPLE = REPO / "examples" / "hello"


def stoker(*args: str, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )


def _qemu_children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"qemu-system" in cmd:
            found.append(int(entry))
    return found


def _start_long_run(project: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """`stoker run` of a command that sleeps; returns once the command runs in the VM."""
    argv = [
        *STOKER,
        "run",
        "--accel",
        "tcg",
        str(project),
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().strip()
        if line != "started":
            # Say why stoker stopped early (a flake on a fresh machine once gave only EOF).
            proc.kill()
            _, stderr = proc.communicate(timeout=30)
            raise AssertionError(
                f"expected 'started', got {line!r}; exit {proc.returncode}; stderr:\n{stderr}"
            )
        return proc, _qemu_children_of(proc.pid)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


# ------------------------------------------------------------------ pure helpers


def test_parse_duration() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("30s") == 30
    assert parse_duration("10m") == 600
    assert parse_duration("1h") == 3600
    with pytest.raises(UsageError, match="duration"):
        parse_duration("soon")


def test_parse_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "yes")
    assert parse_env(["A=1", "B=x=y", "FROM_HOST"]) == {"A": "1", "B": "x=y", "FROM_HOST": "yes"}
    monkeypatch.delenv("NOT_THERE", raising=False)
    with pytest.raises(UsageError, match="NOT_THERE"):
        parse_env(["NOT_THERE"])


# ------------------------------------------------------------------ bad input: no VM started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/does/not/exist", "--", "true"], "does not exist"),
        (["run", str(EXAMPLE), "--memory", "lots", "--", "true"], "cannot read size"),
        (["run", str(EXAMPLE), "--env", "1BAD=x", "--", "true"], "invalid environment variable"),
        (["run", str(EXAMPLE), "--artifacts", "../x", "--", "true"], "stay inside"),
        (["run", str(EXAMPLE), "--accel", "warp", "--", "true"], "--accel"),
        (
            ["run", str(EXAMPLE), "--image", "no-such-image", "--", "true"],
            "no image called 'no-such-image' has been built",
        ),
    ],
)
def test_bad_input_is_a_usage_error(args: list[str], message: str) -> None:
    res = stoker(*args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr


# ------------------------------------------------------------------ real runs

pytestmark_vm = pytest.mark.vm


@pytestmark_vm
def test_run_example_project_passes() -> None:
    res = stoker("run", "--accel", "tcg", str(EXAMPLE), "--", "make", "test")
    assert res.returncode == 0, res.stderr
    assert "all tests passed" in res.stdout
    assert "Ran 2 tests" in res.stderr


@pytestmark_vm
def test_exit_status_and_json_summary(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "report.txt").write_text("x")
    res = stoker(
        "run",
        "--accel",
        "tcg",
        "--json",
        "-a",
        "report.txt",
        "-a",
        "missing-*",
        "--out",
        str(tmp_path / "out"),
        "-e",
        "CODE=7",
        str(proj),
        "--",
        "sh",
        "-c",
        'echo to-stdout; echo "r" >> report.txt; exit $CODE',
    )
    assert res.returncode == 7, res.stderr
    summary = json.loads(res.stdout)
    assert summary["exit_code"] == 7 and summary["returncode"] == 7
    assert summary["artifacts"] == ["report.txt"] and summary["missing_artifacts"] == ["missing-*"]
    assert (tmp_path / "out" / "report.txt").read_text() == "xr\n"
    assert "to-stdout" in res.stderr  # --json moves command output to stderr
    for key in (
        "prepare",
        "launch",
        "agent_ready",
        "seed",
        "command",
        "copy_out",
        "teardown",
        "total",
    ):
        assert summary["timings"][key] >= 0


@pytestmark_vm
def test_timeout_exit_status(tmp_path: Path) -> None:
    res = stoker("run", "--accel", "tcg", "--timeout", "2s", str(tmp_path), "--", "sleep", "600")
    assert res.returncode == 124, res.stderr
    assert "timed out" in res.stderr


@pytestmark_vm
def test_command_not_found_is_127(tmp_path: Path) -> None:
    res = stoker("run", "--accel", "tcg", str(tmp_path), "--", "no-such-program")
    assert res.returncode == 127
    assert "no-such-program" in res.stderr


@pytestmark_vm
def test_hostile_artifact_symlink_refused(tmp_path: Path) -> None:
    proj, out = tmp_path / "proj", tmp_path / "out"
    proj.mkdir()
    canary = tmp_path / "canary"
    canary.write_text("safe")
    res = stoker(
        "run",
        "--accel",
        "tcg",
        "-a",
        "evil",
        "-a",
        "fine.txt",
        "--out",
        str(out),
        str(proj),
        "--",
        "sh",
        "-c",
        f"echo ok > fine.txt; ln -s {canary} evil",
    )
    assert res.returncode == 125, res.stderr
    assert "evil" in res.stderr and "infrastructure error" in res.stderr
    assert canary.read_text() == "safe"
    assert not (out / "evil").is_symlink()


@pytestmark_vm
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_destroys_the_vm(tmp_path: Path, signum: int) -> None:
    proc, qemu = _start_long_run(tmp_path)
    try:
        assert qemu, "no QEMU child found"
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        for pid in qemu:
            assert not Path(f"/proc/{pid}").exists()
    finally:
        proc.kill()
        proc.wait()


def _cgroup_dir(pid: int) -> Path | None:
    """The cgroup v2 directory of process ``pid`` when it has one of its own (a VM's)."""
    from stoker.isolation.cgroups import cgroup2_mount, own_cgroup

    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    own = own_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    if mount is None or own is None or not Path(own).name.startswith("stoker-"):
        return None
    return mount / own.lstrip("/")


@pytestmark_vm
def test_kill_9_of_stoker_takes_the_vm_with_it(tmp_path: Path) -> None:
    proc, qemu = _start_long_run(tmp_path)
    try:
        assert qemu
        cgroups = [_cgroup_dir(pid) for pid in qemu]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in qemu) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Reaped by init once orphaned; gone or a zombie is fine, running is not.
        for pid in qemu:
            status = Path(f"/proc/{pid}/status")
            assert not status.exists() or "zombie" in status.read_text()
        # The next stoker sweeps the dead run's work directory.
        from stoker.paths import Dirs
        from stoker.vmfiles import sweep_stale_workdirs

        runtime = Dirs.from_env().runtime
        sweep_stale_workdirs(runtime)
        assert not list(runtime.glob("stoker-*"))
        # And its VM's cgroup, where this host gave it one (its owner is dead).
        from stoker.isolation.cgroups import sweep_stale

        for cgroup in filter(None, cgroups):
            sweep_stale(cgroup.parent)
            assert not cgroup.exists()
    finally:
        proc.kill()
        proc.wait()


def test_doctor_json() -> None:
    res = stoker("doctor", "--json")
    report = json.loads(res.stdout)
    names = {c["name"] for c in report["checks"]}
    assert {"qemu", "kvm", "busybox-static", "kernel", "microvm kernel", "images", "disk"} <= names
    assert res.returncode == (0 if report["ok"] else 1)


@pytestmark_vm
def test_stdin_is_forwarded_only_when_asked(tmp_path: Path) -> None:
    res = stoker(
        "run",
        "--accel",
        "tcg",
        "--stdin",
        str(tmp_path),
        "--",
        "sh",
        "-c",
        "tr a-z A-Z",
        input="hello vm\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "HELLO VM\n"
    res = stoker(
        "run",
        "--accel",
        "tcg",
        str(tmp_path),
        "--",
        "sh",
        "-c",
        "cat; echo done",
        input="ignored\n",
    )
    assert res.stdout == "done\n"


def test_guest_text_cannot_drive_the_terminal_or_break_markup() -> None:
    from stoker.cli import _safe

    hostile = "[/dev/vda] \x1b]52;c;cGF3bmVk\x07 [bold]fake[/bold] \x9b2J ok\nnext\tline"
    out = _safe(hostile)
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "\n" in out and "\t" in out
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(out)  # must not raise MarkupError
    shown = console.export_text()
    assert "[/dev/vda]" in shown and "[bold]fake[/bold]" in shown


def test_the_build_progress_display_starts_and_stops() -> None:
    # It drives rich's Console as a context manager: the lazily made stderr console
    # must be the real one there (a proxy broke every `stoker image build` once).
    from stoker.cli.images import _BuildProgress

    with _BuildProgress() as progress:
        progress.say("a step")


def test_say_writes_plain_lines_without_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from stoker.cli import say

    say("stoker: warning:", "guest said \x1b[2Jhi\x07", style="yellow")
    say("stoker:", "", style="dim")
    # Not a terminal here: no colour; the guest's escape sequence is neutralised.
    assert capsys.readouterr().err == "stoker: warning: guest said \ufffd[2Jhi\ufffd\nstoker:\n"


def test_finish_raises_for_in_process_callers() -> None:
    import typer

    from stoker.cli import finish

    exit_ = finish(3)
    assert isinstance(exit_, typer.Exit) and exit_.exit_code == 3


def test_run_has_its_own_short_path_with_the_same_interface() -> None:
    res = stoker("run", "--help")
    assert res.returncode == 0 and "Usage: stoker run [OPTIONS]" in res.stdout
    assert "--snapshot" in res.stdout and "--network" in res.stdout
    res = stoker("run", "--bogus", ".", "--", "true")
    assert res.returncode == 2 and "No such option: --bogus" in res.stderr
    # The whole tree is still there for everything else.
    res = stoker("--help")
    assert res.returncode == 0 and "run" in res.stdout and "serve" in res.stdout


def test_the_run_path_loads_neither_pydantic_nor_rich() -> None:
    """What `stoker run` imports before and while its VM starts (no timing: the modules).

    pydantic (through typer >= 0.29, the network policy, or the guest protocol)
    cost 60-100 ms of every run; rich 17 ms.  A VM with a network loads the
    policy, which is pydantic, when it needs it.
    """
    code = (
        "import sys\n"
        "import stoker.cli, stoker.cli.run, stoker.run, stoker.vm, stoker.protocol.client\n"
        "from stoker.cli import say\n"
        "say('stoker: warning:', 'x')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'rich'}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout
