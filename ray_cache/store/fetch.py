"""Reading one cache unit straight from the under store: ranges, version check, decode.

Used by a worker on a miss and by a reader that falls back to the store when the
worker that owns the unit is gone, so both produce exactly the same table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from ray_cache.config import UNIT_TARGET_BYTES
from ray_cache.store import conditional, parquet, proofs, underfs, versions
from ray_cache.store.errors import ObjectChangedError
from ray_cache.store.keys import EntryKey, StoreObject


@dataclass(frozen=True)
class UnitRequest:
    """What a reader asks of a worker: one run of row groups of one object version."""

    key: EntryKey
    obj: StoreObject
    footer: bytes
    unit: parquet.Unit
    #: The file's columns to decode (None: all).
    columns: Optional[Tuple[str, ...]]
    #: Hive partition columns appended after decoding, then ordered as ``key.columns``.
    partitions: Tuple[Tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class PageRequest:
    """A fixed-size page ``[start, end)`` of one object version (the fsspec path)."""

    key: EntryKey
    obj: StoreObject
    start: int
    end: int


def page_key(obj: StoreObject, index: int, page_size: int) -> EntryKey:
    """The cache key of page ``index`` of an object, for a given page size."""
    return EntryKey(obj.protocol, obj.path, obj.version, f"page{page_size}", index, index + 1)


def page_request(obj: StoreObject, index: int, page_size: int) -> PageRequest:
    start = index * page_size
    return PageRequest(page_key(obj, index, page_size), obj, start, min(obj.size, start + page_size))


#: Called with (requests, bytes) after each fetch, to count traffic to the store.
Counter = Callable[[int, int], None]


def fetcher(fs: Any, obj: StoreObject, count: Optional[Counter] = None) -> parquet.Fetcher:
    """A :data:`ray_cache.store.parquet.Fetcher` reading ``obj`` through ``fs``."""

    def fetch(ranges: Sequence[Tuple[int, int]]) -> List[bytes]:
        blobs = underfs.read_ranges(fs, obj.path, ranges)
        if count is not None:
            count(len(ranges), sum(len(b) for b in blobs))
        return blobs

    return fetch


class CheckedFetcher:
    """A :data:`ray_cache.store.parquet.Fetcher` of ``obj`` whose bytes are of ``obj.version``
    once :meth:`done` returns: each read is one conditional request where the store can
    make it (:mod:`ray_cache.store.conditional`, S3), else a plain read and, in
    :meth:`done`, one shared version check (:func:`check_version`).
    """

    def __init__(self, fs: Any, obj: StoreObject, count: Optional[Counter] = None) -> None:
        self.fs, self.obj, self.count = fs, obj, count
        self._plain = fetcher(fs, obj, count)
        self._unchecked = False
        self._fetched = False  # a request of ours (with self.fs) returned the object's bytes

    def __call__(self, ranges: Sequence[Tuple[int, int]]) -> List[bytes]:
        blobs = conditional.read_ranges_checked(self.fs, self.obj, ranges)
        if blobs is None:
            self._unchecked = True
            blobs = self._plain(ranges)
        elif self.count is not None:
            self.count(len(ranges), sum(len(b) for b in blobs))
        self._fetched = self._fetched or bool(ranges)
        return blobs

    def done(self) -> None:
        """Raise :class:`ObjectChangedError` unless every read was of the planned version."""
        if self._unchecked:
            check_version(self.fs, self.obj)
        if self._fetched:  # the store gave these credentials its bytes: a proof (store/proofs.py)
            proofs.note(self.fs, [self.obj.path])


def check_version(fs: Any, obj: StoreObject) -> None:
    """Raise :class:`ObjectChangedError` unless the store still reports ``obj.version``.

    Called after fetching: bytes belong to the planned version only if the store still
    reports it, so a rewrite during a read is never cached or returned as the old data.
    Concurrent checks of one object share metadata requests, each answered only by a
    request begun after it was asked (:mod:`ray_cache.store.versions`).
    """
    versions.CHECKS.check(fs, obj)


def footer_key(obj: StoreObject) -> EntryKey:
    """The cache key of an object's footer bytes."""
    return EntryKey(obj.protocol, obj.path, obj.version, "footer")


def read_footer(fs: Any, obj: StoreObject, count: Optional[Counter] = None) -> bytes:
    """Footer bytes of a Parquet object of the planned version."""
    fetch = CheckedFetcher(fs, obj, count)
    footer = parquet.parse_footer(obj.url, obj.size, fetch)
    fetch.done()
    return footer


def read_unit(
    fs: Any,
    req: UnitRequest,
    meta: Optional[pq.FileMetaData] = None,
    count: Optional[Counter] = None,
) -> pa.Table:
    """Fetch and decode one unit of the planned version."""
    obj = req.obj
    if meta is None:
        meta = parquet.read_metadata(obj.url, obj.size, req.footer)
    ranges = parquet.unit_ranges(meta, req.unit, req.columns)
    fetch = CheckedFetcher(fs, obj, count)
    blobs = fetch(ranges)
    fetch.done()
    return decode(req, meta, {start: blob for (start, _end), blob in zip(ranges, blobs)})


