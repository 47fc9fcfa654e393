"""Ray's ``tensor_column_schema``: binary columns holding raw C-order NumPy arrays
(``arr.tobytes()``) read as Ray Data tensor columns of a given dtype and shape.

Examples
--------
>>> import numpy as np, pyarrow as pa
>>> t = pa.table({"t": [np.arange(4, dtype="int32").tobytes()]})
>>> convert(t, {"t": (np.int32, (2, 2))}).column("t").chunk(0).to_numpy().tolist()
[[[0, 1], [2, 3]]]
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pyarrow as pa


def check(value: Any) -> Any:
    """``value`` if it is a ``{column: (dtype, shape)}`` dict (or None), else ``ValueError``."""
    if value is None:
        return None
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], tuple)
        for k, v in value.items())
    if not ok:
        raise ValueError("tensor_column_schema must be a dict of column name to (numpy dtype, shape "
                         f"tuple), e.g. {{'image': (np.uint8, (32, 32, 3))}}, got {value!r}")
    return value


def convert(table: pa.Table, schema: Dict[str, Tuple[Any, Tuple[int, ...]]]) -> pa.Table:
    """``table`` with each named binary column turned into a tensor column."""
    import numpy as np
    from ray.data.extensions import ArrowTensorArray

    for name, (dtype, shape) in schema.items():
        if table.num_rows == 0:
            arr = np.empty((0,) + tuple(shape), dtype=dtype)
        else:
            arr = np.stack([np.ndarray(shape, buffer=v.as_buffer(), dtype=dtype)
                            for v in table.column(name).combine_chunks()])
        i = table.schema.get_field_index(name)
        tensor = ArrowTensorArray.from_numpy(arr, column_name=name)
        table = table.set_column(i, pa.field(name, tensor.type), tensor)
    return table
