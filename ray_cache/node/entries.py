"""A node's cache of entries: both tiers, labels, pins, expiry, single flight, counters.

This is the engine inside a worker actor, kept free of actor concerns so it can be read
(and tested) on its own. Thread-safe: the worker serves many requests at once.

Entries are Arrow tables: decoded row groups, or one ``binary`` value for raw bytes
(Parquet footers, fsspec pages). Each entry is labelled with its object's
``(protocol, path)`` so it can be freed, pinned or invalidated by path, even after a
restart (the disk tier keeps the label in each file).
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pyarrow as pa
import ray

from ray_cache.config import COUNTERS, WORKER_TIMEOUT_S, WorkerConfig  # noqa: F401 - COUNTERS: ray_cache.entries.COUNTERS
from ray_cache.store.errors import PinCapacityError  # noqa: F401 - also ray_cache.entries.PinCapacityError
from ray_cache.store.keys import EntryKey
from ray_cache.node.tiers.disk import DiskTier
from ray_cache.node.tiers.memory import MemoryTier

log = logging.getLogger("ray_cache.node.entries")

#: ``(ref, nbytes, tier)``: where a caller finds an entry and which tier served it.
Served = Tuple[ray.ObjectRef, int, str]


class _HandOverLost(Exception):
    """A fill from a writer's bytes failed; whoever waited on it loads the key itself."""



def matches(path: str, pattern: str) -> bool:
    """Whether ``path`` is ``pattern``, lies under it (a directory or prefix), or globs it.

    Examples
    --------
    >>> matches("b/data/part-0.parquet", "b/data")
    True
    >>> matches("b/data/part-0.parquet", "b/data/*.parquet")
    True
    >>> matches("b/database.parquet", "b/data")
    False
    """
    pattern = pattern.rstrip("/")
    if path == pattern or path.startswith(pattern + "/"):
        return True
    return any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(path, pattern)


