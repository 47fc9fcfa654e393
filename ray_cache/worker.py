"""The per-node cache worker: serve from memory, then disk, else fetch, store, evict.

One ``CacheWorker`` actor runs on each cache node (see :mod:`ray_cache.cluster`). It is a
threaded actor: requests for different keys proceed in parallel (pyarrow and fsspec
release the GIL), and requests for the same cold key wait on the one fetch in flight
(single flight). Misses are written to the disk tier in the background so a cold read
is not slowed by local disk writes; :meth:`CacheWorker.flush` waits for them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from . import fetch, parquet
from .config import WorkerConfig, default_disk_bytes, validate_disk_dir
from .errors import translate
from .fetch import UnitRequest
from .keys import StoreObject
from .tiers.disk import DiskTier
from .tiers.memory import MemoryTier

log = logging.getLogger("ray_cache.worker")

#: Parsed footers kept per worker process (they are also disk-tier entries).
_META_CACHE_ITEMS = 4096


class CacheWorker:
    """A node's cache: memory tier, disk tier, under-store fetches and counters.

    Not used directly: :func:`ray_cache.cluster.ensure_workers` starts it as a named,
    detached Ray actor pinned to its node.
    """

    def __init__(self, config: Dict[str, Any], node_id: str) -> None:
        cfg = WorkerConfig(**config)
        disk_dir = validate_disk_dir(cfg.disk_dir)
        if cfg.disk_bytes <= 0:  # "size it from this node's free disk"
            cfg = dataclasses.replace(cfg, disk_bytes=default_disk_bytes(disk_dir), disk_dir=disk_dir)
        self.node_id = node_id
        self.config = cfg
        self.memory = MemoryTier(cfg.memory_bytes, cfg.policy)
        self.disk = DiskTier(cfg.disk_dir, cfg.disk_bytes, cfg.policy)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ray-cache-fetch")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-cache-disk")
        self._pending_writes: "set[Future]" = set()
        self._inflight: Dict[str, Future] = {}
        self._lock = threading.Lock()
        self._meta: "OrderedDict[Tuple[str, str], pq.FileMetaData]" = OrderedDict()
        self.counters = dict(
            hits=0,
            misses=0,
            memory_hits=0,
            disk_hits=0,
            bytes_from_cache=0,
            bytes_from_under_store=0,
            requests_to_under_store=0,
            single_flight_waits=0,
            disk_write_errors=0,
            errors=0,
            fallbacks=0,
            fallback_bytes=0,
            bytes_served_local=0,
            bytes_served_remote=0,
        )
        self.started_at = time.time()

    # -- management ---------------------------------------------------------------
    def ping(self) -> str:
        """The node this worker runs on (used to check it is alive)."""
        return self.node_id

    def configure(self, memory_bytes: Optional[int] = None, disk_bytes: Optional[int] = None) -> None:
        """Change tier capacities now, evicting what no longer fits."""
        if memory_bytes is not None:
            self.memory.resize(memory_bytes)
        if disk_bytes is not None:
            self.flush()
            self.disk.resize(disk_bytes)

    def flush(self) -> int:
        """Wait for background disk writes; returns how many were pending."""
        with self._lock:
            pending = list(self._pending_writes)
        for fut in pending:
            fut.exception()
        return len(pending)

    def note_served(self, local_bytes: int, remote_bytes: int) -> None:
        """Count bytes a reader took from this worker on its own node or from another."""
        self._count(bytes_served_local=local_bytes, bytes_served_remote=remote_bytes)

    def get_config(self) -> Dict[str, Any]:
        """The settings this worker runs with (used to start workers on new nodes alike)."""
        return self.config.to_dict()

    def note_fallback(self, units: int, nbytes: int) -> None:
        """Count reads that a client served from the store because another worker was gone."""
        self._count(fallbacks=units, fallback_bytes=nbytes)

    def status(self) -> Dict[str, Any]:
        """This worker's capacities, usage and counters."""
        return dict(
            node_id=self.node_id,
            pid=os.getpid(),
            disk_dir=self.disk.slot,
            memory_bytes_used=self.memory.used,
            memory_bytes_capacity=self.memory.capacity,
            disk_bytes_used=self.disk.used,
            disk_bytes_capacity=self.disk.capacity,
            memory_entries=len(self.memory),
            disk_entries=len(self.disk),
            entries=len(set(self.memory.sizes) | set(self.disk.sizes)),
            evictions=self.memory.evictions + self.disk.evictions,
            memory_evictions=self.memory.evictions,
            disk_evictions=self.disk.evictions,
            **self.counters,
        )

    # -- footers -----------------------------------------------------------------
    def footers(self, fs: Any, objects: Sequence[StoreObject]) -> List[Any]:
        """Footer bytes of each object (cached by version), or the exception for it."""
        futures = [self._pool.submit(self._footer, fs, obj) for obj in objects]
        out: List[Any] = []
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - handed to the caller to raise
                out.append(translate(exc, objects[len(out)].url))
        return out

    def _footer(self, fs: Any, obj: StoreObject) -> bytes:
        key = fetch.footer_key(obj)
        table = self.disk.get(key.digest)
        if table is not None:
            return table.column(0)[0].as_py()

        def load() -> bytes:
            footer = fetch.read_footer(fs, obj, self._count_store)
            self.disk.put(key.digest, pa.table({"footer": pa.array([footer], pa.binary())}))
            return footer

        return self._single_flight(key.digest, load)

    # -- row groups ----------------------------------------------------------------
    def lookup(self, digests: Sequence[str]) -> List[Optional[Tuple[List[ray.ObjectRef], Any]]]:
        """For each key in the memory tier, ``([ref], block metadata)``; None for others.

        Used by the zero-copy warm path; counts hits only when every key is present,
        since otherwise the caller reads through :meth:`get_many` instead.
        """
        found = [self.memory.lookup(d) for d in digests]
        if all(f is not None for f in found):
            nbytes = sum(self.memory.sizes.get(d, 0) for d in digests)
            self._count(hits=len(digests), memory_hits=len(digests), bytes_from_cache=nbytes)
        return [None if f is None else ([f[0]], f[1]) for f in found]

    def get_many(self, fs: Any, requests: Sequence[UnitRequest]) -> Iterator[Tuple]:
        """Stream one result per request, in order, fetching misses in parallel.

        Each item is ``("ok", [ref], nbytes, tier)`` where ``tier`` is ``"memory"``,
        ``"disk"`` or ``"store"``, or ``("err", exception)``.
        """
        futures = [self._pool.submit(self._get_one, fs, req) for req in requests]
        for req, fut in zip(requests, futures):
            try:
                ref, nbytes, tier = fut.result()
                yield ("ok", [ref], nbytes, tier)
            except Exception as exc:  # noqa: BLE001 - handed to the reader to raise
                self._count(errors=1)
                yield ("err", translate(exc, req.obj.url))

    def _get_one(self, fs: Any, req: UnitRequest) -> Tuple[ray.ObjectRef, int, str]:
        digest = req.key.digest
        ref = self.memory.get(digest)
        if ref is not None:
            return self._hit(ref, self.memory.sizes.get(digest, 0), "memory")

        def load() -> Tuple[ray.ObjectRef, int, str]:
            again = self.memory.get(digest)  # filled while we waited for the flight lock
            if again is not None:
                return again, self.memory.sizes.get(digest, 0), "memory"
            table = self.disk.get(digest)
            if table is not None:
                return self.memory.put(digest, table), table.nbytes, "disk"
            meta = self._metadata(req.obj, req.footer)
            table = fetch.read_unit(fs, req, meta, self._count_store)
            ref = self.memory.put(digest, table)
            self._write_behind(digest, table)
            return ref, table.nbytes, "store"

        ref, nbytes, tier = self._single_flight(digest, load)
        if tier == "store":
            self._count(misses=1)
            return ref, nbytes, tier
        return self._hit(ref, nbytes, tier)

    def _hit(self, ref: ray.ObjectRef, nbytes: int, tier: str) -> Tuple[ray.ObjectRef, int, str]:
        self._count(hits=1, bytes_from_cache=nbytes, **{f"{tier}_hits": 1})
        return ref, nbytes, tier

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.counters[name] += delta

    def _count_store(self, requests: int, nbytes: int) -> None:
        self._count(requests_to_under_store=requests, bytes_from_under_store=nbytes)

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

    def _single_flight(self, digest: str, load):
        with self._lock:
            fut = self._inflight.get(digest)
            owner = fut is None
            if owner:
                fut = Future()
                self._inflight[digest] = fut
        if not owner:
            self._count(single_flight_waits=1)
            return fut.result()
        try:
            value = load()
            fut.set_result(value)
            return value
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(digest, None)

    def _write_behind(self, digest: str, table: pa.Table) -> None:
        def write() -> None:
            try:
                self.disk.put(digest, table)
            except OSError as exc:
                self._count(disk_write_errors=1)
                log.warning("ray_cache: disk tier write failed: %s", exc)

        fut = self._writer.submit(write)
        with self._lock:
            self._pending_writes.add(fut)
        fut.add_done_callback(self._write_done)

    def _write_done(self, fut: Future) -> None:
        with self._lock:
            self._pending_writes.discard(fut)
