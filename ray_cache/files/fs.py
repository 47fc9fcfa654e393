"""``raycache``: an fsspec filesystem that reads any file through the cache workers.

Every read is cut into fixed-size pages (:mod:`ray_cache.files.pages`, 4 MiB by default) that
the cache workers hold in their memory and disk tiers, keyed by the object's version like
the Arrow entries of ``read_parquet`` (same tiers, same capacity, same eviction). The
filesystem is registered with fsspec (entry point ``fsspec.specs``), so it works wherever
fsspec URLs do, without importing ``ray_cache``::

    fsspec.open("raycache::s3://bucket/key", s3={"anon": True})
    fsspec.filesystem("raycache", target_protocol="gcs", target_options={...})
    CacheFileSystem(fs=s3fs.S3FileSystem(...))  # paths: bucket/key, s3:// or raycache://

What goes through the cache, and what does not
------------------------------------------------
- **Reads of bytes use the pages**: ``cat_file``, ``cat_ranges``, ``cat``, ``open(..., "rb")``
  (read, seek, readline, text mode), ``head``, ``tail``, ``read_block``, ``get_file`` and
  ``get``. A warm read sends no data request to the store.
- **Metadata** (``info``, ``ls``, ``find``, and ``glob``, ``du``, ``walk``, ``exists``,
  ``isdir``... built on them) is asked of the target and remembered in this process for
  ``metadata_ttl`` seconds (default :data:`METADATA_TTL_S`); ``0`` asks every time.
  ``created``, ``modified`` and ``sign`` are passed to the target as they are.
- **Writes are written through** (``open(..., "wb"/"xb")``, ``pipe_file``, ``put_file``,
  ``put``): they reach the target as usual and, once the store has accepted them under a
  version proven to be theirs, their pages are in the cache, so the first read anywhere
  sends no data request (:mod:`ray_cache.files.write`). Other writes pass through
  (``"ab"``, ``copy``, ``cp_file``, ``mv``, ``rm``, ``rm_file``, ``touch``, ``mkdir``,
  ``makedirs``, ``rmdir``). Every write forgets this filesystem's cached metadata, so the
  next read sees the new version.

Consistency
-----------
A read uses the version reported by ``info`` (so within ``metadata_ttl`` of the last look,
the version seen then). Pages are keyed by version and every page fetched from the store
is checked against the planned version before it is kept or returned (``fetch.read_page``),
so bytes of two versions are never mixed and a rewritten object's old pages are never
served once its new version has been seen. The window, stated honestly: an object
rewritten **by another writer** may be read at its previous version for up to
``metadata_ttl`` seconds, as long as the pages needed are still cached; a page that has to
be fetched fails the version check, and ``cat_file``/``cat_ranges`` then look again and
read the new version. A file open for reading is a snapshot of one version: if its object
changes and a page must be fetched, the read raises ``ObjectChangedError`` (an ``OSError``).
Writes through this filesystem are seen at once (its metadata is forgotten).

Processes
---------
The filesystem pickles by its constructor arguments plus the address of the Ray cluster
it ran in, so it works in Ray tasks, Spark executors and ``DataLoader`` workers
(:mod:`ray_cache.files.pages`): Ray tasks use Ray; ``spawn`` children join the cluster;
``fork``-ed children, which cannot use Ray, map this node's disk tier and ask its worker
for the rest over a private Unix socket (:mod:`ray_cache.node.channel`). A process with no
Ray at all starts one (a local Ray and a cache worker).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fsspec
import fsspec.utils
import ray
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.spec import AbstractFileSystem, make_instance

from ray_cache.cluster import forks
from ray_cache.files import pages
from ray_cache.files.file import CachedFile
from ray_cache.files.meta import MetadataCache
from ray_cache.files import write
from ray_cache.store import access
from ray_cache.store.errors import ObjectChangedError, raise_translated
from ray_cache.store.keys import StoreObject
from ray_cache.store.underfs import bounded_call, object_of, protocol_of, refresh

log = logging.getLogger("ray_cache.fs")

#: Default seconds that ``info``/``ls``/``find`` answers are reused (``metadata_ttl=``).
METADATA_TTL_S = 5.0
#: Read options that ask for another version than the current one: refused, not ignored.
_VERSION_ARGS = ("version_id", "generation", "version")


def _refuse_version_args(kwargs: Dict[str, Any], path: str) -> None:
    asked = sorted(k for k in _VERSION_ARGS if kwargs.get(k) is not None)
    if asked:
        raise ValueError(f"{path}: raycache reads the current version of an object; "
                         f"{', '.join(asked)}= is not supported (read it from the target filesystem)")


def _target_from_protocol(protocol: str, options: Dict[str, Any]) -> AbstractFileSystem:
    if protocol in CacheFileSystem.protocol_names():
        raise ValueError("target_protocol cannot be 'raycache' itself")
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        known = ", ".join(sorted(fsspec.available_protocols()))
        raise ValueError(f"unknown target protocol {protocol!r}; fsspec knows: {known}") from None
    return cls(**options)


def _ray_address() -> Optional[str]:
    if forks.ray_forked() or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - an address is only a hint for the unpickling process
        return None


def _rebuild(cls: type, args: tuple, kwargs: dict, address: Optional[str]) -> "CacheFileSystem":
    # Unpickling: the same filesystem, and the Ray cluster to join if this process has none.
    pages.reader().remember_address(address)
    return make_instance(cls, args, kwargs)


class CacheFileSystem(write.WriteMethods, ChainedFileSystem):
    """An fsspec filesystem reading any target filesystem through the ray_cache workers.

    Parameters
    ----------
    target_protocol : str, optional
        Protocol of the store to read (``"s3"``, ``"gcs"``, ``"abfs"``, ``"file"``, ...).
    target_options : dict, optional
        Options to build the target filesystem with (``fsspec.filesystem(protocol, **options)``).
    fs : fsspec.AbstractFileSystem, optional
        An existing target filesystem, instead of ``target_protocol``/``target_options``.
    page_size : int
        Bytes per cached page (default 4 MiB; see :mod:`ray_cache.files.pages` for why).
    metadata_ttl : float
        Seconds ``info``/``ls``/``find`` answers are reused (default 5; 0 asks every time).
        See the module docstring for what this window means for rewritten objects.
    buffer_bytes : int, optional
        Bytes of recently used object-store pages this process keeps (and so pins),
        default 64 MiB, shared by all ``raycache`` filesystems of the process.

    Examples
    --------
    >>> import fsspec
    >>> with fsspec.open("raycache::s3://bucket/key.csv", "rb", s3={"anon": True}) as f:  # doctest: +SKIP
    ...     head = f.read(100)
    >>> fs = fsspec.filesystem("raycache", target_protocol="s3",
    ...                        target_options={"anon": True})  # doctest: +SKIP
    >>> fs.cat_file("bucket/key.csv", start=0, end=100) == head  # doctest: +SKIP
    True
    """

    protocol = "raycache"
    root_marker = ""
    _strip_tokenize_options = ("fo",)  # one instance per target, not per chained URL

    def __init__(
        self,
        target_protocol: Optional[str] = None,
        target_options: Optional[Dict[str, Any]] = None,
        fs: Optional[AbstractFileSystem] = None,
        page_size: int = pages.PAGE_SIZE,
        metadata_ttl: float = METADATA_TTL_S,
        buffer_bytes: Optional[int] = None,
        fo: Optional[str] = None,  # the path, when built from a chained URL; not needed
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (fs is None) == (target_protocol is None):
            raise ValueError("give exactly one of target_protocol= (with target_options=) or fs=")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive number of bytes, got {page_size!r}")
        if not isinstance(metadata_ttl, (int, float)) or metadata_ttl < 0:
            raise ValueError(f"metadata_ttl must be >= 0 seconds, got {metadata_ttl!r}")
        if fs is None:
            fs = _target_from_protocol(str(target_protocol), dict(target_options or {}))
        elif not isinstance(fs, AbstractFileSystem):
            raise ValueError(f"fs must be an fsspec filesystem, got {type(fs).__name__}")
        self.page_size, self.metadata_ttl, self.buffer_bytes = page_size, float(metadata_ttl), buffer_bytes
        self.target_protocol = protocol_of(fs)
        self._target, self._pid = fs, os.getpid()
        self._meta = MetadataCache(self.metadata_ttl)
        self._strip_protocol: Callable[[Any], Any] = self._strip  # type: ignore[method-assign]
        if ray.is_initialized() and not forks.ray_forked():
            # Learn where this node's workers are now, so that a child forked later (a
            # DataLoader worker, which cannot use Ray) knows their disk slots and channels.
            try:
                pages.reader().workers()
            except Exception as exc:  # noqa: BLE001 - a hint for later forks; reads ask again
                log.debug("ray_cache: workers not known yet (%s)", exc)

    @classmethod
    def protocol_names(cls) -> Tuple[str, ...]:
        return (cls.protocol,) if isinstance(cls.protocol, str) else tuple(cls.protocol)

    def _strip(self, path: Any) -> Any:
        if isinstance(path, (list, tuple)):
            return [self._strip(p) for p in path]
        return self.target._strip_protocol(type(self)._strip_protocol(path))

    @classmethod
    def _unchain(cls, path: Any) -> Any:
        # Only our own prefix: the target's path rules (a trailing "/" in cp/put) must survive.
        if isinstance(path, (list, tuple)):
            return [cls._unchain(p) for p in path]
        path = fsspec.utils.stringify_path(path)
        for proto in cls.protocol_names():
            for sep in ("://", "::"):
                if path.startswith(proto + sep):
                    return path[len(proto + sep):]
        return path

    @property
    def target(self) -> AbstractFileSystem:
        """The target filesystem, usable in this process (rebuilt in a forked child)."""
        if self._pid != os.getpid():  # the parent's sessions and event loops are not ours
            self._target = pickle.loads(pickle.dumps(self._target))
            self._meta, self._pid = MetadataCache(self.metadata_ttl), os.getpid()
        return self._target

    def __reduce__(self) -> Tuple[Any, ...]:
        return _rebuild, (type(self), self.storage_args, self.storage_options, _ray_address())

    def _reader(self) -> pages.PageReader:
        r = pages.reader()
        if self.buffer_bytes and r.buffers.capacity != self.buffer_bytes:
            r.buffers.resize(self.buffer_bytes)
        return r

    @staticmethod
    def local_stats() -> Dict[str, int]:
        """This process's page counters (see :meth:`ray_cache.files.pages.PageReader.stats`)."""
        return pages.reader().stats()

    # -- metadata ----------------------------------------------------------------------
    def _ask(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        target = self.target
        refresh(target, path)  # the TTL here replaces the target's own listings cache
        try:
            answer = bounded_call(target, method, path, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one error table for every store
            raise_translated(exc, path)
        if method == "info" and answer.get("type") == "file":
            access.RIGHTS.note_head(target, [path])  # this reader may read it
        return answer

    def _remember_infos(self, infos: Any) -> None:
        for info in infos:
            if info.get("type") == "file":
                self._meta.put(("info", self.target._strip_protocol(info["name"])), info)

    def info(self, path: str, **kwargs: Any) -> Dict[str, Any]:
        """The target's ``info`` of ``path``, reused for ``metadata_ttl`` seconds."""
        path = self._strip_protocol(path)
        return dict(self._meta.get(("info", path), lambda: self._ask("info", path, **kwargs)))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Union[List[str], List[Dict[str, Any]]]:
        """The target's listing of ``path``, reused for ``metadata_ttl`` seconds."""
        path = self._strip_protocol(path)
        if kwargs.pop("refresh", False):
            self._meta.forget(("ls", path))

        def load() -> List[Dict[str, Any]]:
            entries = self._ask("ls", path, detail=True, **kwargs)
            self._remember_infos(entries)
            return entries

        entries = self._meta.get(("ls", path), load)
        return [dict(e) for e in entries] if detail else [e["name"] for e in entries]

    def find(self, path: str, maxdepth: Optional[int] = None, withdirs: bool = False,
             detail: bool = False, **kwargs: Any) -> Union[List[str], Dict[str, Dict[str, Any]]]:
        """The target's ``find`` (one listing where the store allows), reused for ``metadata_ttl``."""
        path = self._strip_protocol(path)

        def load() -> Dict[str, Dict[str, Any]]:
            found = self._ask("find", path, maxdepth=maxdepth, withdirs=withdirs, detail=True, **kwargs)
            self._remember_infos(found.values())
            return found

        key = ("find", path, maxdepth, withdirs, repr(sorted(kwargs.items())))
        found = self._meta.get(key, load)
        return {k: dict(v) for k, v in found.items()} if detail else sorted(found)

    def invalidate_cache(self, path: Optional[str] = None) -> None:
        """Forget every cached metadata answer (of this filesystem and of its target)."""
        self._meta.forget()
        refresh(self.target, None if path is None else self._strip_protocol(path))

    def created(self, path: str) -> Any:
        return self.target.created(self._strip_protocol(path))

    def modified(self, path: str) -> Any:
        return self.target.modified(self._strip_protocol(path))

    def sign(self, path: str, expiration: int = 100, **kwargs: Any) -> str:
        return self.target.sign(self._strip_protocol(path), expiration, **kwargs)

    # -- reads -------------------------------------------------------------------------
    def _object(self, path: str, fresh: bool = False) -> Tuple[StoreObject, Dict[str, Any]]:
        if fresh:
            self._meta.forget(("info", path))
        info = self.info(path)
        if info.get("type") != "file":
            raise IsADirectoryError(21, "Is a directory, not a file", path)
        access.RIGHTS.require(self.target, [path])  # known from a listing only: HEAD it once
        return object_of(self.target, info, self.target_protocol, path), info

    def cat_file(self, path: str, start: Optional[int] = None, end: Optional[int] = None,
                 **kwargs: Any) -> bytes:
        """Bytes ``[start, end)`` of a file (Python slice rules), assembled from cached pages."""
        path = self._strip_protocol(path)
        _refuse_version_args(kwargs, path)
        for attempt in (0, 1):
            obj, _info = self._object(path, fresh=attempt > 0)
            lo, hi = pages.clamp(start, end, obj.size)
            try:
                return self._reader().read_range(self.target, obj, lo, hi, self.page_size)
            except ObjectChangedError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def cat_ranges(self, paths: List[str], starts: Any, ends: Any, max_gap: Optional[int] = None,
                   on_error: str = "return", **kwargs: Any) -> List[Any]:
        """Byte ranges of one or more files; all their pages are fetched in one batch."""
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        starts = starts if isinstance(starts, list) else [starts] * len(paths)
        ends = ends if isinstance(ends, list) else [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("paths, starts and ends must have the same length")
        out: List[Any] = [None] * len(paths)
        objects: Dict[str, Any] = {}
        planned: List[Tuple[int, StoreObject, int, int]] = []
        for i, (p, s, e) in enumerate(zip(paths, starts, ends)):
            p = self._strip_protocol(p)
            try:
                if p not in objects:
                    objects[p] = self._object(p)[0]
                obj = objects[p]
            except Exception as exc:  # noqa: BLE001 - per-range, as on_error asks
                out[i] = exc
                continue
            planned.append((i, obj, *pages.clamp(s, e, obj.size)))
        results = self._reader().read_ranges(self.target, [x[1:] for x in planned], self.page_size)
        for (i, _obj, _s, _e), res in zip(planned, results):
            if isinstance(res, ObjectChangedError):  # a rewrite since we looked: look again
                try:
                    res = self.cat_file(paths[i], starts[i], ends[i])
                except Exception as exc:  # noqa: BLE001
                    res = exc
            out[i] = res
        if on_error == "raise":
            for res in out:
                if isinstance(res, BaseException):
                    raise res
        return out

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise", **kwargs: Any) -> Any:
        """Contents of one or many files (many: one batch of page reads for all of them)."""
        paths = self.expand_path(path, recursive=recursive)
        if len(paths) == 1 and not isinstance(path, list) and paths[0] == self._strip_protocol(path):
            return self.cat_file(paths[0])
        results = self.cat_ranges(list(paths), None, None, on_error="return")
        out = {}
        for p, res in zip(paths, results):
            if isinstance(res, BaseException):
                if on_error == "raise":
                    raise res
                if on_error == "omit":
                    continue
            out[p] = res
        return out

    def _open(self, path: str, mode: str = "rb", block_size: Optional[int] = None,
              autocommit: bool = True, cache_options: Optional[Dict[str, Any]] = None,
              **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if mode == "rb":
            _refuse_version_args(kwargs, path)
            obj, info = self._object(path)
            self._reader()  # applies buffer_bytes= to this process's reader
            return CachedFile(self, path, obj, info, block_size=block_size)
        self.invalidate_cache(path)
        if "x" in mode and self.target.exists(path):
            # Checked here too, as fsspec's pipe_file(mode="create") does: not every store
            # (or emulator) enforces exclusive creation at commit.
            raise FileExistsError(17, "File exists", path)
        return write.open_for_writing(self, path, mode, block_size=block_size, autocommit=autocommit,
                                      cache_options=cache_options, **kwargs)