class LocalCache:
    """Memory and disk tiers of one node, with the bookkeeping around them."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.memory = MemoryTier(cfg.memory_bytes, cfg.policy)
        self.disk = DiskTier(cfg.disk_dir, cfg.disk_bytes, cfg.policy)
        self.labels: Dict[str, Tuple[str, str]] = dict(self.disk.labels)
        # Keys a tier let go of: their labels go once neither tier holds them
        # (appended under a tier's lock, so only a deque append: no lock of ours).
        self._left: "collections.deque[str]" = collections.deque()
        self.memory.on_remove = self.disk.on_remove = self._left.append
        self.expires: Dict[str, float] = {}
        self.counters: Dict[str, int] = {name: 0 for name in COUNTERS}
        self._lock = threading.Lock()
        self._inflight: Dict[str, Future] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-cache-disk")
        self._pending: "set[Future]" = set()
        #: Tables on their way to the disk tier: an entry the memory tier declined is
        #: served from here until its write is done, not fetched again.
        self._writing: Dict[str, pa.Table] = {}
        self._state_path = os.path.join(self.disk.slot, "state.json")
        self._load_state()

    # -- counters ------------------------------------------------------------------
    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.counters[name] = self.counters.get(name, 0) + delta

    # -- reads ---------------------------------------------------------------------
    def _expired(self, digest: str) -> bool:
        deadline = self.expires.get(digest)
        if deadline is None or deadline > time.time():
            return False
        self.drop([digest])
        self.count(expired=1)
        return True

    def lookup_memory(self, digest: str) -> Optional[Tuple[ray.ObjectRef, Any]]:
        """``(ref, block metadata)`` if in the memory tier and not expired."""
        if self._expired(digest):
            return None
        return self.memory.lookup(digest)

    def holds_or_fills(self, digest: str) -> bool:
        """Whether a tier holds ``digest`` or a fill of it is under way (no side effect)."""
        return (digest in self.memory.sizes or digest in self.disk.sizes or digest in self._inflight
                or digest in self._writing)

    def touch(self, digests: Sequence[str]) -> int:
        """Record reads of disk-tier entries made without asking (mapped by a reader on
        this node): their recency and hit counters. Returns how many were present."""
        found = nbytes = 0
        for d in digests:
            size = self.disk.sizes.get(d)
            if size is None:
                continue
            self.disk.touch(d)
            self.memory.touch(d)
            found, nbytes = found + 1, nbytes + size
        if found:
            self.count(hits=found, disk_hits=found, bytes_from_cache=nbytes, bytes_from_disk=nbytes)
        return found

    def get_or_load(self, key: EntryKey, load: Callable[[], pa.Table]) -> Served:
        """Serve ``key`` from memory, else disk (promoting), else ``load()`` it once."""
        digest = key.digest
        if not self._expired(digest):
            ref = self.memory.get(digest)
            if ref is not None:
                return self._hit(ref, self.memory.sizes.get(digest, 0), "memory")
        ref, nbytes, tier = self._single_flight(digest, lambda: self._fill(key, load))
        if tier == "store":
            self.count(misses=1)
            return ref, nbytes, tier
        return self._hit(ref, nbytes, tier)

    def keep_copy(self, key: EntryKey, load: Callable[[], pa.Table]) -> int:
        """Keep ``load()`` as ``key``'s entry unless held: a copy of a page another worker
        owns (the same key, so the same version: never stale), in memory and, by the next
        :meth:`flush`, on disk where this node's readers map it. Returns its bytes (0 if held).
        Counted ``replica_entries``, not as a miss: no store was asked."""
        digest = key.digest
        if digest in self.memory.sizes or digest in self.disk.sizes:
            return 0
        _ref, nbytes, tier = self._single_flight(digest, lambda: self._fill(key, load))
        if tier == "store":
            self.count(replica_entries=1)
        return nbytes if tier == "store" else 0

    def fill_later(self, key: EntryKey, load: Callable[[], pa.Table],
                   submit: Callable[[Callable[[], None]], Any]) -> bool:
        """Claim ``key`` now and fill it from ``load()`` on ``submit``'s thread: bytes a writer
        handed over (counted ``written_entries``). A reader asking meanwhile waits for this
        fill; if ``load`` fails (the writer died), it loads the key itself. False, doing
        nothing, if the key is held or being filled already."""
        digest = key.digest
        if digest in self.memory.sizes or digest in self.disk.sizes:
            return False
        with self._lock:
            if digest in self._inflight:
                return False
            fut = self._inflight[digest] = Future()

        def run() -> None:
            try:
                value = self._fill(key, load)
                self.count(written_entries=1)
                fut.set_result(value)
            except BaseException as exc:  # noqa: BLE001 - readers waiting load it themselves
                log.debug("ray_cache: handed-over %s not kept (%s)", key.describe(), exc)
                fut.set_exception(_HandOverLost())
            finally:
                with self._lock:
                    self._inflight.pop(digest, None)

        submit(run)
        return True

    def _fill(self, key: EntryKey, load: Callable[[], pa.Table]) -> Served:
        digest = key.digest
        again = self.memory.get(digest)  # filled while we waited for the flight lock
        if again is not None:
            return again, self.memory.sizes.get(digest, 0), "memory"
        with self._lock:  # first: its write may end (and the disk tier hold it) meanwhile
            table = self._writing.get(digest)
        if table is None:
            table = self.disk.get(digest)
        if table is not None:
            return self.memory.put(digest, table), table.nbytes, "disk"
        table = load()
        ref = self.memory.put(digest, table)
        self.prune_labels()
        with self._lock:
            self.labels[digest] = (key.protocol, key.path)
        self._write_behind(digest, table, (key.protocol, key.path))
        return ref, table.nbytes, "store"

    def _hit(self, ref: ray.ObjectRef, nbytes: int, tier: str) -> Served:
        self.count(hits=1, bytes_from_cache=nbytes, **{f"{tier}_hits": 1, f"bytes_from_{tier}": nbytes})
        return ref, nbytes, tier

    def _single_flight(self, digest: str, fill: Callable[[], Served]) -> Served:
        with self._lock:
            fut = self._inflight.get(digest)
            leader = fut is None
            if leader:
                fut = self._inflight[digest] = Future()
        if not leader:
            self.count(single_flight_waits=1)
            try:
                ref, nbytes, _tier = fut.result(timeout=2 * WORKER_TIMEOUT_S)  # the leader's fetch
            except _HandOverLost:  # a writer's bytes that never came: fetch them after all
                return self._single_flight(digest, fill)
            return ref, nbytes, "memory"
        try:
            value = fill()
            fut.set_result(value)
            return value
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(digest, None)

    # -- writes to disk ------------------------------------------------------------
    def _write_behind(self, digest: str, table: pa.Table, label: Tuple[str, str]) -> None:
        def write() -> None:
            stored = False
            try:
                stored = self.disk.put(digest, table, label)
            except OSError as exc:
                self.count(disk_write_errors=1)
                log.warning("ray_cache: disk tier write failed: %s", exc)
            finally:
                with self._lock:
                    if self._writing.get(digest) is table:
                        del self._writing[digest]
            if not stored:
                self._left.append(digest)  # its label goes if memory did not keep it either

        with self._lock:  # the write's own lock waits until both are noted
            self._writing[digest] = table
            fut = self._writer.submit(write)
            self._pending.add(fut)
        fut.add_done_callback(self._written)

    def _written(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def prune_labels(self) -> int:
        """Forget the labels (and expiry) of entries neither tier holds any more; returns
        how many went. Runs on every fill, so labels never outgrow the tiers' contents."""
        gone = 0
        with self._lock:  # lock order: ours, then a tier's (tiers never take ours)
            while self._left:
                d = self._left.popleft()
                if d not in self.memory and d not in self.disk and d not in self._inflight:
                    gone += self.labels.pop(d, None) is not None
                    self.expires.pop(d, None)
        return gone

    def flush(self) -> int:
        """Wait for background disk writes; returns how many were pending."""
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            fut.exception(timeout=WORKER_TIMEOUT_S)  # a disk write; bounded like any wait
        return len(pending)

    # -- management by path ----------------------------------------------------------
    def digests_matching(self, protocol: str, patterns: Sequence[str]) -> List[str]:
        """Entries whose object path matches any pattern (see :func:`matches`)."""
        self.prune_labels()
        with self._lock:
            labels = list(self.labels.items())
        return [d for d, (proto, path) in labels if proto == protocol and any(matches(path, p) for p in patterns)]

    def drop(self, digests: Iterable[str]) -> int:
        """Remove entries from both tiers (pins and expiry too); returns how many existed."""
        self.flush()
        n = 0
        for d in list(digests):
            found = self.memory.remove(d) is not None
            found = (self.disk.remove(d) is not None) or found
            with self._lock:
                self.labels.pop(d, None)
                self.expires.pop(d, None)
            n += found
        self._save_state()
        return n

    def pin(self, digests: Sequence[str]) -> Dict[str, int]:
        """Pin entries in every tier that holds them, or raise without pinning any.

        Room is checked and taken under both tiers' locks (memory's, then disk's), so two
        pins at once cannot both pass a check that only one of them fits.
        """
        self.flush()
        with self.memory.lock, self.disk.lock:
            for tier in (self.memory, self.disk):
                new = sum(tier.sizes.get(d, 0) for d in digests if d not in tier.pinned)
                if tier.pinned_bytes + new > tier.capacity:
                    raise PinCapacityError(
                        f"pinning {new} more bytes would exceed the {tier.name} tier: "
                        f"{tier.pinned_bytes} of {tier.capacity} bytes already pinned"
                    )
            self.memory.pin(digests)
            self.disk.pin(digests)
        self._save_state()
        return {"memory": self.memory.pinned_bytes, "disk": self.disk.pinned_bytes}

    def unpin(self, digests: Sequence[str]) -> None:
        self.memory.unpin(digests)
        self.disk.unpin(digests)
        self._save_state()

    def set_ttl(self, digests: Sequence[str], ttl_s: Optional[float]) -> None:
        with self._lock:
            for d in digests:
                if ttl_s is None:
                    self.expires.pop(d, None)
                else:
                    self.expires[d] = time.time() + ttl_s
        self._save_state()

    # -- pins and expiry survive restarts ----------------------------------------------
    def _save_state(self) -> None:
        with self._lock:
            state = {"pinned": sorted(self.disk.pinned), "expires": dict(self.expires)}
        tmp = self._state_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self._state_path)

    def _load_state(self) -> None:
        try:
            with open(self._state_path) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            return
        self.disk.pin([d for d in state.get("pinned", []) if d in self.disk.sizes])
        self.expires = {d: t for d, t in state.get("expires", {}).items() if d in self.disk.sizes}

    # -- status ----------------------------------------------------------------------
    def status(self) -> Dict[str, Any]:
        self.prune_labels()
        with self._lock:
            counters = dict(self.counters)
        return dict(
            memory_bytes_used=self.memory.used,
            memory_bytes_capacity=self.memory.capacity,
            memory_bytes_pinned=self.memory.pinned_bytes,
            disk_bytes_used=self.disk.used,
            disk_bytes_capacity=self.disk.capacity,
            disk_bytes_pinned=self.disk.pinned_bytes,
            memory_entries=len(self.memory),
            disk_entries=len(self.disk),
            entries=len(set(self.memory.sizes) | set(self.disk.sizes)),
            evictions=self.memory.evictions + self.disk.evictions,
            memory_evictions=self.memory.evictions,
            disk_evictions=self.disk.evictions,
            damaged_entries=self.disk.damaged,
            labels=len(self.labels),
            **counters,
        )
