"""Write-through: a file written through ``raycache`` is in the cache once the store has it.

``open(path, "wb")`` (and ``"xb"``, ``pipe_file``, ``put_file``, ``put``, and everything
built on them: pandas and pyarrow writers, Ray Data's ``write_*``, Ray Train checkpoints
saved to a ``raycache`` filesystem) writes to the target as the target does (s3fs: one PUT,
or a multipart upload for large files) and keeps each page of what was written in this
process's object store as it fills (:class:`PageSpool`). When the target's ``close``
returns (the store has accepted the object) and the store's version is proven to be these
bytes (:mod:`ray_cache.store.written`: one HEAD), each page goes to its owning worker
(``adopt_pages``: the worker takes it from this node's object store), so the first read
anywhere sends no data request. A small file (at most
:data:`~ray_cache.files.spool.INLINE_BYTES`, one page: part files, images, configs) is kept
in this process instead and goes to its owner inside the call itself
(:func:`ray_cache.files.handover.hand_over_bytes`): no object to put, none for the owner to
resolve. ``close`` waits until every owner has the bytes on its
node and has claimed its pages (bounded by ``WORKER_TIMEOUT_S``): from then on a reader
anywhere waits for the owner's copy rather than fetching, and this process may exit.

What is kept, and what is not:

- Only what this process wrote, under the version the store proves is it. A version that
  cannot be proven (another writer replaced the object first, an ETag that is not an MD5)
  keeps nothing: the write succeeded, reads fetch it.
- The first :data:`~ray_cache.files.spool.SPOOL_BYTES` of a file (pages are independent entries: a larger file
  has its leading pages cached, the rest is fetched on first read).
- Not appends (``"ab"``), files in an fsspec transaction (``autocommit=False``), copies,
  moves, or writes from a process that cannot use Ray (a forked ``DataLoader`` child):
  those pass through and forget cached metadata.

A write that fails leaves nothing: an exception inside ``with fs.open(...)`` discards
the file instead of committing it (S3: the multipart upload is aborted; local: the
partial file is removed), unlike fsspec's files, which commit what they have; no page
is kept. A writer killed mid-upload cannot clean up itself: its multipart upload was
registered with the cache worker on its node the moment S3 opened it, and that worker
aborts it once the writer's process is gone (:mod:`ray_cache.node.uploads`).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import ray

from ray_cache.cluster import forks
from ray_cache.cluster.routing import WORKER_GONE
from ray_cache.files import handover
from ray_cache.files.spool import INLINE_BYTES, PageSpool
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.node.uploads import start_time
from ray_cache.store import access
from ray_cache.store.underfs import object_of, protocol_of
from ray_cache.store.written import WriteProof, proven_version

log = logging.getLogger("ray_cache.files.write")

#: Bytes per chunk when ``put_file`` copies a local file.
COPY_CHUNK = 8 * 1024**2


class WritingFile(io.IOBase):
    """A file open for writing through ``raycache``: the target's file, plus write-through.

    Everything not overridden here is the target file's (``tell``, ``flush``, ``mode``...).
    """

    def __init__(self, fs: Any, path: str, f: Any, workers: Optional[Sequence[WorkerRef]]) -> None:
        self._fs, self.path, self._f = fs, path, f
        target = fs.target
        self._protocol = protocol_of(target)
        self._proof = WriteProof(self._protocol)
        self._workers = list(workers or [])
        self._spool: Optional[PageSpool] = (PageSpool(fs.page_size, inline=INLINE_BYTES)
                                            if self._workers else None)
        self._upload: Optional[Any] = None  # (worker handle, upload id) while S3 has it open
        self._done = False
        self._head = self._tail = b""  # a file's first and last 4 bytes: is it Parquet?
        if self._protocol == "s3" and self._workers:
            self._hook_s3(f)

    def _hook_s3(self, f: Any) -> None:
        """Watch s3fs's multipart upload from its start; keep the store's answer to the commit."""
        initiate, call = getattr(f, "_initiate_upload", None), getattr(f, "_call_s3", None)
        if initiate is None or call is None:
            return

        def initiate_then_watch() -> None:
            initiate()
            self._watch()

        def call_and_keep(method: str, *args: Any, **kwargs: Any) -> Any:
            answer = call(method, *args, **kwargs)
            if method in ("put_object", "complete_multipart_upload"):
                self._proof.answer = answer
            return answer

        f._initiate_upload, f._call_s3 = initiate_then_watch, call_and_keep

    # -- the file interface ----------------------------------------------------------
    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        if not self._done:
            self._f.flush()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self._done

    def __getattr__(self, name: str) -> Any:
        f = self.__dict__.get("_f")
        if f is None:
            raise AttributeError(name)
        return getattr(f, name)

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._proof.update(data)
        view = memoryview(data).cast("B")
        if len(self._head) < 4:
            self._head += bytes(view[:4 - len(self._head)])
        self._tail = (self._tail + bytes(view[-4:]))[-4:]
        if self._spool is not None:
            self._spool.add(data)
        return n

    @property
    def _parquet_like(self) -> bool:
        """Whether the file begins and ends with Parquet's magic (see :mod:`handover`)."""
        return self._head == self._tail == handover.MAGIC

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __del__(self) -> None:
        pass  # the target file's own finalizer decides; nothing is handed over from here

    def close(self) -> None:
        """Commit to the store, then hand the pages to their owners (see the module doc)."""
        if self._done:
            return
        self._done = True
        spool, self._spool = self._spool, None
        if spool is not None:
            if self._parquet_like:
                spool.spill()  # its units are handed over from the spooled pages
            spool.end()  # its last page goes into the object store while the store commits
        try:
            self._f.close()
        except BaseException:
            if spool is not None:
                spool.drop()
            try:  # S3: abort the multipart upload it may have left open
                if self._protocol != "file":
                    self._f.discard()
            except Exception:  # noqa: BLE001 - the close's own error is the one to raise
                pass
            self._forget_upload()
            raise
        finally:
            self._fs.invalidate_cache(self.path)
        self._forget_upload()
        if spool is not None:
            try:
                small = spool.small()
                if small is not None:
                    self._hand_over(small)
                    return
                refs = spool.finish()
                if refs is None:
                    raise spool.failed or RuntimeError("no pages")
                self._hand_over(refs)
            except Exception as exc:  # noqa: BLE001 - the write succeeded; reads will fetch
                log.debug("ray_cache: pages of %s not handed over (%s)", self.path, exc)

    def discard(self) -> None:
        """Abandon the write: nothing reaches the store, nothing is cached."""
        if self._done:
            return
        if self._spool is not None:
            self._spool.drop()
        self._done, self._spool = True, None
        f = self._f
        try:
            if self._protocol == "file":
                name = getattr(f, "path", None) or self._fs.target._strip_protocol(self.path)
                f.close()
                if os.path.exists(name):
                    os.remove(name)
            else:
                f.discard()  # S3: aborts the multipart upload; GCS: cancels the upload
                f.closed = True  # so its finalizer does not commit what it has
        finally:
            self._forget_upload()
            self._fs.invalidate_cache(self.path)

    # -- write-through -----------------------------------------------------------------
    def _hand_over(self, pages: Union[List[ray.ObjectRef], bytes]) -> None:
        """Give the written pages to their owners: spooled (``refs``), or a small file's
        bytes."""
        target = self._fs.target
        info = proven_version(target, self.path, self._proof)
        if info is None:
            self._fs._reader()._count(unproven_writes=1)
            return
        if self._protocol != "s3":  # a HEAD's whole record (S3 sent none: the next read asks)
            self._fs._remember_infos([info])
            access.RIGHTS.note_head(target, [self.path])  # that HEAD proved this process may read it
        obj = object_of(target, info, self._protocol)

        def give() -> Dict[str, int]:
            if isinstance(pages, bytes):
                return handover.hand_over_bytes(obj, pages, self._fs.page_size, self._workers)
            return handover.hand_over(obj, pages, self._fs.page_size, self._workers, self._parquet_like)

        try:
            counts = give()
        except WORKER_GONE:  # this process knew workers that have been replaced: ask Ray again
            self._workers = self._fs._reader().workers(refresh=True) or []
            counts = give()
        self._fs._reader()._count(written_pages=counts["pages"], written_units=counts["units"])

    def _watch(self) -> None:
        mpu = getattr(self._f, "mpu", None)
        here = _here()
        local = [w for w in self._workers if w.node_id == here]
        if not mpu or not local:
            return
        upload_id = mpu["UploadId"]
        handle = local[0].handle
        pid = os.getpid()
        ray.get(handle.watch_upload.remote(self._fs.target, self._f.bucket, self._f.key, upload_id,
                                           pid, start_time(pid)), timeout=WORKER_TIMEOUT_S)
        self._upload = (handle, upload_id)

    def _forget_upload(self) -> None:
        if self._upload is not None:
            handle, upload_id = self._upload
            self._upload = None
            try:
                handle.forget_upload.remote(upload_id)
            except Exception:  # noqa: BLE001 - the watcher's abort of a finished upload is a no-op
                pass


