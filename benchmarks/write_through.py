"""What writing through ``raycache`` costs against writing with s3fs directly, and what it
saves the first reader.

Run it with::

    python benchmarks/write_through.py [--latency-ms 0,20] [--rate-mb-s 0] [--small 64]
        [--small-kb 256] [--large-mb 256] [--repeats 2]

For each store shape (the counting proxy adding ``latency-ms`` per request and capping the
link at ``rate-mb-s``, 0 for no cap), writes the same files both ways, alternating, best of
``--repeats``: ``--small`` files of ``--small-kb`` (one PUT each; Spark or Ray Data part
files) and one file of ``--large-mb`` (an s3fs multipart upload in 50 MiB parts; a
checkpoint). Then reads every file written through the cache back through it, with this
process's buffers empty, and counts the data GETs that reached the proxy (the written-
through files should need none). One node: the pages go to this node's worker.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from typing import Any, Dict, List

import numpy as np
from _common import log, open_store, start_local_ray

BUCKET = "bench-write-through"
MB = 1 << 20


def _write(fs: Any, paths: List[str], blobs: List[bytes]) -> float:
    t0 = time.perf_counter()
    for path, blob in zip(paths, blobs):
        with fs.open(path, "wb") as f:
            for i in range(0, len(blob), 8 * MB):
                f.write(blob[i:i + 8 * MB])
    return time.perf_counter() - t0


def _shape(store: Any, args: argparse.Namespace, tag: str) -> Dict[str, Any]:
    import ray_cache
    from ray_cache.files import pages
    from ray_cache.files.fs import CacheFileSystem
    from ray_cache.testing import s3_data_gets

    rng = np.random.default_rng(0)
    sets = {
        f"{args.small} x {args.small_kb} KB": [rng.integers(0, 256, args.small_kb * 1024, dtype=np.uint8).tobytes()
                                              for _ in range(args.small)],
        f"1 x {args.large_mb} MB": [rng.integers(0, 256, args.large_mb * MB, dtype=np.uint8).tobytes()],
    }
    rows = {}
    for name, blobs in sets.items():
        nbytes = sum(map(len, blobs))
        best = {"s3fs": float("inf"), "raycache": float("inf")}
        for rep in range(args.repeats):
            for way in ("s3fs", "raycache"):
                fs = store.far_fs if way == "s3fs" else CacheFileSystem(fs=store.far_fs, skip_instance_cache=True)
                paths = [f"{BUCKET}/{tag}/{way}/{rep}/{i:04d}.bin" for i in range(len(blobs))]
                best[way] = min(best[way], _write(fs, paths, blobs))
        rfs = CacheFileSystem(fs=store.client(), skip_instance_cache=True)
        paths = [f"{BUCKET}/{tag}/raycache/{args.repeats - 1}/{i:04d}.bin" for i in range(len(blobs))]
        pages.reader().clear()
        store.proxy.reset()
        ok = all(rfs.cat_file(p) == b for p, b in zip(paths, blobs))
        gets = len(s3_data_gets(store.proxy.requests(), BUCKET))
        rows[name] = dict(
            mb=nbytes / MB, s3fs_mb_s=nbytes / MB / best["s3fs"], raycache_mb_s=nbytes / MB / best["raycache"],
            ratio=best["s3fs"] / best["raycache"], read_back_gets=gets, equal=ok,
            written_entries=ray_cache.stats()["written_entries"])
        log(f"{tag} {name}: {rows[name]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", default="0,20", help="comma-separated per-request latencies to run")
    ap.add_argument("--rate-mb-s", type=float, default=0.0, help="link cap (0: none)")
    ap.add_argument("--small", type=int, default=64)
    ap.add_argument("--small-kb", type=int, default=256)
    ap.add_argument("--large-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray_cache

    results = {}
    with ExitStack() as stack:
        start_local_ray(stack, num_cpus=4)
        ray_cache.start(memory_bytes=1 << 30, disk_bytes=2 << 30)
        stack.callback(ray_cache.shutdown)
        for latency in [float(x) for x in args.latency_ms.split(",")]:
            with ExitStack() as inner:
                store = open_store(inner, BUCKET, rate_mb_s=args.rate_mb_s, latency_ms=latency)
                results[latency] = _shape(store, args, f"lat{latency:g}")
    print(f"| store | files | s3fs MB/s | raycache MB/s | ratio | data GETs reading back |")
    print("|---|---|---:|---:|---:|---:|")
    for latency, rows in results.items():
        link = f"{latency:g} ms" + (f", {args.rate_mb_s:g} MB/s" if args.rate_mb_s else "")
        for name, r in rows.items():
            print(f"| {link} | {name} | {r['s3fs_mb_s']:.1f} | {r['raycache_mb_s']:.1f} | {r['ratio']:.2f}x | "
                  f"{r['read_back_gets']}{'' if r['equal'] else ' (WRONG BYTES)'} |")


if __name__ == "__main__":
    main()
