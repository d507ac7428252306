"""Where stoker keeps its files.

* cache (``$STOKER_CACHE_DIR``, default ``$XDG_CACHE_HOME/stoker`` or ``~/.cache/stoker``):
  downloaded kernels, initramfs images, built root filesystems, the KVM probe verdict.
  Everything there can be rebuilt; entries are published atomically.
* runtime (``$STOKER_RUNTIME_DIR``, default ``$XDG_RUNTIME_DIR/stoker`` or
  ``/tmp/stoker-$UID``): one private directory per running VM (scratch disk,
  console log), removed when the VM is destroyed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: ``PATH`` of every command in a guest (images may put more in front).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Dirs:
    """The directories stoker uses; build with :meth:`from_env`."""

    cache: Path
    runtime: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Dirs:
        env = dict(os.environ if environ is None else environ)
        if env.get("STOKER_CACHE_DIR"):
            cache = Path(env["STOKER_CACHE_DIR"])
        else:
            xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache = Path(xdg) / "stoker"
        if env.get("STOKER_RUNTIME_DIR"):
            runtime = Path(env["STOKER_RUNTIME_DIR"])
        elif env.get("XDG_RUNTIME_DIR"):
            runtime = Path(env["XDG_RUNTIME_DIR"]) / "stoker"
        else:
            runtime = Path("/tmp") / f"stoker-{os.getuid()}"
        return cls(cache=cache.absolute(), runtime=runtime.absolute())

    @property
    def kernels(self) -> Path:
        return self.cache / "kernels"

    @property
    def initramfs(self) -> Path:
        return self.cache / "initramfs"

    @property
    def images(self) -> Path:
        return self.cache / "images"

    @property
    def logs(self) -> Path:
        return self.cache / "logs"

    def ensure_runtime(self) -> Path:
        """Create the runtime directory, private to this user."""
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.runtime
