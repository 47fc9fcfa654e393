"""Byte ranges of store objects, read through the cache workers in fixed-size pages.

This is the client side of the ``raycache`` filesystem (:mod:`ray_cache.files.fs`). A byte
range is cut into pages of ``page_size`` bytes (default :data:`PAGE_SIZE`); each page is
one cache entry, keyed by (protocol, path, version, page size, index) like any other
entry (:func:`ray_cache.store.fetch.page_key`), owned by the worker that rendezvous hashing
picks, and served from that worker's memory tier, else its disk tier, else fetched from
the store once (one ranged GET: conditional on the version on S3, followed by a version
check elsewhere) and kept. Pages share capacity and eviction with the Arrow batches: they
live in the same ``LocalCache``. Why pages are 4 MiB: :mod:`ray_cache.files.pagebuf`.

Where a page comes from (cheapest first)
----------------------------------------
1. This process's buffers: an LRU of recently used pages (:class:`PageBuffers`).
   Buffers that came from the object store pin their object there, so they are bounded
   by :data:`BUFFER_BYTES` (64 MiB); buffers mapped from disk pin nothing and are bounded
   by :data:`MAPPED_BYTES` of address space. (Before even this, an open file keeps the
   mappings of its own pages: :class:`ray_cache.files.file.CachedFile`.)
2. **This node's disk tier, mapped directly** (a short-circuit read, as HDFS and Alluxio
   do for local blocks): if the page's owner runs on this node, its Arrow IPC file is
   memory-mapped read-only, no actor call, no copy. The file must carry the page's key
   digest in its schema (checked), entries are immutable (the key includes the version)
   and written under a temporary name then renamed, so a mapped page is never partial or
   stale; an evicted file stays readable while mapped. These reads are reported to the
   owner in batches (``touch``), so its counters and recency see them. A page first
   received as an object-store buffer is swapped for its file once the owner has written
   it (unpinning the object). ``RAY_CACHE_SHORT_CIRCUIT=0`` (or
   ``reader().short_circuit = False``) turns this step off.
3. The owner, through Ray (``get_many``): its memory tier (object-store memory, mapped
   without a copy on this node), else its disk tier, else one fetch from the store.
4. The store itself, when the owner is gone or the object store has no room for its
   answer (counted as ``fallback_pages`` and reported to a surviving worker) or, in a
   forked process, where no worker runs on this node.

This process's reader
---------------------
:func:`reader` returns this process's one :class:`PageReader`: the documented handle
to the running cache from this process. It knows the workers (refreshed every
:data:`WORKERS_TTL_S` seconds, or at once when one is gone) and holds the buffers above.

Which processes can use Ray, and how the others read: :mod:`ray_cache.files.local`.

Thread safety: :class:`PageReader` and :class:`PageBuffers` may be used from many threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import ray

from ray_cache.store import fetch
from ray_cache.cluster import hashing
from ray_cache.files.pagebuf import (  # noqa: F401 - re-exported: the page parts are used as pages.*
    ASSEMBLE_AHEAD_BYTES, BUFFER_BYTES, MAPPED_BYTES, PAGE_SIZE, Assembly, Layout, PageBuffers,
    assemble, clamp, cut, map_page,
    page_buffer, page_requests,
)
from ray_cache.cluster.routing import CACHE_FULL, WORKER_GONE, ask_owners_as_ready, report_fallback, warn_once
from ray_cache.cluster import forks, membership
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.store.errors import ObjectChangedError, translate
from ray_cache.store.fetch import PageRequest
from ray_cache.store.keys import StoreObject
from ray_cache.files.local import LocalChannels, local_slots
from ray_cache.files.touches import Touches

log = logging.getLogger("ray_cache.files.pages")

#: Seconds a process reuses its list of workers before asking Ray again.
WORKERS_TTL_S = 30.0

#: One page's bytes, or the exception that stands for it.
PageResult = Union[memoryview, BaseException]
_GONE = object()  # marks a page whose owner did not answer
_FULL = object()  # marks a page the object store had no room for (read from the store)


class PageReader:
    """Reads pages of store objects through the cache (see the module docstring).

    Use :func:`reader` rather than building one: a process has one.

    Examples
    --------
    >>> from ray_cache.files import pages
    >>> obj = StoreObject("s3", "bucket/key", 10 << 20, "etag:abc/10485760")
    >>> data = pages.reader().read_range(s3fs_instance, obj, 0, 1000)  # doctest: +SKIP
    """

    def __init__(self, buffer_bytes: int = BUFFER_BYTES, layout: Optional[Layout] = None) -> None:
        self.buffers = PageBuffers(buffer_bytes)
        self.mapped = PageBuffers(MAPPED_BYTES)
        self.layout = layout
        self._address: Optional[str] = None
        self._workers: Optional[List[WorkerRef]] = None
        self._workers_at = 0.0
        self._lock = threading.Lock()  # counters
        self._refresh_lock = threading.Lock()  # one refresh of the workers at a time
        self._counters: Dict[str, int] = {}
        self._buffer_hits = 0
        self.touches = Touches(self)
        self._map_retry: Dict[str, float] = {}  # digest -> when to look for its file again
        self.channels = LocalChannels()
        #: Map pages of this node's disk tier directly (step 2); False: always ask the owner.
        self.short_circuit = os.environ.get("RAY_CACHE_SHORT_CIRCUIT", "1") != "0"

    def clear(self) -> None:
        """Drop this process's page buffers and mappings (the workers keep their entries)."""
        self.buffers.clear()
        self.mapped.clear()
        self._map_retry.clear()

    def forget_workers(self) -> None:
        """Ask Ray for the workers (and this node's slots) again at the next read."""
        self.flush_touches()
        with self._refresh_lock:
            self._workers, self._workers_at, self.layout = None, 0.0, None

    # -- counters ----------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counters[name] = self._counters.get(name, 0) + delta

    def count_buffer_hits(self, n: int) -> None:
        """Count ``n`` pages served from this process's buffers (see :meth:`stats`)."""
        self._buffer_hits += n

    def mapped_view(self, digest: str) -> Optional[memoryview]:
        """The page mapped from this node's disk tier, if this process holds it mapped."""
        return self.mapped.get(digest)

    def stats(self) -> Dict[str, int]:
        """This process's page counters.

        ``buffer_hits`` (pages served from this process's buffers), ``mapped_pages``
        (mapped from this node's disk tier; ``replica_pages`` of them copies a worker here
        keeps of pages another owns, ``load(replicas=)``), ``worker_pages``/``worker_bytes`` (answered
        by workers through Ray), ``channel_pages``/``channel_bytes`` (answered by this
        node's workers through their channels, in a forked process without Ray),
        ``direct_pages``/``direct_bytes`` (read from the store here: a forked process on a
        node without a worker) and ``fallback_pages`` (read from the store here because a
        worker was gone or the object store full; also reported to a surviving worker, so
        ``ray_cache.stats()`` shows them). ``buffer_hits`` is counted without a lock (it
        is on every warm read), so concurrent threads may rarely lose a count."""
        with self._lock:
            out = dict(self._counters, buffer_hits=self._buffer_hits)
        for name in ("buffer_hits", "mapped_pages", "replica_pages", "worker_pages", "worker_bytes", "channel_pages",
                     "channel_bytes", "direct_pages", "direct_bytes", "fallback_pages"):
            out.setdefault(name, 0)
        return out

    # -- connecting ----------------------------------------------------------------------
    def remember_address(self, address: Optional[str]) -> None:
        """The Ray cluster to join if this process has no Ray yet (from an unpickled fs)."""
        if address and self._address is None:
            self._address = address

    def workers(self, refresh: bool = False) -> Optional[List[WorkerRef]]:
        """The live workers, or None where Ray cannot be used (a forked process)."""
        if forks.ray_forked():
            return None
        with self._refresh_lock:
            fresh = time.monotonic() - self._workers_at < WORKERS_TTL_S
            if self._workers and fresh and not refresh:
                return self._workers
            if not ray.is_initialized() and self._address:
                try:
                    ray.init(address=self._address, logging_level=logging.WARNING,
                             log_to_driver=False, ignore_reinit_error=True)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    log.warning("ray_cache: cannot join Ray at %s (%s); starting or finding "
                                "one as ray_cache.start() does", self._address, exc)
            workers = membership.workers()
            self.flush_touches()  # indexes in the old list of workers
            self.layout = Layout([w.name for w in workers], local_slots(workers))
            self._workers, self._workers_at = workers, time.monotonic()
            return workers

    # -- reading -------------------------------------------------------------------------
    def read_range(self, fs: Any, obj: StoreObject, start: int, end: int,
                   page_size: int = PAGE_SIZE) -> bytes:
        """Bytes ``[start, end)`` of ``obj`` (already clamped to its size)."""
        return self.read_planned(fs, page_requests(obj, start, end, page_size), start, end)

    def read_planned(self, fs: Any, plan: Sequence[PageRequest], start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` from ``plan``, the consecutive pages that cover them."""
        bufs = []
        for r in plan:  # the warm path: every page already held by this process
            buf = self._held(r)
            if buf is None:
                break
            bufs.append(buf)
        else:
            self._buffer_hits += len(bufs)  # the hot path takes no lock (see stats)
            return assemble(plan, bufs, start, end)
        self._buffer_hits += len(bufs)
        rest = plan[len(bufs):]  # from the first page this process does not hold
        if end - start < ASSEMBLE_AHEAD_BYTES:
            got = self.read_pages(fs, rest)
            out = cut(plan, bufs + [got[r.key.digest] for r in rest], start, end)
        else:  # copied in as pages arrive, not all at once after the last
            whole = Assembly(plan, start, end)
            got = self.read_pages(fs, rest, whole.put)
            out = whole.finish(bufs + [got[r.key.digest] for r in rest])
        if isinstance(out, BaseException):
            raise out
        return out

    def read_ranges(self, fs: Any, items: Sequence[Tuple[StoreObject, int, int]],
                    page_size: int = PAGE_SIZE) -> List[Union[bytes, BaseException]]:
        """Bytes (or the exception) for each ``(obj, start, end)``, pages fetched together."""
        plans = [page_requests(obj, s, e, page_size) for obj, s, e in items]
        got = self.read_pages(fs, [r for plan in plans for r in plan])
        return [cut(plan, [got[r.key.digest] for r in plan], s, e)
                for (_obj, s, e), plan in zip(items, plans)]

    def read_pages(self, fs: Any, reqs: Sequence[PageRequest],
                   arrived: Optional[Callable[[PageRequest, memoryview], None]] = None
                   ) -> Dict[str, PageResult]:
        """Each page's buffer (or exception) by key digest, from the cheapest source.
        ``arrived(req, buf)`` is called for pages that come from workers, as each comes."""
        out: Dict[str, PageResult] = {}
        todo: Dict[str, PageRequest] = {}
        hits = 0
        for r in reqs:
            d = r.key.digest
            if d in out or d in todo:
                continue
            buf = self._held(r)
            if buf is not None:
                out[d], hits = buf, hits + 1
            else:
                todo[d] = r
        if hits:
            self._buffer_hits += hits
        if self.layout is None and todo and not forks.ray_forked():
            self.workers()  # learn the layout before trying the disk tier
        for d, r in list(todo.items()):
            buf = self._map(r)
            if buf is not None:
                out[d] = buf
                del todo[d]
        if todo:
            out.update(self._fetch(fs, list(todo.values()), arrived))
        return out

    def _held(self, req: PageRequest) -> Optional[memoryview]:
        """A page this process holds: mapped from disk, else an object-store buffer (swapped
        for the disk-tier file once the owner has written it, looked for at most once a
        second: copying from a file mapping is faster here, and the object is unpinned)."""
        d = req.key.digest
        buf = self.mapped.get(d)
        if buf is not None:
            return buf
        buf = self.buffers.get(d)
        if buf is not None and self.short_circuit and self.layout is not None:
            now = time.monotonic()
            if self._map_retry.get(d, 0.0) <= now:
                mapped = self._map(req)
                if mapped is not None:
                    self.buffers.pop(d)
                    self._map_retry.pop(d, None)
                    return mapped
                if len(self._map_retry) > 65536:
                    self._map_retry.clear()
                self._map_retry[d] = now + 1.0
        return buf

    def _map(self, req: PageRequest) -> Optional[memoryview]:
        layout = self.layout
        if layout is None or not layout.slots or not self.short_circuit:
            return None
        o = hashing.owner(req.key.digest, layout.names)
        for i in sorted(layout.slots, key=lambda i: i != o):  # the owner, then copies here (replicas)
            buf = map_page(layout.slots[i], req.key.digest, req.end - req.start)
            if buf is not None:
                self.mapped.put(req.key.digest, None, buf)
                self._count(mapped_pages=1, **({} if i == o else {"replica_pages": 1}))
                self.touches.add(i, req.key.digest)
                return buf
        return None

    def flush_touches(self) -> List[Any]:
        """Report the pages this process mapped from disk since the last report to their
        owners now (see :meth:`ray_cache.files.touches.Touches.flush`); the ``ObjectRef`` s
        of every report not yet known to be applied."""
        return self.touches.flush()

    def _fetch(self, fs: Any, reqs: List[PageRequest],
               arrived: Optional[Callable[[PageRequest, memoryview], None]] = None
               ) -> Dict[str, PageResult]:
        workers = self.workers()
        if workers is None:  # a process without Ray: this node's workers' channels
            return self.channels.read(self, fs, reqs)
        got, _ = self._from_workers(fs, reqs, workers, arrived)
        dead: Dict[str, BaseException] = {}
        gone = [r for r in reqs if got[r.key.digest] is _GONE]
        if gone:  # a worker died or was replaced (same name, new actor): ask Ray again
            workers = self.workers(refresh=True) or []
            for r in gone:  # the new layout's disk slots on this node first, as any read tries
                buf = self._map(r)
                if buf is not None:
                    got[r.key.digest] = buf
            gone = [r for r in gone if got[r.key.digest] is _GONE]
            if workers and gone:
                again, dead = self._from_workers(fs, gone, workers)
                got.update(again)
            for name, exc in dead.items():
                warn_once(name, exc)
        # Still no answer, or no room in the object store for it: the store, counted and reported.
        direct = [r for r in reqs if got[r.key.digest] is _GONE or got[r.key.digest] is _FULL]
        for r in direct:
            got[r.key.digest] = self._direct(fs, r, "fallback")
        if direct and workers:
            report_fallback(workers, next(iter(dead), ""), len(direct), sum(r.end - r.start for r in direct))
        return got

    def _from_workers(self, fs: Any, reqs: Sequence[PageRequest], workers: Sequence[WorkerRef],
                      arrived: Optional[Callable[[PageRequest, memoryview], None]] = None
                      ) -> Tuple[Dict[str, Any], Dict[str, BaseException]]:
        """Results by digest (``_GONE`` where the owner did not answer) and the owners gone."""
        out: Dict[str, Any] = {}
        gone: Dict[int, BaseException] = {}

        def handle(i: int, o: int, answer: Any) -> None:
            r = reqs[i]
            try:
                if isinstance(answer, BaseException):
                    raise answer
                out[r.key.digest] = buf = self._take(answer, r)
                if arrived is not None and not isinstance(buf, BaseException):
                    arrived(r, buf)
            except WORKER_GONE as exc:
                gone.setdefault(o, exc)
                out[r.key.digest] = _GONE
            except CACHE_FULL:
                out[r.key.digest] = _FULL
            except Exception as exc:  # noqa: BLE001 - this page's result, raised by the caller
                out[r.key.digest] = translate(exc, r.obj.url)

        # Every page is needed before any is used, so each is taken (pulled to this node)
        # the moment its owner has it, owners in parallel.
        ask_owners_as_ready(fs, reqs, workers, handle, gone)
        return out, {workers[o].name: exc for o, exc in gone.items()}

    def _take(self, item: Any, req: PageRequest) -> PageResult:
        if item[0] == "err":
            if isinstance(item[1], CACHE_FULL):
                raise item[1]
            return item[1]
        ref = item[1][0]
        buf = page_buffer(ray.get(ref, timeout=WORKER_TIMEOUT_S).column(0))  # no copy on this node
        if buf.nbytes != req.end - req.start:
            return ObjectChangedError(
                f"{req.obj.url}: page of {buf.nbytes} bytes at {req.start}, expected {req.end - req.start}")
        self.buffers.put(req.key.digest, ref, buf)
        self._count(worker_pages=1, worker_bytes=buf.nbytes)
        return buf

    def _direct(self, fs: Any, req: PageRequest, why: str) -> PageResult:
        try:
            buf = memoryview(fetch.read_page(fs, req))
        except Exception as exc:  # noqa: BLE001 - returned for the caller to raise
            return translate(exc, req.obj.url)
        self.buffers.put(req.key.digest, None, buf)
        if why == "direct":
            self._count(direct_pages=1, direct_bytes=buf.nbytes)
        else:
            self._count(fallback_pages=1)
        return buf


# -- this process's reader ------------------------------------------------------------------
_READER: Optional[PageReader] = None
_READER_LOCK = threading.Lock()
#: Readers inherited through fork: never released here, as releasing their object-store
#: buffers would call into the parent's (dead in this process) Ray core worker.
_INHERITED: List[PageReader] = []


def reader() -> PageReader:
    """This process's page reader (created on first use, and anew after a fork).

    Examples
    --------
    >>> from ray_cache.files import pages
    >>> pages.reader() is pages.reader()
    True
    """
    global _READER
    current = _READER
    if current is not None:  # the common case, without the lock
        return current
    with _READER_LOCK:
        if _READER is None:
            _READER = PageReader()
        return _READER


def _after_fork_in_child() -> None:
    global _READER, _READER_LOCK
    layout = None
    if _READER is not None:
        _INHERITED.append(_READER)
        layout = _READER.layout
    _READER = PageReader(layout=layout) if layout is not None else None
    if _READER is not None and _INHERITED:
        # Disk-tier mappings survive fork and hold no Ray object: the child keeps them.
        _READER.mapped = _INHERITED[-1].mapped
        _READER.mapped._lock = threading.Lock()  # another thread may have held it at the fork
        _INHERITED[-1].mapped = PageBuffers(0)
    _READER_LOCK = threading.Lock()


forks.after_fork(_after_fork_in_child)
