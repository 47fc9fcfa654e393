"""Parquet: footers, planning row-group runs, the byte ranges they span, decoding to Arrow.

Decoding needs only the footer and the bytes of the selected column chunks; we fetch
exactly those ranges (merged when close) and hand pyarrow a sparse file made of them, so
a cache miss costs one request per run of row groups rather than one per page.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ray_cache.store.errors import NotParquetError

MAGIC = b"PAR1"
#: Bytes read from the end of an object to find its footer in one request, usually.
FOOTER_GUESS = 64 * 1024
#: Ranges closer than this are fetched as one request (a round trip to a far store
#: costs about as much as 256 KiB at 10 MB/s).
MERGE_GAP = 256 * 1024

#: ``fetch(ranges) -> list of bytes``: how this module asks the store for bytes.
Fetcher = Callable[[Sequence[Tuple[int, int]]], List[bytes]]


class _SparseFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some segments are known.

    pyarrow reads only the footer and the selected column chunks; a read outside the
    known segments raises ``OSError``, which means the plan and pyarrow disagree.
    """

    def __init__(self, size: int, segments: Dict[int, bytes], footer_len: int = 0):
        self._size = size
        self._segments = sorted(segments.items())
        self._pos = 0
        # pyarrow opens a file by reading its last 64 KiB at once and parses only the footer
        # at their end: such a read (one that runs into the footer) gets zeros for the bytes
        # before the footer that no segment holds. Any other read outside them still fails.
        self._footer_start = size - footer_len if footer_len else size
        self._pad_from = max(0, size - FOOTER_GUESS) if footer_len else size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readinto(self, buf) -> int:  # type: ignore[override]
        want = min(len(buf), self._size - self._pos)
        if want <= 0:
            return 0
        view = memoryview(buf).cast("B")
        done = 0
        while done < want:
            pos = self._pos + done
            for start, data in self._segments:
                if start <= pos < start + len(data):
                    take = min(want - done, start + len(data) - pos)
                    view[done : done + take] = data[pos - start : pos - start + take]
                    done += take
                    break
            else:
                if not self._pad_from <= pos < self._footer_start < self._pos + want:
                    raise OSError(f"read of {want} bytes at {self._pos} outside the fetched ranges")
                take = min([self._footer_start] + [st for st, _ in self._segments if st > pos]) - pos
                view[done : done + take] = bytes(take)
                done += take
        self._pos += want
        return want


def parse_footer(name: str, size: int, fetch: Fetcher) -> bytes:
    """The footer of a Parquet object (its metadata, length and magic), from one read of
    its last 64 KiB (two when the footer is longer).

    Raises :class:`NotParquetError` naming ``name`` when the object is not Parquet.
    """
    if size < 12:
        raise NotParquetError(f"{name} is not a Parquet file (only {size} bytes)")
    start = max(0, size - FOOTER_GUESS)
    tail = fetch([(start, size)])[0]
    if tail[-4:] != MAGIC:
        raise NotParquetError(f"{name} is not a Parquet file (no PAR1 magic at its end)")
    (meta_len,) = struct.unpack("<I", tail[-8:-4])
    need = meta_len + 8
    if need > size - 4:
        raise NotParquetError(f"{name} is not a Parquet file (footer length {meta_len} too big)")
    if need > len(tail):
        tail = fetch([(size - need, size)])[0]
    # The footer alone: every planned unit carries it (into read tasks, a driver holding the
    # plan of 10,000 files), and a 64 KiB tail per file was most of a read task's bytes.
    return bytes(tail[-need:])


def read_metadata(name: str, size: int, footer: bytes) -> pq.FileMetaData:
    """Parse footer bytes (from :func:`parse_footer`) into pyarrow metadata."""
    try:
        return pq.ParquetFile(_SparseFile(size, {size - len(footer): footer}, len(footer))).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise NotParquetError(f"{name} is not a readable Parquet file: {exc}") from None


