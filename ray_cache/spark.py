"""Spark reads and writes Parquet through the cache: a PySpark (4.x) Python Data Source.

>>> import ray_cache.spark  # doctest: +SKIP
>>> ray_cache.spark.register(spark)  # doctest: +SKIP
>>> df = spark.read.format("ray_cache").load("s3://bucket/features/")  # doctest: +SKIP
>>> df.write.format("ray_cache").mode("overwrite").save("s3://bucket/out/")  # doctest: +SKIP

**Reading** plans the same units as ``ray_cache.read_parquet`` (versions fixed at planning),
one Spark partition per run of units up to :data:`PARTITION_BYTES`; each task asks the
units' owners for them through Ray (a Spark Python worker joins the Ray cluster the driver
planned in) and yields their Arrow record batches, conformed to Spark's Arrow schema
(``string`` for ``large_string``, microsecond timestamps, every column nullable, as
``spark.read.parquet`` reports them). Hive partition columns are typed as Spark infers
them (``int``, then ``bigint``, ``double``, else ``string``). Options: ``columns``
(comma-separated), ``storage_options`` (JSON; never logged), ``path``/``paths``; with
none, the store's credentials and endpoint come from the environment as s3fs finds them
(``AWS_*``), in the driver and in Spark's Python workers alike. Filters are pushed down
(comparisons, ``IN``, null tests on top-level columns: units of partitions that cannot
match are not read, rows are filtered exactly) when ``spark.sql.python.filterPushdown.enabled``
is on at :func:`register`; PySpark has no column-pruning or preferred-location API.

**Writing** (``df.write.format("ray_cache")``): each task writes its rows as one Parquet
file, ``part-<partition>-<job>.parquet``, through ``raycache``, so the file is cached as it
is written (pages and the units ``read_parquet`` will ask for: the next stage reads it
warm). A retried task rewrites the same name, so a committed job leaves exactly one file per
partition; ``mode("overwrite")`` removes the folder's other files at commit; an aborted job's
files are deleted, also those of tasks still closing as it aborts (a hidden
``_aborted-<job>`` marker, written first, tells them; files appear as tasks finish, as with
S3's direct committers).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from pyspark.sql.datasource import (DataSource, DataSourceArrowWriter, DataSourceReader, EqualTo, Filter,
                                    GreaterThan, GreaterThanOrEqual, In, InputPartition, IsNotNull, IsNull,
                                    LessThan, LessThanOrEqual, WriterCommitMessage)

#: Bytes of units (decoded) one Spark partition reads, at most (one unit always).
PARTITION_BYTES = 128 * 1024**2
NAME = "ray_cache"


def register(spark: Any) -> None:
    """Register the ``ray_cache`` format with this Spark session.

    Filter pushdown is used if ``spark.sql.python.filterPushdown.enabled`` is on now (a
    reader that offers pushdown fails in Spark when the setting is off).
    """
    import ray

    from ray_cache.cluster import membership

    enabled = str(spark.conf.get("spark.sql.python.filterPushdown.enabled", "false")).lower() == "true"
    membership.workers()  # this driver's Ray (started if there is none) and its cache workers
    base = RayCacheFilteringSource if enabled else RayCacheSource
    # Spark builds the source in its Python workers, which must join this driver's Ray
    # cluster, not whichever one they would find: the address travels with the class.
    source = type(base.__name__, (base,), {"ray_address": ray.get_runtime_context().gcs_address})
    spark.dataSource.register(source)


def _join(address: Optional[str]) -> None:
    """Join the driver's Ray cluster (a Spark Python worker has none of its own)."""
    import logging

    import ray

    if not ray.is_initialized() and address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, ignore_reinit_error=True)


@dataclass
class _Plan:
    """What the driver planned, pickled to every task."""

    fs: Any
    units: List[Any]  # ray_cache.store.fetch.UnitRequest
    arrow: pa.Schema  # the tables the workers return
    spark: Any  # StructType
    partition_types: Dict[str, str] = field(default_factory=dict)  # hive column -> int/bigint/double
    address: Optional[str] = None


def _options(options: Dict[str, str]) -> Tuple[List[str], Optional[List[str]], Dict[str, Any]]:
    paths = json.loads(options["paths"]) if options.get("paths") else []
    if options.get("path"):
        paths.append(options["path"])
    if not paths:
        raise ValueError("ray_cache: give a path: spark.read.format('ray_cache').load('s3://bucket/data/')")
    columns = [c.strip() for c in options["columns"].split(",")] if options.get("columns") else None
    try:
        storage = json.loads(options.get("storage_options") or "{}")
    except json.JSONDecodeError:
        raise ValueError("ray_cache: the storage_options option must be a JSON object") from None
    return paths, columns, storage


