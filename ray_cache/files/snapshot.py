"""A ``raycache`` filesystem bound to one listing of a prefix: no store request per open.

A warm read of the plain ``raycache`` filesystem still asks the store which version an
object is (``info``, one HEAD per file once ``metadata_ttl`` has passed). An epoch over a
million small files would cost a million HEADs. :class:`SnapshotFileSystem` lists a prefix
once (an S3 LIST returns the ETag and size of up to 1,000 keys; GCS and Azure likewise) and
answers every later ``open``, ``cat``, ``info``, ``ls``, ``find`` and ``glob`` from that
listing, so a warm epoch sends no store request at all, and a cold one one GET per file.
``read_parquet`` already does the same for its datasets.

Consistency, precisely
----------------------
- A read of a listed object reads the version the listing reported, whole: bytes of two
  versions are never mixed (pages are keyed by version, and every page fetched from the
  store is checked against it).
- An object **rewritten** after the snapshot: pages of the listed version that are cached are
  served (that version, complete). If a page has to be fetched, the store no longer has that
  version: ``cat_file``/``cat``/``cat_ranges`` look at the object again (one HEAD), record its
  new version in this snapshot and read that version whole; a file already open raises
  :class:`ray_cache.ObjectChangedError`, as the plain filesystem does.
- An object **deleted** after the snapshot: cached pages are served as above to a reader
  whose right to it is proven on the node (see Rights); a fetch, or a reader who must
  prove it now, gets ``FileNotFoundError``.
- An object **added** after the snapshot is not seen (``FileNotFoundError``) until a refresh.
- :meth:`SnapshotFileSystem.refresh` lists again and swaps the listing at once: every read
  that starts after it returns uses the new versions, so **no old version is read once a
  refresh has seen the new one**. Files opened before it keep the version they opened.
- ``refresh_every=S``: a read that starts ``S`` seconds or more after the listing was taken
  starts a refresh in the background and goes on with the current listing (reads never wait
  for it); the refreshed listing is used as soon as it is complete.

Rights: the listing is taken with the reader's own credentials, and one object of it is
HEADed with them (a right to list is not a right to read: a reader who may list the prefix
but not read it gets ``PermissionError`` when the snapshot is taken or refreshed). Each
object read is then proven readable by *these* credentials before any of its bytes are
returned, without a request per file on a warm epoch: the GET that fetched it cold (by a
cache worker with the reader's filesystem, or by the reader) or a HEAD records a proof on
the node (:mod:`ray_cache.store.proofs`) that every process with the same credentials uses
for ``PROOF_TTL_S`` (a day). An object no proof covers costs one HEAD, so a ``Deny`` on
single objects is seen warm or cold (``PermissionError``), and another user's first warm
epoch costs a HEAD per file, once a day per node.

The snapshot is read-only (writing through it raises ``io.UnsupportedOperation``; write
through a :class:`ray_cache.files.fs.CacheFileSystem` and refresh). It pickles with its
listing, so DataLoader workers (forked or spawned), Ray tasks and Spark executors read the
same versions without listing again.
"""

from __future__ import annotations

import bisect
import io
import logging
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

from fsspec.utils import tokenize

from ray_cache.files import pages
from ray_cache.files.fs import CacheFileSystem, _ray_address
from ray_cache.store import access
from ray_cache.store.keys import StoreObject
from ray_cache.store.underfs import resolve_filesystem, version_of

log = logging.getLogger("ray_cache.snapshot")

#: One listed object: (size, version).
Entry = Tuple[int, str]


class Listing:
    """The files under one prefix with their sizes and versions, sorted by path.

    Examples
    --------
    >>> lst = Listing("b/p", {"b/p/a/1": (3, "etag:x/3"), "b/p/b": (1, "etag:y/1")}, 0.0)
    >>> lst.get("b/p/b"), lst.is_dir("b/p/a"), lst.children("b/p")
    ((1, 'etag:y/1'), True, (['b/p/b'], ['b/p/a']))
    """

    def __init__(self, prefix: str, entries: Dict[str, Entry], taken_at: float) -> None:
        self.prefix, self.taken_at = prefix, taken_at
        self.entries = entries
        self.paths = sorted(entries)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, path: str) -> Optional[Entry]:
        return self.entries.get(path)

    def set(self, path: str, entry: Optional[Entry]) -> None:
        """Record what the store reported for one object since (None: it is gone)."""
        if entry is None:
            if self.entries.pop(path, None) is not None:
                self.paths.remove(path)
        else:
            if path not in self.entries:
                bisect.insort(self.paths, path)
            self.entries[path] = entry

    def under(self, path: str) -> List[str]:
        """Listed files strictly below directory ``path``."""
        root = path.rstrip("/") + "/"
        lo = bisect.bisect_left(self.paths, root)
        hi = bisect.bisect_left(self.paths, root[:-1] + "0")  # "0" sorts right after "/"
        return self.paths[lo:hi]

    def is_dir(self, path: str) -> bool:
        return bool(path) and path not in self.entries and bool(self.under(path))

    def children(self, path: str) -> Tuple[List[str], List[str]]:
        """(files, directories) directly in ``path``."""
        root = path.rstrip("/") + "/"
        files, dirs = [], []
        for p in self.under(path):
            rest = p[len(root):]
            if "/" in rest:
                d = root + rest.split("/", 1)[0]
                if not dirs or dirs[-1] != d:
                    dirs.append(d)
            else:
                files.append(p)
        return files, sorted(set(dirs))


