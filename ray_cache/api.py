"""The public functions: reading, starting and stopping, looking, and steering the cache.

Thin on purpose: each resolves its inputs, finds the workers through
:mod:`ray_cache.cluster.membership` and hands the work to the layer below.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import pyarrow as pa
import ray

from ray_cache.cluster import membership
from ray_cache.cluster.membership import ensure_ray as _ensure_ray
from ray_cache.store import underfs

if TYPE_CHECKING:  # pragma: no cover
    from ray_cache.steering.ops import LoadJob, LoadReport
from ray_cache.config import COUNTERS, default_disk_dir, validate_capacity, validate_disk_dir

log = logging.getLogger("ray_cache")

PathArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

#: Counters summed over workers by :func:`stats`.
STAT_FIELDS = COUNTERS + ("evictions", "memory_evictions", "disk_evictions", "damaged_entries")


def start(
    *,
    memory_bytes: Optional[int] = None,
    disk_bytes: Optional[int] = None,
    disk_dir: Optional[str] = None,
    nodes: str = "auto",
    policy: str = "adaptive",
) -> List[membership.WorkerRef]:
    """Start (or attach to) one cache worker per cache node.

    Call it again to add workers on nodes that joined; running workers keep their
    contents, and capacities given here are applied to them at once.

    Parameters
    ----------
    memory_bytes : int, optional
        Memory-tier capacity per worker; default 30% of the node's object store.
    disk_bytes : int, optional
        Disk-tier capacity per worker; default a quarter of the free disk, at most 64 GiB.
    disk_dir : str, optional
        Disk-tier root; default ``$RAY_CACHE_DIR`` or ``~/.cache/ray_cache``.
    nodes : str
        ``"auto"`` (GPU nodes, or all nodes when none has a GPU), ``"all"``, ``"gpu"``,
        ``"resource:NAME"`` or ``"label:KEY=VALUE"``.
    policy : str
        Eviction policy of both tiers (``ray_cache.node.tiers.policy.POLICIES``). The
        default, ``"adaptive"``, needs no tuning: it keeps a stable subset when repeated
        epochs read more than the cache holds (as ``"tinylfu"``), and takes in a new data
        set within one pass when the old one has gone cold (as ``"lru"``); see
        ``benchmarks/policies.py``. Applies to workers this call starts; running workers
        keep theirs.

    Examples
    --------
    >>> import ray_cache
    >>> workers = ray_cache.start(memory_bytes=2 << 30, disk_bytes=20 << 30)  # doctest: +SKIP
    """
    from ray_cache.node.tiers.policy import make_policy

    memory_bytes = validate_capacity("memory_bytes", memory_bytes)
    disk_bytes = validate_capacity("disk_bytes", disk_bytes)
    make_policy(policy)  # ValueError naming the known policies, before any worker starts
    root = validate_disk_dir(disk_dir or default_disk_dir())
    _ensure_ray()
    workers = membership.ensure_workers(memory_bytes, disk_bytes, root, nodes=nodes, policy=policy)
    _forget_workers()
    return workers


def shutdown() -> int:
    """Stop every cache worker (disk tiers stay on disk for the next start).

    Returns the number of workers stopped.

    Examples
    --------
    >>> import ray_cache
    >>> ray_cache.shutdown()  # doctest: +SKIP
    1
    """
    if not ray.is_initialized():
        return 0
    try:
        return membership.stop_workers()
    finally:
        _forget_workers()


def _forget_workers() -> None:
    # This process's page reader must not route to (or let a forked child map) the
    # workers it knew before: they were just replaced.
    from ray_cache.files import pages

    pages.reader().forget_workers()


def stats() -> Dict[str, int]:
    """Counters summed over all live workers.

    Returns
    -------
    dict
        ``hits``, ``misses``, ``bytes_from_cache``, ``bytes_from_under_store``,
        ``evictions``, ``fallbacks`` and more (see ``STAT_FIELDS``).

    Examples
    --------
    >>> import ray_cache
    >>> ray_cache.stats()["hits"]  # doctest: +SKIP
    32
    """
    total = {f: 0 for f in STAT_FIELDS}
    for record in status().workers:
        for f in STAT_FIELDS:
            total[f] += int(record.get(f, 0))
    return total


@dataclass
class CacheStatus:
    """What the cache holds now: one record (a dict) per live worker."""

    workers: List[Dict[str, Any]] = field(default_factory=list)

    def _repr_html_(self) -> str:
        from ray_cache.display import status_html

        return status_html(self)

    def __repr__(self) -> str:
        from ray_cache.display import status_text

        return status_text(self)


def status(timeout: float = 10.0) -> CacheStatus:
    """One record per live worker: node, capacities, usage, entries, hits, misses.

    Examples
    --------
    >>> import ray_cache
    >>> [w["node_id"][:8] for w in ray_cache.status().workers]  # doctest: +SKIP
    ['5f3a9c1e']
    """
    if not ray.is_initialized():
        return CacheStatus([])
    workers = membership.live_workers()
    calls = [w.handle.status.remote() for w in workers]
    records = []
    for w, call in zip(workers, calls):
        try:
            records.append(ray.get(call, timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - a dead worker is reported, not raised
            records.append({"node_id": w.node_id, "error": type(exc).__name__})
    return CacheStatus(records)


def load(
    paths: PathArg,
    *,
    columns: Optional[Sequence[str]] = None,
    filesystem: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
    ttl: Optional[float] = None,
    background: bool = False,
    progress: Optional[bool] = None,
    replicas: Union[None, int, str] = None,
) -> Union["LoadReport", "LoadJob"]:
    """Preload objects so that the first read afterwards sends no data request.

    Parquet objects are loaded as ``read_parquet`` reads them (row-group units for
    ``columns``, and their footers); other objects as pages for the ``raycache``
    filesystem. Each entry is filled by the worker that owns it. Loading again skips what
    is cached, so an interrupted load resumes.

    Parameters
    ----------
    paths, columns, filesystem, storage_options
        As for :func:`read_parquet`.
    ttl : float, optional
        Seconds after which the loaded entries expire.
    background : bool
        Return a :class:`~ray_cache.steering.ops.LoadJob` at once (``wait()``, ``cancel()``,
        ``progress``) instead of the report.
    progress : bool, optional
        Show a progress bar (default: when interactive).
    replicas : None, int or "all"
        Ahead of a rollout (a model every node loads at once): keep copies of each page
        (non-Parquet objects) on this many cache nodes, its owner counted, or on every cache
        node (``"all"``), so readers there map it from their own node's disk. The store is
        read once either way; the copies come from the owners' nodes through Ray's object
        transfer. Default: each page on its owner only.

    Returns
    -------
    LoadReport or LoadJob

    Examples
    --------
    >>> report = ray_cache.load("s3://bucket/train/", columns=["x", "y"])  # doctest: +SKIP
    >>> report.fetched, report.already_cached, report.failures  # doctest: +SKIP
    (32, 0, [])
    >>> ray_cache.load("s3://bucket/models/llm-7b/", replicas="all").replicas  # doctest: +SKIP
    3402
    """
    from ray_cache.steering import ops

    _check_ttl(ttl)
    replicas = ops.check_replicas(replicas)
    p = ops.plan(paths, columns=columns, filesystem=filesystem, storage_options=storage_options)

    def work(cancel=None, on_progress=None) -> "LoadReport":
        report = ops.run_load(p, progress=progress, cancel=cancel, on_progress=on_progress)
        if replicas not in (None, 1) and not report.cancelled:
            ops.run_replicas(p, replicas, report, progress=progress, cancel=cancel)
        if ttl is not None:
            ray.get([p.workers[owner].handle.set_ttl.remote(digests, ttl)
                     for owner, digests in report.digests.items()], timeout=120)
        return report

    return ops.LoadJob(work) if background else work()


def pin(
    paths: PathArg,
    *,
    columns: Optional[Sequence[str]] = None,
    filesystem: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
    ttl: Optional[float] = None,
    progress: Optional[bool] = None,
) -> "LoadReport":
    """Load ``paths`` (if needed) and pin them: pinned entries are never evicted.

    Pinning more than a tier can hold beside what is already pinned raises
    :class:`ray_cache.PinCapacityError` and pins nothing of this call; other pins stay.

    Examples
    --------
    >>> ray_cache.pin("s3://bucket/eval/")  # doctest: +SKIP
    """
    from ray_cache.steering import ops

    _check_ttl(ttl)
    p = ops.plan(paths, columns=columns, filesystem=filesystem, storage_options=storage_options)
    report = ops.run_load(p, progress=progress)
    if report.failures:
        url, why = report.failures[0]
        raise OSError(f"could not load {url} to pin it: {why}")
    ops.pin_loaded(report, p.workers, ttl)
    return report


def _check_ttl(ttl: Optional[float]) -> None:
    if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


def _by_path(method: str, paths: PathArg, filesystem: Any, storage_options: Optional[Dict[str, Any]],
             refresh: bool = False) -> int:
    """Call a by-path worker method (``free``, ``unpin``) with the patterns ``paths`` make on
    every live worker; sum the answers. ``refresh`` also forgets the filesystem's listings."""
    fs, patterns = underfs.resolve_filesystem(paths, filesystem, storage_options)
    if refresh:
        for p in patterns:
            underfs.refresh(fs, p)
    _ensure_ray()
    protocol = underfs.protocol_of(fs)
    calls = [getattr(w.handle, method).remote(protocol, list(patterns)) for w in membership.live_workers()]
    return sum(ray.get(calls, timeout=120))


