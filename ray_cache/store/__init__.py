"""The under store: filesystems, listings with versions, ranged fetches, formats, keys, errors.

``underfs`` (fsspec resolution, listings, ranged reads), ``conditional`` (ranged reads that
carry their version check), ``fetch`` (one unit or page
straight from the store, version-checked), ``versions`` (shared version checks),
``parquet`` (footers, unit planning, decoding), ``keys`` (what identifies an entry),
``errors`` (the one table from under-store errors to Python exceptions). May import
:mod:`ray_cache.config` only.
"""
