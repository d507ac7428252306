"""Receiving a job submission: a streamed ``multipart/form-data`` body, bounded as it arrives.

``POST /v1/jobs`` carries a JSON ``spec`` part and an optional ``source``
part (a tar or tar.gz of the project).  Starlette's form parser would spool
any amount of data to disk before the endpoint runs, so the body is parsed
here instead, chunk by chunk, with python-multipart's streaming parser:

* the ``source`` part goes to a file in a caller-owned temporary directory
  and stops with :class:`UploadTooLarge` as soon as it passes the limit (the
  rest of the body is never read);
* the ``spec`` part is kept in memory, capped at :data:`MAX_SPEC_BYTES`;
* any other part, a repeated part or a missing ``spec`` is a :class:`BadUpload`.

The stored source is then handed to :meth:`stoker.service.service.Service.submit`,
which unpacks and checks it (``safe_extract``) before the job exists.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

__all__ = [
    "MAX_SPEC_BYTES",
    "BadUpload",
    "ReceivedUpload",
    "UploadTooLarge",
    "body_limit",
    "receive_upload",
]

#: Largest accepted ``spec`` part.
MAX_SPEC_BYTES: Final = 1 << 20
#: Allowance for multipart framing and headers on top of the parts themselves.
FRAMING_ALLOWANCE: Final = 64 << 10


class BadUpload(Exception):
    """The submission body is malformed (HTTP 400); the message says how."""


class UploadTooLarge(Exception):
    """A part of the submission is larger than allowed (HTTP 413)."""


@dataclass(frozen=True)
class ReceivedUpload:
    """A parsed submission: the raw JSON spec and, if sent, the stored source part."""

    spec: bytes
    source: Path | None
    source_bytes: int


def body_limit(max_source_bytes: int) -> int:
    """The most a whole submission body may take (checked against ``Content-Length``)."""
    return max_source_bytes + MAX_SPEC_BYTES + FRAMING_ALLOWANCE


class _Parts:
    """python-multipart callbacks that route part data and enforce the per-part limits."""

    def __init__(self, workdir: Path, max_source_bytes: int) -> None:
        self._workdir = workdir
        self._max_source = max_source_bytes
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._current: str | None = None
        self._fd: int | None = None
        self.seen: set[str] = set()
        self.spec = bytearray()
        self.source: Path | None = None
        self.source_bytes = 0
        self.finished = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        field = self._header_field.decode("latin-1").strip().lower()
        self._headers[field] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise BadUpload("every multipart part needs 'Content-Disposition: form-data; name=...'")
        name = options[b"name"].decode("latin-1")
        if name not in ("spec", "source"):
            raise BadUpload(f"unknown multipart part {name!r} (expected 'spec' and 'source')")
        if name in self.seen:
            raise BadUpload(f"multipart part {name!r} given twice")
        self.seen.add(name)
        self._current = name
        if name == "source":
            self.source = self._workdir / "source.upload"
            self._fd = os.open(
                self.source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        if self._current == "spec":
            if len(self.spec) + size > MAX_SPEC_BYTES:
                raise UploadTooLarge(f"the 'spec' part is larger than {MAX_SPEC_BYTES} bytes")
            self.spec += data[start:end]
        elif self._current == "source":
            self.source_bytes += size
            if self.source_bytes > self._max_source:
                raise UploadTooLarge(
                    f"the 'source' upload is larger than the limit of {self._max_source} bytes"
                )
            assert self._fd is not None
            view = memoryview(data)[start:end]
            while view:
                view = view[os.write(self._fd, view) :]

    def _part_end(self) -> None:
        self.close()
        self._current = None

    def _end(self) -> None:
        self.finished = True


async def receive_upload(
    chunks: AsyncIterator[bytes],
    content_type: str,
    *,
    workdir: Path,
    max_source_bytes: int,
) -> ReceivedUpload:
    """Parse a submission body from ``chunks`` into ``workdir`` (which the caller removes).

    Raises :class:`BadUpload` or :class:`UploadTooLarge`; stops reading
    ``chunks`` at the first problem.
    """
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise BadUpload(
            f"expected a multipart/form-data body, not {mime.decode('latin-1') or 'none'!r}"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadUpload("the multipart/form-data content type has no boundary")
    parts = _Parts(workdir, max_source_bytes)
    try:
        parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
        total = 0
        limit = body_limit(max_source_bytes)
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise UploadTooLarge(f"the request body is larger than {limit} bytes")
            # The source part is written to disk from the callbacks: not in the event loop.
            await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadUpload(f"malformed multipart body: {exc}") from None
    finally:
        parts.close()
    if not parts.finished:
        raise BadUpload("the multipart body ends before its closing boundary")
    if "spec" not in parts.seen:
        raise BadUpload("the multipart body has no 'spec' part (the job's JSON description)")
    return ReceivedUpload(
        spec=bytes(parts.spec), source=parts.source, source_bytes=parts.source_bytes
    )
