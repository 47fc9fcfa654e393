"""The Ray Data ``Datasource`` that reads Parquet row groups through the cache workers.

Planning (in the constructor, so bad paths fail at the ``read_parquet`` call) lists the
objects with their current versions, gets their footers through the workers, and cuts
each file into units (runs of row groups). Read tasks are contiguous slices of units, so
rows keep their order within a file and files keep the listed order.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import pyarrow as pa
from ray.data import ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource

from ray_cache.cluster import routing
from ray_cache.store import fetch, parquet
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import UNIT_TARGET_BYTES
from ray_cache.readers import pushdown, shaping, tensors
from ray_cache.readers.arguments import file_order
from ray_cache.store.fetch import UnitRequest
from ray_cache.store.keys import StoreObject


#: One parsed footer: its bytes, pyarrow's metadata and the Arrow schema.
Parsed = Tuple[bytes, Any, pa.Schema]


class _ParsedFooters:
    """Parsed footers of recently planned object versions, in this process: a footer never
    changes for a version, so planning the same files again asks no worker. LRU, bounded
    by footer bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._items: "OrderedDict[Tuple[str, str, str, int], Parsed]" = OrderedDict()
        self._bytes = 0

    def clear(self) -> None:
        """Forget every parsed footer (the next plan asks the workers again)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __call__(self, fs: Any, objects: Sequence[StoreObject], workers: Sequence[WorkerRef]) -> List[Parsed]:
        """Each object's parsed footer, through the workers for those not parsed here before."""
        keys = [(o.protocol, o.path, o.version, o.size) for o in objects]
        with self._lock:
            found = {i: self._items[k] for i, k in enumerate(keys) if k in self._items}
        todo = [i for i in range(len(keys)) if i not in found]
        for i, footer in zip(todo, routing.footers(fs, [objects[i] for i in todo], workers)):
            meta = parquet.read_metadata(objects[i].url, objects[i].size, footer)
            found[i] = (footer, meta, meta.schema.to_arrow_schema())
        with self._lock:
            for i, k in enumerate(keys):
                if k not in self._items:
                    self._bytes += len(found[i][0])
                self._items[k] = found[i]
                self._items.move_to_end(k)
            while self._bytes > self.limit_bytes and self._items:
                self._bytes -= len(self._items.popitem(last=False)[1][0])
        return [found[i] for i in range(len(keys))]


_footers = _ParsedFooters(limit_bytes=64 << 20)


@dataclass(frozen=True)
class ReadOptions:
    """What one ``read_parquet`` asks for, besides the objects (:func:`ray_cache.read_parquet`
    documents each as Ray's argument of the same name)."""

    columns: Optional[Tuple[str, ...]] = None
    #: None, ``"hive"`` (strings, our default), or a ``ray.data.datasource.Partitioning``.
    partitioning: Any = "hive"
    include_paths: bool = False
    include_row_hash: bool = False
    shuffle: Any = None
    user_schema: Optional[pa.Schema] = None
    #: Ray's ``tensor_column_schema``: column -> (numpy dtype, shape).
    tensor_columns: Optional[Dict[str, Tuple[Any, Tuple[int, ...]]]] = None
    unit_bytes: int = UNIT_TARGET_BYTES

    @property
    def synthesized(self) -> Tuple[str, ...]:
        """The columns added as rows are read, never cached (Ray's ``path``, ``row_hash``)."""
        return (("path",) if self.include_paths else ()) + (("row_hash",) if self.include_row_hash else ())

    @property
    def needs_read_tasks(self) -> bool:
        """Whether rows must pass through a read task (not a cached table as it is)."""
        return bool(self.synthesized) or self.shuffle is not None or self.tensor_columns is not None


