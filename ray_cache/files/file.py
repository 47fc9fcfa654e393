"""A file of a ``raycache`` filesystem open for reading (:class:`CachedFile`)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from ray_cache.files import pages
from ray_cache.files.readahead import Readahead
from ray_cache.store.keys import StoreObject

#: Disk-tier page mappings one open file keeps for its warm path (address space only).
MAX_FILE_VIEWS = 64


class CachedFile(AbstractBufferedFile):
    """A file open for reading: one object version, read in pages through the cache.

    Reads go straight to the pages (fsspec's ``"none"`` cache type): the pages and this
    process's page buffers are the cache, so there is no second buffer here. ``fs`` is the
    :class:`ray_cache.files.fs.CacheFileSystem` that opened it: this file uses its
    ``page_size`` and ``target`` (the store's filesystem, usable in this process).
    """

    def __init__(self, fs: AbstractFileSystem, path: str, obj: StoreObject, info: Dict[str, Any],
                 block_size: Optional[int] = None) -> None:
        self.obj = obj
        self._page_size = fs.page_size
        # Pages of this file mapped from the node's disk tier, by index: the warm path of
        # read() slices them without asking the process's page buffers (no lock, no call).
        # A mapping pins no memory (only address space), and entries are immutable.
        self._views: Dict[int, memoryview] = {}
        self._ahead = Readahead(-(-obj.size // self._page_size))
        #: Called once after the first bytes are read and before they are returned (a
        #: snapshot proves the reader's right to read the object there: store/proofs.py).
        self.check: Optional[Callable[[], None]] = None
        super().__init__(fs, path, mode="rb", block_size=block_size or fs.page_size,
                         cache_type="none", size=obj.size)
        self.details = info

    def read(self, length: int = -1) -> bytes:
        """Up to ``length`` bytes from the current position (to the end if negative)."""
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        lo = self.loc
        hi = self.size if length is None or length < 0 else min(self.size, lo + int(length))
        if hi <= lo:
            return b""
        size = self._page_size
        first, last = lo // size, (hi - 1) // size
        views = self._views
        if first == last:  # within one page: the common warm case
            view = views.get(first)
            if view is not None:
                base = first * size
                self.loc = self._ahead.end = hi
                pages.reader().count_buffer_hits(1)
                return view[lo - base:hi - base].tobytes()
        elif all(i in views for i in range(first, last + 1)):
            # Cut by index arithmetic, not pages.assemble: planning the page requests (their
            # keys) for every warm read cost ~5% of warm throughput in benchmarks/ranges.py.
            parts = [views[i] for i in range(first, last + 1)]
            parts[0] = parts[0][lo - first * size:]
            parts[-1] = parts[-1][:hi - last * size]
            self.loc = self._ahead.end = hi
            pages.reader().count_buffer_hits(len(parts))
            return b"".join(parts)
        out = self._fetch_range(lo, hi)
        self.loc += len(out)
        return out

    def close(self) -> None:
        """Close the file and let go of its page mappings."""
        self._views.clear()
        super().close()

    def _fetch_range(self, start: int, end: int) -> bytes:
        fs = self.fs
        lo, hi = pages.clamp(start, end, self.obj.size)
        if hi <= lo:
            return b""
        size = self._page_size
        plan = pages.page_requests(self.obj, lo, hi, size)
        reader = pages.reader()
        first, last = lo // size, (hi - 1) // size
        ahead = self._ahead.ahead(lo, hi, last)
        self._ahead.wait_for(range(first, last + 1))  # pages already being fetched ahead
        if ahead:
            obj, target = self.obj, fs.target
            wanted = {r.start // size: r for r in pages.page_requests(
                obj, ahead[0] * size, min(obj.size, (ahead[-1] + 1) * size), size)
                if reader.mapped_view(r.key.digest) is None and reader.buffers.get(r.key.digest) is None}
            if wanted:
                self._ahead.start(list(wanted), lambda todo: reader.read_pages(target, [wanted[i] for i in todo]))
        out = reader.read_planned(fs.target, plan, lo, hi)
        check = self.check
        if check is not None:
            check()  # raises before any byte of the object is returned
            self.check = None
        for req in plan:
            index = req.start // size
            if index not in self._views:
                view = reader.mapped_view(req.key.digest)
                if view is not None:
                    if len(self._views) >= MAX_FILE_VIEWS:
                        self._views.clear()
                    self._views[index] = view
        return out
