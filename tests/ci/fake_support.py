"""What the FakeGitHub contract tests share: constants, a loopback server base, helpers.

Their fixtures are in ``conftest.py`` beside this module.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stoker.ci.github.fake_github import FakeGitHub

APP_ID = 4242
CLIENT_ID = "Iv1.fake"
INSTALLATION = 77
OWNER = "acme"
REPO = "acme/app"
PAT = "github_pat_static_for_tests"
SECRET = b"webhook-secret-for-fake-tests"
LABELS = ["self-hosted", "linux", "x64"]
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-used",
    "x-ratelimit-resource",
)
#: The workflow job fields the design doc promises (REST and webhooks alike).
JOB_FIELDS = {
    "id",
    "run_id",
    "status",
    "conclusion",
    "labels",
    "runner_id",
    "runner_name",
    "created_at",
    "started_at",
    "completed_at",
    "name",
    "workflow_name",
    "head_branch",
    "html_url",
}
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "github"


class LoopbackServer:
    """A threading HTTP server on 127.0.0.1, started and stopped as a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str, port: int = 0) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        # A short poll interval: shutdown() waits for the next poll.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name=name
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- keys and JWTs


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def app_jwt(
    key: rsa.RSAPrivateKey, *, iss: str = str(APP_ID), age: float = 30, lifetime: float = 540
) -> str:
    """An App JWT as GitHub documents it: issued ``age`` seconds ago, valid ``lifetime``."""
    now = int(time.time())
    claims = {"iat": int(now - age), "exp": int(now - age + lifetime), "iss": iss}
    return jwt.encode(claims, key, algorithm="RS256")


def bearer(token: str) -> dict[str, str]:
    """Request headers with ``token`` (none when empty)."""
    accept = {"Accept": "application/vnd.github+json"}
    return {"Authorization": f"Bearer {token}", **accept} if token else accept


# --------------------------------------------------------------------------- webhook receiver


class Receiver(LoopbackServer):
    """A webhook receiver on 127.0.0.1: records each delivery, answers ``status``."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.received.append((dict(self.headers.items()), body))
                    status = receiver.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        super().__init__(Handler, "test-receiver")
        self.url = f"{self.base_url}/hook"

    def wait_for(self, count: int, timeout: float = 10) -> list[tuple[dict[str, str], bytes]]:
        """The first ``count`` deliveries, once they arrived."""
        until(lambda: len(self.received) >= count, timeout, f"{count} deliveries")
        with self.lock:
            return list(self.received)


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return value


def payloads(received: list[tuple[dict[str, str], bytes]]) -> list[dict[str, Any]]:
    return [json.loads(body) for _, body in received]


# --------------------------------------------------------------------------- fixtures


def make_fake(key: rsa.RSAPrivateKey, receiver: Receiver | None, **kwargs: Any) -> FakeGitHub:
    fake = FakeGitHub(
        app_id=APP_ID,
        client_id=CLIENT_ID,
        public_key_pem=public_pem(key),
        tokens=(PAT,),
        webhook_url=receiver.url if receiver else None,
        webhook_secret=SECRET,
        **kwargs,
    )
    fake.install(OWNER, INSTALLATION)
    fake.add_repo(REPO)
    return fake


def register(api: httpx.Client, name: str, labels: list[str] = LABELS, scope: str = "") -> Any:
    """A JIT runner on ``scope`` (the repository by default): GitHub's 201 answer."""
    response = api.post(
        f"/{scope or 'repos/' + REPO}/actions/runners/generate-jitconfig",
        json={"name": name, "runner_group_id": 1, "labels": labels, "work_folder": "_work"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def jit_identity(encoded: str) -> dict[str, Any]:
    """What the stand-in sends with each runner-protocol call."""
    config = json.loads(base64.b64decode(encoded))
    return {"runner_id": config["runner_id"], "secret": config["secret"]}


def runner_call(api: httpx.Client, what: str, who: dict[str, Any], **body: Any) -> httpx.Response:
    return api.post(f"/_fake/runner/{what}", json={**who, **body}, timeout=40)


def take_job(api: httpx.Client, name: str, labels: list[str] = LABELS) -> tuple[Any, Any]:
    """Register a runner, open its session and take a job: (identity, job)."""
    who = jit_identity(register(api, name, labels)["encoded_jit_config"])
    assert runner_call(api, "session", who).status_code == 200
    answer = runner_call(api, "acquire", who, wait=5)
    assert answer.status_code == 200, answer.text
    return who, answer.json()["job"]
