"""The agent as the guest sees it: a minimal ``stoker`` package tree.

The initramfs copies these files to ``/usr/lib/stoker-agent`` in the guest; the
guest never imports the host package (its ``__init__`` files are replaced by
empty ones so nothing beyond the standard library is needed).

Beside each source goes its bytecode for this host's Python, so a guest with
the same version (the default Debian image) does not compile the agent on
every cold boot, which costs a noticeable part of a boot under emulation.  The
``.pyc`` files are hash-checked against their source: a guest with another
Python ignores them (other magic number, other file name) and one whose source
was replaced (the tests' hostile agents) recompiles, as without them.
"""

from __future__ import annotations

import importlib.util
import marshal
import sys
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
    for path, source in list(files.items()):
        files.update(_bytecode(path, source))
    return files


#: Where the initramfs puts the tree in the guest (names in tracebacks).
GUEST_ROOT = "/usr/lib/stoker-agent"


def _bytecode(path: str, source: bytes) -> dict[str, bytes]:
    """``{__pycache__ path: .pyc}`` of one source, hash-checked (PEP 552)."""
    tag = sys.implementation.cache_tag
    if tag is None:
        return {}
    code = compile(source, f"{GUEST_ROOT}/{path}", "exec", dont_inherit=True)
    directory, _, name = path.rpartition("/")
    pyc = f"{directory}/__pycache__/{name[:-3]}.{tag}.pyc"
    flags = (0b11).to_bytes(4, "little")  # hash-based, checked against the source
    return {
        pyc: importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    }
