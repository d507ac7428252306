"""GitHub webhook deliveries: verified before anything is read, then parsed strictly.

GitHub signs each delivery with the webhook secret: ``X-Hub-Signature-256:
sha256=<HMAC-SHA256 of the raw body, hex>``.  Nothing of a delivery is
parsed or stored before that signature is checked (in constant time); a body
over :data:`MAX_BODY` is refused unread.  Only ``ping`` and ``workflow_job``
are accepted: a hostile sender cannot make stoker parse anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: ``workflow_job`` payloads are a few KiB; GitHub caps any delivery at 25 MiB.
MAX_BODY = 1 << 20
#: Events accepted; anything else is answered 400 and forgotten.
EVENTS = ("ping", "workflow_job")
_DELIVERY_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


class WebhookRejected(Exception):
    """A delivery that is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> None:
    """Raise :class:`WebhookRejected` (401) unless ``header`` signs ``body`` with ``secret``."""
    if not header:
        raise WebhookRejected(401, "missing X-Hub-Signature-256")
    # compare_digest on equal-length ASCII: no timing difference reveals the expected value.
    if not hmac.compare_digest(
        signature(secret, body).encode(), header.strip().encode("ascii", "replace")
    ):
        raise WebhookRejected(401, "X-Hub-Signature-256 does not match the body")


class _Payload(BaseModel):
    # GitHub adds fields over time: ignore what we do not read, check what we do.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Account(_Payload):
    login: str = Field(max_length=100)


class Repository(_Payload):
    full_name: str = Field(max_length=200, pattern=r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")
    owner: Account


class Installation(_Payload):
    id: int


class WorkflowJobPayload(_Payload):
    id: int = Field(ge=1)
    run_id: int = Field(ge=1)
    status: str = Field(max_length=32)
    conclusion: str | None = Field(default=None, max_length=32)
    labels: list[Annotated[str, Field(max_length=256)]] = Field(max_length=100)
    runner_id: int | None = None
    runner_name: str | None = Field(default=None, max_length=200)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    name: str | None = Field(default=None, max_length=1000)


class WorkflowJobEvent(_Payload):
    action: str = Field(max_length=32)
    workflow_job: WorkflowJobPayload
    repository: Repository
    installation: Installation | None = None


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: its event, id and (for ``workflow_job``) the parsed payload."""

    event: Literal["ping", "workflow_job"]
    delivery_id: str
    job: WorkflowJobEvent | None


def parse_delivery(secret: bytes, body: bytes, headers: dict[str, str]) -> Delivery:
    """Verify and parse one delivery; raises :class:`WebhookRejected`.

    ``headers`` are the request's, names lower-cased.  The order of checks
    matters: size, then signature, and only then the content.
    """
    if len(body) > MAX_BODY:
        raise WebhookRejected(413, f"the body is larger than {MAX_BODY} bytes")
    verify(secret, body, headers.get("x-hub-signature-256"))
    event = headers.get("x-github-event", "")
    delivery_id = headers.get("x-github-delivery", "")
    if not _DELIVERY_RE.fullmatch(delivery_id):
        raise WebhookRejected(400, "missing or malformed X-GitHub-Delivery")
    if event not in EVENTS:
        raise WebhookRejected(
            400, f"event {event[:40]!r} is not handled (subscribe to workflow_job only)"
        )
    try:
        document: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WebhookRejected(400, "the body is not JSON") from None
    if not isinstance(document, dict):
        raise WebhookRejected(400, "the body is not a JSON object")
    if event == "ping":
        return Delivery("ping", delivery_id, None)
    try:
        job = WorkflowJobEvent.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WebhookRejected(
            400, f"malformed workflow_job payload: {where}: {first['msg']}"
        ) from None
    return Delivery("workflow_job", delivery_id, job)
