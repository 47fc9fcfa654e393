"""Steering the cache: preload, pin, unpin, free, invalidate, spread over the owning workers.

``load`` plans exactly what ``read_parquet`` would read (Parquet objects as row-group units
with their footers) and raw pages for other objects (what the ``raycache`` filesystem
reads), then asks each owning worker to fill its share without shipping any data back.
Loading again skips what is cached, so an interrupted load resumes where it stopped.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import ray

from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.cluster import routing, membership, hashing
from ray_cache.store import access, fetch, underfs
from ray_cache.config import PAGE_SIZE
from ray_cache.readers.datasource import CachedParquetDatasource
from ray_cache.store.errors import PinCapacityError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
#: Requests sent to a worker in one call; a cancelled load stops between batches.
BATCH = 16


@dataclass
class LoadReport:
    """What a load did.

    Attributes
    ----------
    entries : int
        Entries planned (row-group units, footers and pages).
    fetched : int
        Entries fetched from the store by this load.
    already_cached : int
        Entries that were cached already (the resumable part).
    bytes : int
        Bytes of the entries now cached (decoded Arrow for Parquet, raw for pages).
    seconds : float
        Wall time.
    failures : list of (str, str)
        ``(object url, error)`` for entries that could not be loaded.
    cancelled : bool
        Whether the load was cancelled before the end.
    replicas : int
        Copies of pages placed on nodes other than their owners' (``replicas=``).
    replica_bytes : int
        Their bytes.
    """

    entries: int = 0
    fetched: int = 0
    already_cached: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: List[Tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False
    replicas: int = 0
    replica_bytes: int = 0
    digests: Dict[int, List[str]] = field(default_factory=dict, repr=False)


@dataclass
class Plan:
    fs: Any
    workers: List[membership.WorkerRef]
    requests: List[Any]
    extra_digests: List[Tuple[int, str]]  # footers: (owner, digest)


def plan(
    paths: Any,
    *,
    columns: Optional[Sequence[str]] = None,
    filesystem: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
) -> Plan:
    """Resolve ``paths`` into the cache requests a load (or pin) consists of."""
    fs, stripped = underfs.resolve_filesystem(paths, filesystem, storage_options)
    objects = access.list_readable(fs, stripped, folders=underfs.named_folders(paths, fs))
    workers = membership.workers()
    names = [w.name for w in workers]
    parquet_objs = [o for o in objects if o.path.endswith(PARQUET_SUFFIXES)]
    others = [o for o in objects if not o.path.endswith(PARQUET_SUFFIXES)]
    requests: List[Any] = []
    extra: List[Tuple[int, str]] = []
    if parquet_objs:
        source = CachedParquetDatasource(fs, parquet_objs, workers, columns=columns)
        requests.extend(source.requests)
        for obj in parquet_objs:
            digest = fetch.footer_key(obj).digest
            extra.append((hashing.owner(digest, names), digest))
    for obj in others:
        pages = max(1, math.ceil(obj.size / PAGE_SIZE))
        requests.extend(fetch.page_request(obj, i, PAGE_SIZE) for i in range(pages))
    return Plan(fs, list(workers), requests, extra)


def _interactive() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def run_load(p: Plan, *, progress: Optional[bool] = None, cancel: Optional[threading.Event] = None,
             on_progress: Optional[Callable[[int, int], None]] = None) -> LoadReport:
    """Fill the cache with ``p``'s requests, each on its owning worker; see :func:`load`."""
    from tqdm.auto import tqdm

    cancel = cancel or threading.Event()
    report = LoadReport(entries=len(p.requests))
    names = [w.name for w in p.workers]
    by_owner: Dict[int, List[Any]] = {}
    for req in p.requests:
        by_owner.setdefault(hashing.owner(req.key.digest, names), []).append(req)
    start = time.perf_counter()
    lock = threading.Lock()
    bar = tqdm(total=len(p.requests), unit="entry", desc="ray_cache load",
               disable=not (_interactive() if progress is None else progress))

    def drive(owner: int, reqs: List[Any]) -> None:
        handle = p.workers[owner].handle
        for i in range(0, len(reqs), BATCH):
            if cancel.is_set():
                return
            batch = reqs[i : i + BATCH]
            try:
                stream = handle.load.options(num_returns="streaming").remote(p.fs, batch)
                items = [ray.get(routing.next_item(stream), timeout=WORKER_TIMEOUT_S) for _ in batch]
            except routing.WORKER_GONE as exc:
                items = [("err", exc)] * len(batch)
            with lock:
                for req, item in zip(batch, items):
                    if item[0] == "ok":
                        _, nbytes, tier = item
                        report.bytes += nbytes
                        report.fetched += tier == "store"
                        report.already_cached += tier != "store"
                        report.digests.setdefault(owner, []).append(req.key.digest)
                    else:
                        report.failures.append((req.obj.url, f"{type(item[1]).__name__}: {item[1]}"))
                bar.update(len(batch))
                done = report.fetched + report.already_cached + len(report.failures)
            if on_progress is not None:
                on_progress(done, report.entries)

    _each_at_once(drive, by_owner.items())
    bar.close()
    for owner, digest in p.extra_digests:
        report.digests.setdefault(owner, []).append(digest)
    report.cancelled = cancel.is_set()
    report.seconds = time.perf_counter() - start
    return report


def _each_at_once(fn: Callable[..., None], items: Any) -> None:
    """``fn(*item)`` for every item, each on its own thread (one per worker), all joined."""
    threads = [threading.Thread(target=fn, args=item, daemon=True) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def check_replicas(value: Any) -> Any:
    """None (each page on its owner only), ``"all"`` (every cache node) or a number of nodes
    (its owner counted) >= 1; anything else raises ``ValueError`` saying what is allowed.

    >>> check_replicas("all"), check_replicas(2), check_replicas(None)
    ('all', 2, None)
    """
    if value is None or value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"replicas must be None, 'all' or a number of nodes >= 1, got {value!r}")


