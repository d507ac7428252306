"""The guest kernel and its initramfs.

* :func:`provision_kernel` / :func:`cached_kernel`: Debian's cloud kernel, unpacked
  into the cache (never installed).
* :func:`build_initramfs`: busybox + ``init.sh`` + the modules the guest needs +
  the agent, as a cached, reproducible gzip'd cpio.
* :mod:`~stoker.kernel.modules`: module metadata and dependency closure.
* :mod:`~stoker.kernel.cpio`: a deterministic ``newc`` writer.
"""

from __future__ import annotations

from stoker.kernel.cpio import CpioWriter
from stoker.kernel.debian import DEFAULT_META_PACKAGE, Kernel, cached_kernel, provision_kernel
from stoker.kernel.initramfs import Initramfs, build_initramfs, init_script
from stoker.kernel.modules import (
    GUEST_MODULES,
    builtin_modules,
    index_modules,
    module_name,
    read_modinfo,
    read_module,
    resolve_closure,
)

__all__ = [
    "DEFAULT_META_PACKAGE",
    "GUEST_MODULES",
    "CpioWriter",
    "Initramfs",
    "Kernel",
    "build_initramfs",
    "builtin_modules",
    "cached_kernel",
    "index_modules",
    "init_script",
    "module_name",
    "provision_kernel",
    "read_modinfo",
    "read_module",
    "resolve_closure",
]
