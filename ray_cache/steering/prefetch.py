"""Ray Train ingestion helper: prefetch a cold data set in read order while epoch 1 runs.

A ``ray_cache.read_parquet`` dataset already works as a Ray Train dataset::

    trainer = TorchTrainer(loop, datasets={"train": ray_cache.read_parquet(url)}, ...)

Ray Train re-executes it every epoch; from the second epoch on, every read is served by
the cache workers and no request reaches the store. What is left is the first, cold
epoch: its read tasks (a few at a time, as many as Ray Data runs at once) each ask for
their unit and wait, so the link to the store idles between units. :func:`prefetch`
keeps it busy: it asks the owning workers to fetch the units in the order the read tasks
will want them, ``ahead`` at a time, so each read task finds its unit cached or in
flight (the worker fetches a key once; a reader asking meanwhile waits for that fetch).
Measured in ``benchmarks/train_ingest.py`` (10 MB/s, 25 ms store): see BENCHMARKS.md.

It prefetches no more than the owners can keep (their larger tier's capacity): a unit
fetched into a full cache would be evicted, or refused by a scan-resistant policy,
before its reader comes, and fetched twice. A data set larger than the cache is served
as the policy decides: with ``tinylfu`` a stable part from the cache, the rest from
the store, every epoch (see :mod:`ray_cache.node.tiers.policy`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray

from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.cluster import routing, hashing
from ray_cache.steering import ops
from ray_cache.store.fetch import UnitRequest

#: Units in flight by default: enough to fill a far link, few enough that the first
#: units arrive early and the workers keep threads for the readers.
DEFAULT_AHEAD = 4


@dataclass
class PrefetchReport:
    """What a prefetch did.

    Attributes
    ----------
    units : int
        Units planned (the data set's row-group runs).
    fetched : int
        Units this prefetch fetched from the store.
    already_cached : int
        Units that were cached already (or fetched meanwhile by a reader).
    skipped : int
        Units left out because the owning worker could not keep them.
    failures : list of (str, str)
        ``(object url, error)`` of units that could not be fetched (the reader will
        meet the same error, or read the unit from the store itself).
    seconds : float
        Wall time.
    cancelled : bool
        Whether :meth:`Prefetch.cancel` stopped it early.
    """

    units: int = 0
    fetched: int = 0
    already_cached: int = 0
    skipped: int = 0
    failures: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False


class Prefetch(ops.BackgroundJob):
    """A prefetch running in the background; see :func:`prefetch`.

    Thread-safe: ``progress``, ``done``, ``cancel`` and ``wait`` may be called from any
    thread while it runs.
    """

    _what = "prefetch"

    def __init__(self, plan: "ops.Plan", units: Sequence[UnitRequest], skipped: int, ahead: int) -> None:
        super().__init__("ray-cache-prefetch")
        self._plan = plan
        self._units = list(units)
        self._ahead = ahead
        self._lock = threading.Lock()
        self.report = PrefetchReport(units=len(units) + skipped, skipped=skipped)
        self._start = time.perf_counter()
        self._thread.start()

    @property
    def progress(self) -> Tuple[int, int]:
        """``(units done, units to prefetch)``."""
        with self._lock:
            r = self.report
            return r.fetched + r.already_cached + len(r.failures), len(self._units)

    def wait(self, timeout: Optional[float] = None) -> PrefetchReport:
        """The report once the prefetch has ended (``TimeoutError`` if not within ``timeout``)."""
        return super().wait(timeout)

    def _work(self) -> PrefetchReport:
        try:
            names = [w.name for w in self._plan.workers]
            with ThreadPoolExecutor(self._ahead, thread_name_prefix="ray-cache-prefetch") as pool:
                # The pool takes tasks in submission order: read order, ``ahead`` in flight.
                for req in self._units:
                    pool.submit(self._one, req, hashing.owner(req.key.digest, names))
        finally:
            with self._lock:
                self.report.cancelled = self._cancel.is_set()
                self.report.seconds = time.perf_counter() - self._start
        return self.report

    def _one(self, req: UnitRequest, owner: int) -> None:
        if self._cancel.is_set():
            return
        handle = self._plan.workers[owner].handle
        try:
            stream = handle.load.options(num_returns="streaming").remote(self._plan.fs, [req])
            item = ray.get(routing.next_item(stream), timeout=WORKER_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - reported; the reader meets it again or falls back
            item = ("err", exc)
        with self._lock:
            if item[0] == "ok":
                if item[2] == "store":
                    self.report.fetched += 1
                else:
                    self.report.already_cached += 1
            else:
                self.report.failures.append((req.obj.url, f"{type(item[1]).__name__}: {item[1]}"))


def _keepable(units: Sequence[UnitRequest], plan: "ops.Plan") -> Tuple[List[UnitRequest], int]:
    """The units, in order, that fit in their owner's larger tier; and how many do not."""
    names = [w.name for w in plan.workers]
    records = ray.get([w.handle.status.remote() for w in plan.workers], timeout=60)
    room: Dict[int, int] = {}
    for i, rec in enumerate(records):
        memory = rec["memory_bytes_capacity"] - rec["memory_bytes_pinned"]
        disk = rec["disk_bytes_capacity"] - rec["disk_bytes_pinned"]
        room[i] = max(memory, disk)
    keep: List[UnitRequest] = []
    skipped = 0
    for req in units:
        owner = hashing.owner(req.key.digest, names)
        if req.unit.nbytes <= room[owner]:
            room[owner] -= req.unit.nbytes
            keep.append(req)
        else:
            skipped += 1
    return keep, skipped


def prefetch(
    paths: Any,
    *,
    columns: Optional[Sequence[str]] = None,
    filesystem: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
    ahead: int = DEFAULT_AHEAD,
) -> Prefetch:
    """Start fetching a Parquet data set into the cache, in read order, in the background.

    Call it with the same arguments as :func:`ray_cache.read_parquet`, just before or
    after that call, when the cache is cold: the first epoch then reads at the speed of
    the link instead of one read task's fetch at a time. Units already cached are
    skipped at once, so calling it on a warm cache costs a listing and nothing more.

    Parameters
    ----------
    paths, columns, filesystem, storage_options
        As for :func:`ray_cache.read_parquet` (use the same ``columns``: a unit is
        cached per column selection).
    ahead : int
        Units in flight at once (default 4).

    Returns
    -------
    Prefetch
        ``wait()`` for its :class:`PrefetchReport`, ``cancel()``, ``progress``.

    Examples
    --------
    >>> import ray_cache, ray_cache.steering.prefetch
    >>> job = ray_cache.steering.prefetch.prefetch("s3://bucket/train/", columns=["image", "label"])  # doctest: +SKIP
    >>> ds = ray_cache.read_parquet("s3://bucket/train/", columns=["image", "label"])  # doctest: +SKIP
    >>> job.wait().fetched  # doctest: +SKIP
    24
    """
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 1:
        raise ValueError(f"ahead must be a positive number of units, got {ahead!r}")
    plan = ops.plan(paths, columns=columns, filesystem=filesystem, storage_options=storage_options)
    units = [r for r in plan.requests if isinstance(r, UnitRequest)]
    keep, skipped = _keepable(units, plan)
    return Prefetch(plan, keep, skipped, ahead)


__all__ = ["prefetch", "Prefetch", "PrefetchReport", "DEFAULT_AHEAD"]
