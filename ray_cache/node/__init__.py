"""One node's cache: the worker actor, its cache engine, tiers and policies, metrics.

``worker`` (the actor: requests to entries, misses fetched), ``entries`` (both tiers,
labels, pins, TTLs, single flight, write-behind, counters), ``tiers/`` (accounting, the
object-store and disk tiers, eviction policies), ``metrics`` (Ray metrics). May import
:mod:`ray_cache.store` and :mod:`ray_cache.config` only: a node knows nothing of the cluster.
"""
