"""A daemon told to stop while it is still starting stops cleanly (exit status 0)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (``SigCgt`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "stoker.service", "--config"],
        [sys.executable, "-c", "from stoker._entry import main; main()", "serve", "--config"],
    ],
    ids=["python -m stoker.service", "stoker serve"],
)
def test_sigterm_during_start_up_stops_cleanly(
    tmp_path: Path, allow_fake: None, argv: list[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "stoker.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nbackend = "fake"\n'
        '[listen]\nhost = "127.0.0.1"\n'
        f"port = {port}\n"
        '[host]\nname = "early"\ncpus = 1\nmemory_mb = 512\n'
        "[pools.small]\ncpus = 1\nmemory = 256\nmax = 1\n"
    )
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        # As soon as stoker handles SIGTERM at all, which is long before its event loop
        # runs (the imports alone take about a second): the signal comes while it starts.
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.pid):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "stoker never installed a SIGTERM handler"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text
    # Received by the start-up handler, then acted on once the daemon could stop cleanly.
    assert "during start-up" in text, text
