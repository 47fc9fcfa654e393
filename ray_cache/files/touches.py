"""Reports of pages mapped straight from this node's disk tier, to the workers that own them.

A reader on a cache node maps a page from its owner's disk file without asking the owner
(:mod:`ray_cache.files.pages`), so the owner would not see those reads: its recency order
(what eviction keeps) and hit counters would be wrong. :class:`Touches` collects the
digests of such reads and reports them in batches (``CacheWorker.touch``) every
:data:`TOUCH_BATCH` pages or :data:`TOUCH_EVERY_S` seconds, through Ray or, in a process
forked from a Ray process, through the owner's same-node channel on a thread of its own.
Bookkeeping only: reads never wait on it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional

import ray

from ray_cache.cluster import forks

#: Directly mapped pages reported to their owner per ``touch`` call, at most ...
TOUCH_BATCH = 256
#: ... and at least this often (seconds) while pages are being mapped.
TOUCH_EVERY_S = 1.0


class Touches:
    """The mapped reads of one process's page reader not yet reported.

    ``reader`` is the :class:`ray_cache.files.pages.PageReader` whose workers, layout and
    channels the reports go through.
    """

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self._touches: Dict[int, List[str]] = {}
        self._touched_at = time.monotonic()
        self._calls: List[Any] = []  # reports sent and maybe not yet applied
        self._thread: Optional[threading.Thread] = None  # a forked process's report in flight

    def add(self, o: int, digest: str) -> None:
        """Note a read of page ``digest`` mapped from worker ``o``'s disk; report when due."""
        if self._reader._workers is None and not forks.ray_forked():
            return
        with self._lock:
            self._touches.setdefault(o, []).append(digest)
            due = (len(self._touches[o]) >= TOUCH_BATCH
                   or time.monotonic() - self._touched_at >= TOUCH_EVERY_S)
        if due and forks.ray_forked():  # a channel call: sent from a thread, reads go on
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self.flush, daemon=True)
                self._thread.start()
        elif due:
            self.flush()

    def flush(self) -> List[Any]:
        """Report what was noted since the last report now. Returns the ``ObjectRef`` s of
        every report not yet known to be applied (this call's and earlier ones'), so a
        caller that waits on them sees every mapped read counted by the owners."""
        reader = self._reader
        workers = reader._workers
        with self._lock:
            batches, self._touches = self._touches, {}
            self._touched_at = time.monotonic()
        calls: List[Any] = []
        if forks.ray_forked():  # through the channel of the worker whose disk was mapped
            layout = reader.layout
            for o, batch in batches.items():
                if batch and layout is not None and o in layout.slots:
                    reader.channels.touch(layout.slots[o], batch)
            return calls
        if workers is None:
            return calls
        for o, batch in batches.items():
            if batch and o < len(workers):
                try:
                    calls.append(workers[o].handle.touch.remote(batch))
                except Exception:  # noqa: BLE001 - bookkeeping only; reads do not depend on it
                    pass
        with self._lock:  # reports sent on their own earlier and maybe not yet applied
            pending = self._calls
            if pending:
                _done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            self._calls = pending + calls
            return list(self._calls)
