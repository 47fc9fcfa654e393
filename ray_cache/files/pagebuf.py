"""Pages held by one process: cutting ranges into pages, page buffers, disk-tier mappings.

The parts of :mod:`ray_cache.files.pages` that need no Ray: which pages cover a byte range
(:func:`page_requests`), how a range is cut from consecutive page buffers
(:func:`assemble`), a page's bytes inside its Arrow entry (:func:`page_buffer`), mapping
a page straight from a disk-tier slot on this node (:func:`map_page`), the bounded LRU of
buffers a process keeps (:class:`PageBuffers`) and who owns which page (:class:`Layout`).
See :mod:`ray_cache.files.pages` for the whole read path.

Page size: 4 MiB
----------------
- Per-page costs (one actor round trip, one object in the object store, one file in the
  disk tier, one GET and one HEAD on a miss) are paid once per 4 MiB: at the few hundred
  MB/s one store connection delivers, ~1 ms of per-page overhead is ~10% of a page's
  transfer time (it would be ~40% with 1 MiB pages).
- Stores want large ranged GETs (S3: ~5 Gbit/s per connection, 8-16 MB ranges for full
  throughput); the worker fetches the pages of one read in parallel, so a large read
  issues several 4 MiB GETs at once.
- The price is read amplification on a cold random read: a 64 KiB read fetches up to two
  pages (8 MiB). For image-sized files (< 4 MiB) one page is the whole file. JuiceFS uses
  4 MiB blocks for the same reasons; Alluxio's 1 MB pages cost four times the per-page
  overhead. ``CacheFileSystem(page_size=...)`` changes it (keys include the size, so
  filesystems with different sizes never share or confuse pages).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ray_cache.store import fetch
from ray_cache.store.fetch import PageRequest
from ray_cache.store.keys import StoreObject
from ray_cache.node.pageentry import page_buffer  # noqa: F401 - pages.page_buffer
from ray_cache.node.tiers.disk import entry_path, read_entry
from ray_cache.node.tiers.ipcpage import map_page_file

#: Default page size (see the module docstring for why 4 MiB).
PAGE_SIZE = 4 * 1024 * 1024
#: Bytes of object-store page buffers one process keeps (``$RAY_CACHE_PAGE_BUFFER_BYTES``).
BUFFER_BYTES = int(os.environ.get("RAY_CACHE_PAGE_BUFFER_BYTES", 64 * 1024 * 1024))
#: Bytes of disk-tier pages one process keeps mapped (address space, not memory).
MAPPED_BYTES = int(os.environ.get("RAY_CACHE_PAGE_MAPPED_BYTES", 4 * 1024**3))


def clamp(start: Optional[int], end: Optional[int], size: int) -> Tuple[int, int]:
    """``[start, end)`` within ``[0, size]``, with Python slice rules for None and negatives.

    This is what fsspec's own filesystems (local, memory) return for ``cat_file``:
    reading past the end gives the bytes up to the end, possibly none.

    Examples
    --------
    >>> clamp(None, None, 10), clamp(-3, None, 10), clamp(5, 30, 10), clamp(20, 30, 10)
    ((0, 10), (7, 10), (5, 10), (10, 10))
    >>> clamp(5, 3, 10), clamp(None, -2, 10)
    ((5, 5), (0, 8))
    """
    lo = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
    hi = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
    return lo, max(lo, hi)


def page_requests(obj: StoreObject, start: int, end: int, page_size: int) -> List[PageRequest]:
    """The page requests covering bytes ``[start, end)`` of ``obj`` (none when empty).

    Examples
    --------
    >>> obj = StoreObject("s3", "b/k", 10, "etag:x/10")
    >>> [(r.start, r.end) for r in page_requests(obj, 3, 9, 4)]
    [(0, 4), (4, 8), (8, 10)]
    """
    if end <= start:
        return []
    first, last = start // page_size, (end - 1) // page_size
    return [_page_request(obj, i, page_size) for i in range(first, last + 1)]


#: Keys are SHA-256 digests: computed once per page, not once per read of it.
_page_request = functools.lru_cache(maxsize=1 << 16)(fetch.page_request)


def assemble(reqs: Sequence[PageRequest], bufs: Sequence[memoryview], start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` cut from consecutive pages (one copy; none for no pages)."""
    parts = [_within(r, buf, start, end) for r, buf in zip(reqs, bufs)]
    return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)


#: A read at least this long is copied into its result page by page as pages arrive
#: (:class:`Assembly`), not in one copy after the last.
ASSEMBLE_AHEAD_BYTES = 16 * 1024 * 1024

_new_bytes = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi))
_bytes_address = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object)(
    ("PyBytes_AsString", ctypes.pythonapi))


