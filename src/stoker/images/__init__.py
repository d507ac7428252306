"""Root filesystem images: specs in, content-addressed read-only filesystems out.

* :mod:`~stoker.images.spec`: the TOML spec format, validated with located errors;
* :mod:`~stoker.images.catalog`: the specs shipped with stoker (``default``, ...);
* :mod:`~stoker.images.builder`: spec -> image (debian, ubuntu and oci bases);
  :mod:`~stoker.images.nixos` for NixOS configurations;
* :mod:`~stoker.images.debian`, :mod:`~stoker.images.oci`: the bases;
* :mod:`~stoker.images.customize`, :mod:`~stoker.images.tree`,
  :mod:`~stoker.images.fetch`, :mod:`~stoker.images.pack`: the shared steps;
* :mod:`~stoker.images.store`: the content-addressed store.

Typical use::

    store = ImageStore(Dirs.from_env())
    image = store.ensure(default_builder(dirs))  # builds once, then returns at once
    image.rootfs, image.python
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stoker._lazy import lazy_exports

if TYPE_CHECKING:
    from stoker.images.base import Image, ImageBuilder
    from stoker.images.builder import SpecBuilder, builder_for, default_builder
    from stoker.images.debian import DebianSpec
    from stoker.images.spec import ImageSpec, load_spec_file
    from stoker.images.store import ImageStore

# Imported when first used: `stoker run` needs stoker.images.base (digests, the
# Image record) and must not pay for the builders and the spec parser on its way
# to the VM.
_HOMES = {
    "Image": "base",
    "ImageBuilder": "base",
    "SpecBuilder": "builder",
    "builder_for": "builder",
    "default_builder": "builder",
    "DebianSpec": "debian",
    "ImageSpec": "spec",
    "load_spec_file": "spec",
    "ImageStore": "store",
}


__getattr__ = lazy_exports(__name__, _HOMES)


__all__ = [
    "DebianSpec",
    "Image",
    "ImageBuilder",
    "ImageSpec",
    "ImageStore",
    "SpecBuilder",
    "builder_for",
    "default_builder",
    "load_spec_file",
]