def unpin(paths: PathArg, *, filesystem: Any = None, storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Unpin entries of objects under ``paths`` (files, prefixes or globs); returns how many.

    Examples
    --------
    >>> ray_cache.unpin("s3://bucket/eval/")  # doctest: +SKIP
    12
    """
    return _by_path("unpin", paths, filesystem, storage_options)


def free(paths: PathArg, *, filesystem: Any = None, storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Drop every cached entry (all versions, both tiers, pinned or not) under ``paths``.

    Needs no access to the store: entries are matched by path on each worker.

    Examples
    --------
    >>> ray_cache.free("s3://bucket/old-epoch/")  # doctest: +SKIP
    48
    """
    return _by_path("free", paths, filesystem, storage_options)


def invalidate(paths: PathArg, *, filesystem: Any = None, storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Tell the cache the source changed under ``paths``: the next read re-checks and re-fetches.

    Reads always re-list object versions, so a rewrite is noticed anyway; invalidating
    also drops the old entries at once (freeing their room) and clears listing caches.

    Examples
    --------
    >>> ray_cache.invalidate("s3://bucket/daily/2026-11-28/")  # doctest: +SKIP
    16
    """
    return _by_path("free", paths, filesystem, storage_options, refresh=True)


def configure(*, memory_bytes: Optional[int] = None, disk_bytes: Optional[int] = None) -> None:
    """Change every worker's tier capacities now, without a restart.

    Examples
    --------
    >>> ray_cache.configure(memory_bytes=16 << 30)  # doctest: +SKIP
    """
    memory_bytes = validate_capacity("memory_bytes", memory_bytes)
    disk_bytes = validate_capacity("disk_bytes", disk_bytes)
    _ensure_ray()
    ray.get([w.handle.configure.remote(memory_bytes, disk_bytes) for w in membership.live_workers()], timeout=120)
