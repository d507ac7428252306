"""A **stand-in** for the Actions runner's ``run.sh``, for tests against FakeGitHub only.

The official runner cannot be downloaded where stoker is developed.  This
script plays its part in a ``github-runner`` image built from the shipped
spec with a local artifact (:func:`build_tarball` packs it as the release
tarball, ``run.sh`` at its root): it reads the JIT configuration from
``--jitconfig`` or ``ACTIONS_RUNNER_INPUT_JITCONFIG`` (and removes the latter
from its environment, as the runner does), opens a session with the fake
GitHub it names, waits for one job, runs it, reports it and exits.  HTTP goes
through ``http_proxy`` when set (inside an ``egress`` VM: the guest's proxy).

Run as a script, it needs only Python's standard library.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RUN_SH = b"""#!/bin/sh
# stoker's STAND-IN for the Actions runner (tests against a fake GitHub only).
exec python3 "$(dirname "$0")/stand_in.py" "$@"
"""


def build_tarball(dest: Path) -> str:
    """Write the stand-in release tarball (reproducible); returns its SHA-256."""
    members = [("run.sh", RUN_SH, 0o755), ("stand_in.py", Path(__file__).read_bytes(), 0o644)]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(data), mode, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    import gzip

    packed = gzip.compress(raw.getvalue(), mtime=0)
    dest.write_bytes(packed)
    return hashlib.sha256(packed).hexdigest()


def _say(text: str) -> None:
    print(f"[stand-in runner] {text}", flush=True)


def _post(url: str, body: dict[str, Any], *, timeout: float = 60) -> tuple[int, Any]:
    if not url.startswith(("http://", "https://")):
        raise SystemExit(f"[stand-in runner] not an http(s) URL: {url!r}")
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    for attempt in range(8):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                data = response.read(1 << 20)
                return response.status, json.loads(data) if data else None
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == 7:
                raise SystemExit(f"[stand-in runner] cannot reach {url}: {exc}") from None
            time.sleep(min(5.0, 0.2 * 2**attempt))
    raise AssertionError("unreachable")


def main(argv: list[str]) -> int:
    """Take one job from the fake GitHub, run it, report it."""
    encoded = os.environ.pop("ACTIONS_RUNNER_INPUT_JITCONFIG", "")
    if "--jitconfig" in argv:
        encoded = argv[argv.index("--jitconfig") + 1]
    if not encoded:
        _say("no JIT configuration (--jitconfig or ACTIONS_RUNNER_INPUT_JITCONFIG)")
        return 2
    config = json.loads(base64.b64decode(encoded))
    url = config["url"]
    who = {"runner_id": config["runner_id"], "secret": config["secret"]}
    status, _ = _post(f"{url}/_fake/runner/session", who)
    if status != 200:
        _say(f"the session was refused ({status})")
        return 1
    _say(f"{config['runner_name']}: Listening for Jobs")
    while True:
        status, answer = _post(f"{url}/_fake/runner/acquire", {**who, "wait": 20})
        if status == 200 and answer:
            break
        if status not in (200, 204):
            _say(f"acquiring a job failed ({status})")
            return 1
    job = answer["job"]
    _say(f"Running job {job['id']}: {' '.join(job['run'])}")
    # Like the real runner renewing its job, say every second that this runner is alive.
    done = threading.Event()

    def beat() -> None:
        while not done.wait(1.0):
            _post(f"{url}/_fake/runner/heartbeat", who, timeout=10)

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        result = subprocess.run(job["run"], check=False)
    finally:
        done.set()
        beating.join(timeout=15)
    conclusion = "success" if result.returncode == 0 else "failure"
    status, _ = _post(
        f"{url}/_fake/runner/complete", {**who, "job_id": job["id"], "conclusion": conclusion}
    )
    _say(f"Job {job['id']} completed with result: {conclusion} (reported: {status})")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