def _plan(options: Dict[str, str], address: Optional[str]) -> _Plan:
    import ray

    from ray_cache.cluster import membership
    from ray_cache.readers.arguments import check_extensions, select_files
    from ray_cache.readers.datasource import CachedParquetDatasource
    from ray_cache.store import access, underfs
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StructField, StructType

    paths, columns, storage = _options(options)
    _join(address)
    fs, stripped = underfs.resolve_filesystem(paths, None, storage or None)
    extensions = check_extensions(None)
    objects = access.list_readable(fs, stripped, keep=lambda objs: [
        o for o in objs if o.path in set(select_files([x.path for x in objs], None, extensions, stripped))],
        folders=underfs.named_folders(paths, fs))
    workers = membership.workers()
    source = CachedParquetDatasource(fs, objects, workers, columns=columns)
    arrow = source.schema
    hive = {k for u in source.requests for k, _ in u.partitions}
    types = {k: _infer(sorted({v for u in source.requests for kk, v in u.partitions if kk == k})) for k in hive}
    fields = []
    for f in from_arrow_schema(pa.schema([_sparkable(x) for x in arrow])).fields:
        spark_type = f.dataType
        if f.name in types and types[f.name] != "string":
            from pyspark.sql.types import DoubleType, IntegerType, LongType
            spark_type = {"int": IntegerType(), "bigint": LongType(), "double": DoubleType()}[types[f.name]]
        fields.append(StructField(f.name, spark_type, True))  # Spark's Parquet reader: all nullable
    return _Plan(fs, list(source.requests), arrow, StructType(fields), types,
                 ray.get_runtime_context().gcs_address)


def _infer(values: Sequence[str]) -> str:
    """Spark's partition-value type inference, for the types it most often finds.

    >>> _infer(["2024", "2025"]), _infer(["1", "9999999999"]), _infer(["0.5", "2"]), _infer(["a", "1"])
    ('int', 'bigint', 'double', 'string')
    """
    def every(kind: type) -> bool:
        try:
            return all(kind(v) is not None for v in values)
        except ValueError:
            return False

    if values and every(int):
        return "int" if all(-2**31 <= int(v) < 2**31 for v in values) else "bigint"
    if values and every(float):
        return "double"
    return "string"


def _sparkable(f: pa.Field) -> pa.Field:
    """The field Spark's Arrow conversion takes (large types as their plain ones)."""
    t = f.type
    if pa.types.is_large_string(t):
        t = pa.string()
    elif pa.types.is_large_binary(t):
        t = pa.binary()
    elif pa.types.is_large_list(t):
        t = pa.list_(_sparkable(t.value_field).type)
    return pa.field(f.name, t, True)


class RayCacheSource(DataSource):
    """The ``ray_cache`` format (see the module docstring)."""

    #: The driver's Ray cluster (set by :func:`register`).
    ray_address: Optional[str] = None

    @classmethod
    def name(cls) -> str:
        return NAME

    def _planned(self) -> _Plan:
        if getattr(self, "_cached_plan", None) is None:
            self._cached_plan = _plan(dict(self.options), self.ray_address)
        return self._cached_plan

    def schema(self) -> Any:
        return self._planned().spark

    def reader(self, schema: Any) -> DataSourceReader:
        return _Reader(self._planned(), schema)

    def writer(self, schema: Any, overwrite: bool) -> "_Writer":
        paths, _columns, storage = _options(dict(self.options))
        _join(self.ray_address)
        return _Writer(paths[0], storage, overwrite)


class RayCacheFilteringSource(RayCacheSource):
    """:class:`RayCacheSource` whose reader takes pushed filters."""

    def reader(self, schema: Any) -> DataSourceReader:
        return _FilteringReader(self._planned(), schema)


class _Units(InputPartition):
    units: List[Any]

    def __init__(self, units: List[Any]) -> None:
        super().__init__(len(units))
        self.units = units


class _Reader(DataSourceReader):
    def __init__(self, plan: _Plan, schema: Any) -> None:
        self.plan = plan
        self.filters: List[Tuple[Filter, Any, str]] = []  # pushed: (Spark's, pyarrow's, column)

    def partitions(self) -> Sequence[InputPartition]:
        out: List[InputPartition] = []
        run: List[Any] = []
        for u in self.plan.units:
            if not self._may_match(u):
                continue
            if run and sum(x.unit.nbytes for x in run) + u.unit.nbytes > PARTITION_BYTES:
                out.append(_Units(run))
                run = []
            run.append(u)
        if run or not out:
            out.append(_Units(run))
        return out

    def _may_match(self, unit: Any) -> bool:
        """False if a pushed filter on a partition column rules the unit's file out."""
        values = dict(unit.partitions)
        for _f, expr, column in self.filters:
            if column in values:
                one = _typed(pa.table({column: [values[column]]}), self.plan)
                if one.filter(expr).num_rows == 0:
                    return False
        return True

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        from ray_cache.cluster import routing
        from ray_cache.files import pages
        from pyspark.sql.pandas.types import to_arrow_schema

        reader = pages.reader()
        reader.remember_address(self.plan.address)
        workers = reader.workers(refresh=True) or []  # a reused Python worker may know old ones
        target = to_arrow_schema(self.plan.spark, timezone="UTC")  # what Spark checks batches against
        for table in routing.read_units(self.plan.fs, partition.units, workers):
            table = _typed(_conform_units(table, self.plan.arrow), self.plan)
            for _f, expr, _c in self.filters:
                table = table.filter(expr)
            table = _to_spark(table, target)
            yield from table.to_batches()


