"""A job's output on its way into the database, and wake-ups for those following it.

* :class:`Notifier` wakes coroutines waiting for news about a job (log followers).
* :class:`SecretMasker` replaces secret values in a byte stream, across chunk boundaries.
* :class:`LogWriter` stores a job's output as bounded :class:`~stoker.service.models.LogChunk`
  rows, flushed periodically and in the job's final transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stoker.errors import InfrastructureError
from stoker.service.db import Database
from stoker.service.jobs import MIN_SECRET_LEN
from stoker.service.models import Job, LogChunk, utcnow

log = logging.getLogger(__name__)

#: Log output is stored in chunks of at most this size ...
LOG_CHUNK = 64 << 10
#: ... written at least this often while a command runs ...
LOG_FLUSH_SECONDS = 0.25
#: ... and as soon as this much is waiting (the guest waits for the database then).
LOG_FLUSH_BYTES = 256 << 10


# --- notifications for log followers --------------------------------------------------------------


class Notifier:
    """Wakes coroutines waiting for news about a key (a job id).

    An event is kept only while someone holds it: a follower that stops
    (its job ended, its client left) takes its entry with it, so the table does
    not grow by one event for every job ever followed.
    """

    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )

    def __len__(self) -> int:
        """How many keys someone waits for."""
        return len(self._events)

    def event(self, key: str) -> asyncio.Event:
        """The event the next :meth:`notify` of ``key`` sets (take it before looking)."""
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return event

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()


# --- logs -----------------------------------------------------------------------------------------


class SecretMasker:
    """Replaces secret values in a byte stream by ``***``, also across chunk boundaries.

    A chunk's tail that could be the start of a secret is held back until the
    next chunk (or :meth:`finish`) shows whether it is.
    """

    def __init__(self, values: Iterable[str]) -> None:
        self._secrets = sorted(
            {v.encode() for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True
        )
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        if not self._secrets:
            return data
        buf = self._pending + data
        for secret in self._secrets:
            buf = buf.replace(secret, b"***")
        hold = self._prefix_len(buf)
        self._pending = buf[len(buf) - hold :] if hold else b""
        return buf[: len(buf) - hold]

    def _prefix_len(self, buf: bytes) -> int:
        """Length of the longest tail of ``buf`` that starts some secret."""
        best = 0
        for secret in self._secrets:
            for k in range(min(len(secret) - 1, len(buf)), best, -1):
                if buf.endswith(secret[:k]):
                    best = k
                    break
        return best

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


class LogWriter:
    """A job's output on its way into :class:`~stoker.service.models.LogChunk` rows.

    Bounded: once the job's stored output reaches ``limit`` bytes (over all
    its attempts) the rest is dropped and the job is marked ``log_truncated``;
    lines stoker itself adds (stream ``system``) are not counted.  Nothing is
    written before :meth:`begin` (the job is this host's from then on); what
    is left at the end goes into the job's final transaction
    (:meth:`store_rest`), so followers see the last output and the end together.
    """

    def __init__(
        self,
        db: Database,
        job_id: str,
        *,
        limit: int,
        secrets: Iterable[str],
        on_flush: Callable[[str], None],
    ) -> None:
        self._db = db
        self._job_id = job_id
        self._limit = limit
        self._secrets = list(secrets)
        self._maskers = {s: SecretMasker(self._secrets) for s in ("stdout", "stderr")}
        self._pending: list[tuple[str, bytearray]] = []
        self._pending_bytes = 0
        #: Sequence number of the last stored chunk (None: not known yet).
        self._seq: int | None = None
        #: Output bytes accepted so far (stored or pending), over all attempts.
        self._accepted = 0
        self._truncated = False
        self._lock = asyncio.Lock()
        self._on_flush = on_flush
        self._ticker: asyncio.Task[None] | None = None

    @property
    def job_id(self) -> str:
        return self._job_id

    def begin(self, seq: int, stored: int, truncated: bool) -> None:
        """Continue after what earlier attempts stored; start flushing periodically."""
        self._seq = seq
        self._accepted += stored
        self._truncated = self._truncated or truncated
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:
                # Kept pending; the next tick (or the command's next output) tries again.
                log.warning("storing output of job %s failed: %s", self._job_id, exc)

    def _append(self, stream: str, data: bytes) -> None:
        if not data:
            return
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].extend(data)
        else:
            self._pending.append((stream, bytearray(data)))
        self._pending_bytes += len(data)

    def _accept(self, stream: str, data: bytes) -> None:
        if self._truncated or not data:
            return
        room = self._limit - self._accepted
        if len(data) > room:
            data = data[:room]
            self._truncated = True
        self._accepted += len(data)
        self._append(stream, data)
        if self._truncated:
            notice = f"[stoker] output limit of {self._limit} bytes reached; the rest is dropped\n"
            self._append("system", notice.encode())

    async def write(self, stream: Literal["stdout", "stderr"], data: bytes) -> None:
        """Store ``data`` (secrets masked); waits for the database when a lot is pending."""
        self._accept(stream, self._maskers[stream].feed(data))
        if self._pending_bytes >= LOG_FLUSH_BYTES:
            await self.flush()

    async def system(self, text: str) -> None:
        """A line from stoker itself (``[stoker] ...``)."""
        self._append("system", f"[stoker] {text}\n".encode())
        if self._pending_bytes >= LOG_FLUSH_BYTES:
            await self.flush()

    async def checkpoint(self, add_secrets: Iterable[str] = ()) -> int:
        """Store everything written so far (held-back tails included); the last chunk's seq.

        Output written after this gets higher sequence numbers, so a caller can
        tell one command's output from the next.  ``add_secrets`` are masked
        from here on, as well as the job's own.
        """
        for stream, masker in self._maskers.items():
            self._accept(stream, masker.finish())
        values = list(add_secrets)
        if values:
            self._secrets.extend(values)
            self._maskers = {s: SecretMasker(self._secrets) for s in ("stdout", "stderr")}
        await self.flush()
        if self._pending:
            # The database refused the write; the caller's failure handling takes over.
            raise InfrastructureError(f"storing the output of job {self._job_id} failed")
        assert self._seq is not None, "checkpoint() before begin()"
        return self._seq

    def note(self, text: str) -> None:
        """Like :meth:`system`, from code that cannot wait: stored with the next flush."""
        self._append("system", f"[stoker] {text}\n".encode())

    def _rows(
        self, pending: list[tuple[str, bytearray]], first_seq: int
    ) -> tuple[list[LogChunk], int, int]:
        """Chunks for ``pending``, numbered from ``first_seq``; their last seq; output bytes."""
        at = utcnow()
        rows = []
        seq = first_seq - 1
        for stream, data in pending:
            for i in range(0, len(data), LOG_CHUNK):
                seq += 1
                rows.append(
                    LogChunk(
                        job_id=self._job_id,
                        seq=seq,
                        stream=stream,
                        data=bytes(data[i : i + LOG_CHUNK]),
                        at=at,
                    )
                )
        output = sum(len(d) for s, d in pending if s != "system")
        return rows, seq, output

    async def flush(self) -> None:
        """Write what is pending as one transaction (nothing before :meth:`begin`)."""
        async with self._lock:
            if not self._pending or self._seq is None:
                return
            # Output that arrives while this is written waits for the next flush.
            pending, self._pending = self._pending, []
            size, self._pending_bytes = self._pending_bytes, 0
            rows, last, output = self._rows(pending, self._seq + 1)
            truncated = self._truncated

            def store(session: Session) -> None:
                session.add_all(rows)
                job = session.get(Job, self._job_id)
                if job is not None:
                    job.log_bytes += output
                    job.log_truncated = job.log_truncated or truncated

            write = asyncio.get_running_loop().create_task(self._db.run(store))
            try:
                await asyncio.shield(write)
            finally:
                if not write.done():
                    # Cancelled while the database thread writes: that write still lands.
                    await asyncio.wait({write})
                if not write.cancelled() and write.exception() is None:
                    self._seq = last
                else:
                    self._pending = pending + self._pending
                    self._pending_bytes += size
        self._on_flush(self._job_id)

    async def close(self) -> None:
        """Stop the periodic flush; what the maskers held back joins the pending output."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for stream, masker in self._maskers.items():
            self._accept(stream, masker.finish())

    def store_rest(self, session: Session, job: Job) -> None:
        """Add what is still pending to ``session`` (the job's final transaction)."""
        if not self._pending:
            return
        first = self._seq
        if first is None:
            first = (
                session.scalar(
                    select(func.max(LogChunk.seq)).where(LogChunk.job_id == self._job_id)
                )
                or 0
            )
        rows, _, output = self._rows(self._pending, first + 1)
        session.add_all(rows)
        job.log_bytes += output
        job.log_truncated = job.log_truncated or self._truncated
