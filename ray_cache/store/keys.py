"""What identifies a cache entry: the object, its version, the slice and the columns.

A key never contains credentials or storage options: only the protocol, the path, the
version string the store reported and what part of the object the entry holds. Its
``digest`` (SHA-256) names the entry on disk and picks its owner by hashing, so it is the
same in every process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class StoreObject:
    """An object in an under store, as listed at planning time.

    Attributes
    ----------
    protocol : str
        The fsspec protocol (``"s3"``, ``"gcs"``, ``"abfs"``, ``"file"``, ...).
    path : str
        The path as the filesystem names it, without protocol (``"bucket/key"``).
    size : int
        Size in bytes.
    version : str
        The store's version token (``etag:...``, ``gen:...``, ``mtime:...``).
    """

    protocol: str
    path: str
    size: int
    version: str

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.path}" if self.protocol != "file" else self.path


@dataclass(frozen=True)
class EntryKey:
    """A cache entry: a run of row groups of one object version, for some columns.

    ``kind`` is ``"rg"`` for decoded Arrow row groups and ``"footer"`` for the raw footer
    bytes of a Parquet object; later kinds (pages) reuse the same shape.

    Examples
    --------
    >>> k = EntryKey("s3", "bucket/a.parquet", "etag:abc", "rg", 0, 2, ("x", "y"))
    >>> len(k.digest)
    64
    >>> k.digest == EntryKey("s3", "bucket/a.parquet", "etag:abc", "rg", 0, 2, ("x", "y")).digest
    True
    """

    protocol: str
    path: str
    version: str
    kind: str
    start: int = 0
    stop: int = 0
    columns: Optional[Tuple[str, ...]] = None
    digest: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        cols = "*" if self.columns is None else "\x1f".join(self.columns)
        text = "\x1e".join(
            [self.protocol, self.path, self.version, self.kind, str(self.start), str(self.stop), cols]
        )
        object.__setattr__(self, "digest", hashlib.sha256(text.encode("utf-8")).hexdigest())

    def describe(self) -> str:
        """A short human-readable label (used in logs and errors; holds no secrets)."""
        cols = "all columns" if self.columns is None else f"{len(self.columns)} columns"
        return f"{self.protocol}://{self.path} [{self.kind} {self.start}:{self.stop}, {cols}]"
