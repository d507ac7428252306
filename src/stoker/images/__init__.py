"""Root filesystem images: builders turn specs into erofs files, the store publishes them.

Typical use::

    store = ImageStore(Dirs.from_env())
    image = store.ensure(default_builder())  # builds once, then returns in milliseconds
    image.rootfs, image.python
"""

from __future__ import annotations

from stoker.images.base import Image, ImageBuilder
from stoker.images.debian import DebianBuilder, DebianSpec
from stoker.images.store import ImageStore, default_builder

__all__ = [
    "DebianBuilder",
    "DebianSpec",
    "Image",
    "ImageBuilder",
    "ImageStore",
    "default_builder",
]