def _here() -> Optional[str]:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return None


def writers_workers(fs: Any) -> Optional[List[WorkerRef]]:
    """The workers to hand written pages to, or None where this process cannot use Ray."""
    if forks.ray_forked():
        return None
    try:
        return fs._reader().workers()
    except Exception as exc:  # noqa: BLE001 - no cluster to write through: pass through
        log.debug("ray_cache: writing without write-through (%s)", exc)
        return None


def open_for_writing(fs: Any, path: str, mode: str, **kwargs: Any) -> Any:
    """The file ``fs.open(path, mode)`` returns for a write mode."""
    f = fs.target.open(path, mode, **kwargs)
    if "a" in mode or not kwargs.get("autocommit", True):
        # An append holds only part of the object; a file that does not commit on close
        # (an fsspec transaction) is not the store's yet: pass through, then forget.
        close = f.close

        def close_then_forget() -> None:
            try:
                close()
            finally:
                fs.invalidate_cache(path)

        f.close = close_then_forget
        return f
    return WritingFile(fs, path, f, writers_workers(fs))


def put_file(fs: Any, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite",
             **kwargs: Any) -> None:
    """Upload one local file through :func:`open_for_writing` (so it is written through)."""
    if os.path.isdir(lpath):
        fs.target.makedirs(rpath, exist_ok=True)
        return
    size = os.path.getsize(lpath)
    if callback is not None:
        callback.set_size(size)
    with open(lpath, "rb") as src, fs.open(rpath, "xb" if mode == "create" else "wb", **kwargs) as dst:
        while True:
            chunk = src.read(COPY_CHUNK)
            if not chunk:
                break
            dst.write(chunk)
            if callback is not None:
                callback.relative_update(len(chunk))


