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

from stoker.images.base import Image, ImageBuilder
from stoker.images.builder import SpecBuilder, builder_for, default_builder
from stoker.images.debian import DebianSpec
from stoker.images.spec import ImageSpec, load_spec_file
from stoker.images.store import ImageStore

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
