"""The disk tier: Arrow IPC files under a per-worker slot directory.

Several workers may share one filesystem (several raylets on one host, or a shared
``disk_dir``), so each worker claims a ``slot-N`` directory by holding an exclusive
``flock`` on ``slot-N.lock`` for its whole life. A restarted worker (or a new Ray
session) claims a free slot, usually the same one, and re-indexes the files it finds:
the disk tier survives worker and Ray restarts. Files are written to a temporary name and
renamed into place, so a crash never leaves a half-written entry under a real name.
Each file carries its key's digest in its schema metadata and ends with a checksum of
its contents (:mod:`ray_cache.node.tiers.checksum`), both checked on every read: a damaged
or truncated entry is dropped (counted as ``damaged_entries``) and re-fetched, never
served. An entry is admitted before it is written (its exact size is known from a dry
run of the writer), so a refused entry costs no disk write.
Directories are ``0700`` and files ``0600``: only the owner can read cached data.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import uuid
from typing import List, Optional, Tuple

import pyarrow as pa

from ray_cache.node.tiers import checksum
from ray_cache.node.tiers.base import Tier

log = logging.getLogger("ray_cache.node.tiers.disk")

_KEY_FIELD = b"ray_cache.key"
_PROTOCOL_FIELD = b"ray_cache.protocol"
_PATH_FIELD = b"ray_cache.path"
_OURS = (_KEY_FIELD, _PROTOCOL_FIELD, _PATH_FIELD)
_SUFFIX = ".arrow"


def claim_slot(root: str, max_slots: int = 1024) -> Tuple[str, int]:
    """Lock and return the first free ``slot-N`` directory under ``root``.

    The lock file descriptor is kept open (and so locked) for the life of the process.
    """
    os.makedirs(root, mode=0o700, exist_ok=True)
    for n in range(max_slots):
        lock_path = os.path.join(root, f"slot-{n}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        slot = os.path.join(root, f"slot-{n}")
        os.makedirs(slot, mode=0o700, exist_ok=True)
        os.chmod(slot, 0o700)
        return slot, fd
    raise RuntimeError(f"no free cache slot under {root} (all {max_slots} are locked)")


class DiskTier(Tier):
    """Arrow IPC files within ``capacity`` bytes (file sizes)."""

    name = "disk"

    def __init__(self, root: str, capacity: int, policy: str = "adaptive") -> None:
        super().__init__(capacity, policy)
        self.root = root
        self.slot, self._lock_fd = claim_slot(root)
        #: Entries found damaged (checksum, key or structure) and dropped.
        self.damaged = 0
        self._writing: set = set()  # admitted, file not yet in place
        #: ``key -> (protocol, path)`` of each entry, read back from files on re-index.
        self.labels: dict = {}
        self._reindex()

    def close(self) -> None:
        """Release the slot lock (the files stay for the next worker)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _path(self, key: str) -> str:
        return entry_path(self.slot, key)

    def _reindex(self) -> None:
        found: List[Tuple[float, str, int]] = []
        for dirpath, _dirs, files in os.walk(self.slot):
            for name in files:
                full = os.path.join(dirpath, name)
                if name.startswith(".tmp-"):
                    os.unlink(full)  # an interrupted write; never visible under a real name
                elif name.endswith(_SUFFIX):
                    key = name[: -len(_SUFFIX)]
                    label = _read_label(full, key)
                    if label is None:  # damaged or foreign: never served, so remove it
                        self.damaged += 1
                        os.unlink(full)
                        continue
                    st = os.stat(full)
                    found.append((st.st_mtime, key, st.st_size, label))
        found.sort()  # oldest first, so the policy's LRU order matches file age
        with self.lock:
            for _mtime, key, size, label in found:
                self.sizes[key] = size
                self.used += size
                self.labels[key] = label
                self.policy.touch(key)
            self._evict_until(self.capacity)

    def _drop(self, key: str) -> None:
        self.labels.pop(key, None)
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def get(self, key: str) -> Optional[pa.Table]:
        """Read an entry (memory-mapped, checksum verified), or None on a miss or a
        damaged file (which is dropped)."""
        with self.lock:
            if key not in self.sizes or key in self._writing:
                return None
        path = self._path(key)
        table = read_entry(path, key)
        if table is None:
            with self.lock:
                if key in self._writing or key not in self.sizes:
                    return None  # replaced or dropped meanwhile: a miss, not damage
                self.damaged += 1
                self.remove(key)
            log.warning("ray_cache: dropped a damaged disk-tier entry %s; it will be re-fetched", key)
            return None
        meta = table.schema.metadata or {}
        table = table.replace_schema_metadata(
            {k: v for k, v in meta.items() if k not in _OURS} or None
        )
        os.utime(path)
        self.touch(key)
        return table

    def put(self, key: str, table: pa.Table, label: tuple = ("", "")) -> bool:
        """Write ``table`` as a sealed IPC file if the tier admits it; returns whether it
        was stored.

        ``label`` is the entry's ``(protocol, path)``, kept in the file so that entries can
        be freed by path after a restart. Admission comes first, with the file's exact
        size: a refused entry is never written.
        """
        if key in self:
            self.touch(key)
            return True
        meta = dict(table.schema.metadata or {})
        meta[_KEY_FIELD] = key.encode()
        meta[_PROTOCOL_FIELD] = label[0].encode()
        meta[_PATH_FIELD] = label[1].encode()
        tagged = table.replace_schema_metadata(meta)
        size = _ipc_size(tagged) + checksum.TRAILER_BYTES
        with self.lock:
            if not self.reserve(key, size):
                return False
            self._writing.add(key)
        directory = os.path.dirname(self._path(key))
        tmp = os.path.join(directory, f".tmp-{key}-{uuid.uuid4().hex}")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as raw, pa.ipc.new_file(raw, tagged.schema) as writer:
                writer.write_table(tagged)
            written = checksum.seal(tmp)
            with self.lock:
                self._writing.discard(key)
                if key not in self.sizes:  # evicted or dropped while being written
                    os.unlink(tmp)
                    return False
                if written != size:  # the dry run is exact; keep the books right if not
                    self.used += written - size
                    self.sizes[key] = written
                os.replace(tmp, self._path(key))
                self.labels[key] = tuple(label)
            return True
        except BaseException:
            with self.lock:
                self._writing.discard(key)
                self.remove(key)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def entry_path(slot: str, key: str) -> str:
    """Where the entry ``key`` lives in a slot directory: ``slot/<2 hex>/<key>.arrow``."""
    return os.path.join(slot, key[:2], key + _SUFFIX)


