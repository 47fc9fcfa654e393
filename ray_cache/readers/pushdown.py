"""``Dataset.filter(expr=...)`` pushed into a cached Parquet read (Ray 2.60's predicate pushdown).

Two jobs, both on Ray Data's own expressions (``ray.data.expressions``):

- :func:`matching_units`: the row groups that may hold a matching row, from their
  statistics in the footer and the file's partition values. A unit (a run of row groups,
  one cache entry) no statistic can exclude is read and cached whole, the same entry an
  unfiltered read uses; excluded row groups are neither fetched nor cached.
  Conservative: any expression, type or statistic it does not understand means "may match".
- :func:`apply`: the exact row filter (pyarrow's evaluation of the expression, what
  Ray's own ``Filter`` does), applied to each unit's table after it is read.

Examples
--------
>>> from ray.data.expressions import col
>>> bounds = {"x": (0, 9, 0, 10)}                     # min, max, nulls, rows
>>> may_match(col("x") > 20, bounds), may_match((col("x") > 5) | (col("y") == 1), bounds)
(False, True)
>>> referenced_columns((col("x") > 1) & col("y").is_null())
['x', 'y']
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ray_cache.store import parquet

#: Per column: (min, max, null count, row count); min/max None when unknown.
Bounds = Dict[str, Tuple[Any, Any, Optional[int], int]]

#: Python types whose statistics compare exactly with a literal of the same kind. Timestamps
#: are left out on purpose: a zone on one side and not the other would decide wrongly.
_COMPARABLE = (int, float, decimal.Decimal, str, bytes, bool, datetime.date)


def referenced_columns(expr: Any) -> Optional[List[str]]:
    """The columns ``expr`` reads, in order of appearance; None if it holds a kind of
    expression this module does not know (then it is not pushed down)."""
    from ray.data.expressions import BinaryExpr, ColumnExpr, LiteralExpr, UnaryExpr

    out: List[str] = []

    def walk(e: Any) -> bool:
        if isinstance(e, ColumnExpr):
            if e.name not in out:
                out.append(e.name)
            return True
        if isinstance(e, LiteralExpr):
            return True
        if isinstance(e, BinaryExpr):
            return walk(e.left) and walk(e.right)
        if isinstance(e, UnaryExpr):
            return walk(e.operand)
        return False

    return out if walk(expr) else None


def may_match(expr: Any, bounds: Bounds) -> bool:
    """False only when ``bounds`` prove no row satisfies ``expr`` (SQL semantics: a null
    never satisfies a comparison, as pyarrow's filter drops it)."""
    from ray.data.expressions import BinaryExpr, ColumnExpr, LiteralExpr, Operation, UnaryExpr

    if isinstance(expr, BinaryExpr):
        if expr.op == Operation.AND:
            return may_match(expr.left, bounds) and may_match(expr.right, bounds)
        if expr.op == Operation.OR:
            return may_match(expr.left, bounds) or may_match(expr.right, bounds)
        flip = {Operation.GT: Operation.LT, Operation.LT: Operation.GT, Operation.GE: Operation.LE,
                Operation.LE: Operation.GE, Operation.EQ: Operation.EQ}
        op, column, literal = expr.op, expr.left, expr.right
        if isinstance(column, LiteralExpr) and isinstance(literal, ColumnExpr) and op in flip:
            op, column, literal = flip[op], literal, column
        if not (isinstance(column, ColumnExpr) and isinstance(literal, LiteralExpr)):
            return True
        b = bounds.get(column.name)
        if b is None:
            return True
        lo, hi, nulls, rows = b
        if op == Operation.IN and any(v is None for v in literal.value):
            return True  # pyarrow's is_in matches a null to a null in the list
        if nulls is not None and nulls >= rows:
            return False if op in flip or op == Operation.IN else True
        if lo is None or hi is None:
            return True
        values = literal.value
        try:
            if op == Operation.IN:
                items = [v for v in values if v is not None]
                return not all(_comparable(lo, v) for v in items) or any(lo <= v <= hi for v in items)
            if not _comparable(lo, values):
                return True
            if op == Operation.GT:
                return hi > values
            if op == Operation.GE:
                return hi >= values
            if op == Operation.LT:
                return lo < values
            if op == Operation.LE:
                return lo <= values
            if op == Operation.EQ:
                return lo <= values <= hi
        except TypeError:
            return True
        return True
    if isinstance(expr, UnaryExpr) and isinstance(expr.operand, ColumnExpr):
        b = bounds.get(expr.operand.name)
        if b is None or b[2] is None:
            return True
        if expr.op == Operation.IS_NULL:
            return b[2] > 0
        if expr.op == Operation.IS_NOT_NULL:
            return b[2] < b[3]
    return True


def _comparable(stat: Any, value: Any) -> bool:
    if isinstance(stat, bool) != isinstance(value, bool):
        return False
    if isinstance(stat, (int, float, decimal.Decimal)) and isinstance(value, (int, float, decimal.Decimal)):
        return True
    if isinstance(stat, datetime.datetime) or isinstance(value, datetime.datetime):
        return False
    return isinstance(stat, _COMPARABLE) and type(stat) is type(value)


def row_group_bounds(meta: pq.FileMetaData, index: int, schema: pa.Schema) -> Bounds:
    """The statistics of row group ``index`` for the top-level columns of ``schema`` whose
    type compares exactly (numbers, strings, dates, booleans)."""
    rg = meta.row_group(index)
    out: Bounds = {}
    for j in range(rg.num_columns):
        chunk = rg.column(j)
        name = chunk.path_in_schema
        if name not in schema.names or not _exact_type(schema.field(name).type):
            continue
        stats = chunk.statistics
        if stats is None:
            continue
        nulls = stats.null_count if stats.has_null_count else None
        lo, hi = (stats.min, stats.max) if stats.has_min_max else (None, None)
        out[name] = (lo, hi, nulls, rg.num_rows)
    return out


def _exact_type(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
            or pa.types.is_date(t))


def matching_units(expr: Any, meta: pq.FileMetaData, units: Sequence[parquet.Unit], schema: pa.Schema,
                   partitions: Sequence[Tuple[Any, ...]] = ()) -> List[parquet.Unit]:
    """``units`` narrowed to the row groups that may hold a row satisfying ``expr``: a unit
    none of whose row groups is excluded stays as it is (the same cache entry as an
    unfiltered read), one with some excluded becomes the runs of those that are not, and
    one with all excluded goes. A partition column's value is the same on every row."""
    values = {key: value if not typed or typed[0] == "string" else
              pa.scalar(value).cast(pa.type_for_alias(typed[0])).as_py()
              for key, value, *typed in partitions}  # the same on every row of the file
    out: List[parquet.Unit] = []
    for unit in units:
        keep = []
        for i in range(unit.start, unit.stop):
            bounds = row_group_bounds(meta, i, schema)
            rows = meta.row_group(i).num_rows
            bounds.update((key, (v, v, 0, rows)) for key, v in values.items())
            keep.append(may_match(expr, bounds))
        if all(keep):
            out.append(unit)
            continue
        run: List[int] = []
        for i, k in zip(range(unit.start, unit.stop), keep):
            if k:
                run.append(i)
            if run and (not k or i == unit.stop - 1):
                groups = [meta.row_group(j) for j in run]
                out.append(parquet.Unit(run[0], run[-1] + 1, sum(g.num_rows for g in groups),
                                        sum(g.total_byte_size for g in groups)))
                run = []
    return out


def apply(table: pa.Table, expr: Any) -> pa.Table:
    """The rows of ``table`` that satisfy ``expr``, as Ray's ``Filter`` evaluates it."""
    return table.filter(expr.to_pyarrow())
