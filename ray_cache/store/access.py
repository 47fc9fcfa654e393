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

from ray_cache.store import proofs, underfs
from ray_cache.store.errors import raise_translated
from ray_cache.store.keys import StoreObject
from ray_cache.store.proofs import is_local

#: Seconds a reader's proven right to read an object is trusted in one process.
ACCESS_TTL_S = 300.0
#: Metadata requests in flight at once while proving rights.
PARALLEL_CHECKS = 16


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
        proofs.note(fs, paths)  # and for this node's other readers (store/proofs.py)

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
        refused = _check(fs, todo)
        if refused:
            raise next(refused[p] for p in todo if p in refused)
        self.note(fs, todo)
        return len(todo)


#: This process's proofs, shared by every reader in it.
RIGHTS = ReadRights()


def _head(fs: Any, path: str) -> None:
    """A metadata request for ``path`` with ``fs``: the store authorizes it as a read."""
    # A listing's cached entry must not stand in for the HEAD: neither the path's own nor
    # its parent's (adlfs answers ``info`` from a cached listing of the parent).
    underfs.refresh(fs, path)
    if "/" in path:
        underfs.refresh(fs, path.rsplit("/", 1)[0])
    try:
        info = underfs.bounded_call(fs, "info", path)
    except Exception as exc:  # noqa: BLE001 - translated: PermissionError, FileNotFoundError
        raise_translated(exc, path)
    if info.get("type") != "file":  # keys under it, but no object of that name
        raise FileNotFoundError(2, "No such object", path)


def refused_on_node(fs: Any, paths: Sequence[str]) -> Dict[str, BaseException]:
    """Prove ``fs`` may read each of ``paths`` with the proofs this node's processes recorded
    (:mod:`ray_cache.store.proofs`: a GET or HEAD with the same credentials within
    ``PROOF_TTL_S``), a HEAD for each path without one; returns the refusals by path
    (``PermissionError``, ``FileNotFoundError``), empty when every path may be read.
    Local files: ``os.access``.

    Examples
    --------
    >>> import fsspec, tempfile
    >>> fs = fsspec.filesystem("file")
    >>> refused_on_node(fs, [os.path.join(tempfile.mkdtemp(), "missing")])  # doctest: +ELLIPSIS
    {...: FileNotFoundError(2, 'No such file or directory')}
    """
    if is_local(fs):
        return _check(fs, list(dict.fromkeys(paths)))
    book = proofs.book_for(fs)
    todo = [p for p in dict.fromkeys(paths) if not book.proven(p)]
    if not todo:  # the warm path: every path proven on this node
        return {}
    refused = _check(fs, todo)
    RIGHTS.note(fs, [p for p in todo if p not in refused])
    return refused


def _check(fs: Any, paths: Sequence[str]) -> Dict[str, BaseException]:
    """Ask whether ``fs`` may read each of ``paths`` now (local files: ``os.access``; a store:
    a HEAD each, :data:`PARALLEL_CHECKS` at a time); the refusals by path."""
    out: Dict[str, BaseException] = {}
    if is_local(fs):
        for p in paths:
            if not os.access(p, os.R_OK):
                out[p] = (PermissionError(13, "Permission denied", p) if os.path.exists(p)
                          else FileNotFoundError(2, "No such file or directory", p))
        return out
    if not paths:
        return out

    def head(path: str) -> Optional[BaseException]:
        try:
            _head(fs, path)
        except Exception as exc:  # noqa: BLE001 - reported per path
            return exc
        return None

    with ThreadPoolExecutor(max_workers=min(PARALLEL_CHECKS, len(paths))) as pool:
        for path, exc in zip(paths, pool.map(head, paths)):
            if exc is not None:
                out[path] = exc
    return out


def list_readable(fs: Any, paths: Iterable[str], suffixes: Tuple[str, ...] = (),
                  keep: Optional[Callable[[List[StoreObject]], List[StoreObject]]] = None,
                  missing_ok: bool = False, skip: FrozenSet[str] = frozenset(),
                  folders: FrozenSet[str] = frozenset()) -> List[StoreObject]:
    """:func:`ray_cache.store.underfs.list_objects`, narrowed by ``keep``, each object then
    proven readable with ``fs`` (:data:`RIGHTS`): what every reader plans from."""
    headed: List[str] = []
    objects = underfs.list_objects(fs, paths, suffixes, headed=headed, missing_ok=missing_ok, skip=skip,
                                   folders=folders)
    RIGHTS.note_head(fs, headed)
    if keep is not None:
        objects = keep(objects)
    RIGHTS.require(fs, [o.path for o in objects])
    return objects
