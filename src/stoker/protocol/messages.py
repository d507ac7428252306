"""Schemas of the messages the guest agent may send to the host.

The guest is hostile: every MSG frame it sends is validated here before anything
acts on it.  Unknown types, unknown fields, wrong types (no coercion: ``"1"`` is
not ``1``, ``true`` is not ``1``) and oversized strings are all rejected (as
:class:`~stoker.errors.GuestProtocolError` by the client).

Written with msgspec rather than pydantic: every ``stoker run`` loads these
schemas, and msgspec imports and builds them in a few milliseconds where
pydantic takes about 60 (the CLI's start-up budget is 0.15 s).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

ShortStr = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e9)]

#: What :func:`parse` raises for a message that does not validate.
InvalidMessage = msgspec.ValidationError


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """A message from the guest; ``type`` names which (the struct's tag)."""


class Ready(_Msg, tag="ready", frozen=True):
    """The agent is up and serving."""

    protocol: int
    agent: ShortStr
    python: ShortStr
    kernel: ShortStr
    pid1: bool
    #: Guest uptime (s) when the agent became ready, and when it started running.
    uptime: Seconds = 0.0
    started: Seconds = 0.0


class Ok(_Msg, tag="ok", frozen=True):
    pass


class Pong(_Msg, tag="pong", frozen=True):
    pass


class Started(_Msg, tag="started", frozen=True):
    pid: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)]


Bytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]


class Evidence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the agent measured about how a command ended (the host names the cause).

    See :mod:`stoker.agent.limits`.  Every field is optional: an older agent
    (a restored snapshot's) sends none of them.
    """

    #: The command ran in a cgroup of its own (with the limits below).
    cgroup: bool = False
    #: Processes of the command the guest's OOM killer killed.
    oom_kills: Count = 0
    #: Times a fork failed because the command was at its process limit.
    pids_max_hits: Count = 0
    #: The limits in force (bytes, processes); None: not limited.
    memory_max: Bytes | None = None
    pids_max: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)] | None = None
    #: The most memory the command's cgroup held.
    memory_peak: Bytes | None = None
    #: The agent killed the command itself, and why.
    killed_for: Literal["pids_limit"] | None = None
    #: The writable file system with the least free space seen while the
    #: command ran, its free and total bytes and free inodes (no free inode:
    #: ``disk_free`` is 0).
    disk_path: ShortStr | None = None
    disk_free: Bytes | None = None
    disk_size: Bytes | None = None
    disk_inodes_free: Bytes | None = None
    #: Why the command ran without limits (e.g. a kernel without cgroup v2).
    note: ShortStr | None = None


class Exit(_Msg, tag="exit", frozen=True):
    """A command ended: exactly one of ``code`` (0-255) or ``signal``."""

    code: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    signal: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    evidence: Evidence | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            raise ValueError("exactly one of code and signal must be set")


class Done(_Msg, tag="done", frozen=True):
    missing: Annotated[list[ShortStr], msgspec.Meta(max_length=1024)] = msgspec.field(
        default_factory=list
    )


class NetStarted(_Msg, tag="net_started", frozen=True):
    """The agent listens for proxied connections on the guest's loopback ``port``."""

    #: 0 in ``nat`` mode (no proxy: the guest has a network device).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]


class JournalOn(_Msg, tag="journal_on", frozen=True):
    """The agent keeps what it sends until acknowledged; this reply is the journal's first frame."""


class Resumed(_Msg, tag="resumed", frozen=True):
    """A resuming host's stream starts here: the journal follows from ``offset``.

    ``error`` instead of ``offset``: the journal no longer holds that offset.
    ``highest`` is the highest channel the previous host opened.
    """

    nonce: ShortStr
    #: Bounded well below the network channels' bit: the host numbers on from here.
    highest: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)]
    offset: Annotated[int, msgspec.Meta(ge=0)] | None = None
    error: Text | None = None

    def __post_init__(self) -> None:
        if (self.offset is None) == (self.error is None):
            raise ValueError("exactly one of offset and error must be set")


class Error(_Msg, tag="error", frozen=True):
    message: Text
    spawn: bool = False


GuestMessage = Ready | Ok | Pong | Started | Exit | Done | NetStarted | JournalOn | Resumed | Error


def parse(raw: Any) -> GuestMessage:
    """The message ``raw`` (a decoded JSON object) is; raises :data:`InvalidMessage`."""
    message: GuestMessage = msgspec.convert(raw, GuestMessage, strict=True)
    return message