class SnapshotFileSystem(CacheFileSystem):
    """A read-only ``raycache`` filesystem answering from one listing of ``prefix``.

    Build it with :func:`snapshot` (or directly, with the same arguments as
    :class:`ray_cache.files.fs.CacheFileSystem` plus ``prefix``). See the module docstring for
    what a reader sees when objects change.

    Parameters
    ----------
    prefix : str
        The directory or prefix to list (``"bucket/train"``, ``"s3://bucket/train/"``).
    refresh_every : float, optional
        Seconds after which a read starts a background refresh (default: never; call
        :meth:`refresh`).

    Examples
    --------
    >>> snap = SnapshotFileSystem("bucket/train", fs=s3fs_instance)  # doctest: +SKIP
    >>> len(snap), snap.find("bucket/train")[:1]  # doctest: +SKIP
    (1281167, ['bucket/train/n01440764/n01440764_10026.JPEG'])
    >>> data = snap.cat_file("bucket/train/n01440764/n01440764_10026.JPEG")  # doctest: +SKIP
    """

    cachable = False  # each snapshot is its own listing
    _strip_tokenize_options = ("fo", "listing", "snapshot_id")

    def __init__(self, prefix: str, *args: Any, refresh_every: Optional[float] = None,
                 snapshot_id: Optional[str] = None, listing: Optional[Listing] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(
                refresh_every, (int, float)) or refresh_every <= 0):
            raise ValueError(f"refresh_every must be a positive number of seconds or None, "
                             f"got {refresh_every!r}")
        self.prefix = self._strip_protocol(prefix).rstrip("/")
        self.refresh_every = None if refresh_every is None else float(refresh_every)
        self.snapshot_id = snapshot_id or uuid.uuid4().hex
        self._refreshing: Optional[threading.Thread] = None
        self._next_refresh = 0.0
        self._snap_lock = threading.Lock()
        self._listing = listing if listing is not None else self._take()

    @property
    def _fs_token(self) -> str:  # equal only to itself and its pickled copies
        return tokenize(type(self).__name__, self.snapshot_id)

    # -- the listing ---------------------------------------------------------------------
    def _take(self) -> Listing:
        taken_at = time.time()
        found = self._ask("find", self.prefix, withdirs=False, detail=True)
        entries = {self.target._strip_protocol(name): (int(info.get("size") or 0), version_of(info))
                   for name, info in found.items() if info.get("type") == "file"}
        if not entries:
            raise FileNotFoundError(2, "No objects under this prefix", self.prefix)
        # A right to list is not a right to read: one object of the listing is proven
        # readable with these credentials (a HEAD), so a reader who may only list the prefix
        # is refused here; each object read is proven before it is served (_refused).
        access.RIGHTS.require(self.target, [min(entries)])
        return Listing(self.prefix, entries, taken_at)

    def __len__(self) -> int:
        return len(self._listing)

    @property
    def taken_at(self) -> float:
        """When the current listing was taken (seconds since the epoch)."""
        return self._listing.taken_at

    def refresh(self) -> Dict[str, int]:
        """List the prefix again and use the new listing from now on.

        Returns how many objects were ``added``, ``changed`` and ``removed``.

        Examples
        --------
        >>> snap.refresh()  # doctest: +SKIP
        {'added': 3, 'changed': 1, 'removed': 0, 'files': 1003}
        """
        old, new = self._listing, self._take()
        self._listing = new
        added = sum(1 for p in new.entries if p not in old.entries)
        changed = sum(1 for p, e in new.entries.items() if p in old.entries and old.entries[p] != e)
        removed = sum(1 for p in old.entries if p not in new.entries)
        return {"added": added, "changed": changed, "removed": removed, "files": len(new)}

    def _current(self) -> Listing:
        listing = self._listing
        if self.refresh_every is not None:
            now = time.time()
            if now - listing.taken_at >= self.refresh_every and now >= self._next_refresh:
                self._refresh_soon(now)
        return listing

    def _refresh_soon(self, now: float) -> None:
        with self._snap_lock:
            if self._refreshing is not None and self._refreshing.is_alive():
                return
            assert self.refresh_every is not None
            self._next_refresh = now + self.refresh_every  # a failing store is retried this often
            self._refreshing = threading.Thread(target=self._refresh_quietly, daemon=True,
                                                name="ray_cache-snapshot-refresh")
            self._refreshing.start()

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - the current listing stays in use
            log.warning("ray_cache: refreshing the snapshot of %s failed (%s); reads go on "
                        "with the listing of %s", self.prefix, exc, time.ctime(self.taken_at))

    # -- metadata from the listing --------------------------------------------------------
    def _missing(self, path: str) -> FileNotFoundError:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken_at))
        inside = path == self.prefix or path.startswith(self.prefix + "/")
        why = (f"not in the snapshot of {self.prefix} taken at {taken} (refresh() to see "
               "objects added since)" if inside else f"outside the snapshot's prefix {self.prefix}")
        return FileNotFoundError(2, why, path)

    def _file_info(self, path: str, entry: Entry) -> Dict[str, Any]:
        return {"name": path, "size": entry[0], "type": "file", "version": entry[1]}

    def info(self, path: str, **kwargs: Any) -> Dict[str, Any]:
        """The listed ``name``, ``size``, ``type`` and ``version`` of a file or directory."""
        path = self._strip_protocol(path).rstrip("/")
        listing = self._current()
        entry = listing.get(path)
        if entry is not None:
            return self._file_info(path, entry)
        if listing.is_dir(path):
            return {"name": path, "size": 0, "type": "directory"}
        raise self._missing(path)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Union[List[str], List[Dict[str, Any]]]:
        """The listed files and directories directly in ``path``."""
        path = self._strip_protocol(path).rstrip("/")
        listing = self._current()
        entry = listing.get(path)
        if entry is not None:
            infos = [self._file_info(path, entry)]
        else:
            files, dirs = listing.children(path)
            if not files and not dirs:
                raise self._missing(path)
            infos = ([self._file_info(p, listing.entries[p]) for p in files]
                     + [{"name": d, "size": 0, "type": "directory"} for d in dirs])
            infos.sort(key=lambda i: i["name"])
        return infos if detail else [i["name"] for i in infos]

    def find(self, path: str, maxdepth: Optional[int] = None, withdirs: bool = False,
             detail: bool = False, **kwargs: Any) -> Union[List[str], Dict[str, Dict[str, Any]]]:
        """The listed files under ``path`` (and their directories with ``withdirs``)."""
        path = self._strip_protocol(path).rstrip("/")
        listing = self._current()
        entry = listing.get(path)
        out: Dict[str, Dict[str, Any]] = {}
        if entry is not None:
            out[path] = self._file_info(path, entry)
        else:
            if withdirs and path and listing.is_dir(path):  # as fsspec's find: the root too
                out[path] = {"name": path, "size": 0, "type": "directory"}
            depth0 = path.count("/") + 1 if path else 0
            for p in listing.under(path) if path else listing.paths:
                depth = p.count("/") - depth0 + 1
                if withdirs:
                    parts = p.split("/")
                    for k in range(depth0 + 1, len(parts)):
                        if maxdepth is None or k - depth0 <= maxdepth:
                            d = "/".join(parts[:k])
                            out.setdefault(d, {"name": d, "size": 0, "type": "directory"})
                if maxdepth is None or depth <= maxdepth:
                    out[p] = self._file_info(p, listing.entries[p])
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    def _object(self, path: str, fresh: bool = False) -> Tuple[StoreObject, Dict[str, Any]]:
        listing = self._current()
        if fresh:  # the listed version is gone from the store: what is there now?
            try:
                now = self._ask("info", path)
            except FileNotFoundError:
                listing.set(path, None)
                raise
            if now.get("type") == "file":
                listing.set(path, (int(now.get("size") or 0), version_of(now)))
        entry = listing.get(path)
        if entry is None:
            if listing.is_dir(path):
                raise IsADirectoryError(21, "Is a directory, not a file", path)
            raise self._missing(path)
        return StoreObject(self.target_protocol, path, entry[0], entry[1]), self._file_info(path, entry)

    # -- the right to read each object ----------------------------------------------------
    def _refused(self, paths: List[str]) -> Dict[str, BaseException]:
        """Of ``paths`` (read through this snapshot), those these credentials may not read."""
        return access.refused_on_node(self.target, paths)

    def _prove(self, path: str) -> None:
        refused = self._refused([path])
        if refused:
            raise refused[path]

    def cat_file(self, path: str, start: Optional[int] = None, end: Optional[int] = None,
                 **kwargs: Any) -> bytes:
        """Bytes ``[start, end)`` of a listed file, once its reader's right to it is proven."""
        data = super().cat_file(path, start, end, **kwargs)
        self._prove(self._strip_protocol(path))  # after the read: a cold GET is the proof
        return data

    def cat_ranges(self, paths: List[str], starts: Any, ends: Any, max_gap: Optional[int] = None,
                   on_error: str = "return", **kwargs: Any) -> List[Any]:
        """Byte ranges of listed files, each returned once its reader's right is proven."""
        out = super().cat_ranges(paths, starts, ends, max_gap=max_gap, on_error="return", **kwargs)
        names = [self._strip_protocol(p) for p in paths]
        refused = self._refused([n for n, r in zip(names, out) if not isinstance(r, BaseException)])
        out = [refused.get(n, r) if not isinstance(r, BaseException) else r for n, r in zip(names, out)]
        if on_error == "raise":
            for res in out:
                if isinstance(res, BaseException):
                    raise res
        return out

    def open(self, path: str, mode: str = "rb", block_size: Optional[int] = None,
             cache_options: Optional[Dict[str, Any]] = None, compression: Optional[str] = None,
             **kwargs: Any) -> Any:
        """Open a listed file (``"rb"``, or text modes); see fsspec's ``open``.

        The plain binary open is this filesystem's per-file hot path (a DataLoader opens
        every sample): it goes straight to ``_open``, skipping fsspec's generic wrapper
        (~7 µs of the ~15 µs an open costs).
        """
        if mode == "rb" and compression is None and not kwargs and block_size is None:
            return self._open(path)
        return super().open(path, mode, block_size=block_size, cache_options=cache_options,
                            compression=compression, **kwargs)

    # -- read-only ------------------------------------------------------------------------
    def _refuse_write(self) -> io.UnsupportedOperation:
        return io.UnsupportedOperation(
            f"a snapshot of {self.prefix} is read-only: write through "
            "ray_cache.fs.CacheFileSystem, then refresh() the snapshot")

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if mode != "rb":
            raise self._refuse_write()
        f = super()._open(path, mode, *args, **kwargs)
        name = f.path
        f.check = lambda: self._prove(name)  # after its first read: a cold GET proves it
        return f

    def _write(self, method: str, remote: Tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        raise self._refuse_write()

    def __reduce__(self) -> Tuple[Any, ...]:
        kwargs = dict(self.storage_options, snapshot_id=self.snapshot_id)
        return _rebuild_snapshot, (type(self), self.storage_args, kwargs, self._listing,
                                   _ray_address())

    def __repr__(self) -> str:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken_at))
        return (f"SnapshotFileSystem({self.target_protocol}://{self.prefix}, "
                f"{len(self):,} files, taken {taken})")


