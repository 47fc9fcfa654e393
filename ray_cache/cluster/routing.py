"""Routing reads to the workers that own their keys, and falling back when one is gone.

For each key the owner is chosen by rendezvous hashing over the live workers' names, the
same in every process. Requests to one owner go in one streaming call, answered in order
while later misses are still being fetched. If the owner dies or stops answering, or
the object store has no room for its answer (full, nowhere to spill), the reader fetches
the unit from the store itself, counts that fallback (reported to a
surviving worker so ``stats()`` shows it) and logs it once per worker: never a hang, never
a wrong row, never silent.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import ray
from ray.exceptions import (
    ActorUnschedulableError,
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    ObjectStoreFullError,
    OutOfDiskError,
    RayActorError,
    WorkerCrashedError,
)

from ray_cache.node.calls import next_item
from ray_cache.store import fetch
from ray_cache.cluster import forks, hashing
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.store.errors import CacheError
from ray_cache.store.fetch import UnitRequest
from ray_cache.store.keys import StoreObject

log = logging.getLogger("ray_cache.cluster.routing")

#: Failures that mean "this worker (or the node under it) is gone", not "bad input".
#: (``OwnerDiedError`` is an ``ObjectLostError``: the cached object's owner, the worker, died.)
WORKER_GONE = (
    RayActorError,
    ActorUnschedulableError,
    ObjectLostError,
    NodeDiedError,
    WorkerCrashedError,
    GetTimeoutError,
)
#: Failures that mean "the object store has no room for this answer now" (full, and no
#: disk to spill to): the data is fine, the cache cannot carry it; readers go to the store.
CACHE_FULL = (ObjectStoreFullError, OutOfDiskError)
_warned: set = set()
#: How long a reader waits for a surviving worker to count its fallback.
REPORT_TIMEOUT_S = 5.0


def warn_once(name: str, exc: BaseException) -> None:
    if name not in _warned:
        _warned.add(name)
        log.warning(
            "ray_cache: worker %s unavailable (%s); reading its keys from the store",
            name,
            type(exc).__name__,
        )


def report_fallback(workers: Sequence[WorkerRef], dead: str, units: int, nbytes: int) -> None:
    """Count a fallback at a surviving worker, and wait (briefly) until it is counted.

    Waiting makes ``stats()`` read after the read returns include it; the degraded path
    already paid a store round trip, so one more actor round trip is small. The report is
    best effort: if no worker answers within ``REPORT_TIMEOUT_S`` the log line still shows it.
    """
    # Prefer a surviving worker; the "dead" one last, since Ray may have restarted it.
    for w in sorted(workers, key=lambda w: w.name == dead):
        try:
            ray.get(w.handle.note_fallback.remote(units, nbytes), timeout=REPORT_TIMEOUT_S)
            return
        except GetTimeoutError:
            return  # it may still arrive; sending it elsewhere could count it twice
        except Exception:  # noqa: BLE001 - this one is gone too; try the next
            continue


def footers(fs: Any, objects: Sequence[StoreObject], workers: Sequence[WorkerRef]) -> List[bytes]:
    """Footer bytes for each object, through the owning workers (store on fallback)."""
    names = [w.name for w in workers]
    by_owner = hashing.group([fetch.footer_key(obj).digest for obj in objects], names)
    calls = {
        o: workers[o].handle.footers.remote(fs, [objects[i] for i in idx])
        for o, idx in by_owner.items()
    }
    out: List[Optional[bytes]] = [None] * len(objects)
    for o, idx in by_owner.items():
        try:
            results = ray.get(calls[o], timeout=WORKER_TIMEOUT_S)
        except WORKER_GONE as exc:
            warn_once(workers[o].name, exc)
            results = [_direct_footer(fs, objects[i]) for i in idx]
            report_fallback(workers, workers[o].name, len(idx), 0)
        for i, res in zip(idx, results):
            if isinstance(res, BaseException):
                raise res
            out[i] = res
    return out  # type: ignore[return-value]


def _direct_footer(fs: Any, obj: StoreObject) -> Any:
    try:
        return fetch.read_footer(fs, obj)
    except Exception as exc:  # noqa: BLE001 - raised by the caller, like a worker's answer
        return exc


#: What :func:`ask_owners` yields for a request: ``(owner index, answer)``, where the
#: answer is ``ray.get`` of the worker's item (the object it points to is still to be got)
#: or the ``WORKER_GONE`` exception that ended that owner's stream.
Answer = Tuple[int, Any]


def ask_owners(
    fs: Any,
    requests: Sequence[Any],
    workers: Sequence[WorkerRef],
    gone: Optional[Dict[int, BaseException]] = None,
) -> Iterator[Answer]:
    """One streaming ``get_many`` call per owning worker; answers yielded in request order.

    The shared routing step of Parquet read tasks (:func:`read_units`) and page reads
    (:mod:`ray_cache.files.pages`). Once an owner is in ``gone`` (its stream failed here, or the
    caller failed to get an object it pointed to and added it), every later request it
    owned gets that exception at once, so no reader waits on a dead worker twice.
    """
    gone = {} if gone is None else gone
    owners, _batches, streams = _open_streams(fs, requests, workers, gone)
    for o in owners:
        if o not in gone:
            try:
                yield o, _next_answer(streams[o])
                continue
            except WORKER_GONE as exc:
                gone[o] = exc
        yield o, gone[o]


def _open_streams(fs: Any, requests: Sequence[Any], workers: Sequence[WorkerRef],
                  gone: Dict[int, BaseException], as_ready: bool = False
                  ) -> Tuple[List[int], Dict[int, List[int]], Dict[int, Any]]:
    """Each request's owner, each owner's request indices, and one streaming ``get_many``
    call per owner (an owner that cannot be called goes into ``gone``)."""
    names = [w.name for w in workers]
    owners = [hashing.owner(r.key.digest, names) for r in requests]
    batches: Dict[int, List[int]] = {}
    for i, o in enumerate(owners):
        batches.setdefault(o, []).append(i)
    streams: Dict[int, Any] = {}
    for o, idx in sorted(batches.items()):
        try:
            streams[o] = workers[o].handle.get_many.options(num_returns="streaming").remote(
                fs, [requests[i] for i in idx], **({"as_ready": True} if as_ready else {}))
        except WORKER_GONE as exc:
            gone[o] = exc
    return owners, batches, streams


def _next_answer(stream: Any) -> Any:
    """``ray.get`` of a stream's next item; a ``WORKER_GONE`` error if the worker is gone,
    did not answer in ``WORKER_TIMEOUT_S``, or ended its stream early."""
    try:
        return ray.get(next_item(stream), timeout=WORKER_TIMEOUT_S)
    except StopIteration:
        raise RayActorError("the worker's stream ended early") from None


def ask_owners_as_ready(
    fs: Any,
    requests: Sequence[Any],
    workers: Sequence[WorkerRef],
    handle: Callable[[int, int, Any], None],
    gone: Optional[Dict[int, BaseException]] = None,
) -> None:
    """:func:`ask_owners` for a reader that needs every answer and no order: each owner
    streams its answers as they are ready, and ``handle(request index, owner index,
    answer)`` runs for each at once, one thread per owner (this one takes the first), so
    no answer waits behind a slower one. Returns once every request has been handled.

    ``handle`` may add an owner to ``gone`` (it failed to get an object that owner pointed
    to): that owner's later requests are handled with the exception, without waiting.
    ``handle`` must not wait on this pool (it must not read pages itself).
    A whole-file read of pages owned across N nodes is where order costs: answered in
    order, a reader took its first page only once the slowest of the first parts was in,
    and pulled the rest of the file to its node after the store had sent it all.
    """
    gone = {} if gone is None else gone
    _owners, batches, streams = _open_streams(fs, requests, workers, gone, as_ready=True)

    def drain(o: int) -> None:
        idx, seen = batches[o], [False] * len(batches[o])
        left = len(idx)
        while left and o not in gone:
            try:
                j, answer = _next_answer(streams[o])
            except WORKER_GONE as exc:
                gone[o] = exc
                break
            if not seen[j]:
                seen[j], left = True, left - 1
                handle(idx[j], o, answer)
        for j, was in enumerate(seen):
            if not was:
                handle(idx[j], o, gone[o])

    owners = sorted(batches)
    others = [_OWNER_THREADS.pool().submit(drain, o) for o in owners[1:]]
    try:
        if owners:
            drain(owners[0])
    finally:  # every drain has ended before this returns or raises: none writes after
        futures.wait(others)
    for fut in others:
        fut.result()


#: Threads that drain owners' streams for :func:`ask_owners_as_ready`.
_OWNER_THREADS = forks.ProcessThreads(16, "ray-cache-owner")


def read_units(
    fs: Any, requests: Sequence[UnitRequest], workers: Sequence[WorkerRef]
) -> Iterator[pa.Table]:
    """Yield the table of each request, in order, through the owning workers.

    Bytes served are counted per owner as node-local or remote (this reader runs on
    another node than the owner) and reported to the owner when the task ends.
    """
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node to compare
        here = None
    served: Dict[int, List[int]] = {}
    dead: Dict[int, BaseException] = {}
    answers = ask_owners(fs, requests, workers, dead) if workers else ((-1, None) for _ in requests)
    for req, (o, answer) in zip(requests, answers):
        table = None
        if o >= 0:
            try:
                if isinstance(answer, BaseException):
                    raise answer
                if answer[0] == "err":
                    raise answer[1]
                table = ray.get(answer[1][0], timeout=WORKER_TIMEOUT_S)
                tally = served.setdefault(o, [0, 0])
                tally[0 if workers[o].node_id == here else 1] += table.nbytes
            except WORKER_GONE as exc:
                dead[o] = exc
                warn_once(workers[o].name, exc)
            except CACHE_FULL:  # the owner's answer had no room: the store's, as for a fallback
                pass
        if table is None:
            table = fetch.read_unit(fs, req)
            if o >= 0:
                report_fallback(workers, workers[o].name, 1, table.nbytes)
        yield table
    for o, (local, remote) in served.items():
        if o not in dead:
            try:
                workers[o].handle.note_served.remote(local, remote)
            except Exception:  # noqa: BLE001 - counters are best effort, reads are not
                pass


__all__ = ["read_units", "ask_owners", "footers", "next_item", "warn_once", "report_fallback", "WORKER_GONE", "CACHE_FULL",
           "CacheError"]