def read_entry(path: str, key: str, verify: bool = True) -> Optional[pa.Table]:
    """The entry file at ``path``, memory-mapped, if it is a valid entry for ``key``; else None.

    The one place that reads an entry file: the tier itself, its re-index and same-node
    page readers (:mod:`ray_cache.files.pages`) all go through it (or through
    :func:`ray_cache.node.tiers.ipcpage.map_page_file`, which checks the same), so neither
    the checksum nor the key check is skipped. ``verify=False`` (re-index only) checks the
    trailer is there without hashing the contents. The returned table's buffers stay
    mapped after the file is closed.
    """
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # missing, unreadable, or empty (mmap refuses 0 bytes)
        return None
    body = checksum.sealed_body(mapped, verify=verify)
    if body is None:
        return None
    try:
        table = pa.ipc.open_file(pa.py_buffer(body)).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    if (table.schema.metadata or {}).get(_KEY_FIELD) != key.encode():
        return None
    return table


def _ipc_size(table: pa.Table) -> int:
    """The exact size of ``table`` as an IPC file, from a dry run that stores nothing."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.size()


def _read_label(path: str, key: str):
    """``(protocol, path)`` from an entry file's schema, or None if it is not a valid entry."""
    table = read_entry(path, key, verify=False)
    if table is None:
        return None
    meta = table.schema.metadata or {}
    return (meta.get(_PROTOCOL_FIELD, b"").decode(), meta.get(_PATH_FIELD, b"").decode())
