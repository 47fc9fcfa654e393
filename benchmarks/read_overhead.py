"""Per-read cost of warm reads: ``raycache`` against fsspec's ``blockcache``, by read size.

Run it with::

    python benchmarks/read_overhead.py [--size-mb 128] [--reads 2000] [--repeats 5]

One object of ``--size-mb`` random bytes on the local S3 server is read whole through both
caches (so both are warm: blockcache's mmap file, raycache's pages in this node's disk tier),
then ``--reads`` reads at random offsets for each read size (100 B, 64 KiB, 1 MiB, 4 MiB),
the two caches read by read in turn (which goes first alternates), ``--repeats`` passes.
Prints microseconds per read (best pass) and the ratio blockcache / raycache (above 1:
raycache is faster). Small reads show the per-read overhead; large ones are bound by the
one copy both make out of a page-cache mapping.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import ExitStack
from typing import Optional, Sequence

import numpy as np
from _common import log, open_store, start_local_ray
from ranges import read_whole

BUCKET = "ray-cache-overhead"
SIZES = (100, 64 << 10, 1 << 20, 4 << 20)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if min(args.size_mb, args.reads, args.repeats) < 1 or args.size_mb * 1_000_000 <= max(SIZES):
        ap.error("--reads and --repeats must be positive, --size-mb above 4")

    import fsspec

    import ray_cache
    from ray_cache.files.fs import CacheFileSystem

    size = args.size_mb * 1_000_000
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        store = open_store(stack, BUCKET)
        path = f"{BUCKET}/object.bin"
        store.direct_fs.pipe(path, np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
        block = fsspec.filesystem("blockcache", fs=store.client(), skip_instance_cache=True,
                                  cache_storage=os.path.join(tmp, "bc"))
        bf = stack.enter_context(block.open(path, "rb"))
        read_whole(bf)
        start_local_ray(stack, object_store_memory=1 << 30)
        ray_cache.start(memory_bytes=2 * size, disk_bytes=2 * size, disk_dir=os.path.join(tmp, "rc"))
        stack.callback(ray_cache.shutdown)
        rf = stack.enter_context(CacheFileSystem(fs=store.client(), skip_instance_cache=True).open(path, "rb"))
        read_whole(rf)
        read_whole(rf)  # pages written to the disk tier by now are mapped on this pass
        rng = np.random.default_rng(0)
        pc = time.perf_counter
        print("| read size | blockcache µs/read | raycache µs/read | blockcache / raycache |")
        print("|---:|---:|---:|---:|")
        for n in SIZES:
            starts = [int(s) for s in rng.integers(0, size - n, args.reads)]
            best = {"bc": float("inf"), "rc": float("inf")}
            for _ in range(args.repeats):
                spent = {"bc": 0.0, "rc": 0.0}
                for i, s in enumerate(starts):
                    order = (("bc", bf), ("rc", rf)) if i % 2 else (("rc", rf), ("bc", bf))
                    for name, f in order:
                        t0 = pc()
                        f.seek(s)
                        f.read(n)
                        spent[name] += pc() - t0
                for name in best:
                    best[name] = min(best[name], spent[name] / len(starts) * 1e6)
            log(f"{n} bytes: blockcache {best['bc']:.1f} µs, raycache {best['rc']:.1f} µs")
            print(f"| {n:,} B | {best['bc']:.1f} | {best['rc']:.1f} | {best['bc'] / best['rc']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
