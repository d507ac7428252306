"""Packages that re-export names without importing their modules up front."""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: ``homes`` maps each name to the
    submodule defining it, imported when the name is first used.

    For packages whose users often need only a light part of them (``stoker run``
    and the GitLab executor start a process per call: every import counts).
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return __getattr__


def preload(module: str) -> None:
    """Import ``module`` in a thread while the VMM starts (a process of its own).

    The thread holds the interpreter only while it runs Python; the event loop
    meanwhile waits on the VMM.  Whoever imports ``module`` next waits for it;
    an import error is raised there again, so it is dropped here.
    """
    if module in sys.modules:
        return

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    threading.Thread(target=load, name="stoker-preload", daemon=True).start()