class CachedParquetDatasource(Datasource):
    """Parquet objects read through ray_cache workers.

    Supports Ray Data's projection and predicate pushdown: ``select_columns`` after the read
    re-plans it for those columns only (only they are fetched and cached), and
    ``filter(expr=...)`` skips the units whose statistics exclude it
    (:mod:`ray_cache.readers.pushdown`) and filters the rows of the others.

    Examples
    --------
    >>> import ray_cache  # doctest: +SKIP
    >>> ds = ray_cache.read_parquet("s3://bucket/data/")  # builds this datasource  # doctest: +SKIP
    """

    def __init__(
        self,
        fs: Any,
        objects: Sequence[StoreObject],
        workers: Sequence[WorkerRef],
        columns: Optional[Sequence[str]] = None,
        unit_bytes: int = UNIT_TARGET_BYTES,
        partitioning: Any = "hive",
        include_paths: bool = False,
        shuffle: Any = None,
        user_schema: Optional[pa.Schema] = None,
        options: Optional[ReadOptions] = None,
        predicate: Any = None,
        executions: Optional[List[int]] = None,
        only: Optional[FrozenSet[Any]] = None,
    ) -> None:
        super().__init__()
        opts = options or ReadOptions(tuple(columns) if columns is not None else None, partitioning,
                                      include_paths, False, shuffle, user_schema, None, unit_bytes)
        self._fs = fs
        self._objects = list(objects)
        self._workers = list(workers)
        self._opts = opts
        self._projection_map: Optional[Dict[str, str]] = None
        self._predicate_expr = predicate
        #: Executions so far, shared with pushed-down copies (a shuffle's order per execution).
        self._executions = executions if executions is not None else [0]
        #: The units this source reads, by :func:`unit_id` (None: all).
        self._only = only
        #: Whether each read task yields its units as one block (:meth:`restricted`).
        self._whole = False
        self._columns = list(opts.columns) if opts.columns is not None else None
        read_cols = self._columns
        if read_cols is not None and predicate is not None:  # the filter's columns are read too
            read_cols = read_cols + [c for c in pushdown.referenced_columns(predicate) or () if c not in read_cols]
        self._plan(read_cols)

    def _plan(self, read_cols: Optional[List[str]]) -> None:
        opts, user_schema, synthesized = self._opts, self._opts.user_schema, self._opts.synthesized
        self._requests: List[UnitRequest] = []
        self._row_starts: List[int] = []
        self._schema: Optional[pa.Schema] = None
        schemas: List[pa.Schema] = []
        parts_seen: Dict[str, pa.DataType] = {}
        for obj, (footer, meta, schema) in zip(self._objects, _footers(self._fs, self._objects, self._workers)):
            # Partition columns (Ray's default: hive, strings), after the file's own columns;
            # a file column of the same name wins.
            parts = partition_columns(obj, schema, opts.partitioning)
            for p in parts:
                parts_seen.setdefault(p[0], _part_type(p))
            cols = read_cols
            if user_schema is not None:  # read only what the given schema keeps (Ray's schema=)
                have = set(schema.names) | {p[0] for p in parts}
                wanted = [f.name for f in user_schema if f.name not in parts_seen] + [p[0] for p in parts]
                cols = [c for c in wanted if c in have and (read_cols is None or c in read_cols)]
            if cols is not None:
                parts = tuple(p for p in parts if p[0] in cols)
            full = pa.schema(list(schema) + [pa.field(p[0], _part_type(p)) for p in parts])
            if cols is not None:
                missing = [c for c in cols if c not in full.names and c not in synthesized]
                if missing:
                    raise ValueError(
                        f"columns {missing} not in {obj.url}; its columns are {full.names}"
                    )
                full = pa.schema([full.field(c) for c in cols if c in full.names])
            for name in synthesized:  # as Ray: after the others
                if cols is None or name in cols:
                    full = _with_field(full, pa.field(name, pa.string() if name == "path" else pa.uint64()))
            schemas.append(full)
            names = {p[0] for p in parts}
            # The key keeps the caller's column order, so a cached table needs no reordering.
            key_columns = None if cols is None else tuple(c for c in dict.fromkeys(cols) if c not in synthesized)
            decode = None if key_columns is None else tuple(c for c in key_columns if c not in names)
            starts = _row_group_starts(meta)
            units = parquet.plan_units(meta, opts.unit_bytes)
            if self._predicate_expr is not None:  # only row groups the statistics allow
                units = pushdown.matching_units(self._predicate_expr, meta, units, schema, parts)
            if self._only is not None:
                units = [u for u in units if unit_id(obj, u) in self._only]
            for req in fetch.unit_requests(obj, footer, meta, parts, key_columns, decode, units=units):
                self._requests.append(req)
                self._row_starts.append(starts[req.unit.start])
        self._paths = [o.url for o in self._objects]
        #: Whether every file has the same schema; else tables are conformed to the
        #: unified one as they are read (Ray Data's schema evolution).
        self.uniform_schema = all(s.equals(schemas[0]) for s in schemas)
        if schemas:
            self._schema = schemas[0] if self.uniform_schema else parquet.unify_schemas(schemas, self._paths)
        if user_schema is not None:  # Ray's schema=: exactly it (cast, missing as nulls), then
            # partition columns after the file's, as Ray orders them (typed as given, if given)
            target = [f for f in user_schema if f.name not in parts_seen] + [
                user_schema.field(k) if k in user_schema.names else pa.field(k, t) for k, t in parts_seen.items()]
            for name in synthesized:
                if name not in user_schema.names:
                    target.append(pa.field(name, pa.string() if name == "path" else pa.uint64()))
            if read_cols is not None:
                by_name = {f.name: f for f in target}
                unknown = [c for c in read_cols if c not in by_name]
                if unknown:
                    raise ValueError(f"columns {unknown} not in the schema given: {user_schema.names}")
                target = [by_name[c] for c in read_cols]
            self._schema = pa.schema(target, metadata=user_schema.metadata)
            self.uniform_schema = all(s.equals(self._schema) for s in schemas)
        self._out_schema = self._schema
        if self._schema is not None and self._columns is not None and read_cols != self._columns:
            self._out_schema = pa.schema([self._schema.field(c) for c in self._columns], metadata=self._schema.metadata)
        if self._schema is not None and opts.tensor_columns:
            self._out_schema = tensors.convert(self._out_schema.empty_table(), opts.tensor_columns).schema

    # -- Ray Data's pushdown ------------------------------------------------------------

    def supports_projection_pushdown(self) -> bool:
        return True

    def supports_predicate_pushdown(self) -> bool:
        # Ray's row_hash counts rows after its filter within its own read units: keep
        # Ray's Filter above the read then, so the hashes stay those of the unfiltered file.
        return not self._opts.include_row_hash

    def apply_projection(self, projection_map: Optional[Dict[str, str]]) -> "CachedParquetDatasource":
        if projection_map is None:
            return self
        wanted = list(projection_map)
        if self._columns is not None:
            wanted = [c for c in self._columns if c in projection_map]
        return self._copy(columns=tuple(wanted), predicate=self._predicate_expr)

    def apply_predicate(self, predicate_expr: Any) -> "CachedParquetDatasource":
        if pushdown.referenced_columns(predicate_expr) is None:
            return self  # Ray keeps its Filter
        pred = predicate_expr if self._predicate_expr is None else self._predicate_expr & predicate_expr
        return self._copy(columns=self._opts.columns, predicate=pred)

    def _copy(self, columns: Optional[Tuple[str, ...]], predicate: Any) -> "CachedParquetDatasource":
        clone = CachedParquetDatasource(self._fs, self._objects, self._workers,
                                        options=replace(self._opts, columns=columns),
                                        predicate=predicate, executions=self._executions, only=self._only)
        clone._projection_map = None if columns is None else {c: c for c in columns}
        clone._whole = self._whole
        return clone

    def restricted(self, ids: Sequence[Any], whole: bool = False) -> "CachedParquetDatasource":
        """This source over the units named in ``ids`` only (kept through Ray's pushdown);
        with ``whole``, each read task yields its units as one block (Ray Data pays per
        block it iterates; a read task's units are read in parallel by their owners anyway)."""
        only = frozenset(ids) if self._only is None else self._only & frozenset(ids)
        clone = CachedParquetDatasource(self._fs, self._objects, self._workers, options=self._opts,
                                        predicate=self._predicate_expr, executions=self._executions, only=only)
        clone._projection_map = self._projection_map
        clone._whole = whole
        return clone

    @property
    def shuffled(self) -> bool:
        """Whether files are read in a new order at every execution (Ray's file shuffle)."""
        return self._opts.shuffle is not None

    @property
    def requests(self) -> List[UnitRequest]:
        """The planned units, in read order."""
        return list(self._requests)

    @property
    def num_units(self) -> int:
        return len(self._requests)

    @property
    def schema(self) -> Optional[pa.Schema]:
        return self._out_schema

    @property
    def needs_read_tasks(self) -> bool:
        """Whether rows must pass through read tasks (a cached table is not the answer as it is)."""
        return self._opts.needs_read_tasks or self._predicate_expr is not None

    def get_name(self) -> str:
        return "RayCacheParquet"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(r.unit.nbytes for r in self._requests)

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: Optional[int] = None,
        data_context: Any = None,
    ) -> List[ReadTask]:
        pairs = list(zip(self._requests, self._row_starts))
        if self._opts.shuffle is not None and pairs:  # Ray's file shuffle: whole files, one order per execution
            by_file: Dict[str, List[Tuple[UnitRequest, int]]] = {}
            for pair in pairs:
                by_file.setdefault(pair[0].obj.url, []).append(pair)
            files = list(by_file.values())
            pairs = [p for i in file_order(len(files), self._opts.shuffle, self._executions[0]) for p in files[i]]
            self._executions[0] += 1
        if not pairs:
            empty = self._out_schema.empty_table() if self._out_schema is not None else pa.table({})
            meta = BlockMetadata(num_rows=0, size_bytes=0, input_files=None, exec_stats=None)
            return [ReadTask(lambda: [empty], meta, schema=self._out_schema, per_task_row_limit=per_task_row_limit)]
        n = max(1, min(parallelism if parallelism > 0 else len(pairs), len(pairs)))
        plain = self.uniform_schema and not self.needs_read_tasks
        shape = shaping.Shaping(None if self.uniform_schema else self._schema, self._opts.include_paths,
                           self._opts.include_row_hash, self._predicate_expr, self._columns,
                           self._opts.tensor_columns)
        tasks = []
        for i in range(n):
            chunk = pairs[i * len(pairs) // n : (i + 1) * len(pairs) // n]
            if not chunk:
                continue
            reqs = [r for r, _ in chunk]
            meta = BlockMetadata(
                num_rows=None if self._predicate_expr is not None else sum(r.unit.num_rows for r in reqs),
                size_bytes=sum(r.unit.nbytes for r in reqs),
                input_files=sorted({r.obj.url for r in reqs}),
                exec_stats=None,
            )
            # Keys keep the caller's column order: tables come out as asked.
            read = functools.partial(routing.read_units, self._fs, reqs, self._workers) if plain else \
                functools.partial(shaping.shaped, self._fs, chunk, self._workers, shape)
            if self._whole:
                read = functools.partial(_as_one, read)
            read.__name__ = "read_ray_cache_units"  # Ray Data names a read task by it (a large one)
            tasks.append(
                ReadTask(
                    read,
                    meta,
                    schema=self._out_schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def unit_id(obj: StoreObject, unit: parquet.Unit) -> Tuple[str, str, int]:
    """What names one unit whatever columns are read: its object version and first row group."""
    return (obj.path, obj.version, unit.start)


def _as_one(read: Any) -> List[pa.Table]:
    """The tables ``read()`` yields, as one block (side by side: no copy)."""
    tables = list(read())
    return [shaping.one_block(tables)] if tables else []


def partition_columns(obj: StoreObject, schema: pa.Schema, partitioning: Any) -> Tuple[Tuple[str, ...], ...]:
    """``obj``'s partition columns as ``(key, value)`` (hive strings, our default) or
    ``(key, value, type)`` (a ``Partitioning`` with ``field_types``, ``base_dir`` or the
    ``"dir"`` style, parsed by Ray's own ``PathPartitionParser``); a file column of the
    same name wins."""
    if partitioning is None:
        return ()
    if partitioning == "hive":
        return fetch.default_partitions(obj, schema)
    from ray.data.datasource.partitioning import PathPartitionParser

    types = {int: "int64", float: "double", bool: "bool", str: "string"}
    values = PathPartitionParser(partitioning)(obj.path)
    field_types = partitioning.field_types or {}
    return tuple((k, None if v is None else str(v), types.get(field_types.get(k, str), "string"))
                 for k, v in values.items() if k not in schema.names)


def _part_type(part: Tuple[str, ...]) -> pa.DataType:
    return pa.type_for_alias(part[2]) if len(part) > 2 else pa.string()


def _with_field(schema: pa.Schema, field: pa.Field) -> pa.Schema:
    """``schema`` with ``field`` last, replacing a column of the same name (as Ray does for
    its synthesized columns)."""
    i = schema.get_field_index(field.name)
    return schema.append(field) if i == -1 else schema.set(i, field)


def _row_group_starts(meta: Any) -> List[int]:
    """The file row index at which each row group starts."""
    out, n = [], 0
    for i in range(meta.num_row_groups):
        out.append(n)
        n += meta.row_group(i).num_rows
    return out + [n]
