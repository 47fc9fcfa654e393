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
    """A one-row table holding ``data`` (bytes-like) as the entry of a page or footer.

    Built over ``data`` itself (no copy) with ``from_buffers``: ``pa.array([memoryview])``
    copies, and pyarrow 26 never releases the view it copied from, so each page fetched
    that way stayed in the worker's memory for good (found by ``benchmarks/soak.py``).

    >>> page_table(memoryview(b"xabc")[1:]).column(0).to_pylist()
    [b'abc']
    """
    view = memoryview(data).cast("B")
    offsets = pa.py_buffer(np.array([0, view.nbytes], dtype=np.int64))
    array = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(view)])
    return pa.table({"bytes": array})


def page_buffer(column: Any) -> memoryview:
    """The bytes of a page entry's one value, without a copy.

    (``column[0].as_buffer()`` costs ~30x more: it builds a scalar first.)
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0)
    _validity, offsets, data = column.buffers()
    lo, hi = np.frombuffer(offsets, dtype=np.int64, count=2, offset=column.offset * 8)
    return memoryview(data.slice(int(lo), int(hi - lo)))
