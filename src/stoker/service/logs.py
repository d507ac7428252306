"""A job's output on its way into the database, and wake-ups for those following it.

* :class:`Notifier` wakes coroutines waiting for news about a job (log followers).
* :class:`SecretMasker` replaces secret values in a byte stream, across chunk boundaries.
* :class:`LogWriter` stores a job's output as bounded :class:`~stoker.service.models.LogChunk`
  rows, flushed periodically and in the job's final transaction.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stoker.errors import InfrastructureError
from stoker.service.db import JOB_PATIENCE, Database, DatabaseError
from stoker.service.jobs import ACTIVE, MIN_SECRET_LEN, JobState
from stoker.service.models import Job, LogChunk, utcnow

log = logging.getLogger(__name__)

#: Log output is stored in chunks of at most this size ...
LOG_CHUNK = 64 << 10
#: ... written at least this often while a command runs ...
LOG_FLUSH_SECONDS = 0.25
#: ... and as soon as this much is waiting (the guest waits for the database then).
LOG_FLUSH_BYTES = 256 << 10
#: Output waiting while the database cannot store it (an outage, a full disk) is kept up to
#: this much per job; what comes after is dropped, and the log says how much.
LOG_BUFFER_MAX = 8 << 20


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

    @property
    def held(self) -> bytes:
        """The tail held back (part of a secret, maybe): stored with a resume point."""
        return self._pending

    def hold(self, data: bytes) -> None:
        """Hold ``data`` back again (resuming where an earlier process stopped)."""
        self._pending = data


class LogWriter:
    """A job's output on its way into :class:`~stoker.service.models.LogChunk` rows.

    Bounded: once the job's stored output reaches ``limit`` bytes (over all
    its attempts) the rest is dropped and the job is marked ``log_truncated``;
    lines stoker itself adds (stream ``system``) are not counted.  Nothing is
    written before :meth:`begin` (the job is this host's from then on); what
    is left at the end goes into the job's final transaction
    (:meth:`store_rest`), so followers see the last output and the end together.

    While the database cannot take it, output waits in memory (at most
    :data:`LOG_BUFFER_MAX` bytes, then it is dropped and a ``system`` line says
    how much).  With ``owner`` (host, attempt) nothing is written once the job
    is no longer that attempt on that host: another host may be running it.
    """

    def __init__(
        self,
        db: Database,
        job_id: str,
        *,
        limit: int,
        secrets: Iterable[str],
        on_flush: Callable[[str], None],
        owner: tuple[str, int] | None = None,
    ) -> None:
        self._db = db
        self._owner = owner
        #: Bytes of output dropped because the database could not take them (not yet reported).
        self._dropped = 0
        #: The job is not ``owner``'s any more: write nothing.
        self.fenced = False
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
        # Resuming after a restart (detached VMs): the command's channel, when it
        # started (wall clock), the journal offset of the last frame whose output
        # was accepted, the offset last stored, and where to acknowledge stored ones.
        self._resume: dict[str, Any] | None = None
        self._offset = 0
        self._stored_offset = -1
        self._ack: Callable[[int], Awaitable[None]] | None = None

    @property
    def job_id(self) -> str:
        return self._job_id

    # --- a resume point for a process that takes over after a restart --------------------

    def command_started(self, channel: int) -> None:
        """The command runs on agent ``channel``: from now on flushes store a resume point."""
        self._resume = {"channel": channel, "started": time.time()}

    def frame(self, start: int, end: int) -> None:
        """The command's next frame ends at journal offset ``end`` (its output comes next)."""
        self._offset = end

    def acks_to(self, ack: Callable[[int], Awaitable[None]]) -> None:
        """After each flush, tell ``ack`` the journal offset that is now stored."""
        self._ack = ack

    def resume_from(self, point: dict[str, Any]) -> None:
        """Continue from a resume point an earlier process stored (held-back tails too)."""
        self._resume = {"channel": int(point["channel"]), "started": float(point["started"])}
        self._offset = self._stored_offset = int(point["offset"])
        for stream, held in (point.get("held") or {}).items():
            if stream in self._maskers and isinstance(held, str):
                self._maskers[stream].hold(base64.b64decode(held))

    def _resume_point(self) -> dict[str, Any] | None:
        if self._resume is None:
            return None
        held = {s: base64.b64encode(m.held).decode() for s, m in self._maskers.items() if m.held}
        return {**self._resume, "offset": self._offset, "held": held}

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
            except DatabaseError:
                pass  # kept pending; the database's health logged the outage once
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
        if self._pending_bytes >= LOG_BUFFER_MAX:
            self._dropped += len(data)
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
        await self._flush_if_full()

    async def system(self, text: str) -> None:
        """A line from stoker itself (``[stoker] ...``)."""
        self._append("system", f"[stoker] {text}\n".encode())
        await self._flush_if_full()

    async def _flush_if_full(self) -> None:
        # During an outage the periodic flush probes; output only waits (bounded).
        if self._pending_bytes >= LOG_FLUSH_BYTES and self._db.health.retry_in() == 0:
            with contextlib.suppress(DatabaseError):
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
        await self.flush(patience=JOB_PATIENCE)
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

    async def flush(self, *, patience: float = 0.0) -> None:
        """Write what is pending as one transaction (nothing before :meth:`begin`).

        ``patience``: seconds to wait for the database through an outage; on
        :class:`~stoker.service.db.DatabaseError` the output stays pending.
        """
        async with self._lock:
            moved = self._resume is not None and self._offset != self._stored_offset
            if (not self._pending and not moved) or self._seq is None or self.fenced:
                return
            # Output that arrives while this is written waits for the next flush.
            # The resume point is taken at the same instant: it covers exactly this output.
            pending, self._pending = self._pending, []
            size, self._pending_bytes = self._pending_bytes, 0
            first = self._seq + 1
            rows, last, output = self._rows(pending, first)
            truncated = self._truncated
            point = self._resume_point()

            def store(session: Session) -> bool:
                job = session.get(Job, self._job_id)
                if job is None:
                    return False
                if self._owner is not None and (
                    (job.host, job.attempt) != self._owner or JobState(job.state) not in ACTIVE
                ):
                    return False
                stored = select(LogChunk.seq).where(
                    LogChunk.job_id == self._job_id, LogChunk.seq == first
                )
                if session.scalar(stored) is not None:
                    return True  # an earlier try committed, its answer was lost with the connection
                session.add_all(rows)
                job.log_bytes += output
                job.log_truncated = job.log_truncated or truncated
                if point is not None:
                    job.resume = point  # with the output it covers, in one transaction
                return True

            write = asyncio.get_running_loop().create_task(self._db.run(store, patience=patience))
            try:
                await asyncio.shield(write)
            finally:
                if not write.done():
                    # Cancelled while the database thread writes: that write still lands.
                    await asyncio.wait({write})
                if write.cancelled() or write.exception() is not None:
                    self._pending = pending + self._pending
                    self._pending_bytes += size
                elif write.result():
                    self._seq = last
                    if point is not None:
                        self._stored_offset = point["offset"]
                    if self._dropped:
                        self._append("system", self._dropped_note())
                        self._dropped = 0
                else:
                    self.fenced = True
                    log.warning(
                        "job %s is no longer attempt %s on this host: its output is not stored",
                        self._job_id,
                        self._owner[1] if self._owner else "?",
                    )
        self._on_flush(self._job_id)
        if point is not None and self._ack is not None and self._stored_offset == point["offset"]:
            with contextlib.suppress(Exception):  # the agent is gone: the job ends anyway
                await self._ack(point["offset"])

    async def hand_over(self) -> None:
        """Store what is pending with its resume point; the next process goes on from there."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.flush()

    def _dropped_note(self) -> bytes:
        return (
            f"[stoker] {self._dropped} bytes of output were dropped: the database could not "
            f"store them (unreachable or full) and at most {LOG_BUFFER_MAX} bytes may wait\n"
        ).encode()

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
        job.resume = None  # nothing to take over any more
        if self._dropped:
            self._append("system", self._dropped_note())
            self._dropped = 0
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
