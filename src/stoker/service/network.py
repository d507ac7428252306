"""What a job's guest did on the network, for the people and tools watching the job.

A VM in ``egress`` mode sends every guest connection through its own
:class:`~stoker.net.proxy.EgressProxy`, which ends each one with a
:class:`~stoker.net.proxy.ConnectionRecord` (and logs it on the ``stoker.net``
logger, which the service's JSON log format carries whole).  The supervisor
hands each record of a job's VM to the job's :class:`JobConnections`:

* refused and failed connections become system lines of the job's log
  (``[stoker] network: denied evil.example:443: not in allowlist``), at most
  :data:`MAX_NETWORK_LINES` per attempt, then one line counting the rest, so a
  user reading a failed build sees why;
* when the attempt ends, :func:`usage` (counts and the most frequent refusals)
  is stored on the job and one line sums it up in the log.
"""

from __future__ import annotations

from typing import Any

from stoker.net.proxy import ConnectionRecord
from stoker.run import network_summary
from stoker.service.jobs import redact
from stoker.service.logs import LogWriter
from stoker.vm import VM

#: Refused connections shown in a job's log per attempt (the rest are counted).
MAX_NETWORK_LINES = 100
#: Longest line shown for one connection (what the guest asked for is hostile).
MAX_LINE = 300


def printable(text: str, limit: int = MAX_LINE) -> str:
    """``text`` on one line of printable characters, at most ``limit`` long."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def usage(vm: VM | None) -> dict[str, Any] | None:
    """The connections of ``vm``'s egress proxy (None: it had none, not ``egress``)."""
    if vm is None or vm.proxy is None:
        return None
    summary = network_summary(vm)
    return {"connections": summary["connections"], "denied": summary["denied"]}


class JobConnections:
    """The connection records of one attempt of a job: refusals into its log, bounded.

    :meth:`record` is called from the proxy's callback: it must not block,
    so lines are only queued on the :class:`~stoker.service.logs.LogWriter`
    (stored with its next flush).  Secret values of the job are masked.
    """

    def __init__(
        self, writer: LogWriter, *, secrets: list[str], limit: int = MAX_NETWORK_LINES
    ) -> None:
        self._writer = writer
        self._secrets = secrets
        self._limit = limit
        #: Refusal lines written, and refusals beyond the limit.
        self.shown = 0
        self.hidden = 0

    def record(self, record: ConnectionRecord) -> None:
        """One connection of the job's guest ended."""
        if record.decision == "allowed":
            return
        if self.shown >= self._limit:
            self.hidden += 1
            return
        self.shown += 1
        self._note(printable(record.describe()))

    def finish(self, vm: VM | None) -> dict[str, Any] | None:
        """The attempt ended (its VM destroyed): log the totals, return :func:`usage`."""
        if self.hidden:
            self._note(f"{self.hidden} more refused connections not shown")
        summary = usage(vm)
        if summary is not None:
            # What the guest asked for is its own text: one printable line each, no secrets.
            summary["denied"] = [
                redact(printable(line), self._secrets) for line in summary["denied"]
            ]
            c = summary["connections"]
            if c["allowed"] or c["denied"] or c["errors"]:
                self._note(
                    f"{c['allowed']} connections allowed, {c['denied']} denied, "
                    f"{c['errors']} failed; {c['bytes_up']} bytes sent, "
                    f"{c['bytes_down']} received"
                )
        return summary

    def _note(self, text: str) -> None:
        self._writer.note(redact(f"network: {text}", self._secrets))
