"""Who may be served what: cached objects go only to readers whose own credentials may read them.

The cache workers hold one copy of an object for every reader, so the right to read is
checked against the store with the *reader's* filesystem (its credentials), never the
cache's: cached bytes carry no rights of their own. The model:

- every read lists or HEADs its objects with the reader's filesystem at planning (so a
  reader with no rights gets ``PermissionError`` before any cached byte is served);
- a listing proves the right to list, not to read (S3's ``s3:ListBucket`` without
  ``s3:GetObject``, a ``Deny`` on a prefix): an object known only from a listing is
  proven readable by a metadata request (HEAD) with the reader's filesystem, which the
  stores authorize as a read (S3 HeadObject needs ``s3:GetObject``; GCS and Azure the
  object's read permission). Local files: ``os.access(path, R_OK)``;
- a proof holds for :data:`ACCESS_TTL_S` seconds per filesystem instance (one set of
  credentials) in the process that made it; a revoked right is noticed within that time.
  Proofs live in memory only: never in a file, a log or a key.

Examples
--------
>>> import fsspec, os, tempfile
>>> fs = fsspec.filesystem("file")
>>> path = os.path.join(tempfile.mkdtemp(), "x")
>>> open(path, "wb").close()
>>> rights = ReadRights(ttl_s=60)
>>> rights.require(fs, [path])  # checked once ...
1
>>> rights.require(fs, [path])  # ... then proven for ttl_s
0
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from ray_cache.store import underfs
from ray_cache.store.errors import raise_translated
from ray_cache.store.keys import StoreObject

#: Seconds a reader's proven right to read an object is trusted in one process.
ACCESS_TTL_S = 300.0
#: Metadata requests in flight at once while proving rights.
PARALLEL_CHECKS = 16


def is_local(fs: Any) -> bool:
    """Whether ``fs`` reads local files (rights: the OS's, checked with ``os.access``)."""
    protocol = getattr(fs, "protocol", "")
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return bool({"file", "local"} & set(protocols))


class ReadRights:
    """Per filesystem instance, the object paths its credentials were allowed to read, and when."""

    def __init__(self, ttl_s: float = ACCESS_TTL_S) -> None:
        self.ttl_s = float(ttl_s)
        self._lock = threading.Lock()
        self._proven: "weakref.WeakKeyDictionary[Any, Dict[str, float]]" = weakref.WeakKeyDictionary()

    def _book(self, fs: Any) -> Dict[str, float]:
        try:
            return self._proven.setdefault(fs, {})
        except TypeError:  # not weak-referenceable: nothing is remembered for it
            return {}

    def note(self, fs: Any, paths: Sequence[str]) -> None:
        """Record that ``fs`` was just allowed to read ``paths`` (a HEAD or a GET succeeded)."""
        now = time.monotonic()
        with self._lock:
            book = self._book(fs)
            for p in paths:
                book[p] = now

    def note_head(self, fs: Any, paths: Sequence[str]) -> None:
        """Record that a HEAD of ``paths`` with ``fs`` just passed: a proof on a store, none for
        local files (a ``stat`` needs no right to read)."""
        if not is_local(fs):
            self.note(fs, paths)

    def require(self, fs: Any, paths: Sequence[str]) -> int:
        """Prove ``fs`` may read each of ``paths`` not proven within ``ttl_s``; raises
        ``PermissionError`` (or ``FileNotFoundError``) naming the first path refused.
        Returns how many were checked with the store."""
        now = time.monotonic()
        with self._lock:
            book = self._book(fs)
            todo = [p for p in dict.fromkeys(paths) if now - book.get(p, -1e18) > self.ttl_s]
        if not todo:
            return 0
        if is_local(fs):
            for p in todo:
                if not os.access(p, os.R_OK):
                    raise PermissionError(13, "Permission denied", p)
        else:
            def head(path: str) -> None:
                underfs.refresh(fs, path)  # a listing's cached entry must not stand in for the HEAD
                try:
                    underfs.bounded_call(fs, "info", path)
                except Exception as exc:  # noqa: BLE001 - translated: PermissionError, FileNotFoundError
                    raise_translated(exc, path)

            with ThreadPoolExecutor(max_workers=min(PARALLEL_CHECKS, len(todo))) as pool:
                for _ in pool.map(head, todo):
                    pass
        self.note(fs, todo)
        return len(todo)


#: This process's proofs, shared by every reader in it.
RIGHTS = ReadRights()


def list_readable(fs: Any, paths: Iterable[str], suffixes: Tuple[str, ...] = (),
                  keep: Optional[Callable[[List[StoreObject]], List[StoreObject]]] = None,
                  missing_ok: bool = False, skip: FrozenSet[str] = frozenset()) -> List[StoreObject]:
    """:func:`ray_cache.store.underfs.list_objects`, narrowed by ``keep``, each object then
    proven readable with ``fs`` (:data:`RIGHTS`): what every reader plans from."""
    headed: List[str] = []
    objects = underfs.list_objects(fs, paths, suffixes, headed=headed, missing_ok=missing_ok, skip=skip)
    RIGHTS.note_head(fs, headed)
    if keep is not None:
        objects = keep(objects)
    RIGHTS.require(fs, [o.path for o in objects])
    return objects
