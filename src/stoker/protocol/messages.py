"""Schemas of the messages the guest agent may send to the host.

The guest is hostile: every MSG frame it sends is validated here before anything
acts on it.  Unknown types, unknown fields, wrong types and oversized strings are
all rejected (as :class:`~stoker.errors.GuestProtocolError` by the client).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator

ShortStr = Annotated[str, StringConstraints(max_length=256)]
Text = Annotated[str, StringConstraints(max_length=4096)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Ready(_Msg):
    """The agent is up and serving."""

    type: Literal["ready"]
    protocol: int
    agent: ShortStr
    python: ShortStr
    kernel: ShortStr
    pid1: bool
    #: Guest uptime (s) when the agent became ready, and when it started running.
    uptime: float = Field(default=0.0, ge=0, le=1e9)
    started: float = Field(default=0.0, ge=0, le=1e9)


class Ok(_Msg):
    type: Literal["ok"]


class Pong(_Msg):
    type: Literal["pong"]


class Started(_Msg):
    type: Literal["started"]
    pid: int = Field(ge=1, le=1 << 22)


class Exit(_Msg):
    """A command ended: exactly one of ``code`` (0-255) or ``signal``."""

    type: Literal["exit"]
    code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=64)

    @model_validator(mode="after")
    def _one_of(self) -> Exit:
        if (self.code is None) == (self.signal is None):
            raise ValueError("exactly one of code and signal must be set")
        return self


class Done(_Msg):
    type: Literal["done"]
    missing: Annotated[list[ShortStr], Field(max_length=1024)] = []


class NetStarted(_Msg):
    """The agent listens for proxied connections on the guest's loopback ``port``."""

    type: Literal["net_started"]
    #: 0 in ``nat`` mode (no proxy: the guest has a network device).
    port: int = Field(ge=0, le=65535)


class Error(_Msg):
    type: Literal["error"]
    message: Text
    spawn: bool = False


GuestMessage = Annotated[
    Ready | Ok | Pong | Started | Exit | Done | NetStarted | Error, Field(discriminator="type")
]
guest_message: TypeAdapter[GuestMessage] = TypeAdapter(GuestMessage)
