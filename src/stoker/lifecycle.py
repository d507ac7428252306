"""A VM's states, the guard on its operations, and where its start-up time went."""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from stoker.errors import InfrastructureError

P = ParamSpec("P")
T = TypeVar("T")


class VMState(enum.Enum):
    CREATED = "created"
    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


def require(*states: VMState) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Guard a coroutine method so it only runs in the given states."""

    def deco(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            state = getattr(args[0], "state")  # noqa: B009 (the instance: self)
            if state not in states:
                allowed = ", ".join(s.value for s in states)
                raise InfrastructureError(
                    f"{fn.__name__}() needs the VM to be {allowed}; it is {state.value}"
                )
            return await fn(*args, **kwargs)

        return wrapper

    return deco


@dataclass
class Timings:
    """Where the time went, in seconds (monotonic clock)."""

    prepare: float = 0.0
    launch: float = 0.0
    agent_ready: float = 0.0
    #: Unpacking the seed disk in the guest (0 without one).
    seed: float = 0.0
    teardown: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prepare": round(self.prepare, 4),
            "launch": round(self.launch, 4),
            "agent_ready": round(self.agent_ready, 4),
            "seed": round(self.seed, 4),
            "teardown": round(self.teardown, 4),
        }
