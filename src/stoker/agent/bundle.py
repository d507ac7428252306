"""The agent as the guest sees it: a minimal ``stoker`` package tree.

The initramfs copies these files to ``/usr/lib/stoker-agent`` in the guest; the
guest never imports the host package (its ``__init__`` files are replaced by
empty ones so nothing beyond the standard library is needed).
"""

from __future__ import annotations

from importlib import resources

# Files of the host package that the agent needs, relative to the package root.
_SOURCES = ("protocol/wire.py", "agent/main.py", "agent/netfwd.py", "agent/__main__.py")


def agent_files() -> dict[str, bytes]:
    """Return ``{relative path: content}`` for the guest's ``stoker`` package."""
    root = resources.files("stoker")
    files: dict[str, bytes] = {
        "stoker/__init__.py": b"",
        "stoker/protocol/__init__.py": b"",
        "stoker/agent/__init__.py": b"",
    }
    for rel in _SOURCES:
        files["stoker/" + rel] = root.joinpath(rel).read_bytes()
    return files
