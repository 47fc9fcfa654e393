"""ray_cache: a read cache for Ray that makes remote training data feel local.

Examples
--------
>>> import ray_cache  # doctest: +SKIP
>>> ds = ray_cache.read_parquet("s3://bucket/train/")  # doctest: +SKIP
>>> ray_cache.stats()["hits"]  # doctest: +SKIP
0
"""

from ray_cache.api import (
    CacheStatus,
    configure,
    free,
    invalidate,
    load,
    pin,
    shutdown,
    start,
    stats,
    status,
    unpin,
)
from ray_cache.cluster.forks import RayForkedError
from ray_cache.reading import read_parquet
from ray_cache.files.snapshot import SnapshotFileSystem, snapshot
from ray_cache.folder import ImageFolder
from ray_cache.store.errors import CacheError, NotParquetError, ObjectChangedError, PinCapacityError

__version__ = "0.1.0"

__all__ = [
    "read_parquet",
    "snapshot",
    "SnapshotFileSystem",
    "ImageFolder",
    "start",
    "shutdown",
    "stats",
    "status",
    "load",
    "pin",
    "unpin",
    "free",
    "invalidate",
    "configure",
    "CacheStatus",
    "RayForkedError",
    "PinCapacityError",
    "CacheError",
    "NotParquetError",
    "ObjectChangedError",
]
