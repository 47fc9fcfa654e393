"""A page entry's bytes straight from its Arrow IPC file, without building a table.

A page entry on disk (:mod:`ray_cache.node.tiers.disk`) is an Arrow IPC file of one row of
``large_binary`` (:mod:`ray_cache.node.pageentry`). Opening it with ``pyarrow.ipc`` costs
~200 µs here, ten times reading a 110 KB file from the page cache, and a reader of many
small files maps each page once per process. This module finds the value's bytes by
reading the file's two leading IPC messages (the schema and the record batch) directly:
their flatbuffers say where the data buffer lies, and the schema's metadata carries the
entry's key, checked exactly as :func:`ray_cache.node.tiers.disk.read_entry` checks it,
after the file's checksum trailer (:mod:`ray_cache.node.tiers.checksum`) is verified.
About 20 µs plus the checksum (~4 µs for a 110 KB page) for the first file of a shape (its
length, its key's and its page's); a later file of that shape, which differs from the first
only in its metadata's values, is checked against what the first parse found, byte for byte
outside those values, in ~2 µs (a forked DataLoader worker maps every file of its epoch anew). Anything it does not expect (another layout, compression, a short file)
returns None, and the caller reads the file with pyarrow instead.

Examples
--------
>>> import os, tempfile, pyarrow as pa
>>> from ray_cache.node.pageentry import page_table
>>> path = os.path.join(tempfile.mkdtemp(), "e.arrow")
>>> t = page_table(b"hello").replace_schema_metadata({b"ray_cache.key": b"k1"})
>>> with pa.OSFile(path, "wb") as f, pa.ipc.new_file(f, t.schema) as w:
...     w.write_table(t)
>>> map_page_file(path, "k1", 5) is None  # not sealed: never trusted
True
>>> from ray_cache.node.tiers.checksum import seal
>>> _ = seal(path)
>>> bytes(map_page_file(path, "k1", 5)), map_page_file(path, "other", 5)
(b'hello', None)
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ray_cache.node.tiers.checksum import sealed_body

_MAGIC = b"ARROW1"
_CONTINUATION = 0xFFFFFFFF
_RECORD_BATCH = 3  # MessageHeader union: Schema=1, DictionaryBatch=2, RecordBatch=3


class _Table:
    """A flatbuffer table inside ``buf`` at ``pos`` (only what Arrow's messages need)."""

    def __init__(self, buf: Any, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt, self.vt_size = vt, struct.unpack_from("<H", buf, vt)[0]

    def _field(self, index: int) -> int:
        off = 4 + 2 * index
        if off >= self.vt_size:
            return 0
        rel = struct.unpack_from("<H", self.buf, self.vt + off)[0]
        return self.pos + rel if rel else 0

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        at = self._field(index)
        return struct.unpack_from(fmt, self.buf, at)[0] if at else default

    def _target(self, index: int) -> int:
        at = self._field(index)
        return at + struct.unpack_from("<I", self.buf, at)[0] if at else 0

    def table(self, index: int) -> Optional["_Table"]:
        at = self._target(index)
        return _Table(self.buf, at) if at else None

    def vector(self, index: int) -> "tuple[int, int]":
        """(position of the first element, count); (0, 0) if absent."""
        at = self._target(index)
        return (at + 4, struct.unpack_from("<I", self.buf, at)[0]) if at else (0, 0)

    def string(self, pos: int) -> bytes:
        at = pos + struct.unpack_from("<I", self.buf, pos)[0]
        n = struct.unpack_from("<I", self.buf, at)[0]
        return bytes(self.buf[at + 4:at + 4 + n])


def _message(buf: Any, pos: int) -> "tuple[_Table, int]":
    """The message flatbuffer at ``pos`` and where its body starts."""
    marker, length = struct.unpack_from("<Ii", buf, pos)
    if marker != _CONTINUATION or length <= 0:
        raise ValueError("not an IPC message")
    start = pos + 8
    root = start + struct.unpack_from("<I", buf, start)[0]
    return _Table(buf[start:start + length], root - start), start + length


def _metadata(schema: _Table, base: int) -> List[Tuple[bytes, int, int]]:
    """The schema's metadata as ``(name, start, end)``: each value's bytes lie at
    ``[start, end)`` of the file (``base``: where the schema's flatbuffer starts)."""
    out = []
    first, count = schema.vector(2)  # Schema.custom_metadata: [KeyValue]
    for i in range(count):
        at = first + 4 * i
        kv = _Table(schema.buf, at + struct.unpack_from("<I", schema.buf, at)[0])
        name_at, value_at = kv._field(0), kv._field(1)
        if name_at and value_at:
            s_at = value_at + struct.unpack_from("<I", schema.buf, value_at)[0]
            n = struct.unpack_from("<I", schema.buf, s_at)[0]
            out.append((kv.string(name_at), base + s_at + 4, base + s_at + 4 + n))
    return out


class _Layout(NamedTuple):
    """What one full parse learnt of page files of one shape: the bytes before the body
    outside the metadata's values (``same``: ``(start, bytes)`` runs), where the key lies,
    where the value's offsets and data lie."""

    same: Tuple[Tuple[int, bytes], ...]
    key_at: int
    offsets_at: int
    data_at: int


#: Layouts by (file length, key length, page length): page files of the same shape differ
#: only in their metadata's values, so a file whose other header bytes equal a parsed one's
#: parses to the same places (checked byte for byte, then the key and the value's offsets).
_LAYOUTS: Dict[Tuple[int, int, int], _Layout] = {}
_LAYOUTS_MAX = 4096


def _parse(view: memoryview, key: bytes, nbytes: int) -> Optional[Tuple[memoryview, _Layout]]:
    if bytes(view[:6]) != _MAGIC or bytes(view[-6:]) != _MAGIC:
        return None
    schema_msg, pos = _message(view, 8)
    schema = schema_msg.table(2)  # Message.header
    if schema_msg.scalar(1, "<B") != 1 or schema is None:
        return None
    values = _metadata(schema, 16)  # the schema's flatbuffer follows magic, padding, prefix
    key_at, key_end = next(((a, b) for name, a, b in values if name == b"ray_cache.key"), (0, 0))
    if not key_at or view[key_at:key_end] != key:
        return None
    batch_msg, body = _message(view, pos)
    batch = batch_msg.table(2)
    if batch_msg.scalar(1, "<B") != _RECORD_BATCH or batch is None or batch.table(3) is not None:
        return None  # not a record batch, or compressed
    if batch.scalar(0, "<q") != 1:
        return None  # one row
    first, count = batch.vector(2)  # RecordBatch.buffers: [Buffer{offset, length}]
    if count != 3:
        return None  # validity, offsets, data of one large_binary column
    off_at, off_len = struct.unpack_from("<qq", batch.buf, first + 16)
    data_at, data_len = struct.unpack_from("<qq", batch.buf, first + 32)
    if off_len < 16 or data_len < nbytes:
        return None
    lo, hi = struct.unpack_from("<qq", view, body + off_at)
    if lo != 0 or hi != nbytes or body + data_at + nbytes > len(view) - 10:
        return None
    same, at = [], 0  # the header outside the values, which alone differ within a shape
    for _name, a, b in sorted(values, key=lambda v: v[1]) + [(b"", body, body)]:
        same.append((at, bytes(view[at:a])))
        at = b
    layout = _Layout(tuple(same), key_at, body + off_at, body + data_at)
    return view[body + data_at:body + data_at + nbytes], layout


def page_in(buf: Any, key: str, nbytes: int) -> Optional[memoryview]:
    """The page's ``nbytes`` bytes within an IPC file's bytes ``buf``, if it is ``key``'s entry."""
    try:
        view = memoryview(buf)
        k = key.encode()
        shape = (len(view), len(k), nbytes)
        known = _LAYOUTS.get(shape)
        if (known is not None and all(view[a:a + len(b)] == b for a, b in known.same)
                and view[known.key_at:known.key_at + len(k)] == k and view[-6:] == _MAGIC
                and struct.unpack_from("<qq", view, known.offsets_at) == (0, nbytes)):
            return view[known.data_at:known.data_at + nbytes]
        parsed = _parse(view, k, nbytes)
        if parsed is None:
            return None
        out, layout = parsed
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[shape] = layout
        return out
    except (struct.error, ValueError, IndexError, TypeError):
        return None


def map_page_file(path: str, key: str, nbytes: int) -> Optional[memoryview]:
    """The page bytes of the sealed entry file at ``path`` (checksum verified),
    memory-mapped read-only, or None (``FileNotFoundError`` if there is no such file)."""
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    body = sealed_body(mapped)
    return None if body is None else page_in(body, key, nbytes)
