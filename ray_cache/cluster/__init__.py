"""The cluster: which nodes get workers, who owns each key, and routing reads to owners.

``membership`` (starting, finding and stopping the named, detached workers; Ray is the
membership service), ``hashing`` (rendezvous hashing over worker names), ``routing``
(streaming calls to owners, with fallback to the store when one is gone). May import
:mod:`ray_cache.node`, :mod:`ray_cache.store` and :mod:`ray_cache.config`.
"""