def run_replicas(p: Plan, replicas: Any, report: LoadReport, *, progress: Optional[bool] = None,
                 cancel: Optional[threading.Event] = None) -> LoadReport:
    """After :func:`run_load`: copies of the plan's pages on more nodes, each page on the
    first ``replicas`` workers of its rendezvous ranking (its owner first; ``"all"``: every
    worker), so readers there map them from their own node's disk (no call to the owner).

    Every target pulls its copies from the owners at once, by Ray's object transfer, which
    may serve a page from any node that holds it already. Parquet units are not copied
    (``read_parquet`` reads them from their owners, or from copies on their nodes).
    """
    from tqdm.auto import tqdm

    cancel = cancel or threading.Event()
    names = [w.name for w in p.workers]
    want = len(names) if replicas == "all" else min(int(replicas or 1), len(names))
    jobs: Dict[int, Dict[int, List[Any]]] = {}  # target -> owner -> pages
    for req in p.requests:
        if isinstance(req, fetch.PageRequest):
            ranked = hashing.rank(req.key.digest, names)
            for target in ranked[1:want]:
                jobs.setdefault(target, {}).setdefault(ranked[0], []).append(req)
    total = sum(len(reqs) for owners in jobs.values() for reqs in owners.values())
    lock = threading.Lock()
    bar = tqdm(total=total, unit="page", desc="ray_cache replicas",
               disable=not total or not (_interactive() if progress is None else progress))

    def drive(target: int, owners: Dict[int, List[Any]]) -> None:
        handle = p.workers[target].handle
        for owner, reqs in owners.items():
            for i in range(0, len(reqs), BATCH):
                if cancel.is_set():
                    return
                batch = reqs[i : i + BATCH]
                try:
                    copied, nbytes = ray.get(handle.replicate.remote(p.fs, names[owner], batch),
                                             timeout=2 * WORKER_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - reported, the load itself stands
                    with lock:
                        report.failures.extend((r.obj.url, f"replica: {type(exc).__name__}: {exc}")
                                               for r in batch)
                    continue
                with lock:
                    report.replicas += copied
                    report.replica_bytes += nbytes
                    report.digests.setdefault(target, []).extend(r.key.digest for r in batch)
                    bar.update(len(batch))

    _each_at_once(drive, jobs.items())
    bar.close()
    report.cancelled = report.cancelled or cancel.is_set()
    return report


class BackgroundJob:
    """Work running on a daemon thread: ``done``, ``cancel()``, ``wait()`` for its result.

    Subclasses implement :meth:`_work` (which should look at ``self._cancel`` between
    steps) and say what they are in ``_what`` and :attr:`progress`.
    """

    _what = "job"

    def __init__(self, thread_name: str) -> None:
        self._cancel = threading.Event()
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, daemon=True, name=thread_name)

    def _work(self) -> Any:
        raise NotImplementedError

    def _main(self) -> None:
        try:
            self._result = self._work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in wait()
            self._error = exc

    @property
    def progress(self) -> Tuple[int, int]:
        """``(done, total)``."""
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Stop after the steps in flight; what was loaded stays cached."""
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> Any:
        """The result once the job has ended (``TimeoutError`` if not within ``timeout``)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._what} still running after {timeout} s (progress {self.progress})")
        if self._error is not None:
            raise self._error
        return self._result


class LoadJob(BackgroundJob):
    """A load running in the background: ``wait()`` for its report, or ``cancel()`` it.

    Examples
    --------
    >>> job = ray_cache.load("s3://bucket/next-epoch/", background=True)  # doctest: +SKIP
    >>> job.progress  # doctest: +SKIP
    (12, 48)
    >>> job.wait().fetched  # doctest: +SKIP
    48
    """

    _what = "load"

    def __init__(self, work: Callable[[threading.Event, Callable[[int, int], None]], LoadReport]) -> None:
        super().__init__("ray-cache-load")
        self._load = work
        self._progress: Tuple[int, int] = (0, 0)
        self._thread.start()

    def _work(self) -> LoadReport:
        return self._load(self._cancel, self._set_progress)

    def _set_progress(self, done: int, total: int) -> None:
        self._progress = (done, total)

    @property
    def progress(self) -> Tuple[int, int]:
        """``(entries done, entries planned)``."""
        return self._progress

    def wait(self, timeout: Optional[float] = None) -> LoadReport:
        """The report, once the load has ended (``TimeoutError`` if not within ``timeout``)."""
        return super().wait(timeout)


def pin_loaded(report: LoadReport, workers: List[membership.WorkerRef], ttl_s: Optional[float]) -> None:
    """Pin what a load cached; all or nothing: on a capacity error, undo and raise."""
    done: List[Tuple[int, List[str]]] = []
    try:
        for owner, digests in report.digests.items():
            result = ray.get(workers[owner].handle.pin.remote(digests, ttl_s), timeout=120)
            done.append((owner, digests))
            if result["missing"]:
                raise PinCapacityError(
                    f"cannot pin {len(digests)} entries: only {result['pinned']} fit in the cache "
                    f"of node {workers[owner].node_id[:8]} beside what is pinned already; "
                    "nothing of this call was pinned"
                )
    except PinCapacityError:
        for owner, digests in done:
            ray.get(workers[owner].handle.unpin_digests.remote(digests), timeout=120)
        raise


__all__ = ["LoadReport", "BackgroundJob", "LoadJob", "plan", "run_load", "run_replicas", "check_replicas",
           "pin_loaded"]
