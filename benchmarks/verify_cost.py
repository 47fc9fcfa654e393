"""What checking every disk-tier entry's checksum costs a warm-from-disk read.

Run it with::

    python benchmarks/verify_cost.py [--gb 1] [--repeats 5]

Writes ``--gb`` of decoded row groups (64 MiB tables, as Parquet units are cached) and as
many 110 KB file pages (an image folder) into a disk tier in a temporary folder, then
reads each set back the way a worker or a same-node reader does (memory-mapped, opened,
every byte copied out, as into the object store), with the checksum verified and without,
alternating, best of ``--repeats`` passes. The files sit in the OS page cache, so this is
the worst case for the check's relative cost (a read from the device itself is slower and
the check's share smaller). No Ray needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
from _common import log

from ray_cache.node.pageentry import page_table
from ray_cache.node.tiers import checksum, ipcpage
from ray_cache.node.tiers.disk import DiskTier, read_entry

GB = 1 << 30


def _copy_out(table: pa.Table, into: np.ndarray) -> int:
    """Copy every buffer of ``table`` into ``into`` (what a put into the object store does)."""
    n = 0
    for column in table.columns:
        for chunk in column.chunks:
            for buf in chunk.buffers():
                if buf is not None and buf.size:
                    view = np.frombuffer(buf, dtype=np.uint8)
                    into[n:n + view.size] = view
                    n += view.size
    return n


def _timed(fn: Callable[[], int]) -> "tuple[float, int]":
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.gb <= 0 or args.repeats < 1:
        ap.error("--gb and --repeats must be positive")
    total = int(args.gb * GB)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tier = DiskTier(tmp, capacity=4 * total + GB)
        rows = (64 << 20) // 16
        units = []
        for i in range(max(1, total // (64 << 20))):
            t = pa.table({"id": np.arange(rows, dtype=np.int64), "x": rng.random(rows)})
            key = f"u{i:05d}" + "0" * 58
            tier.put(key, t, ("s3", f"bucket/part-{i}.parquet"))
            units.append(key)
        page = 110_000
        files = []
        for i in range(total // page):
            key = f"p{i:06d}" + "0" * 57
            tier.put(key, page_table(rng.integers(0, 256, page, dtype=np.uint8).tobytes()), ("s3", f"b/{i}.jpg"))
            files.append(key)
        log(f"wrote {len(units)} row-group entries and {len(files)} page entries")
        sink = np.empty(rows * 16 + (1 << 20), dtype=np.uint8)

        def units_read(verify: bool) -> int:
            return sum(_copy_out(read_entry(tier._path(k), k, verify=verify), sink) for k in units)

        def pages_read(verify: bool) -> int:
            n = 0
            for k in files:
                with open(tier._path(k), "rb") as f:
                    import mmap

                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                body = checksum.sealed_body(mapped, verify=verify)
                buf = ipcpage.page_in(body, k, page)
                sink[:page] = np.frombuffer(buf, dtype=np.uint8)
                n += page
            return n

        print(f"{'entries':<28}{'unchecked ms/GB':>16}{'checked ms/GB':>15}{'cost ms/GB':>12}{'checked/unchecked':>19}")
        for name, fn in (("64 MiB row groups", units_read), ("110 KB file pages", pages_read)):
            best = {True: float("inf"), False: float("inf")}
            for r in range(args.repeats):
                for verify in ((True, False) if r % 2 else (False, True)):
                    seconds, nbytes = _timed(lambda: fn(verify))
                    best[verify] = min(best[verify], seconds / (nbytes / GB))
            off, on = best[False] * 1e3, best[True] * 1e3
            print(f"{name:<28}{off:>16.1f}{on:>15.1f}{on - off:>12.1f}{on / off:>19.2f}")
        tier.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