def _rebuild_snapshot(cls: type, args: tuple, kwargs: dict, listing: Listing,
                      address: Optional[str]) -> SnapshotFileSystem:
    pages.reader().remember_address(address)
    return cls(*args, listing=listing, **kwargs)


def snapshot(path: str, *, filesystem: Any = None, storage_options: Optional[Dict[str, Any]] = None,
             refresh_every: Optional[float] = None, **cache_options: Any) -> SnapshotFileSystem:
    """List ``path`` once and read the files under it through the cache at those versions.

    Parameters
    ----------
    path : str
        A prefix or directory: ``"s3://bucket/train/"``, ``"gs://..."``, ``"abfs://..."``,
        a local directory.
    filesystem : fsspec or pyarrow filesystem, optional
        The store's filesystem (e.g. ``s3fs.S3FileSystem(...)``); inferred from ``path``
        with ``storage_options`` when not given. A ``CacheFileSystem`` is unwrapped.
    refresh_every : float, optional
        List again in the background this many seconds after the last listing.
    cache_options
        Passed to :class:`ray_cache.files.fs.CacheFileSystem` (``page_size``, ...).

    Examples
    --------
    >>> import ray_cache
    >>> snap = ray_cache.snapshot("s3://bucket/train/", storage_options={"anon": True})  # doctest: +SKIP
    >>> with snap.open("bucket/train/cat/0001.jpg") as f:  # doctest: +SKIP
    ...     jpeg = f.read()
    >>> snap.refresh()  # doctest: +SKIP
    {'added': 0, 'changed': 0, 'removed': 0, 'files': 1000}
    """
    if isinstance(filesystem, CacheFileSystem):
        if storage_options:
            raise ValueError("pass either filesystem= or storage_options=, not both")
        filesystem, stripped = filesystem.target, [filesystem._strip(path)]
    else:
        filesystem, stripped = resolve_filesystem(path, filesystem, storage_options)
    return SnapshotFileSystem(stripped[0], fs=filesystem, refresh_every=refresh_every, **cache_options)