@dataclass(frozen=True)
class Unit:
    """A run ``[start, stop)`` of row groups of one object: one cache entry."""

    start: int
    stop: int
    num_rows: int
    nbytes: int


def plan_units(meta: pq.FileMetaData, target_bytes: int) -> List[Unit]:
    """Group consecutive row groups into runs of at most ``target_bytes`` (uncompressed).

    Deterministic for a given footer, so every reader computes the same keys.

    Examples
    --------
    >>> import pyarrow as pa, pyarrow.parquet as pq, io
    >>> buf = io.BytesIO(); pq.write_table(pa.table({"x": range(100)}), buf, row_group_size=10)
    >>> meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    >>> [(u.start, u.stop) for u in plan_units(meta, target_bytes=1)][:3]
    [(0, 1), (1, 2), (2, 3)]
    >>> len(plan_units(meta, target_bytes=1 << 30))
    1
    """
    units: List[Unit] = []
    start, rows, nbytes = 0, 0, 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        if i > start and nbytes + rg.total_byte_size > target_bytes:
            units.append(Unit(start, i, rows, nbytes))
            start, rows, nbytes = i, 0, 0
        rows += rg.num_rows
        nbytes += rg.total_byte_size
    if meta.num_row_groups:
        units.append(Unit(start, meta.num_row_groups, rows, nbytes))
    return units


def column_indices(meta: pq.FileMetaData, columns: Optional[Sequence[str]]) -> Optional[List[int]]:
    """Leaf column indices for top-level ``columns`` (``None``: all)."""
    if columns is None:
        return None
    wanted = set(columns)
    out = []
    for i in range(meta.num_columns):
        path = meta.schema.column(i).path
        if path.split(".")[0] in wanted:
            out.append(i)
    return out


def unit_ranges(
    meta: pq.FileMetaData, unit: Unit, columns: Optional[Sequence[str]]
) -> List[Tuple[int, int]]:
    """Byte ranges ``[start, end)`` holding the selected column chunks of a unit, merged."""
    leaves = column_indices(meta, columns)
    spans = []
    for r in range(unit.start, unit.stop):
        rg = meta.row_group(r)
        for c in leaves if leaves is not None else range(rg.num_columns):
            col = rg.column(c)
            begin = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                begin = min(begin, col.dictionary_page_offset)
            spans.append((begin, begin + col.total_compressed_size))
    spans.sort()
    merged: List[Tuple[int, int]] = []
    for s, e in spans:
        if merged and s - merged[-1][1] <= MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def decode_unit(
    size: int,
    footer: bytes,
    meta: pq.FileMetaData,
    unit: Unit,
    columns: Optional[Sequence[str]],
    segments: Dict[int, bytes],
) -> pa.Table:
    """Decode a unit's row groups from its fetched column-chunk segments."""
    segments = dict(segments)
    segments[size - len(footer)] = footer
    pf = pq.ParquetFile(_SparseFile(size, segments, len(footer)), metadata=meta)
    return pf.read_row_groups(
        list(range(unit.start, unit.stop)),
        columns=list(columns) if columns is not None else None,
        use_threads=True,
    )


def hive_partitions(path: str) -> Tuple[Tuple[str, str], ...]:
    """``(key, value)`` of each ``key=value`` folder in ``path``, outermost first, values
    URL-decoded: Ray Data's hive rule (it reads them whatever the base folder).

    >>> hive_partitions("bucket/t/year=2025/month=1/part-0.parquet")
    (('year', '2025'), ('month', '1'))
    >>> hive_partitions("bucket/t/a%3Db/city=New%20York/x.parquet")
    (('city', 'New York'),)
    """
    from urllib.parse import unquote

    folders = path.split("/")[:-1]
    return tuple((k, unquote(v)) for k, v in (d.split("=") for d in folders if d and d.count("=") == 1))


