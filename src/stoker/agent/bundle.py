"""The agent as the guest sees it: a minimal ``stoker`` package tree.

The initramfs copies these files to ``/usr/lib/stoker-agent`` in the guest; the
guest never imports the host package (its ``__init__`` files are replaced by
empty ones so nothing beyond the standard library is needed).
"""

from __future__ import annotations

import importlib.util
import marshal
import sys
from collections.abc import Mapping
from importlib import resources

# Files of the host package that the agent needs, relative to the package root.
_SOURCES = (
    "protocol/wire.py",
    "agent/main.py",
    "agent/limits.py",
    "agent/channel.py",
    "agent/netfwd.py",
    "agent/__main__.py",
)


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


#: Where the initramfs puts the tree in the guest (names in tracebacks).
GUEST_ROOT = "/usr/lib/stoker-agent"


def bytecode(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """``{__pycache__ path: .pyc}`` for the ``.py`` files of ``files``, for this host's Python.

    A guest with the same Python (the default Debian image) then does not compile
    the agent on every cold boot, about 5% of a boot under emulation.  The files
    are hash-checked against their source (PEP 552): a guest with another Python
    ignores them (other magic number, other file name), and a source replaced
    afterwards (the tests' hostile agents) is recompiled, as without them.  A
    source that does not compile here gets no bytecode.
    """
    tag = sys.implementation.cache_tag
    out: dict[str, bytes] = {}
    for path, source in files.items():
        if tag is None or not path.endswith(".py"):
            continue
        try:
            code = compile(source, f"{GUEST_ROOT}/{path}", "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            continue
        directory, slash, name = path.rpartition("/")
        pyc = f"{directory}{slash}__pycache__/{name[:-3]}.{tag}.pyc"
        flags = (0b11).to_bytes(4, "little")  # hash-based, checked against the source
        out[pyc] = (
            importlib.util.MAGIC_NUMBER
            + flags
            + importlib.util.source_hash(source)
            + marshal.dumps(code)
        )
    return out


def bytecode_key() -> bytes:
    """What :func:`bytecode` depends on besides the sources (an initramfs cache key part)."""
    return (sys.implementation.cache_tag or "").encode() + importlib.util.MAGIC_NUMBER