def decode(req: UnitRequest, meta: pq.FileMetaData, segments: Dict[int, Any]) -> pa.Table:
    """A unit's table from its column-chunk segments (``{start: bytes}`` of
    :func:`ray_cache.store.parquet.unit_ranges`), wherever they came from."""
    table = parquet.decode_unit(req.obj.size, req.footer, meta, req.unit, req.columns, segments)
    return parquet.with_partitions(table, req.partitions, req.key.columns) if req.partitions else table


def unit_requests(obj: StoreObject, footer: bytes, meta: pq.FileMetaData,
                  parts: Tuple[Tuple[str, ...], ...] = (), key_columns: Optional[Tuple[str, ...]] = None,
                  columns: Optional[Tuple[str, ...]] = None, unit_bytes: int = UNIT_TARGET_BYTES,
                  units: Optional[Sequence[parquet.Unit]] = None) -> List[UnitRequest]:
    """The units of one object as ``read_parquet`` asks for them: the one place their keys
    are made (a reader's plan and a writer's hand-over must agree on them).

    ``parts``: hive partition columns appended after decoding; ``key_columns``: the columns
    asked for, in order (None: all); ``columns``: the file's own columns among them;
    ``units``: those to ask for (default: :func:`ray_cache.store.parquet.plan_units`).
    """
    kind = "rg" if not parts else "rg+hive:" + "\x1f".join(
        p[0] if len(p) == 2 else f"{p[0]}:{p[2]}" for p in parts)
    return [UnitRequest(EntryKey(obj.protocol, obj.path, obj.version, kind, u.start, u.stop, key_columns),
                        obj, footer, u, columns, parts)
            for u in (parquet.plan_units(meta, unit_bytes) if units is None else units)]


def default_partitions(obj: StoreObject, schema: pa.Schema) -> Tuple[Tuple[str, str], ...]:
    """Hive partition columns of ``obj``'s path that ``read_parquet`` adds by default (a file
    column of the same name wins)."""
    return tuple((k, v) for k, v in parquet.hive_partitions(obj.path) if k not in schema.names)


#: Consecutive cold pages of one object are fetched together, one ranged GET per up to this
#: many bytes. AWS's guidance is 8-16 MiB ranges, many in flight; a store with a high price
#: per request (the test bench's server takes ~200 ms for any range of a 256 MB object:
#: 20 MB/s in 4 MiB GETs, 84 in 16 MiB, 205 in 50 MiB) wants fewer, larger ones. 32 MiB
#: parts, two in flight for a sequential reader, serve both.
PART_BYTES = 32 * 1024 * 1024


class PagePart:
    """Consecutive pages of one object version fetched with one read, the first time any
    of them is asked for (thread-safe: the others wait for that read and slice it).

    Examples
    --------
    >>> obj = StoreObject("file", "/tmp/x", 10, "size:10")
    >>> parts = PagePart.group(None, [page_request(obj, i, 4) for i in range(3)], part_bytes=8)
    >>> [[r.start for r in p.reqs] for p in parts]
    [[0, 4], [8]]
    """

    def __init__(self, fs: Any, reqs: Sequence[PageRequest], count: Optional[Counter] = None) -> None:
        self.fs, self.reqs, self.count = fs, list(reqs), count
        self._lock = threading.Lock()
        self._data: Optional[memoryview] = None
        self._error: Optional[BaseException] = None

    @classmethod
    def group(cls, fs: Any, reqs: Sequence[PageRequest], count: Optional[Counter] = None,
              part_bytes: int = PART_BYTES) -> List["PagePart"]:
        """Runs of consecutive pages of one object, at most ``part_bytes`` long, in order."""
        parts: List[List[PageRequest]] = []
        for r in reqs:
            last = parts[-1][-1] if parts else None
            if (last is not None and last.obj == r.obj and last.end == r.start
                    and last.key.kind == r.key.kind and r.end - parts[-1][0].start <= part_bytes):
                parts[-1].append(r)
            else:
                parts.append([r])
        return [cls(fs, p, count) for p in parts]

    def page(self, req: PageRequest) -> memoryview:
        """The bytes of ``req`` (one of this part's pages), fetching the part if needed."""
        with self._lock:
            data = self._read()
            base = self.reqs[0].start
            return data[req.start - base:req.end - base]

    def fetch(self) -> None:
        """Read the part now, ahead of its pages (nothing if read already; a failure is kept
        for its pages to raise), so the link stays busy while earlier parts are served."""
        with self._lock:
            try:
                self._read()
            except Exception:  # noqa: BLE001 - kept in self._error, raised by page()
                pass

    def _read(self) -> memoryview:
        # Under self._lock: the part's one read.
        if self._error is not None:
            raise self._error  # the part's one read failed: every page of it fails alike
        if self._data is None:
            first = self.reqs[0]
            whole = PageRequest(first.key, first.obj, first.start, self.reqs[-1].end)
            try:
                self._data = memoryview(read_page(self.fs, whole, self.count))
            except Exception as exc:
                self._error = exc
                raise
        return self._data


def read_page(fs: Any, req: PageRequest, count: Optional[Counter] = None) -> bytes:
    """Fetch one page of the planned version."""
    if req.end <= req.start:
        return b""
    fetch = CheckedFetcher(fs, req.obj, count)
    (data,) = fetch([(req.start, req.end)])
    if len(data) != req.end - req.start:
        raise ObjectChangedError(
            f"{req.obj.url}: expected {req.end - req.start} bytes at {req.start}, got {len(data)}"
        )
    fetch.done()
    return data
