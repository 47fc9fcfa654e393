"""Steering the cache: load, pin, free, invalidate, and prefetch for training.

One job: plan what a read would ask for and have the owning workers act on it. The
only layer that may import a sibling face (:mod:`ray_cache.readers`, whose datasource plans
the Parquet units a load fills); below that :mod:`ray_cache.cluster`, :mod:`ray_cache.store`
and :mod:`ray_cache.config`.
"""
