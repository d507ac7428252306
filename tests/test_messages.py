"""The schemas of what the guest may send: strict, bounded, no coercion."""

from __future__ import annotations

from typing import Any

import pytest

from stoker.protocol import messages as m

READY: dict[str, Any] = {
    "type": "ready",
    "protocol": 1,
    "agent": "stoker-agent",
    "python": "3.11.2",
    "kernel": "6.1.192",
    "pid1": True,
}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (READY, m.Ready(1, "stoker-agent", "3.11.2", "6.1.192", True)),
        (
            {**READY, "uptime": 2, "started": 1.5},
            m.Ready(1, "stoker-agent", "3.11.2", "6.1.192", True, 2.0, 1.5),
        ),
        ({"type": "ok"}, m.Ok()),
        ({"type": "pong"}, m.Pong()),
        ({"type": "started", "pid": 42}, m.Started(42)),
        ({"type": "exit", "code": 0}, m.Exit(code=0)),
        ({"type": "exit", "signal": 9}, m.Exit(signal=9)),
        ({"type": "done"}, m.Done()),
        ({"type": "done", "missing": ["*.xml"]}, m.Done(["*.xml"])),
        ({"type": "net_started", "port": 0}, m.NetStarted(0)),
        (
            {"type": "error", "message": "no such file", "spawn": True},
            m.Error("no such file", True),
        ),
    ],
)
def test_valid_messages(raw: dict[str, Any], expected: object) -> None:
    assert m.parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"type": "launch_missiles"}, "type"),
        ({"protocol": 1}, "type"),
        ({"type": "ok", "extra": 1}, "extra"),
        ({**READY, "protocol": "1"}, "protocol"),  # no coercion from strings
        ({**READY, "protocol": True}, "protocol"),  # nor from booleans
        ({**READY, "pid1": 1}, "pid1"),
        ({**READY, "agent": "x" * 257}, "agent"),
        ({**READY, "uptime": -1}, "uptime"),
        ({k: v for k, v in READY.items() if k != "kernel"}, "kernel"),
        ({"type": "started", "pid": 0}, "pid"),
        ({"type": "started", "pid": 1 << 23}, "pid"),
        ({"type": "exit", "code": 256}, "code"),
        ({"type": "exit", "signal": 65}, "signal"),
        ({"type": "exit"}, "exactly one of code and signal"),
        ({"type": "exit", "code": 1, "signal": 9}, "exactly one of code and signal"),
        ({"type": "done", "missing": ["x"] * 1025}, "missing"),
        ({"type": "done", "missing": ["x" * 300]}, "missing"),
        ({"type": "net_started", "port": 65536}, "port"),
        ({"type": "error", "message": "x" * 5000}, "message"),
        ([1, 2], "object"),
        ("ready", "object"),
    ],
)
def test_invalid_messages_are_refused_with_the_field(raw: Any, problem: str) -> None:
    with pytest.raises(m.InvalidMessage, match=problem):
        m.parse(raw)


def test_messages_are_immutable() -> None:
    message = m.parse({"type": "started", "pid": 7})
    with pytest.raises(AttributeError):
        message.pid = 8  # type: ignore[misc,union-attr]
