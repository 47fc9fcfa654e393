"""The per-node cache worker actor: Parquet units, raw pages, footers, and their management.

One ``CacheWorker`` actor runs on each cache node (see :mod:`ray_cache.cluster.membership`). It is a
threaded actor: requests for different keys proceed in parallel (pyarrow and fsspec
release the GIL) while requests for the same cold key wait on the one fetch in flight.
The caching itself lives in :class:`ray_cache.node.entries.LocalCache`; this module maps
requests to entries and fetches misses through :mod:`ray_cache.store.fetch`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ray_cache.store import fetch, parquet
from ray_cache.config import NAMESPACE, WORKER_TIMEOUT_S, WorkerConfig, default_disk_bytes, validate_disk_dir
from ray_cache.node.entries import LocalCache
from ray_cache.store.errors import translate
from ray_cache.store.fetch import PageRequest, UnitRequest
from ray_cache.store.keys import StoreObject
from ray_cache.node.calls import next_item
from ray_cache.node.channel import ChannelServer, channel_path
from ray_cache.node.metrics import WorkerMetrics
from ray_cache.node.parts import AheadPart, ColdParts
from ray_cache.node.pageentry import page_buffer, page_table
from ray_cache.node.tiers.memory import node_store_used
from ray_cache.node.uploads import UploadWatch

log = logging.getLogger("ray_cache.node.worker")

#: Parsed footers kept per worker process (their bytes are cache entries too).
_META_CACHE_ITEMS = 4096

Request = Union[UnitRequest, PageRequest]


class CacheWorker:
    """A node's cache: answers reads, fills misses from the store, and is managed by path.

    Not used directly: :func:`ray_cache.cluster.membership.ensure_workers` starts it as a named,
    detached Ray actor pinned to its node.
    """

    def __init__(self, config: Dict[str, Any], node_id: str) -> None:
        cfg = WorkerConfig(**config)
        disk_dir = validate_disk_dir(cfg.disk_dir)
        if cfg.disk_bytes <= 0:  # "size it from this node's free disk"
            cfg = dataclasses.replace(cfg, disk_bytes=default_disk_bytes(disk_dir))
        self.config = dataclasses.replace(cfg, disk_dir=disk_dir)
        self.node_id = node_id
        self.cache = LocalCache(self.config)
        self.parts = ColdParts(self.cache.holds_or_fills, self._count_store)
        self.metrics = WorkerMetrics(node_id)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ray-cache-fetch")
        self._meta: "OrderedDict[Tuple[str, str], pq.FileMetaData]" = OrderedDict()
        self._lock = threading.Lock()
        self.started_at = time.time()
        self._stop = threading.Event()
        self._peers: Dict[str, Any] = {}
        self.uploads = UploadWatch(self.cache.count)
        self._handovers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ray-cache-handover")
        threading.Thread(target=self._export_loop, name="ray-cache-metrics", daemon=True).start()
        self.channel: Optional[ChannelServer] = None
        try:  # for this node's processes that cannot use Ray (forked readers)
            self.channel = ChannelServer(channel_path(self.cache.disk.slot), self.channel_request)
        except OSError as exc:
            log.warning("ray_cache: no same-node channel (%s); forked readers on this node "
                        "will read the store directly", exc)

    def _export_loop(self, period_s: float = 5.0) -> None:
        # Metrics are pushed on a timer so dashboards move even when nobody asks status().
        while not self._stop.wait(period_s):
            try:
                self.status()
            except Exception:  # noqa: BLE001 - metrics must never take the worker down
                log.debug("ray_cache: metrics export failed", exc_info=True)

    # -- management ---------------------------------------------------------------
    def ping(self) -> str:
        """The node this worker runs on (used to check it is alive)."""
        return self.node_id

    def get_config(self) -> Dict[str, Any]:
        """The settings this worker runs with (used to start workers on new nodes alike)."""
        return self.config.to_dict()

    def configure(self, memory_bytes: Optional[int] = None, disk_bytes: Optional[int] = None) -> None:
        """Change tier capacities now, evicting what no longer fits (never pinned entries)."""
        if memory_bytes is not None:
            self.cache.memory.resize(memory_bytes)
            self.config = dataclasses.replace(self.config, memory_bytes=memory_bytes)
        if disk_bytes is not None:
            self.cache.flush()
            self.cache.disk.resize(disk_bytes)
            self.config = dataclasses.replace(self.config, disk_bytes=disk_bytes)

    def flush(self) -> int:
        """Wait for background disk writes; returns how many were pending."""
        return self.cache.flush()

    def status(self) -> Dict[str, Any]:
        """This worker's capacities, usage and counters (also exported as Ray metrics)."""
        record = dict(
            node_id=self.node_id,
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
            disk_dir=self.cache.disk.slot,
            uptime_s=time.time() - self.started_at,
            channel=self.channel.path if self.channel is not None else None,
            **self.cache.status(),
        )
        self.metrics.export(record)
        return record

    def note_served(self, local_bytes: int, remote_bytes: int) -> None:
        """Count bytes a reader took from this worker on its own node or from another."""
        self.cache.count(bytes_served_local=local_bytes, bytes_served_remote=remote_bytes)

    def note_fallback(self, units: int, nbytes: int) -> None:
        """Count reads a client served from the store because a worker was gone."""
        self.cache.count(fallbacks=units, fallback_bytes=nbytes)

    # -- management by path --------------------------------------------------------
    def free(self, protocol: str, patterns: Sequence[str]) -> int:
        """Drop every entry (any version) of objects matching ``patterns``."""
        return self.cache.drop(self.cache.digests_matching(protocol, patterns))

    def pin(self, digests: Sequence[str], ttl_s: Optional[float] = None) -> Dict[str, int]:
        """Pin entries (raises ``PinCapacityError`` without pinning any if they do not fit)."""
        self.cache.flush()  # pending disk writes decide what is present (and may evict)
        present = [d for d in digests if d in self.cache.memory or d in self.cache.disk]
        result = self.cache.pin(present)
        if ttl_s is not None:
            self.cache.set_ttl(present, ttl_s)
        return dict(result, pinned=len(present), missing=len(digests) - len(present))

    def unpin(self, protocol: str, patterns: Sequence[str]) -> int:
        digests = self.cache.digests_matching(protocol, patterns)
        self.cache.unpin(digests)
        return len(digests)

    def unpin_digests(self, digests: Sequence[str]) -> None:
        self.cache.unpin(digests)

    def set_ttl(self, digests: Sequence[str], ttl_s: Optional[float]) -> None:
        self.cache.set_ttl(digests, ttl_s)

    # -- reads ---------------------------------------------------------------------
    def lookup(self, digests: Sequence[str]) -> List[Optional[Tuple[List[ray.ObjectRef], Any]]]:
        """For each key in the memory tier, ``([ref], block metadata)``; None for others.

        Used by the zero-copy warm path; counts hits only when every key is present,
        since otherwise the caller reads through :meth:`get_many` instead.
        """
        found = [self.cache.lookup_memory(d) for d in digests]
        if all(f is not None for f in found):
            nbytes = sum(self.cache.memory.sizes.get(d, 0) for d in digests)
            self.cache.count(hits=len(digests), memory_hits=len(digests),
                             bytes_from_cache=nbytes, bytes_from_memory=nbytes)
        return [None if f is None else ([f[0]], f[1]) for f in found]

    def warm_metas(self, digests: Sequence[str]) -> Tuple[List[Optional[Any]], int]:
        """Block metadata of each key in the memory tier (None for others), and the bytes in
        use in this node's object store (the memory tier, blocks of datasets still alive,
        anything; the tier's own if Ray does not say): what the multi-node warm path plans
        with. Counts nothing: the copy tasks' reads are counted when they come."""
        found = [self.cache.lookup_memory(d) for d in digests]
        used = node_store_used(self.node_id)
        return [None if f is None else f[1] for f in found], self.cache.memory.used if used is None else used

    def touch(self, digests: Sequence[str]) -> int:
        """Count reads of this worker's disk-tier entries that a reader on this node mapped
        directly (``ray_cache.files.pages``), and refresh their recency; returns how many exist."""
        return self.cache.touch(digests)

    def footers(self, fs: Any, objects: Sequence[StoreObject]) -> List[Any]:
        """Footer bytes of each object (cached by version), or the exception for it."""
        futures = [self._pool.submit(self._footer, fs, obj) for obj in objects]
        out: List[Any] = []
        for obj, fut in zip(objects, futures):
            try:
                out.append(fut.result(timeout=WORKER_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001 - handed to the caller to raise
                out.append(translate(exc, obj.url))
        return out

    def _footer(self, fs: Any, obj: StoreObject) -> bytes:
        key = fetch.footer_key(obj)
        ref, _n, _tier = self.cache.get_or_load(
            key, lambda: page_table(fetch.read_footer(fs, obj, self._count_store)))
        return ray.get(ref, timeout=WORKER_TIMEOUT_S).column(0)[0].as_py()

    def get_many(self, fs: Any, requests: Sequence[Request], as_ready: bool = False) -> Iterator[Tuple]:
        """Stream one result per request, in order, fetching misses in parallel.

        Each item is ``("ok", [ref], nbytes, tier)`` where ``tier`` is ``"memory"``,
        ``"disk"`` or ``"store"``, or ``("err", exception)``. With ``as_ready``, items come
        as they are ready instead, each as ``(index of its request, item)``: a reader that
        needs every page before it can use any (a whole-file read) takes each the moment
        it is here, not after the slowest part ahead of it.
        """
        parts, mine = self.parts.claim(fs, requests)  # consecutive cold pages: one read each
        try:
            yield from (self._stream_as_ready if as_ready else self._stream)(fs, requests, parts)
        finally:
            self.parts.release(mine)

    def _stream(self, fs: Any, requests: Sequence[Request], parts: Dict[str, Any]) -> Iterator[Tuple]:
        futures = [self._submit(fs, req, parts.get(req.key.digest)) for req in requests]
        for req, fut in zip(requests, futures):
            yield self._item(req, fut, WORKER_TIMEOUT_S)

    def _stream_as_ready(self, fs: Any, requests: Sequence[Request], parts: Dict[str, Any]
                         ) -> Iterator[Tuple[int, Tuple]]:
        index = {self._submit(fs, req, parts.get(req.key.digest)): i for i, req in enumerate(requests)}
        pending = set(index)
        while pending:
            done, pending = wait(pending, timeout=WORKER_TIMEOUT_S, return_when=FIRST_COMPLETED)
            # Nothing ready in WORKER_TIMEOUT_S: what is left fails with the timeout.
            for fut in sorted(done or pending, key=index.__getitem__):
                yield index[fut], self._item(requests[index[fut]], fut, 0)
            if not done:
                return

    def _item(self, req: Request, fut: "Future[Any]", timeout_s: float) -> Tuple:
        try:
            ref, nbytes, tier = fut.result(timeout=timeout_s)
            return ("ok", [ref], nbytes, tier)
        except Exception as exc:  # noqa: BLE001 - handed to the reader to raise
            self.cache.count(errors=1)
            return ("err", translate(exc, req.obj.url))

    def _submit(self, fs: Any, req: Request, part: Optional[AheadPart]) -> "Future[Any]":
        # A page of a part being read is queued once the part is in (ray_cache.node.parts).
        return ColdParts.after(part, lambda: self._pool.submit(self._serve, fs, req, part))

    def load(self, fs: Any, requests: Sequence[Request]) -> Iterator[Tuple]:
        """Like :meth:`get_many` but ship no data: ``("ok", nbytes, tier)`` per request."""
        for item in self.get_many(fs, requests):
            if item[0] == "ok" and item[3] == "store":
                self.cache.count(loaded_entries=1)
            yield item if item[0] == "err" else ("ok", item[2], item[3])

    def _serve(self, fs: Any, req: Request, part: Optional[fetch.PagePart] = None):
        if isinstance(req, PageRequest):  # every page belongs to a part (get_many)
            assert part is not None
            return self.cache.get_or_load(req.key, lambda: page_table(part.page(req)))

        def load_unit() -> pa.Table:
            meta = self._metadata(req.obj, req.footer)
            return fetch.read_unit(fs, req, meta, self._count_store)

        return self.cache.get_or_load(req.key, load_unit)

    # -- write-through (ray_cache.files.write) ----------------------------------------------
    def adopt_pages(self, requests: Sequence[PageRequest], *pages: Any) -> int:
        """Keep pages a writer just wrote: ``pages[i]`` is page ``requests[i]``'s bytes, and
        the store has accepted them under ``requests[i].obj.version`` (proven by the writer:
        :mod:`ray_cache.store.written`).

        The writer passes its objects as the call's own arguments, so Ray has them on this
        node before this runs, and a writer that exits once this returns loses nothing.
        Returns once every page is claimed (a reader asking from then on waits for it and
        sends no data request), which is how many it returns; they are copied into the
        tiers in the background."""
        def loader(req: PageRequest, data: Any):
            def load() -> pa.Table:
                if len(data) != req.end - req.start:
                    raise ValueError(f"{req.key.describe()}: {len(data)} bytes handed over")
                return page_table(data)
            return load

        return sum(self.cache.fill_later(r.key, loader(r, d), self._handovers.submit)
                   for r, d in zip(requests, pages))

    def adopt_page_bytes(self, request: PageRequest, *chunks: bytes) -> int:
        """:meth:`adopt_pages` for one page sent inside the call (a small file: its bytes
        in ``chunks``, joined here), as :func:`ray_cache.files.handover.hand_over_bytes`
        sends it."""
        return self.adopt_pages([request], b"".join(chunks))

    def adopt_parquet(self, obj: StoreObject, footer: Optional[bytes], units: Sequence[UnitRequest],
                      spans: Sequence[Sequence[int]], page_ids: Sequence[int], page_size: int,
                      *pages: Any) -> int:
        """Keep the decoded units (and the footer, if given) of a Parquet file a writer just
        wrote, as ``read_parquet`` will ask for them: each unit is decoded here, in the
        background, from the written pages it spans (``spans[i]``: indices of the file's
        pages; ``pages[j]`` is page ``page_ids[j]``). Claimed before returning, like
        :meth:`adopt_pages`; returns how many were claimed."""
        claimed = 0
        if footer is not None:
            claimed += self.cache.fill_later(fetch.footer_key(obj), lambda: page_table(footer),
                                             self._handovers.submit)
        views = {i: memoryview(p) for i, p in zip(page_ids, pages)}

        def loader(req: UnitRequest, span: Sequence[int]):
            def load() -> pa.Table:
                meta = self._metadata(req.obj, req.footer)
                mine = {i: views[i] for i in span}
                segments = {start: _span(mine, start, end, page_size)
                            for start, end in parquet.unit_ranges(meta, req.unit, req.columns)}
                return fetch.decode(req, meta, segments)
            return load

        for req, span in zip(units, spans):
            claimed += self.cache.fill_later(req.key, loader(req, span), self._handovers.submit)
        return claimed

    def replicate(self, fs: Any, owner: str, requests: Sequence[PageRequest]) -> Tuple[int, int]:
        """Keep copies of pages the worker named ``owner`` holds, so that this node's readers
        map them from this disk tier instead of asking the owner (``load(replicas=...)``).
        Each page comes by Ray's object transfer, which may take it from any node holding a
        copy already. Returns ``(pages copied, bytes)``; pages held here are skipped, and an
        error from the owner (e.g. the object is gone) is raised."""
        todo = [r for r in requests if r.key.digest not in self.cache.memory.sizes
                and r.key.digest not in self.cache.disk.sizes]
        copied = nbytes = 0
        if todo:
            stream = self._peer(owner).get_many.options(num_returns="streaming").remote(fs, todo)
            for req in todo:
                item = ray.get(next_item(stream), timeout=WORKER_TIMEOUT_S)
                if item[0] == "err":
                    raise item[1]
                ref = item[1][0]
                n = self.cache.keep_copy(req.key, lambda: ray.get(ref, timeout=WORKER_TIMEOUT_S))
                copied, nbytes = copied + (n > 0), nbytes + n
        self.cache.flush()  # on disk before returning: readers map copies from there
        return copied, nbytes

    def watch_upload(self, fs: Any, bucket: str, key: str, upload_id: str, pid: int,
                     started: Optional[str]) -> None:
        """Abort this multipart upload if process ``pid`` (on this node) dies before
        :meth:`forget_upload` (see :mod:`ray_cache.node.uploads`)."""
        self.uploads.watch(fs, bucket, key, upload_id, pid, started)

    def forget_upload(self, upload_id: str) -> None:
        """The writer finished (or aborted) the upload itself."""
        self.uploads.forget(upload_id)

    # -- the same-node channel (ray_cache.node.channel) ------------------------------------
    def channel_request(self, request: Tuple) -> Any:
        """Answer one request of a process on this node that cannot use Ray.

        - ``("pages", fs, [PageRequest])``: pages this worker owns, from its tiers or
          fetched from the store (and so cached), as :meth:`get_many` serves them;
        - ``("relay", owner, fs, [PageRequest])``: pages owned by the worker named ``owner``
          (on another node, or another raylet), asked of it through Ray;
        - ``("touch", digests)``: as :meth:`touch`.

        Pages come back one item each: ``("ok", buffer)`` (an out-of-band pickle buffer
        over the entry, no copy here), ``("err", exception)`` (the store's answer, e.g. a
        missing object), or ``("gone", why)`` where the owner could not be reached (the
        reader then reads that page from the store itself, counted as a fallback).
        """
        op = request[0]
        if op == "pages":
            _op, fs, reqs = request
            return [self._channel_item(item) for item in self.get_many(fs, reqs)]
        if op == "relay":
            _op, owner, fs, reqs = request
            return self._relay(owner, fs, reqs)
        if op == "touch":
            return self.touch(request[1])
        raise ValueError(f"unknown channel request {op!r}; known: pages, relay, touch")

    @staticmethod
    def _channel_item(item: Tuple) -> Tuple[str, Any]:
        if item[0] == "err":
            return item
        table = ray.get(item[1][0], timeout=WORKER_TIMEOUT_S)  # this node's store: no copy
        return ("ok", pickle.PickleBuffer(page_buffer(table.column(0))))

    def _relay(self, owner: str, fs: Any, reqs: Sequence[PageRequest]) -> List[Tuple[str, Any]]:
        out: List[Tuple[str, Any]] = []
        try:
            stream = self._peer(owner).get_many.options(num_returns="streaming").remote(fs, list(reqs))
            for _ in reqs:
                out.append(self._channel_item(ray.get(next_item(stream), timeout=WORKER_TIMEOUT_S)))
        except Exception as exc:  # noqa: BLE001 - owner gone or not answering: the reader reads the store
            self._peers.pop(owner, None)
            why = f"{owner}: {type(exc).__name__}"
            out.extend(("gone", why) for _ in range(len(reqs) - len(out)))
        return out

    # -- helpers -------------------------------------------------------------------
    def _peer(self, owner: str) -> Any:
        """The handle of the worker named ``owner``, looked up once."""
        peer = self._peers.get(owner)
        if peer is None:
            peer = self._peers[owner] = ray.get_actor(owner, namespace=NAMESPACE)
        return peer

    def _count_store(self, requests: int, nbytes: int) -> None:
        self.cache.count(requests_to_under_store=requests, bytes_from_under_store=nbytes)

    def _metadata(self, obj: StoreObject, footer: bytes) -> pq.FileMetaData:
        mkey = (obj.path, obj.version)
        with self._lock:
            meta = self._meta.get(mkey)
            if meta is not None:
                self._meta.move_to_end(mkey)
                return meta
        meta = parquet.read_metadata(obj.url, obj.size, footer)
        with self._lock:
            self._meta[mkey] = meta
            while len(self._meta) > _META_CACHE_ITEMS:
                self._meta.popitem(last=False)
        return meta


def _span(views: Dict[int, memoryview], start: int, end: int, page_size: int) -> bytes:
    """Bytes ``[start, end)`` of a file from its pages (``views``: page index to bytes)."""
    first, last = start // page_size, (end - 1) // page_size
    if first == last:
        base = first * page_size
        return bytes(views[first][start - base:end - base])
    return b"".join(bytes(views[i][max(start - i * page_size, 0):min(end - i * page_size, page_size)])
                    for i in range(first, last + 1))
