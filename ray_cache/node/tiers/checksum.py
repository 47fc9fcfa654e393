"""A disk entry's checksum: a 16-byte trailer after the Arrow IPC file it seals.

A disk-tier entry is an Arrow IPC file followed by ``b"RCSUMv1\\0"`` and the xxh3-64 of
every byte before the trailer (little-endian). Writing appends the trailer after the
file is complete; reading checks it before Arrow sees a byte, so a flipped bit, a torn
write or a truncated file is never decoded: it fails the check and the tier drops and
re-fetches the entry. The trailer covers the whole file (schema, key, data, footer), and
Arrow reads the file from the bytes before it (:func:`sealed_body`).

xxh3 runs at ~27 GB/s on one core here, against ~5 GB/s for zlib's crc32, so checking
costs about 40 ms per GB on top of reading it (BENCHMARKS.md).

Examples
--------
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "e")
>>> with open(path, "wb") as f:
...     _ = f.write(b"payload")
>>> seal(path)
23
>>> with open(path, "rb") as f:
...     data = f.read()
>>> bytes(sealed_body(data)), sealed_body(data[:-1]), sealed_body(b"pAyload" + data[7:])
(b'payload', None, None)
"""

from __future__ import annotations

import os
import struct
from typing import Any, Optional

import xxhash

MAGIC = b"RCSUMv1\0"
TRAILER = struct.Struct("<8sQ")
TRAILER_BYTES = TRAILER.size  # 16


def digest(data: Any) -> int:
    """xxh3-64 of a bytes-like object."""
    return xxhash.xxh3_64_intdigest(data)


def seal(path: str) -> int:
    """Append the trailer to the complete file at ``path``; returns the sealed size."""
    import mmap

    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                value = digest(mapped)
        else:
            value = digest(b"")
        f.seek(size)
        f.write(TRAILER.pack(MAGIC, value))
    return size + TRAILER_BYTES


def sealed_body(buf: Any, verify: bool = True) -> Optional[memoryview]:
    """The bytes before a valid trailer, or None (no trailer, short, or a checksum that
    does not match). ``verify=False`` checks only that the trailer is there (a cheap
    look, as on re-index; reads always verify)."""
    view = memoryview(buf)
    if len(view) < TRAILER_BYTES:
        return None
    magic, value = TRAILER.unpack_from(view, len(view) - TRAILER_BYTES)
    if magic != MAGIC:
        return None
    body = view[: len(view) - TRAILER_BYTES]
    if verify and digest(body) != value:
        return None
    return body
