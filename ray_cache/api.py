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
from ray_cache.cluster.membership import ensure_ray as _ensure_ray, workers as _workers
from ray_cache.store import access, underfs
from ray_cache.store.keys import StoreObject

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


def read_parquet(
    paths: PathArg,
    *,
    columns: Optional[Sequence[str]] = None,
    filesystem: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
    override_num_blocks: Optional[int] = None,
    zero_copy: Union[bool, str] = "auto",
    partitioning: Any = "hive",
    include_paths: bool = False,
    file_extensions: Optional[Sequence[str]] = ("parquet",),
    partition_filter: Any = None,
    shuffle: Any = None,
    schema: Any = None,
    **kwargs: Any,
) -> "ray.data.Dataset":
    """Read Parquet through the cache: the first read fills it, later reads come from it.

    Parameters
    ----------
    paths : str or list of str
        A file, a list of files, a directory or prefix, or a glob; local paths,
        ``file://``, ``s3://``, ``gs://``, ``abfs://`` and whatever fsspec reaches.
    columns : list of str, optional
        Read and cache only these columns.
    filesystem : fsspec or pyarrow filesystem, optional
        Filesystem to read with, e.g. ``s3fs.S3FileSystem(...)``.
    storage_options : dict, optional
        fsspec options used when ``filesystem`` is None.
    override_num_blocks : int, optional
        Number of read tasks (default: Ray Data's choice, at most one per cache unit).
    zero_copy : bool or "auto"
        When every unit is already in memory, return a materialized dataset instead of
        read tasks. ``True``: over the cached objects themselves (no copy; see
        :mod:`ray_cache.readers.fastpath` for the trade-off). ``"auto"`` (default): that
        when every worker of the read runs on this driver's node (a node loss there ends
        the driver anyway); otherwise over copies made on each worker's node, owned by
        this driver, which survive a worker's death and are re-made if a node is lost,
        taken only when they fit in the object stores
        (:mod:`ray_cache.readers.nodecopies`). ``False`` always plans read tasks.
    partitioning : ``ray.data.datasource.Partitioning("hive")``, ``"hive"`` or None
        As Ray's default: ``key=value`` folders in a file's path become string columns
        after the file's own (``columns`` may name them). None: no partition columns.
    include_paths : bool
        As Ray's: a string column ``path`` (the object's path, as the filesystem names it)
        after the others. Read with read tasks (the column is added as rows are read).
    file_extensions : list of str, optional
        As Ray's: read only files ending with one of these (with or without the dot, any
        case); default, None or empty: ``["parquet"]`` (Ray 2.60 reads only those too).
    partition_filter : ``ray.data.datasource.PathPartitionFilter``, optional
        As Ray's: called with the listed paths, reads those it returns.
    shuffle : ``"files"`` or ``ray.data.FileShuffleConfig``, optional
        As Ray's: files are read in a random order, a new one each time the dataset is
        executed (a config's ``seed`` fixes it, per execution unless
        ``reseed_after_execution=False``). Read with read tasks.
    schema : ``pyarrow.Schema``, optional
        As Ray's: the dataset has exactly this schema (columns cast to its types, missing
        ones as nulls, others not read), then any partition columns and ``path``.
    **kwargs
        Ray's scheduling arguments (``num_cpus``, ``concurrency``, ``ray_remote_args``, ...),
        passed on to ``ray.data.read_datasource``. Ray's other ``read_parquet`` arguments
        that ray_cache does not implement yet raise ``ValueError`` unless given the value
        that means what ray_cache does; unknown ones (``filter=`` included) raise
        ``TypeError``: never silently ignored (:mod:`ray_cache.readers.arguments`).

    Returns
    -------
    ray.data.Dataset
        Rows and schema equal to what pyarrow reads from the same files; the dataset is
        a snapshot of the objects' versions at this call.

    Examples
    --------
    >>> import ray_cache
    >>> ds = ray_cache.read_parquet("s3://bucket/train/", columns=["x", "y"])  # doctest: +SKIP
    >>> ds.count()  # doctest: +SKIP
    1000000
    """
    from ray_cache.readers.arguments import (check_partitioning, check_read_args, check_shuffle,
                                             check_extensions, select_files)

    kwargs = check_read_args(kwargs)  # before any listing: refused, never ignored
    partitioning = check_partitioning(partitioning)
    shuffle = check_shuffle(shuffle)
    if schema is not None and not isinstance(schema, pa.Schema):
        raise ValueError(f"schema must be a pyarrow.Schema, got {type(schema).__name__}")
    if zero_copy not in (True, False, "auto"):
        raise ValueError(f"zero_copy must be True, False or 'auto', got {zero_copy!r}")
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise ValueError(f"columns must be a list of column names, got {columns!r}")
    if not isinstance(include_paths, bool):
        raise ValueError(f"include_paths must be True or False, got {include_paths!r}")
    extensions = check_extensions(file_extensions)  # before any listing
    fs, stripped = underfs.resolve_filesystem(paths, filesystem, storage_options)

    def chosen(objects: List[StoreObject]) -> List[StoreObject]:
        keep = set(select_files([o.path for o in objects], partition_filter, extensions, stripped))
        return [o for o in objects if o.path in keep]

    objects = access.list_readable(fs, stripped, keep=chosen)  # rights proven for those kept
    workers = _workers()
    from ray_cache.readers import fastpath, nodecopies
    from ray_cache.readers.datasource import CachedParquetDatasource  # imports Ray Data: only when reading

    source = CachedParquetDatasource(fs, objects, workers, columns=columns, partitioning=partitioning,
                                     include_paths=include_paths, shuffle=shuffle, user_schema=schema)
    warm = None
    if zero_copy is not False and not kwargs and override_num_blocks is None and source.uniform_schema \
            and not include_paths and shuffle is None:
        here = ray.get_runtime_context().get_node_id()
        if zero_copy is True or all(w.node_id == here for w in workers):
            warm = fastpath.try_zero_copy(source.requests, workers)
        else:
            warm = nodecopies.plan(fs, source.requests, workers)
    if warm is not None:
        return warm
    # One read task per unit by default: asking Ray Data for more blocks than tasks makes
    # it split every block (a copy) after the read.
    blocks = override_num_blocks or max(1, source.num_units)
    return ray.data.read_datasource(source, override_num_blocks=blocks, **kwargs)


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

    Returns
    -------
    LoadReport or LoadJob

    Examples
    --------
    >>> report = ray_cache.load("s3://bucket/train/", columns=["x", "y"])  # doctest: +SKIP
    >>> report.fetched, report.already_cached, report.failures  # doctest: +SKIP
    (32, 0, [])
    """
    from ray_cache.steering import ops

    _check_ttl(ttl)
    p = ops.plan(paths, columns=columns, filesystem=filesystem, storage_options=storage_options)

    def work(cancel=None, on_progress=None) -> "LoadReport":
        report = ops.run_load(p, progress=progress, cancel=cancel, on_progress=on_progress)
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
