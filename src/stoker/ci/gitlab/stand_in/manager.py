"""The runner's side of GitLab's job API around :func:`run_custom_job` (stand-in, tests only)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from .contract import PREPARATION_RETRY_INTERVAL, JobOutcome, RunnerSettings
from .job import run_custom_job


class StandInRunnerManager:
    """The runner's side of GitLab's job API around :func:`run_custom_job` (a stand-in).

    ``runner_token`` is the runner's authentication token (``glrt-...``);
    ``work_dir`` holds the jobs' temporary directories (a private temporary
    directory when None).  Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        runner_token: str,
        settings: RunnerSettings,
        *,
        system_id: str = "s_standin00000",
        work_dir: Path | None = None,
        retry_delay: float = PREPARATION_RETRY_INTERVAL,
        poll_interval: float = 0.2,
        update_interval: float = 0.3,
        keepalive_interval: float = 2.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = runner_token
        self.settings = settings
        self.system_id = system_id
        self.retry_delay = retry_delay
        self.poll_interval = poll_interval
        self.update_interval = update_interval
        self.keepalive_interval = keepalive_interval
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if work_dir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="stand-in-runner-")
            work_dir = Path(self._own_dir.name)
        self.work_dir = Path(work_dir)
        self._http = httpx.Client(base_url=f"{self.url}/api/v4", timeout=30, trust_env=False)
        self._http_lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP client (and remove the private work directory)."""
        self._http.close()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> StandInRunnerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._http_lock:
            return self._http.request(method, path, **kwargs)

    def request_job(self, timeout: float) -> dict[str, Any] | None:
        """Poll ``POST /jobs/request`` until a job comes (201) or ``timeout`` passes (None)."""
        deadline = time.monotonic() + timeout
        last_update = ""
        while True:
            try:
                response = self._request(
                    "POST",
                    "/jobs/request",
                    json={
                        "token": self.token,
                        "system_id": self.system_id,
                        "last_update": last_update,
                        "info": {
                            "name": "stand-in",
                            "version": "stand-in",
                            "revision": "stand-in",
                            "platform": "linux",
                            "architecture": os.uname().machine,
                            "executor": "custom",
                            "shell": self.settings.shell,
                            "features": {
                                "variables": True,
                                "shared": True,
                                "upload_raw_artifacts": True,
                                "cancelable": True,
                                "trace_reset": True,
                                "trace_checksum": True,
                                "trace_size": True,
                                "masking": True,
                                "return_exit_code": True,
                            },
                        },
                    },
                )
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 201:
                job: dict[str, Any] = response.json()
                return job
            if response is not None and response.status_code == 204:
                last_update = response.headers.get("x-gitlab-last-update", last_update)
            elif response is not None and response.status_code in (401, 403):
                raise RuntimeError(f"jobs/request refused the runner token: {response.status_code}")
            if time.monotonic() + self.poll_interval >= deadline:
                return None
            time.sleep(self.poll_interval)

    def run_once(self, timeout: float = 30.0) -> JobOutcome | None:
        """Take one job (waiting up to ``timeout`` s), run it, report it; None if none came."""
        job = self.request_job(timeout)
        if job is None:
            return None
        return self.run_job(job)

    def run_job(self, job: Mapping[str, Any]) -> JobOutcome:
        """Run a job GitLab handed out and report its trace and result."""
        job_id, job_token = int(job["id"]), str(job["token"])
        trace = bytearray()
        trace_lock = threading.Lock()
        sent = 0
        cancel = threading.Event()
        last_contact = time.monotonic()

        def watch(response: httpx.Response) -> None:
            if response.headers.get("job-status") in ("canceled", "canceling", "failed"):
                cancel.set()

        def flush() -> None:
            nonlocal sent, last_contact
            with trace_lock:
                chunk, start = bytes(trace[sent:]), sent
            if not chunk:
                if time.monotonic() - last_contact >= self.keepalive_interval:
                    last_contact = time.monotonic()
                    with contextlib.suppress(httpx.TransportError):
                        watch(
                            self._request(
                                "PUT",
                                f"/jobs/{job_id}",
                                json={"token": job_token, "state": "running"},
                            )
                        )
                return
            try:
                response = self._request(
                    "PATCH",
                    f"/jobs/{job_id}/trace",
                    content=chunk,
                    headers={
                        "JOB-TOKEN": job_token,
                        "Content-Range": f"{start}-{start + len(chunk) - 1}",
                        "Content-Type": "text/plain",
                    },
                )
            except httpx.TransportError:
                return
            last_contact = time.monotonic()
            watch(response)
            if response.status_code == 202:
                sent = start + len(chunk)
            elif response.status_code == 416:
                # GitLab says how much it holds ("0-N"): go on from there.
                _, _, end = response.headers.get("range", "0-0").partition("-")
                try:
                    sent = min(int(end), len(trace))
                except ValueError:
                    sent = 0

        self._request("PUT", f"/jobs/{job_id}", json={"token": job_token, "state": "running"})
        stop = threading.Event()

        def pusher() -> None:
            while not stop.wait(self.update_interval):
                flush()

        def write(data: bytes) -> None:
            with trace_lock:
                trace.extend(data)

        thread = threading.Thread(target=pusher, name=f"stand-in-trace-{job_id}", daemon=True)
        thread.start()
        try:
            outcome = run_custom_job(
                job,
                self.settings,
                trace=write,
                work_dir=self.work_dir,
                cancel=cancel,
                retry_delay=self.retry_delay,
            )
        finally:
            stop.set()
            thread.join()
        for _ in range(5):
            flush()
            if sent >= len(trace):
                break
        whole = bytes(trace)
        checksum = f"crc32:{zlib.crc32(whole) & 0xFFFFFFFF:08x}"
        body: dict[str, Any] = {
            "token": job_token,
            "state": outcome.state,
            "checksum": checksum,
            "output": {"checksum": checksum, "bytesize": len(whole)},
        }
        if outcome.exit_code is not None:
            body["exit_code"] = outcome.exit_code
        if outcome.failure_reason:
            body["failure_reason"] = outcome.failure_reason
        for _ in range(5):
            response = self._request("PUT", f"/jobs/{job_id}", json=body)
            if response.status_code == 412:
                sent = 0  # GitLab's copy differs: send the whole trace again
                for _ in range(5):
                    flush()
                    if sent >= len(trace):
                        break
                continue
            if response.status_code == 202 or response.status_code >= 500:
                time.sleep(self.update_interval)
                continue
            break
        return outcome


class StandInManager:
    """:class:`StandInRunnerManager` with the older calling convention (``run_once(work_dir)``).

    Kept for ``bench/gitlab.py`` and the scenario tests; ``token`` is the runner's.
    """

    def __init__(
        self,
        url: str,
        token: str,
        settings: RunnerSettings,
        *,
        system_id: str = "s_standin00000",
        retry_delay: float = 0.1,
    ) -> None:
        self.url, self.token, self.settings = url, token, settings
        self.system_id, self.retry_delay = system_id, retry_delay
        self._managers: dict[Path, StandInRunnerManager] = {}

    def _manager(self, work_dir: Path) -> StandInRunnerManager:
        key = Path(work_dir)
        if key not in self._managers:
            self._managers[key] = StandInRunnerManager(
                self.url,
                self.token,
                self.settings,
                system_id=self.system_id,
                work_dir=key,
                retry_delay=self.retry_delay,
            )
        return self._managers[key]

    def request_job(self, timeout: float) -> dict[str, Any] | None:
        """See :meth:`StandInRunnerManager.request_job`."""
        return self._manager(Path(tempfile.gettempdir())).request_job(timeout)

    def run_once(self, work_dir: Path, *, timeout: float = 30) -> JobOutcome | None:
        """Take one job, run it with its temporary directories in ``work_dir``, report it."""
        return self._manager(work_dir).run_once(timeout)

    def close(self) -> None:
        """Close every HTTP client."""
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()

    def __enter__(self) -> StandInManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