def with_partitions(table: pa.Table, partitions: Sequence[Tuple[str, ...]],
                    columns: Optional[Sequence[str]]) -> pa.Table:
    """``table`` with a column for each partition appended (as Ray Data adds them: strings,
    or the type a ``(key, value, type)`` names), then put in ``columns`` order when the
    caller named columns.

    >>> t = with_partitions(pa.table({"x": [1, 2]}), [("year", "2025")], None)
    >>> t.column_names, t["year"].to_pylist()
    (['x', 'year'], ['2025', '2025'])
    >>> with_partitions(pa.table({"x": [1]}), [("year", "2025")], ["year", "x"]).column_names
    ['year', 'x']
    >>> with_partitions(pa.table({"x": [1]}), [("year", "2025", "int64")], None)["year"].type
    DataType(int64)
    """
    for key, value, *typed in partitions:  # a third item: the type to cast to (Ray's field_types)
        values = pa.repeat(pa.scalar(value, pa.string()), table.num_rows)
        if typed and typed[0] != "string":
            values = values.cast(pa.type_for_alias(typed[0]))
        table = table.append_column(pa.field(key, values.type), values)
    return table.select(list(columns)) if columns is not None else table


def unify_schemas(schemas: Sequence[pa.Schema], names: Sequence[str]) -> pa.Schema:
    """One schema for files whose schemas differ, as Ray Data reads them: every column of
    the first file in its order, then each column a later file adds, in order of first
    appearance; a column missing from a file reads as nulls. Types that differ are widened
    as Ray's read does (pyarrow's permissive promotion: ``string`` and ``large_string`` read
    as ``large_string``, ``int32`` and ``int64`` as ``int64``); incompatible ones raise
    ``ValueError`` naming both files (``names``: one per schema).

    Examples
    --------
    >>> a = pa.schema([("id", pa.int64()), ("x", pa.float64())])
    >>> b = pa.schema([("id", pa.int64()), ("y", pa.string()), ("x", pa.float64())])
    >>> unify_schemas([a, b], ["a.parquet", "b.parquet"]).names
    ['id', 'x', 'y']
    >>> unify_schemas([pa.schema([("s", pa.string())]), pa.schema([("s", pa.large_string())])], ["a", "b"]).types
    [DataType(large_string)]
    >>> unify_schemas([a, pa.schema([("x", pa.string())])], ["a.parquet", "c.parquet"])
    Traceback (most recent call last):
    ...
    ValueError: c.parquet and a.parquet have incompatible schemas: column 'x' is string in one and double in the other
    """
    unified = schemas[0]
    first: Dict[str, str] = {f.name: names[0] for f in unified}
    for schema, name in zip(schemas[1:], names[1:]):
        if schema.equals(unified):
            continue
        for field in schema:
            if field.name in first and field.type != unified.field(field.name).type:
                try:
                    pa.unify_schemas([pa.schema([unified.field(field.name)]), pa.schema([field])],
                                     promote_options="permissive")
                except (pa.ArrowTypeError, pa.ArrowInvalid):
                    raise ValueError(
                        f"{name} and {first[field.name]} have incompatible schemas: column {field.name!r} "
                        f"is {field.type} in one and {unified.field(field.name).type} in the other") from None
            first.setdefault(field.name, name)
        unified = pa.unify_schemas([unified, schema], promote_options="permissive")
    return unified


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order, missing ones as nulls, others cast
    to the schema's type (no copy of the columns whose type already matches).

    >>> conform(pa.table({"a": [1], "b": ["x"]}), pa.schema([("a", pa.int32()), ("c", pa.string())])).to_pylist()
    [{'a': 1, 'c': None}]
    """
    if table.schema.equals(schema):
        return table
    columns = []
    for f in schema:
        if f.name not in table.schema.names:
            columns.append(pa.nulls(table.num_rows, f.type))
        else:
            col = table.column(f.name)
            columns.append(col if col.type.equals(f.type) else col.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)