class Assembly:
    """The bytes ``[start, end)`` of consecutive pages, each page copied in as it arrives.

    A whole-file read of a large file otherwise makes its one copy after its last page,
    when every reader of a model on a node copies at once (1 GB: 0.6 s alone, 1.3 s with
    four at once on two cores). The result is a ``bytes`` object made uninitialized and
    filled before anyone else sees it: the one case in which CPython's C API allows
    writing into a bytes object (``PyBytes_FromStringAndSize(NULL, n)``, then
    ``PyBytes_AsString``). Pages arrive on several threads; each fills its own slice.

    Examples
    --------
    >>> obj = StoreObject("s3", "b/k", 10, "etag:x/10")
    >>> plan = page_requests(obj, 3, 10, 4)
    >>> a = Assembly(plan, 3, 10)
    >>> a.put(plan[1], memoryview(b"4567").cast("b"))  # any byte format
    >>> a.finish([memoryview(b"0123"), memoryview(b"4567"), memoryview(b"89")])
    b'3456789'
    """

    def __init__(self, plan: Sequence[PageRequest], start: int, end: int) -> None:
        self.plan, self.start, self.end = list(plan), start, end
        self._data = _new_bytes(None, end - start)
        self._view: Optional[memoryview] = memoryview(
            (ctypes.c_char * (end - start)).from_address(_bytes_address(self._data))).cast("B")
        self._index = {r.key.digest: i for i, r in enumerate(self.plan)}
        self._filled = [False] * len(self.plan)

    def put(self, req: PageRequest, buf: memoryview) -> None:
        """Copy in page ``req`` (its whole bytes, as read); pages not in the plan are ignored."""
        i = self._index.get(req.key.digest)
        if i is None or self._filled[i] or self._view is None:
            return
        r = self.plan[i]
        lo = max(self.start, r.start) - self.start
        part = _within(r, buf if buf.format == "B" else buf.cast("B"), self.start, self.end)
        self._view[lo:lo + len(part)] = part
        self._filled[i] = True

    def finish(self, results: Sequence[Any]) -> Union[bytes, BaseException]:
        """The bytes, once ``results`` (each page's buffer or exception, in plan order)
        are all in: pages not put yet are copied now; the first exception is returned."""
        err = next((r for r in results if isinstance(r, BaseException)), None)
        if err is not None:
            return err
        for r, buf in zip(self.plan, results):
            self.put(r, buf)
        if self._view is None or not all(self._filled):
            raise RuntimeError("an assembly finished twice, or with pages missing")
        self._view.release()
        self._view = None
        return self._data


def _within(req: PageRequest, buf: memoryview, start: int, end: int) -> memoryview:
    """The part of page ``req`` (its bytes ``buf``) inside ``[start, end)``."""
    return buf[max(start, req.start) - req.start:min(end, req.end) - req.start]


def cut(plan: Sequence[PageRequest], results: Sequence[Any], start: int,
        end: int) -> Union[bytes, BaseException]:
    """Bytes ``[start, end)`` from the pages' results (buffers or exceptions), or the first
    page's exception."""
    err = next((r for r in results if isinstance(r, BaseException)), None)
    return err if err is not None else assemble(plan, results, start, end)


def map_page(slot: str, digest: str, nbytes: int) -> Optional[memoryview]:
    """A page from a disk-tier slot on this node, memory-mapped, or None if not there.

    Reads the tier's layout (``slot/<2 hex>/<digest>.arrow``, the digest in the schema
    metadata); anything unexpected (missing, damaged, of another key or size) is None,
    so the caller asks the owner instead.
    """
    path = entry_path(slot, digest)
    try:
        buf = map_page_file(path, digest, nbytes)  # ~10x faster than opening it with pyarrow
    except FileNotFoundError:
        return None
    if buf is not None:
        return buf
    table = read_entry(path, digest)
    if table is None or table.num_rows != 1:
        return None
    try:
        buf = page_buffer(table.column(0))
    except (IndexError, ValueError):
        return None
    return buf if buf.nbytes == nbytes else None


class PageBuffers:
    """An LRU of page buffers, bounded in bytes (thread-safe).

    Each entry keeps the buffer and, when it came from a worker, the ``ObjectRef`` of the
    entry, which keeps the object in the object store while the buffer is in use.

    Examples
    --------
    >>> lru = PageBuffers(capacity=8)
    >>> lru.put("a", None, memoryview(b"12345"))
    >>> lru.put("b", None, memoryview(b"6789"))  # evicts "a": 9 bytes > 8
    >>> lru.get("a") is None, bytes(lru.get("b"))
    (True, b'6789')
    """

    def __init__(self, capacity: int = BUFFER_BYTES) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._items: "OrderedDict[str, Tuple[Any, memoryview]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> Optional[memoryview]:
        with self._lock:
            item = self._items.get(digest)
            if item is None:
                return None
            self._items.move_to_end(digest)
            return item[1]

    def put(self, digest: str, ref: Any, buf: memoryview) -> None:
        if buf.nbytes > self.capacity:
            return
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self.used -= old[1].nbytes
            self._items[digest] = (ref, buf)
            self.used += buf.nbytes
            self._shrink()

    def pop(self, digest: str) -> None:
        with self._lock:
            item = self._items.pop(digest, None)
            if item is not None:
                self.used -= item[1].nbytes

    def clear(self) -> None:
        """Drop every buffer (the workers keep their entries)."""
        with self._lock:
            self._items.clear()
            self.used = 0

    def resize(self, capacity: int) -> None:
        with self._lock:
            self.capacity = int(capacity)
            self._shrink()

    def _shrink(self) -> None:
        while self.used > self.capacity and self._items:
            _digest, (_ref, buf) = self._items.popitem(last=False)
            self.used -= buf.nbytes


@dataclass
class Layout:
    """Who owns which page, and where this node's owners keep pages on disk.

    Plain strings only, so it survives ``fork`` (where Ray handles do not).
    """

    names: List[str]
    slots: Dict[int, str] = field(default_factory=dict)  # owner index -> disk-tier slot here
