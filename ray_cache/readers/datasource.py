"""The Ray Data ``Datasource`` that reads Parquet row groups through the cache workers.

Planning (in the constructor, so bad paths fail at the ``read_parquet`` call) lists the
objects with their current versions, gets their footers through the workers, and cuts
each file into units (runs of row groups). Read tasks are contiguous slices of units, so
rows keep their order within a file and files keep the listed order.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, List, Optional, Sequence

import pyarrow as pa
from ray.data import ReadTask
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource

from ray_cache.cluster import routing
from ray_cache.store import parquet
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import UNIT_TARGET_BYTES
from ray_cache.store.fetch import UnitRequest
from ray_cache.store.keys import EntryKey, StoreObject


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
    ) -> None:
        super().__init__()
        self._fs = fs
        self._workers = list(workers)
        self._columns = list(columns) if columns is not None else None
        # The key keeps the caller's column order, so a cached table needs no reordering.
        key_columns = tuple(dict.fromkeys(columns)) if columns is not None else None
        footers = routing.footers(fs, objects, self._workers)
        self._requests: List[UnitRequest] = []
        self._schema: Optional[pa.Schema] = None
        schemas: List[pa.Schema] = []
        for obj, footer in zip(objects, footers):
            meta = parquet.read_metadata(obj.url, obj.size, footer)
            schema = meta.schema.to_arrow_schema()
            if self._columns is not None:
                missing = [c for c in self._columns if c not in schema.names]
                if missing:
                    raise ValueError(
                        f"columns {missing} not in {obj.url}; its columns are {schema.names}"
                    )
                schema = pa.schema([schema.field(c) for c in self._columns])
            schemas.append(schema)
            for unit in parquet.plan_units(meta, unit_bytes):
                key = EntryKey(
                    obj.protocol, obj.path, obj.version, "rg", unit.start, unit.stop, key_columns
                )
                self._requests.append(UnitRequest(key, obj, footer, unit, key_columns))
        self._paths = [o.url for o in objects]
        #: Whether every file has the same schema; else tables are conformed to the
        #: unified one as they are read (Ray Data's schema evolution).
        self.uniform_schema = all(s.equals(schemas[0]) for s in schemas)
        if schemas:
            self._schema = schemas[0] if self.uniform_schema else parquet.unify_schemas(schemas, self._paths)

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
                    if self.uniform_schema else
                    functools.partial(_conformed, self._fs, chunk, self._workers, self._schema),
                    meta,
                    schema=self._schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def _conformed(fs: Any, chunk: Sequence[UnitRequest], workers: Sequence[WorkerRef],
               schema: pa.Schema) -> Iterator[pa.Table]:
    """The chunk's tables, each with the unified schema (missing columns as nulls)."""
    for table in routing.read_units(fs, chunk, workers):
        yield parquet.conform(table, schema)
