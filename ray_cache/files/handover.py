"""Handing a written file to the cache workers: its pages, and for Parquet its units.

Called by :mod:`ray_cache.files.write` once the store has accepted a file and its version
is proven. Every entry goes to the worker that owns its key (rendezvous hashing, as for
reads). The pages' objects are the calls' own arguments, so Ray moves them to the owner
before the call runs; the owner claims each entry before answering (a reader asking from
then on waits for it) and copies it into its tiers in the background. Once the calls
return, this process may exit without losing any of it.

**Parquet** (a file that begins and ends with ``PAR1``, every page spooled): besides its
pages, its footer and its decoded units are handed over exactly as ``read_parquet`` with
default arguments will ask for them (:func:`ray_cache.store.fetch.unit_requests`: the same
keys, hive partition columns included), so a pipeline's next stage (Ray Data, Spark,
pandas writing Parquet through ``raycache``, then a training job reading it) sends no data
request. Each unit's owner decodes it from the pages it spans, so no writer decodes and
the decoding is spread like the units. A read with other arguments (``columns=``...) has
other keys: it reads the pages' bytes from the store.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import ray

from ray_cache.cluster import hashing
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.store import fetch, parquet
from ray_cache.store.errors import NotParquetError
from ray_cache.store.keys import StoreObject

log = logging.getLogger("ray_cache.files.handover")

MAGIC = b"PAR1"


def hand_over(obj: StoreObject, refs: List[ray.ObjectRef], page_size: int, workers: Sequence[WorkerRef],
              parquet_like: bool) -> Dict[str, int]:
    """Give each page (and, for Parquet, each unit and the footer) to its owner; returns
    how many ``pages`` and ``units`` were claimed. Waits for the claims, not the copies."""
    names = [w.name for w in workers]
    reqs = [fetch.page_request(obj, i, page_size) for i in range(len(refs))]
    calls: List[Tuple[str, Any]] = []
    for o, idx in hashing.group([r.key.digest for r in reqs], names).items():
        calls.append(("pages", workers[o].handle.adopt_pages.remote(
            [reqs[i] for i in idx], *[refs[i] for i in idx])))
    if parquet_like and len(refs) * page_size >= obj.size:
        try:
            calls.extend(("units", c) for c in _parquet_calls(obj, refs, page_size, workers, names))
        except NotParquetError as exc:  # PAR1 at both ends is not proof: the pages still count
            log.debug("ray_cache: %s: no units handed over (%s)", obj.url, exc)
    counts = {"pages": 0, "units": 0}
    for what, n in zip([w for w, _ in calls], ray.get([c for _, c in calls], timeout=2 * WORKER_TIMEOUT_S)):
        counts[what] += n
    return counts


#: Bytes per argument of :func:`hand_over_bytes`: below Ray's 100 KiB limit for arguments
#: sent inside the task itself (``max_direct_call_object_size``), not through the object store.
INLINE_CHUNK = 96 * 1024


def hand_over_bytes(obj: StoreObject, data: bytes, page_size: int, workers: Sequence[WorkerRef]) -> Dict[str, int]:
    """Give a small file's one page (``data``: the whole file) to its owner inside the call
    (chunks of :data:`INLINE_CHUNK`, each sent with the task, none put in the object store);
    returns how many ``pages`` were claimed (0 for an empty file, or one the owner already
    holds) once the owner has answered, as :func:`hand_over` does."""
    if not data:
        return {"pages": 0, "units": 0}
    if len(data) > page_size:
        raise ValueError(f"{len(data)} bytes are more than one page ({page_size})")
    req = fetch.page_request(obj, 0, page_size)
    owner = workers[hashing.owner(req.key.digest, [w.name for w in workers])]
    chunks = [data[i:i + INLINE_CHUNK] for i in range(0, len(data), INLINE_CHUNK)]
    n = ray.get(owner.handle.adopt_page_bytes.remote(req, *chunks), timeout=2 * WORKER_TIMEOUT_S)
    return {"pages": n, "units": 0}


def _parquet_calls(obj: StoreObject, refs: List[ray.ObjectRef], page_size: int,
                   workers: Sequence[WorkerRef], names: List[str]) -> List[Any]:
    read = _page_fetcher(refs, page_size)
    footer = parquet.parse_footer(obj.url, obj.size, read)  # the same bytes a store read gives
    meta = parquet.read_metadata(obj.url, obj.size, footer)
    units = fetch.unit_requests(obj, footer, meta, fetch.default_partitions(obj, meta.schema.to_arrow_schema()))
    by_owner: Dict[int, List[int]] = hashing.group([u.key.digest for u in units], names)
    footer_owner = hashing.owner(fetch.footer_key(obj).digest, names)
    by_owner.setdefault(footer_owner, [])
    calls = []
    for o, idx in by_owner.items():
        spans = []
        for i in idx:
            ranges = parquet.unit_ranges(meta, units[i].unit, units[i].columns)
            spans.append(sorted({p for s, e in ranges for p in range(s // page_size, (e - 1) // page_size + 1)}))
        page_ids = sorted({p for span in spans for p in span})
        calls.append(workers[o].handle.adopt_parquet.remote(
            obj, footer if o == footer_owner else None, [units[i] for i in idx], spans, page_ids, page_size,
            *[refs[p] for p in page_ids]))
    return calls


def _page_fetcher(refs: List[ray.ObjectRef], page_size: int) -> parquet.Fetcher:
    """A :data:`ray_cache.store.parquet.Fetcher` reading the spooled pages (this node)."""
    views: Dict[int, memoryview] = {}

    def view(i: int) -> memoryview:
        if i not in views:
            views[i] = memoryview(ray.get(refs[i], timeout=WORKER_TIMEOUT_S))
        return views[i]

    def read(ranges: Sequence[Tuple[int, int]]) -> List[bytes]:
        return [b"".join(bytes(view(i)[max(s - i * page_size, 0):min(e - i * page_size, page_size)])
                         for i in range(s // page_size, (e - 1) // page_size + 1)) for s, e in ranges]

    return read
