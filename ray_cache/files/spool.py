"""The pages of a file being written, put in this process's object store as they fill.

:class:`PageSpool` is write-through's buffer (:mod:`ray_cache.files.write`): it copies what a
writer writes into page-sized objects on a thread of its own, bounded both in bytes kept
(:data:`SPOOL_BYTES`) and in writes queued (:data:`SPOOL_QUEUE`), so a writer faster than the
object store waits for it rather than holding its bytes twice. A file that stays small
(:data:`INLINE_BYTES`) is only kept here: it goes to its owner inside the hand-over call
(:func:`ray_cache.files.handover.hand_over_bytes`), so nothing is put and no thread starts.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, List, Optional

import numpy as np
import ray

from ray_cache.config import WORKER_TIMEOUT_S

#: Bytes of one file kept for write-through, at most (its leading pages).
SPOOL_BYTES = 2 * 1024**3
#: Writes queued for the spool's thread, at most (a writer waits beyond that).
SPOOL_QUEUE = 8
#: A file of at most this many bytes (and one page) is kept, not put (see :meth:`PageSpool.small`).
INLINE_BYTES = 1024**2


class PageSpool:
    """The pages of a file being written, each put in this process's object store as it
    fills (owned by this process: freed with it, if it dies).

    The copying runs on a thread of its own, so it overlaps the upload: :meth:`add` only
    queues (copying a buffer the caller may reuse), :meth:`end` says no more will come (the
    last page is put on the thread too), :meth:`finish` waits and returns the pages' refs,
    or None if any page could not be put (the object store is full: the file is then not
    cached, its write is unaffected).

    >>> import ray; _ = ray.init(address="local", num_cpus=1, include_dashboard=False)  # doctest: +SKIP
    >>> s = PageSpool(4); s.add(b"abcdefghij")  # doctest: +SKIP
    >>> [bytes(ray.get(r)) for r in s.finish()]  # doctest: +SKIP
    [b'abcd', b'efgh', b'ij']

    With ``inline``, a file that stays within it is only kept (no Ray needed):

    >>> s = PageSpool(4096, inline=8); s.add(b"abc"); s.add(b"de")
    >>> s.small(), s.refs
    (b'abcde', [])
    """

    def __init__(self, page_size: int, limit: int = SPOOL_BYTES, inline: int = 0) -> None:
        self.page_size = page_size
        self.pages_max = max(0, limit // page_size)
        self.refs: List[ray.ObjectRef] = []
        self.failed: Optional[BaseException] = None
        self._page = bytearray()  # grows to one page (a small file never allocates a whole one)
        # Every byte so far while there are at most ``inline`` of them (one page at most);
        # None once the file outgrew it, or was spilled.
        self._inline = min(inline, page_size)
        self._kept: Optional[bytearray] = bytearray() if self._inline > 0 else None
        # Bounded: a writer faster than the object store waits for it rather than holding
        # its bytes twice (and gives up on write-through if it waits too long).
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=SPOOL_QUEUE)
        self._thread: Optional[threading.Thread] = None
        self._ended = False

    def add(self, data: Any) -> None:
        kept = self._kept
        if kept is not None:
            view = memoryview(data).cast("B")
            if len(kept) + view.nbytes <= self._inline:
                kept += view
                return
            self.spill()  # no longer small: what was kept goes first
        self._put(data)

    def small(self) -> Optional[bytes]:
        """The whole file, if it stayed within ``inline`` bytes (then nothing was put)."""
        return None if self._kept is None else bytes(self._kept)

    def spill(self) -> None:
        """Put what was kept like any other write (a small Parquet file's pages are needed as
        objects: its units are decoded from them)."""
        kept, self._kept = self._kept, None
        if kept:
            self._put(bytes(kept))

    def _put(self, data: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ray-cache-spool", daemon=True)
            self._thread.start()
        if self.failed is not None:
            return
        try:
            self._queue.put(data if isinstance(data, bytes) else bytes(data), timeout=WORKER_TIMEOUT_S)
        except queue.Full:
            self.failed = TimeoutError("the object store took no page in time")

    def end(self, timeout: float = WORKER_TIMEOUT_S) -> None:
        """No more data: the thread puts the last, partial page while the caller goes on
        (the writer's commit to the store: a file's last page is put during its PUT)."""
        if self._thread is not None and not self._ended:
            self._ended = True
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                self.failed = self.failed or TimeoutError("pages not put in time")

    def finish(self, timeout: float = WORKER_TIMEOUT_S) -> Optional[List[ray.ObjectRef]]:
        """Wait for every page; their refs, or None if any could not be put."""
        if self._thread is not None:
            self.end(timeout)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.failed = TimeoutError("pages not put in time")
        return None if self.failed is not None else self.refs

    def drop(self) -> None:
        """Stop; nothing will be handed over."""
        self.failed = self.failed or RuntimeError("dropped")
        self._kept = None
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass  # the thread sees failed and stops at its next look

    def _run(self) -> None:
        while True:
            try:
                data = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self.failed is not None:
                    return
                continue
            if data is None:
                if self.failed is None and self._page and len(self.refs) < self.pages_max:
                    try:
                        self._seal()
                    except BaseException as exc:  # noqa: BLE001 - reported by finish()
                        self.failed = exc
                return
            if self.failed is not None:
                continue
            try:
                self._cut(memoryview(data).cast("B"))
            except BaseException as exc:  # noqa: BLE001 - reported by finish()
                self.failed = exc

    def _cut(self, view: memoryview) -> None:
        while view.nbytes and len(self.refs) < self.pages_max:
            take = min(self.page_size - len(self._page), view.nbytes)
            self._page += view[:take]
            view = view[take:]
            if len(self._page) == self.page_size:
                self._seal()

    def _seal(self) -> None:
        self.refs.append(ray.put(np.frombuffer(self._page, dtype=np.uint8)))
        self._page = bytearray()
