"""``ray_cache.read_parquet``: Ray Data's ``read_parquet``, read through the cache.

Resolves the arguments (each of Ray 2.60's, with Ray's meaning, or refused:
:mod:`ray_cache.readers.arguments`), lists the objects with the reader's own rights
(:mod:`ray_cache.store.access`), plans the units (:mod:`ray_cache.readers.datasource`) and
returns the warm dataset when every unit is cached (:mod:`ray_cache.readers.fastpath`,
:mod:`ray_cache.readers.nodecopies`), else read tasks: on a cluster, each on the node its
units' blocks belong to (:mod:`ray_cache.readers.nodereads`).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import ray

from ray_cache.api import PathArg
from ray_cache.cluster.membership import workers as _workers
from ray_cache.store import access, underfs
from ray_cache.store.keys import StoreObject

log = logging.getLogger("ray_cache")


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
    include_row_hash: bool = False,
    file_extensions: Optional[Sequence[str]] = ("parquet",),
    partition_filter: Any = None,
    shuffle: Any = None,
    schema: Any = None,
    ignore_missing_paths: bool = False,
    skip_paths: Union[str, Sequence[str], None] = None,
    tensor_column_schema: Optional[Dict[str, Tuple[Any, Tuple[int, ...]]]] = None,
    catalog: Any = None,
    parallelism: int = -1,
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
        (:mod:`ray_cache.readers.nodecopies`); a new read of the same units while a
        dataset made by an earlier one lives shares that dataset's copies. ``False`` always plans read tasks. Read
        tasks on a cluster run on their units' owners' nodes (evened out by rows), every
        execution (:mod:`ray_cache.readers.nodereads`), unless Ray's remote arguments are given.
    partitioning : ``ray.data.datasource.Partitioning``, ``"hive"`` or None
        As Ray's default: ``key=value`` folders in a file's path become string columns
        after the file's own (``columns`` may name them). A ``Partitioning`` with
        ``field_types`` (typed columns), ``base_dir`` or the ``"dir"`` style is parsed by
        Ray's own ``PathPartitionParser``. None: no partition columns.
    include_paths : bool
        As Ray's: a string column ``path`` (the object's path, as the filesystem names it)
        after the others. Read with read tasks (the column is added as rows are read).
    include_row_hash : bool
        As Ray's: a ``uint64`` column ``row_hash``, Ray's hash of the file's path and the
        row's index in it (equal to Ray's on the same files). Read with read tasks.
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
    ignore_missing_paths : bool
        As Ray's: paths (files, folders, globs) that name nothing are left out instead of
        raising ``FileNotFoundError``.
    skip_paths : str or list of str, optional
        As Ray's: files (or whole folders) to leave out, whether or not they exist.
    tensor_column_schema : dict, optional
        As Ray's: ``{column: (numpy dtype, shape)}``; those binary columns (raw C-order
        arrays, ``arr.tobytes()``) are read as tensor columns. Read with read tasks.
    catalog : ``ray.data.catalog.Catalog``, optional
        As Ray's: ``paths`` is a table name the catalog resolves to a location (and a
        filesystem carrying its credentials).
    parallelism : int
        Deprecated in Ray for ``override_num_blocks``; as there, a value other than -1 is
        the number of blocks.
    **kwargs
        Ray's scheduling arguments (``num_cpus``, ``concurrency``, ``ray_remote_args``, ...),
        passed on to ``ray.data.read_datasource``. Ray's other ``read_parquet`` arguments
        that ray_cache does not implement yet raise ``ValueError`` unless given the value
        that means what ray_cache does; unknown ones (``filter=`` included) raise
        ``TypeError``: never silently ignored (:mod:`ray_cache.readers.arguments`).

    Returns
    -------
    ray.data.Dataset
        Rows and schema equal to what Ray's ``read_parquet`` reads from the same files; the
        dataset is a snapshot of the objects' versions at this call. ``select_columns`` and
        ``filter(expr=...)`` on it are pushed into the read when it is planned as read
        tasks (a cold read): only those columns are fetched and cached, and units whose
        row-group statistics exclude the filter are not fetched.

    Examples
    --------
    >>> import ray_cache
    >>> ds = ray_cache.read_parquet("s3://bucket/train/", columns=["x", "y"])  # doctest: +SKIP
    >>> ds.count()  # doctest: +SKIP
    1000000
    """
    from ray_cache.readers import tensors
    from ray_cache.readers.arguments import (check_partitioning, check_read_args, check_shuffle,
                                             check_extensions, check_skip_paths, select_files)

    kwargs = check_read_args(kwargs)  # before any listing: refused, never ignored
    if catalog is not None:  # as Ray: the table's location and credentials from the catalog
        paths, filesystem = _from_catalog(catalog, paths, filesystem)
    if parallelism != -1:  # Ray's deprecated name for it
        log.warning("parallelism is deprecated (as in Ray): use override_num_blocks")
        override_num_blocks = parallelism
    partitioning = check_partitioning(partitioning)
    shuffle = check_shuffle(shuffle)
    tensor_column_schema = tensors.check(tensor_column_schema)
    if schema is not None and not isinstance(schema, pa.Schema):
        raise ValueError(f"schema must be a pyarrow.Schema, got {type(schema).__name__}")
    if zero_copy not in (True, False, "auto"):
        raise ValueError(f"zero_copy must be True, False or 'auto', got {zero_copy!r}")
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise ValueError(f"columns must be a list of column names, got {columns!r}")
    for name, flag in (("include_paths", include_paths), ("include_row_hash", include_row_hash),
                       ("ignore_missing_paths", ignore_missing_paths)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    extensions = check_extensions(file_extensions)  # before any listing
    fs, stripped = underfs.resolve_filesystem(paths, filesystem, storage_options)
    skip = check_skip_paths(fs, skip_paths)

    def chosen(objects: List[StoreObject]) -> List[StoreObject]:
        keep = set(select_files([o.path for o in objects], partition_filter, extensions, stripped))
        return [o for o in objects if o.path in keep]

    # rights proven for those kept
    objects = access.list_readable(fs, stripped, keep=chosen, missing_ok=ignore_missing_paths, skip=skip,
                                   folders=underfs.named_folders(paths, fs))
    workers = _workers()
    from ray_cache.readers import fastpath, nodecopies, nodereads
    from ray_cache.readers.datasource import CachedParquetDatasource, ReadOptions  # imports Ray Data

    if columns is not None:  # as Ray: columns= keeps the columns it adds (select_columns does not)
        columns = list(columns) + [c for c, on in (("path", include_paths), ("row_hash", include_row_hash))
                                   if on and c not in columns]
    options = ReadOptions(tuple(columns) if columns is not None else None, partitioning, include_paths,
                          include_row_hash, shuffle, schema, tensor_column_schema)
    source = CachedParquetDatasource(fs, objects, workers, options=options)
    warm = None
    if zero_copy is not False and not kwargs and override_num_blocks is None and source.uniform_schema \
            and not source.needs_read_tasks:
        here = ray.get_runtime_context().get_node_id()
        if zero_copy is True or all(w.node_id == here for w in workers):
            warm = fastpath.try_zero_copy(source.requests, workers)
        else:
            warm = nodecopies.plan(fs, source.requests, workers)
    if warm is not None:
        return warm
    if zero_copy is not True and not kwargs and override_num_blocks is None:
        pinned = nodereads.plan(source, workers)  # on a cluster: each read on its blocks' node
        if pinned is not None:
            return pinned
    # One read task per unit by default: asking Ray Data for more blocks than tasks makes
    # it split every block (a copy) after the read.
    blocks = override_num_blocks or max(1, source.num_units)
    return ray.data.read_datasource(source, override_num_blocks=blocks, **kwargs)


def _from_catalog(catalog: Any, paths: Any, filesystem: Any) -> Tuple[Any, Any]:
    """Ray's ``catalog=``: one table name resolved to its location and filesystem."""
    if not isinstance(paths, str):
        raise ValueError("Specifying multiple table identifiers is not supported.")
    from ray.data.catalog import ReaderFormat

    resolved = catalog.resolve(paths, reader=ReaderFormat.PARQUET)
    if resolved.filesystem is not None:
        if filesystem is not None:
            log.warning("Both `filesystem` and `catalog` were specified. Overriding the provided "
                        "`filesystem` with the catalog-resolved credentials.")
        filesystem = resolved.filesystem
    return resolved.path, filesystem
