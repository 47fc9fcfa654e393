"""The public import path of the ``raycache`` fsspec filesystem.

The filesystem lives in :mod:`ray_cache.files.fs`; this name stays for users and docs.

Examples
--------
>>> from ray_cache.fs import CacheFileSystem
>>> CacheFileSystem.protocol
'raycache'
"""

from ray_cache.files.fs import CacheFileSystem
from ray_cache.files.snapshot import SnapshotFileSystem, snapshot

__all__ = ["CacheFileSystem", "SnapshotFileSystem", "snapshot"]
