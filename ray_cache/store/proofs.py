"""Proofs that one set of credentials may read one object, shared by every reader on a node.

A request the store answered with an object's bytes (a GET) or its metadata (a HEAD) proves
that the credentials which made it may read that object. :mod:`ray_cache.store.access`
keeps such proofs in one process for a few minutes; a :class:`ProofBook` keeps them for
every process of one OS user on one machine (the reader, its forked or spawned DataLoader
workers, the cache workers that fetch pages with the reader's filesystem), so a snapshot's
warm epoch can check a reader's right to *each* object without a request per file:

- a proof is recorded by whichever process made the request, under the **fingerprint** of
  the credentials it used there (:func:`fingerprint`): the filesystem's class and options
  (keys included), the credential variables of that process's environment, its user, home
  and host. A cache worker that fetched a page with a reader's filesystem records it under
  the worker's own fingerprint of that filesystem, so the proof serves a reader only where
  both resolve to the same credentials (same options, same environment); anywhere else the
  reader proves the object itself;
- a proof lasts :data:`PROOF_TTL_S` from the request that made it;
- what is stored: 16-byte records (an 8-byte keyed digest of the object's path, the time),
  appended to ``<cache dir>/rights/<fingerprint>.<period>.log``, one log per period of
  ``PROOF_TTL_S``, removed once it can hold no live proof (directory ``0700``, files ``0600``).
  No credential, path or option is written in the clear: the file name and the records are
  BLAKE2b digests keyed with a random key kept beside them (``rights/.key``, ``0600``).

Examples
--------
>>> import tempfile
>>> book = ProofBook(os.path.join(tempfile.mkdtemp(), "x"))
>>> book.proven("bucket/a.jpg")
False
>>> book.note(["bucket/a.jpg"])
>>> book.proven("bucket/a.jpg"), ProofBook(book.base).proven("bucket/a.jpg")
(True, True)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tempfile
import threading
import time
import weakref
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ray_cache.config import default_disk_dir

#: Seconds a proof of a right to read an object serves readers on its node.
PROOF_TTL_S = 24 * 3600.0
#: Environment variables that select credentials, by prefix or name (values fingerprinted).
CREDENTIAL_ENV = ("AWS_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "GCE_", "AZURE_", "FSSPEC_",
                  "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_", "STORAGE_EMULATOR_HOST")
#: Files credentials are read from whose contents tell identities apart where the
#: environment may not (same variables, same path): fingerprinted by contents. Token files
#: that rotate for one identity (web-identity tokens) are left out: the role or client id
#: in the environment already tells those identities apart.
CREDENTIAL_FILE_ENV = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                       "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "GOOGLE_APPLICATION_CREDENTIALS")
CREDENTIAL_FILES = ("~/.aws/credentials", "~/.aws/config",
                    "~/.config/gcloud/application_default_credentials.json")
#: One record: the path's digest, the proof's time (seconds since the epoch).
_RECORD = np.dtype([("k", "<u8"), ("t", "<f8")])
#: Records appended with one ``write`` (a multiple of the record size below one page).
_WRITE_RECORDS = 256
#: New proofs held apart from the sorted arrays before they are merged in.
_MERGE_AT = 4096


def is_local(fs: Any) -> bool:
    """Whether ``fs`` reads local files (rights: the OS's, checked with ``os.access``)."""
    protocol = getattr(fs, "protocol", "")
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return bool({"file", "local"} & set(protocols))


class ProofBook:
    """Proven paths of one fingerprint: append-only logs read by every process using it.

    ``base=None`` keeps proofs in this process only. Records go to one log per period of
    ``ttl_s`` (``<base>.<period>.log``); a lookup reads the logs of this period and the one
    before (older ones can hold no live proof and are removed), so the files stay bounded
    by what was proven within two periods. Lookups are a digest and a binary search of two
    arrays (inherited unchanged by forked children); a miss reads what other processes
    appended since.
    """

    def __init__(self, base: Optional[str], ttl_s: float = PROOF_TTL_S, key: bytes = b"") -> None:
        if not (isinstance(ttl_s, (int, float)) and ttl_s > 0):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        self.base, self.ttl_s, self._key = base, float(ttl_s), key
        #: Bytes of each period's log already taken in, and the period last seen.
        self._read: Dict[int, int] = {}
        self._period: Optional[int] = None
        #: When this book was last looked in (books idle for ``ttl_s`` are let go).
        self.used = time.time()
        #: Merged proofs: sorted digests and their times, swapped as one tuple (lookups take no lock).
        self._sorted = (np.empty(0, dtype="<u8"), np.empty(0, dtype="<f8"))
        self._recent: Dict[int, float] = {}
        self._lock = threading.Lock()

    def _digest(self, path: str) -> int:
        return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8, key=self._key).digest(), "little")

    def proven(self, path: str) -> bool:
        """Whether a proof of ``path`` younger than ``ttl_s`` is recorded (by any process)."""
        k, now = self._digest(path), time.time()
        if self._fresh(k, now):
            return True
        self._load(now)
        return self._fresh(k, now)

    def note(self, paths: Iterable[str]) -> None:
        """Record that the credentials of this book were just allowed to read ``paths``."""
        now = time.time()
        keys = [self._digest(p) for p in paths]
        if not keys:
            return
        with self._lock:
            for k in keys:
                self._recent[k] = now
            self._merge_if_due(now)
            path = self._log_path(int(now // self.ttl_s))
        if path is None:
            return
        recs = np.empty(len(keys), dtype=_RECORD)
        recs["k"], recs["t"] = keys, now
        data = recs.tobytes()
        step = _WRITE_RECORDS * _RECORD.itemsize
        try:  # opened per call: a long-lived process meets many credentials, and holds no fd
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError:  # an unwritable cache directory: the proofs stay in this process
            return
        try:
            for i in range(0, len(data), step):  # each write lands whole (O_APPEND) ...
                chunk = data[i:i + step]
                if os.write(fd, chunk) != len(chunk):
                    break  # ... or, on a full disk, part of one: readers drop what it misaligns
        except OSError:  # a full disk: the proofs stay in this process
            pass
        finally:
            os.close(fd)

    def _log_path(self, period: int) -> Optional[str]:
        """The log of ``period``; on entering a new period, logs older than the last one
        are removed. Under the lock."""
        if self.base is None:
            return None
        if period != self._period:
            self._period = period
            self._read = {q: n for q, n in self._read.items() if q >= period - 1}
            self._remove_stale(period)
        return f"{self.base}.{period}.log"

    def _remove_stale(self, period: int) -> None:
        """Remove every log (of any fingerprint) too old to hold a live proof."""
        folder = os.path.dirname(self.base or "")
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            parts = name.split(".")
            q = parts[1] if len(parts) == 3 and parts[2] == "log" else ""
            if q.lstrip("-").isdigit() and int(q) < period - 1:
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass

    def _fresh(self, k: int, now: float) -> bool:
        self.used = now
        t = self._recent.get(k)
        if t is not None and now - t < self.ttl_s:
            return True
        keys, times = self._sorted
        i = int(np.searchsorted(keys, k))
        return i < len(keys) and int(keys[i]) == k and now - float(times[i]) < self.ttl_s

    def _load(self, now: float) -> None:
        """Take in the records other processes appended since the last look."""
        with self._lock:
            period = int(now // self.ttl_s)
            chunks, offsets = [], {}
            for q in (period - 1, period):
                path = self._log_path(q) if q == period else f"{self.base}.{q}.log"
                if path is None:
                    return
                read = self._read.get(q, 0)
                try:
                    with open(path, "rb") as f:
                        f.seek(read)
                        data = f.read()
                except OSError:  # not written yet, or unreadable: nothing from it
                    continue
                whole = len(data) // _RECORD.itemsize * _RECORD.itemsize
                if whole:
                    offsets[q] = read + whole
                    chunks.append(np.frombuffer(data[:whole], dtype=_RECORD))
            if not chunks:
                return
            recs = np.concatenate(chunks)
            # A record is a proof only with a time this book could have written (a torn
            # write on a full disk misaligns the rest of its log: those decode as garbage).
            recs = recs[(recs["t"] > now - 2 * self.ttl_s) & (recs["t"] <= now + 60.0)]
            if len(recs) >= _MERGE_AT:
                self._merge(recs["k"], recs["t"], now)
            else:
                recent = self._recent
                for k, t in zip(recs["k"].tolist(), recs["t"].tolist()):
                    if t > recent.get(k, 0.0):
                        recent[k] = t
                self._merge_if_due(now)
            self._read.update(offsets)  # after the merge: a fork between the two re-reads them

    def _merge_if_due(self, now: float) -> None:
        if len(self._recent) >= max(_MERGE_AT, len(self._sorted[0]) // 8):
            keys = np.fromiter(self._recent.keys(), dtype="<u8", count=len(self._recent))
            times = np.fromiter(self._recent.values(), dtype="<f8", count=len(self._recent))
            self._merge(keys, times, now)
            self._recent = {}  # after the merge: a lookup finds each proof in one or the other

    def _merge(self, keys: np.ndarray, times: np.ndarray, now: float) -> None:
        """Fold records into the sorted arrays: the latest proof per path, none expired."""
        keys = np.concatenate([self._sorted[0], keys])
        times = np.concatenate([self._sorted[1], times])
        order = np.lexsort((times, keys))
        keys, times = keys[order], times[order]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = keys[1:] != keys[:-1]
        keep = last & (now - times < self.ttl_s)
        self._sorted = (keys[keep], times[keep])

    def after_fork(self) -> None:
        self._lock = threading.Lock()


# -- this process's books, by fingerprint ---------------------------------------------------
_LOCK = threading.Lock()
_BOOKS: Dict[str, ProofBook] = {}
#: By ``id`` of a live filesystem (fsspec filesystems compare equal by their options' text,
#: which may hide a secret): its fingerprint, and its private book where it has none.
_FINGERPRINTS: Dict[int, Optional[str]] = {}
_PRIVATE: Dict[int, ProofBook] = {}
_DIR_KEY: Optional[tuple] = None


def _directory() -> Optional[tuple]:
    """``(directory, key)`` of this user's proof books, created ``0700`` (None if unusable:
    not writable, or not this user's)."""
    global _DIR_KEY
    d = os.path.join(default_disk_dir(), "rights")
    if _DIR_KEY is not None and _DIR_KEY[0] == d:
        return _DIR_KEY
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.lstat(d).st_uid != os.getuid():  # another user's folder: share nothing with it
            return None
        os.chmod(d, 0o700)
        key_path = os.path.join(d, ".key")
        if not os.path.exists(key_path):  # written whole, then linked in: readers never see a part
            fd, tmp = tempfile.mkstemp(prefix=".key-", dir=d)  # 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(32))
                try:
                    os.link(tmp, key_path)
                except FileExistsError:  # another process linked its key first: that one holds
                    pass
            finally:
                os.unlink(tmp)
        fd = os.open(key_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            key = f.read(64)
        if len(key) != 32:
            return None
    except OSError:
        return None
    _DIR_KEY = (d, key)
    return _DIR_KEY


def _file_digests() -> List[tuple]:
    """(path, digest of contents) of each credential file there is (see CREDENTIAL_FILES)."""
    paths = [os.environ[v] for v in CREDENTIAL_FILE_ENV if os.environ.get(v)]
    paths += [os.path.expanduser(p) for p in CREDENTIAL_FILES]
    out = []
    for path in dict.fromkeys(paths):
        try:
            with open(path, "rb") as f:
                out.append((path, hashlib.blake2b(f.read(1 << 20), digest_size=16).digest()))
        except OSError:
            continue
    return out


def _remember(cache: Dict[int, Any], fs: Any, value: Any) -> None:
    try:
        weakref.finalize(fs, cache.pop, id(fs), None)
    except TypeError:  # not weak-referenceable: nothing is remembered for it
        return
    cache[id(fs)] = value


def fingerprint(fs: Any) -> Optional[str]:
    """A keyed digest of what selects ``fs``'s credentials in this process, or None when its
    options cannot be fingerprinted (its proofs then stay in this process): its class and
    options (keys included), the credential variables of the environment, the contents of
    the credential files, the user, home and host."""
    if id(fs) in _FINGERPRINTS:
        return _FINGERPRINTS[id(fs)]
    where = _directory()
    fp: Optional[str] = None
    if where is not None:
        try:
            options = pickle.dumps((type(fs).__module__, type(fs).__qualname__,
                                    tuple(getattr(fs, "storage_args", ()) or ()),
                                    sorted((getattr(fs, "storage_options", {}) or {}).items())), protocol=4)
        except Exception:  # noqa: BLE001 - e.g. a live session object among the options
            options = None
        if options is not None:
            env = sorted((k, v) for k, v in os.environ.items() if k.startswith(CREDENTIAL_ENV))
            h = hashlib.blake2b(digest_size=20, key=where[1])
            h.update(options)
            h.update(repr((env, _file_digests(), os.getuid(), os.path.expanduser("~"),
                           socket.gethostname())).encode())
            fp = h.hexdigest()
    _remember(_FINGERPRINTS, fs, fp)
    return fp


def book_for(fs: Any) -> ProofBook:
    """The book of ``fs``'s credentials (this process's alone when they have no fingerprint)."""
    fp = fingerprint(fs)
    with _LOCK:
        if fp is None:
            book = _PRIVATE.get(id(fs))
            if book is None:
                book = ProofBook(None)
                _remember(_PRIVATE, fs, book)
            return book
        book = _BOOKS.get(fp)
        if book is None:
            now = time.time()
            for old in [k for k, b in _BOOKS.items() if now - b.used > b.ttl_s]:
                del _BOOKS[old]  # idle for a whole lifetime of its proofs (rotated credentials)
            where = _directory()
            book = _BOOKS[fp] = ProofBook(os.path.join(where[0], fp) if where else None,
                                          key=where[1] if where else b"")
        return book


def note(fs: Any, paths: Iterable[str]) -> None:
    """Record that ``fs`` was just allowed to read ``paths`` (a GET or HEAD succeeded);
    nothing for local files, whose rights the OS checks at each read."""
    if not is_local(fs):
        book_for(fs).note(paths)


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    for book in list(_BOOKS.values()) + list(_PRIVATE.values()):
        book.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
