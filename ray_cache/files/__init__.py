"""The ``raycache`` fsspec filesystem: any file read through the cache in version-keyed pages.

One job: byte ranges of store objects, from the cheapest place that holds them (this
process's buffers, this node's disk tier, the owning worker, the store). Modules:
``fs`` (the filesystem), ``snapshot`` (a filesystem bound to one listing), ``file`` (a file open for reading), ``meta`` (metadata answers kept a
short TTL), ``pages`` (where each page comes from), ``pagebuf`` (page planning, buffers and
mappings, no Ray). May import :mod:`ray_cache.cluster`, :mod:`ray_cache.node`,
:mod:`ray_cache.store` and :mod:`ray_cache.config`; never :mod:`ray_cache.readers`,
:mod:`ray_cache.steering` or the top-level faces.
"""
