"""What a read task does to each cached unit's table before Ray Data gets it: the columns
Ray adds as rows are read (``path``, ``row_hash``), the unified schema of files that differ,
a pushed-down filter, and tensor columns. None of it is cached: the cache keeps the units
as the files hold them, so every read of any shape shares them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa

from ray_cache.cluster import routing
from ray_cache.cluster.membership import WorkerRef
from ray_cache.readers import pushdown, tensors
from ray_cache.store import parquet
from ray_cache.store.fetch import UnitRequest


@dataclass(frozen=True)
class Shaping:
    """What a read task does to each unit's table before handing it on."""

    schema: Optional[pa.Schema]  # the unified schema, when files differ
    include_paths: bool
    include_row_hash: bool
    predicate: Any
    columns: Optional[List[str]]  # the columns asked for, when the filter read others too
    tensor_columns: Optional[Dict[str, Tuple[Any, Tuple[int, ...]]]]


def shaped(fs: Any, chunk: Sequence[Tuple[UnitRequest, int]], workers: Sequence[WorkerRef],
            shape: Shaping) -> Iterator[pa.Table]:
    """The chunk's tables as Ray's ``read_parquet`` returns them: conformed to the unified
    schema, ``path`` and ``row_hash`` (the file's row index, Ray's hash) appended, filtered,
    the asked columns kept, tensor columns converted."""
    reqs = [r for r, _ in chunk]
    for (req, row_start), table in zip(chunk, routing.read_units(fs, reqs, workers)):
        if shape.schema is not None:
            table = parquet.conform(table, shape.schema)
        n = table.num_rows
        if shape.include_paths and (shape.columns is None or "path" in shape.columns):
            table = _put(table, "path", pa.repeat(pa.scalar(req.obj.path, pa.string()), n))
        if shape.include_row_hash and (shape.columns is None or "row_hash" in shape.columns):
            table = _put(table, "row_hash", pa.array(row_hashes(req.obj.path, row_start, n), pa.uint64()))
        if shape.predicate is not None:  # never with row_hash (see supports_predicate_pushdown)
            table = pushdown.apply(table, shape.predicate)
        if shape.columns is not None and table.column_names != shape.columns:
            table = table.select(shape.columns)
        if shape.tensor_columns:
            table = tensors.convert(table, shape.tensor_columns)
        yield table


def _put(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    field = pa.field(name, values.type)
    return table.append_column(field, values) if i == -1 else table.set_column(i, field, values)


def row_hashes(path: str, start_row: int, num_rows: int) -> Any:
    """Ray Data's ``row_hash`` of rows ``[start_row, start_row + num_rows)`` of the file at
    ``path``: the first 8 bytes of the path's MD5 (little-endian) plus the row index, through
    the splitmix64 finalizer (Ray 2.60's ``synthesized_columns``).

    >>> [int(h) for h in row_hashes("b/x.parquet", 0, 2)] == [int(h) for h in row_hashes("b/x.parquet", 0, 3)[:2]]
    True
    """
    import hashlib

    import numpy as np

    seed = np.uint64(int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], "little"))
    keys = seed + np.arange(start_row, start_row + num_rows, dtype=np.uint64)
    keys ^= keys >> np.uint64(30)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(27)
    keys *= np.uint64(0x94D049BB133111EB)
    keys ^= keys >> np.uint64(31)
    return keys


#: Blocks up to this size are made contiguous (see :func:`one_block`).
CONTIGUOUS_BYTES = 256 << 20


def one_block(tables: Sequence[pa.Table]) -> pa.Table:
    """``tables`` (at least one, same schema) as one block, each column contiguous.

    One copy here, where the block is made, instead of one in every batch: Ray Data
    concatenates the chunks a batch spans each time the block is iterated (two blocks of 12
    chunks, 1.2M rows each, iterated in batches of 65,536: 0.038-0.040 s; the same blocks
    contiguous: 0.029-0.034 s). Left chunked above ``CONTIGUOUS_BYTES``, or where Arrow cannot
    join a column into one chunk.

    Examples
    --------
    >>> block = one_block([pa.table({"x": [1]}), pa.table({"x": [2, 3]})])
    >>> block.num_rows, block.column("x").num_chunks
    (3, 1)
    """
    block = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if block.nbytes > CONTIGUOUS_BYTES or all(c.num_chunks <= 1 for c in block.columns):
        return block
    try:
        return block.combine_chunks()
    except pa.lib.ArrowException:  # e.g. string offsets past 2 GiB: chunked, as it was
        return block