class _FilteringReader(_Reader):
    def pushFilters(self, filters: List[Filter]) -> Iterator[Filter]:
        names = set(self.plan.spark.fieldNames())
        for f in filters:
            expr = _expression(f, names)
            if expr is None:
                yield f  # Spark evaluates it
            else:
                self.filters.append((f, expr, f.attribute[0]))


def _expression(f: Filter, names: set) -> Optional[Any]:
    """The pyarrow expression of a Spark filter, or None where it is not one we push."""
    attr = getattr(f, "attribute", ())
    if len(attr) != 1 or attr[0] not in names:
        return None
    col = pc.field(attr[0])
    ops = {EqualTo: lambda v: col == v, GreaterThan: lambda v: col > v, GreaterThanOrEqual: lambda v: col >= v,
           LessThan: lambda v: col < v, LessThanOrEqual: lambda v: col <= v}
    try:
        if type(f) in ops:
            if f.value is None:
                return None
            return ops[type(f)](pa.scalar(f.value))
        if isinstance(f, In):
            return col.isin(pa.array(list(f.value)))
        if isinstance(f, IsNull):
            return col.is_null()
        if isinstance(f, IsNotNull):
            return col.is_valid()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    return None


def _conform_units(table: pa.Table, schema: pa.Schema) -> pa.Table:
    from ray_cache.store import parquet

    return parquet.conform(table, schema)


def _typed(table: pa.Table, plan: _Plan) -> pa.Table:
    """Hive partition columns (strings) cast as Spark types them."""
    arrow = {"int": pa.int32(), "bigint": pa.int64(), "double": pa.float64()}
    for name, kind in plan.partition_types.items():
        if kind != "string" and name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, name, table.column(name).cast(arrow[kind]))
    return table


def _to_spark(table: pa.Table, target: pa.Schema) -> pa.Table:
    """``table`` as exactly Spark's Arrow schema (types and nullability)."""
    cols = [table.column(f.name).cast(f.type) if not table.column(f.name).type.equals(f.type)
            else table.column(f.name) for f in target]
    return pa.Table.from_arrays(cols, schema=target)


@dataclass
class _Written(WriterCommitMessage):
    path: Optional[str]


class _Writer(DataSourceArrowWriter):
    """One Parquet file per task, written through ``raycache`` (see the module docstring)."""

    def __init__(self, path: str, storage: Dict[str, Any], overwrite: bool) -> None:
        import ray

        from ray_cache.files.fs import CacheFileSystem
        from ray_cache.store import underfs

        target, (root,) = underfs.resolve_filesystem([path], None, storage or None)
        self.root = root.rstrip("/")
        self.target = target
        self.fs = CacheFileSystem(fs=target, skip_instance_cache=True)
        self.job = uuid.uuid4().hex[:12]
        self.marker = f"{self.root}/_aborted-{self.job}"
        self.overwrite = overwrite
        if not ray.is_initialized():  # not joined: nothing to write through to
            raise RuntimeError("ray_cache: register the data source with ray_cache.spark.register(spark)")

    def write(self, iterator: Iterator[pa.RecordBatch]) -> _Written:
        import pyarrow.parquet as pq
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part = ctx.partitionId() if ctx is not None else 0
        path = f"{self.root}/part-{part:05d}-{self.job}.parquet"
        batches = iter(iterator)
        first = next(batches, None)
        if first is None:  # an empty partition writes no file
            return _Written(None)
        with self.fs.open(path, "wb") as f:  # an exception here discards the file
            writer = pq.ParquetWriter(f, first.schema)
            writer.write_batch(first)
            for batch in batches:
                writer.write_batch(batch)
            writer.close()
        if self._aborted():  # the job was aborted while this task wrote: its file must not stay
            self.fs.rm(path)
            return _Written(None)
        return _Written(path)

    def _aborted(self) -> bool:
        # Asked of the store itself after this task's file is visible there, and written by
        # abort() before it lists: whichever comes first, the other sees it.
        self.target.invalidate_cache(self.root)
        return bool(self.target.exists(self.marker))

    def commit(self, messages: List[Optional[WriterCommitMessage]]) -> None:
        if self.overwrite:
            keep = {m.path for m in messages if isinstance(m, _Written)}
            old = [p for p in self.fs.find(self.root) if p not in keep and not _hidden(p, self.root)]
            if old:
                self.fs.rm(old)

    def abort(self, messages: List[Optional[WriterCommitMessage]]) -> None:
        # A task still closing its file as this runs would leave it after the listing: the
        # marker, written first, tells it to delete its own (it stays, hidden like _SUCCESS).
        self.target.pipe_file(self.marker, b"")
        self.fs.invalidate_cache(self.root)
        mine = [p for p in self.fs.find(self.root) if f"-{self.job}.parquet" in p]
        if mine:
            self.fs.rm(mine)


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root):].lstrip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))