#: Keyword arguments of write methods that name paths in the target.
_REMOTE_ARGS = ("path", "path1", "path2", "rpath")


class WriteMethods:
    """The write half of :class:`ray_cache.files.fs.CacheFileSystem` (a mixin).

    ``pipe_file``, ``put_file`` (and ``put``, built on it) are written through; the others
    pass through to the target and then forget this filesystem's cached metadata, so the
    next read sees the new version.
    """

    target: Any

    def _write(self, method: str, remote: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        args = tuple(self._unchain(a) if i in remote else a for i, a in enumerate(args))  # type: ignore[attr-defined]
        for name in _REMOTE_ARGS:
            if name in kwargs:
                kwargs[name] = self._unchain(kwargs[name])  # type: ignore[attr-defined]
        self.invalidate_cache()  # type: ignore[attr-defined]
        try:
            return getattr(self.target, method)(*args, **kwargs)
        finally:
            self.invalidate_cache()  # type: ignore[attr-defined]

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Write ``value`` to ``path`` (written through: the cache holds it after)."""
        with self.open(path, "xb" if mode == "create" else "wb", **kwargs) as f:  # type: ignore[attr-defined]
            f.write(value)

    def put_file(self, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        """Upload a local file (written through)."""
        rpath = self._strip_protocol(self._unchain(rpath))  # type: ignore[attr-defined]
        put_file(self, lpath, rpath, callback=callback, mode=mode, **kwargs)

    def copy(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> Any:
        """Copy within the target, as the target's ``copy`` does (pass-through)."""
        return self._write("copy", (0, 1), path1, path2, *args, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> Any:
        return self._write("cp_file", (0, 1), path1, path2, **kwargs)

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> Any:
        """Move within the target (pass-through)."""
        return self._write("mv", (0, 1), path1, path2, *args, **kwargs)

    def rm(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        """Delete from the target (pass-through); cached pages of old versions age out."""
        return self._write("rm", (0,), path, *args, **kwargs)

    def rm_file(self, path: str) -> Any:
        return self._write("rm_file", (0,), path)

    def touch(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return self._write("touch", (0,), path, *args, **kwargs)

    def mkdir(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return self._write("mkdir", (0,), path, *args, **kwargs)

    def makedirs(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return self._write("makedirs", (0,), path, *args, **kwargs)

    def rmdir(self, path: str) -> Any:
        return self._write("rmdir", (0,), path)
