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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
from ray.data import ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource

from ray_cache.cluster import routing
from ray_cache.store import fetch, parquet
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import UNIT_TARGET_BYTES
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


class CachedParquetDatasource(Datasource):
    """Parquet objects read through ray_cache workers.

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
        partitioning: Optional[str] = "hive",
        include_paths: bool = False,
        shuffle: Any = None,
        user_schema: Optional[pa.Schema] = None,
    ) -> None:
        super().__init__()
        self._fs = fs
        self._workers = list(workers)
        self._columns = list(columns) if columns is not None else None
        self._requests: List[UnitRequest] = []
        self._schema: Optional[pa.Schema] = None
        schemas: List[pa.Schema] = []
        parts_seen: List[str] = []
        for obj, (footer, meta, schema) in zip(objects, _footers(fs, objects, self._workers)):
            # Hive partition columns (Ray's default): strings, after the file's own columns;
            # a file column of the same name wins.
            parts = fetch.default_partitions(obj, schema) if partitioning == "hive" else ()
            parts_seen.extend(k for k, _ in parts if k not in parts_seen)
            cols = self._columns
            if user_schema is not None:  # read only what the given schema keeps (Ray's schema=)
                have = set(schema.names) | {k for k, _ in parts}
                wanted = [f.name for f in user_schema if f.name not in parts_seen] + [k for k, _ in parts]
                cols = [c for c in wanted if c in have and (self._columns is None or c in self._columns)]
            if cols is not None:
                parts = tuple((k, v) for k, v in parts if k in cols)
            full = pa.schema(list(schema) + [pa.field(k, pa.string()) for k, _ in parts])
            if cols is not None:
                missing = [c for c in cols if c not in full.names and not (include_paths and c == "path")]
                if missing:
                    raise ValueError(
                        f"columns {missing} not in {obj.url}; its columns are {full.names}"
                    )
                full = pa.schema([full.field(c) for c in cols if c in full.names])
            if include_paths and "path" not in full.names:  # as Ray: after the others
                full = full.append(pa.field("path", pa.string()))
            schemas.append(full)
            names = {k for k, _ in parts}
            # The key keeps the caller's column order, so a cached table needs no reordering.
            key_columns = tuple(dict.fromkeys(cols)) if cols is not None else None
            decode = None if key_columns is None else tuple(c for c in key_columns if c not in names)
            self._requests.extend(fetch.unit_requests(obj, footer, meta, parts, key_columns, decode, unit_bytes))
        self._paths = [o.url for o in objects]
        self._include_paths = include_paths
        self._shuffle = shuffle
        self._executions = 0
        #: Whether every file has the same schema; else tables are conformed to the
        #: unified one as they are read (Ray Data's schema evolution).
        self.uniform_schema = all(s.equals(schemas[0]) for s in schemas)
        if schemas:
            self._schema = schemas[0] if self.uniform_schema else parquet.unify_schemas(schemas, self._paths)
        if user_schema is not None:  # Ray's schema=: exactly it (cast, missing as nulls), then
            # partition columns after the file's, as Ray orders them (typed as given, if given)
            target = [f for f in user_schema if f.name not in parts_seen] + [
                user_schema.field(k) if k in user_schema.names else pa.field(k, pa.string()) for k in parts_seen]
            if include_paths and "path" not in user_schema.names:
                target.append(pa.field("path", pa.string()))  # and the path
            if self._columns is not None:
                by_name = {f.name: f for f in target}
                unknown = [c for c in self._columns if c not in by_name]
                if unknown:
                    raise ValueError(f"columns {unknown} not in the schema given: {user_schema.names}")
                target = [by_name[c] for c in self._columns]
            self._schema = pa.schema(target, metadata=user_schema.metadata)
            self.uniform_schema = all(s.equals(self._schema) for s in schemas)

    @property
    def requests(self) -> List[UnitRequest]:
        """The planned units, in read order."""
        return list(self._requests)

    @property
    def num_units(self) -> int:
        return len(self._requests)

    @property
    def schema(self) -> Optional[pa.Schema]:
        return self._schema

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
        reqs = self._requests
        if self._shuffle is not None and reqs:  # Ray's file shuffle: whole files, one order per execution
            by_file: Dict[str, List[UnitRequest]] = {}
            for r in reqs:
                by_file.setdefault(r.obj.url, []).append(r)
            files = list(by_file.values())
            reqs = [r for i in file_order(len(files), self._shuffle, self._executions) for r in files[i]]
            self._executions += 1
        if not reqs:
            empty = self._schema.empty_table() if self._schema is not None else pa.table({})
            meta = BlockMetadata(num_rows=0, size_bytes=0, input_files=None, exec_stats=None)
            return [ReadTask(lambda: [empty], meta, schema=self._schema, per_task_row_limit=per_task_row_limit)]
        n = max(1, min(parallelism if parallelism > 0 else len(reqs), len(reqs)))
        tasks = []
        for i in range(n):
            chunk = reqs[i * len(reqs) // n : (i + 1) * len(reqs) // n]
            if not chunk:
                continue
            meta = BlockMetadata(
                num_rows=sum(r.unit.num_rows for r in chunk),
                size_bytes=sum(r.unit.nbytes for r in chunk),
                input_files=sorted({r.obj.url for r in chunk}),
                exec_stats=None,
            )
            tasks.append(
                ReadTask(
                    # Keys keep the caller's column order: tables come out as asked.
                    functools.partial(routing.read_units, self._fs, chunk, self._workers)
                    if self.uniform_schema and not self._include_paths else
                    functools.partial(_conformed, self._fs, chunk, self._workers,
                                      None if self.uniform_schema else self._schema, self._include_paths),
                    meta,
                    schema=self._schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def _conformed(fs: Any, chunk: Sequence[UnitRequest], workers: Sequence[WorkerRef],
               schema: Optional[pa.Schema], include_paths: bool = False) -> Iterator[pa.Table]:
    """The chunk's tables, each with its ``path`` column if asked, and the unified schema
    if given (missing columns as nulls)."""
    for req, table in zip(chunk, routing.read_units(fs, chunk, workers)):
        if include_paths and "path" not in table.column_names:
            table = table.append_column(pa.field("path", pa.string()),
                                        pa.repeat(pa.scalar(req.obj.path, pa.string()), table.num_rows))
        yield table if schema is None else parquet.conform(table, schema)
