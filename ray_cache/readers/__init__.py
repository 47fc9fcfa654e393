"""Faces to frameworks: the Ray Data datasource and its zero-copy warm path.

One job: turn planned cache units into what a framework consumes (a ``ray.data.Dataset``).
May import :mod:`ray_cache.cluster`, :mod:`ray_cache.node` (for types only),
:mod:`ray_cache.store` and :mod:`ray_cache.config`; never :mod:`ray_cache.files`,
:mod:`ray_cache.steering` or the top-level faces.
"""
