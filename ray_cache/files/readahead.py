"""Sequential reads fetch ahead: the next pages of a file read in order are asked for early.

A checkpoint or a video read front to back with ``f.read(1 MiB)`` touches one page at a
time; fetched one by one, each cold page costs a full store round trip and the reader
waits for every one. :class:`Readahead` watches one open file: when a read starts where
the previous one ended, the pages after it are requested in the background, the window
doubling with each sequential read up to :data:`MAX_PAGES` (64 MiB of 4 MiB pages), asked
for in batches so that the owner fetches them as parts of up to 32 MiB, one ranged GET
each, two in flight (:data:`ray_cache.store.fetch.PART_BYTES`). Measured on the test bench
(``benchmarks/ranges.py``, a 256 MB object read in 1 MiB reads): 17 MB/s fetching page by
page, 76 MB/s with 8 pages ahead in 16 MiB parts, 101 MB/s with 16 pages in 32 MiB parts.
A read elsewhere resets the window, so random access fetches nothing extra.
Prefetched pages land in this process's page buffers (or are mapped from this node's
disk tier); a read that needs a page still being fetched waits for that fetch instead of
asking again. A failed prefetch is forgotten: the read itself fetches and reports errors.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Sequence

from ray_cache.cluster import forks
from ray_cache.config import WORKER_TIMEOUT_S

#: Most pages fetched ahead of a sequential reader.
MAX_PAGES = 16
#: Threads that fetch pages ahead of sequential readers.
_THREADS = forks.ProcessThreads(4, "ray-cache-ahead")


class Readahead:
    """The read-ahead state of one open file.

    Examples
    --------
    >>> ra = Readahead(npages=20)
    >>> ra.ahead(0, 100, last=0), ra.ahead(100, 200, last=0), ra.ahead(200, 5000, last=1)
    ([], [1], [2, 3])
    >>> ra.ahead(5000, 6000, last=1), ra.ahead(6000, 9000, last=2)  # the window doubles
    ([4, 5], [6, 7, 8, 9, 10])
    >>> ra.ahead(9000, 9500, last=2), ra.ahead(9500, 9600, last=2)  # then enough is ahead
    ([11, 12, 13, 14, 15, 16, 17, 18], [])
    >>> ra.ahead(90000, 90100, last=12)  # not where the last read ended: no read-ahead
    []
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.window = 0
        #: Where the last read of the file ended (the file's warm path sets it too).
        self.end = -1
        self._frontier = 0  # the first page not yet asked for ahead
        self._inflight: Dict[int, Future] = {}

    def ahead(self, start: int, end: int, last: int) -> List[int]:
        """Page indices to fetch ahead of a read of ``[start, end)`` whose last page is ``last``.

        Asked for in batches (once at most half the window is still ahead), so that the
        owner can fetch runs of consecutive pages as single large GETs.
        """
        sequential = start == self.end
        self.window = min(MAX_PAGES, max(1, 2 * self.window)) if sequential else 0
        self.end = end
        if not sequential:
            self._frontier = last + 1
            return []
        frontier = max(self._frontier, last + 1)
        if frontier - (last + 1) > self.window // 2:
            return []
        stop = min(self.npages, last + 1 + self.window)
        self._frontier = max(frontier, stop)
        return list(range(frontier, stop))

    def wait_for(self, indices: Sequence[int]) -> None:
        """Wait (bounded) for fetches ahead of time of any of ``indices`` still in flight."""
        for i in indices:
            fut = self._inflight.pop(i, None)
            if fut is not None:
                try:
                    fut.result(timeout=WORKER_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - the read itself fetches and reports
                    pass

    def start(self, indices: Sequence[int], fetch: Callable[[List[int]], Any]) -> None:
        """Fetch the pages ``indices`` not already in flight, in the background."""
        todo = [i for i in indices if i not in self._inflight]
        if not todo:
            return
        fut = _THREADS.pool().submit(fetch, todo)
        for i in todo:
            self._inflight[i] = fut
        if len(self._inflight) > 4 * MAX_PAGES:  # pages the reader skipped past
            for i in [i for i, f in self._inflight.items() if f.done()]:
                del self._inflight[i]
