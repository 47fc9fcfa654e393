"""How a page's bytes are held in a cache entry: a one-row Arrow table of ``large_binary``.

The worker stores pages (and Parquet footers) this way in both tiers; readers take the
bytes back out without a copy (:func:`page_buffer`).

Examples
--------
>>> bytes(page_buffer(page_table(b"abc").column(0)))
b'abc'
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def page_table(data: Any) -> pa.Table:
    """A one-row table holding ``data`` (bytes-like) as the entry of a page or footer."""
    return pa.table({"bytes": pa.array([data], pa.large_binary())})


def page_buffer(column: Any) -> memoryview:
    """The bytes of a page entry's one value, without a copy.

    (``column[0].as_buffer()`` costs ~30x more: it builds a scalar first.)
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0)
    _validity, offsets, data = column.buffers()
    lo, hi = np.frombuffer(offsets, dtype=np.int64, count=2, offset=column.offset * 8)
    return memoryview(data.slice(int(lo), int(hi - lo)))
