"""The public import path of the Ray Train helpers (``ray_cache.train.prefetch``).

The prefetcher lives in :mod:`ray_cache.steering.prefetch`; this name stays for users and docs.

Examples
--------
>>> import ray_cache.train
>>> job = ray_cache.train.prefetch("s3://bucket/train/")  # doctest: +SKIP
"""

from ray_cache.steering.prefetch import Prefetch, prefetch

__all__ = ["Prefetch", "prefetch"]
