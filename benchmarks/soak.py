"""A long run: mixed readers against a cache smaller than the data, for a bounded time.

Run it with::

    python benchmarks/soak.py [--minutes 10] [--latency-ms 10] [--json out.json]

Data: Parquet files and many small files on the local S3 server (behind the counting
proxy, ``--latency-ms`` per request), about 3x the cache's memory tier and 1.5x its disk
tier. Readers, in turns chosen at random (seeded): ``read_parquet`` of the whole set or
of one file, ``raycache`` reads of random files and ranges, ``load`` of a subset, and
``free`` of a subset. Every result is compared with what pyarrow or s3fs reads from the
store directly: a difference is a wrong read. Every ``--sample-s`` seconds it records the
cache worker's own memory (``RssAnon``: its heap, not the object store's shared pages
or the cache files it maps, which ``VmRSS`` also counts), the memory and disk tiers' use against their capacities,
and the node's object-store use. At the end it prints the samples and the verdicts the
issue asks for: worker memory growth after warm-up (the first quarter of the run, ``--warmup``),
usage above capacity, errors, wrong reads. Exit status 1 if any verdict fails.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import ExitStack
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import log, open_store, quiet_ray_data, start_local_ray

BUCKET = "ray-cache-soak"
MB = 1 << 20


def _rss(pid: int, field: str = "RssAnon") -> int:
    """The worker's own memory: ``RssAnon`` (its heap), not the object store's shared pages
    (``RssShmem``) or mapped cache files (``RssFile``) that ``VmRSS`` also counts."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _write_data(fs: Any, files: int, rows: int, blobs: int, blob_kb: int) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    parquet = []
    for i in range(files):
        t = pa.table({"id": np.arange(i * rows, (i + 1) * rows, dtype=np.int64),
                      "x": rng.random(rows), "y": rng.integers(0, 1000, rows).astype(np.int32)})
        path = f"{BUCKET}/table/part-{i:03d}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(t, f, row_group_size=rows // 4)
        parquet.append(path)
    files_ = {}
    for i in range(blobs):
        data = rng.integers(0, 256, blob_kb * 1024, dtype=np.uint8).tobytes()
        path = f"{BUCKET}/images/img-{i:05d}.bin"
        fs.pipe(path, data)
        files_[path] = data
    return {"parquet": parquet, "files": files_}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--warmup", type=float, default=0.25,
                    help="fraction of the run that counts as warm-up for the memory verdict")
    ap.add_argument("--ops", default="", help="only these readers, comma-separated (default: all)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0:
        ap.error("--minutes and --sample-s must be positive")

    import ray

    import ray_cache
    from ray_cache.files import pages
    from ray_cache.files.fs import CacheFileSystem

    rng = random.Random(args.seed)
    with ExitStack() as stack:
        start_local_ray(stack, object_store_memory=512 * MB)
        quiet_ray_data()
        store = open_store(stack, BUCKET, latency_ms=args.latency_ms)
        data = _write_data(store.direct_fs, files=12, rows=400_000, blobs=600, blob_kb=100)
        want = {p: pq.read_table(p, filesystem=store.direct_fs) for p in data["parquet"]}
        want_all = pa.concat_tables(want.values()).sort_by("id")
        total = sum(t.nbytes for t in want.values()) + sum(len(v) for v in data["files"].values())
        memory_cap, disk_cap = total // 3, int(total / 1.5)
        log(f"data {total / MB:.0f} MB; cache: memory {memory_cap / MB:.0f} MB, disk {disk_cap / MB:.0f} MB")
        import tempfile

        disk_dir = stack.enter_context(tempfile.TemporaryDirectory())
        ray_cache.start(memory_bytes=memory_cap, disk_bytes=disk_cap, disk_dir=disk_dir)
        stack.callback(ray_cache.shutdown)
        fs = store.far_fs
        rfs = CacheFileSystem(fs=fs, skip_instance_cache=True)
        paths = list(data["files"])

        def read_all_parquet() -> bool:
            got = pa.concat_tables(ray.get(ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=fs)
                                           .to_arrow_refs())).sort_by("id")
            return got.equals(want_all)

        def read_one_parquet() -> bool:
            p = rng.choice(data["parquet"])
            got = pa.concat_tables(ray.get(ray_cache.read_parquet(f"s3://{p}", filesystem=fs).to_arrow_refs()))
            return got.sort_by("id").equals(want[p])

        def read_files() -> bool:
            ok = True
            for p in rng.sample(paths, 40):
                blob = data["files"][p]
                lo = rng.randrange(len(blob))
                hi = rng.randrange(lo, len(blob) + 1)
                ok &= rfs.cat_file(p, lo, hi) == blob[lo:hi]
            return ok

        def load_some() -> bool:
            ray_cache.load([f"s3://{p}" for p in rng.sample(paths, 50)], filesystem=fs)
            return True

        def free_some() -> bool:
            ray_cache.free([f"s3://{p}" for p in rng.sample(paths, 50)], filesystem=fs)
            return True

        ops = [(read_all_parquet, 2), (read_one_parquet, 3), (read_files, 6), (load_some, 1), (free_some, 1)]
        if args.ops:
            ops = [o for o in ops if o[0].__name__ in args.ops.split(",")]
        names, weights = [o[0] for o in ops], [o[1] for o in ops]
        counts = {f.__name__: 0 for f in names}
        errors: List[str] = []
        wrong: List[str] = []
        samples: List[Dict[str, Any]] = []
        pid = ray_cache.status().workers[0]["pid"]
        start = time.monotonic()
        end = start + args.minutes * 60
        next_sample = start
        while True:
            now = time.monotonic()
            if now >= next_sample or now >= end:
                w = ray_cache.status().workers[0]
                used = ray.cluster_resources().get("object_store_memory", 0) - \
                    ray.available_resources().get("object_store_memory", 0)
                samples.append({"t_s": round(now - start, 1), "worker_rss": _rss(pid),
                                "worker_vmrss": _rss(pid, "VmRSS"), "worker_shmem": _rss(pid, "RssShmem"),
                                "memory_used": w["memory_bytes_used"], "memory_cap": w["memory_bytes_capacity"],
                                "disk_used": w["disk_bytes_used"], "disk_cap": w["disk_bytes_capacity"],
                                "object_store_used": int(used), "ops": sum(counts.values()),
                                "errors": len(errors), "wrong": len(wrong)})
                log(f"t={now - start:5.0f}s ops={sum(counts.values())} anon={_rss(pid) / MB:.0f} MB "
                    f"vmrss={_rss(pid, 'VmRSS') / MB:.0f} MB "
                    f"mem={w['memory_bytes_used'] / MB:.0f}/{w['memory_bytes_capacity'] / MB:.0f} MB "
                    f"disk={w['disk_bytes_used'] / MB:.0f}/{w['disk_bytes_capacity'] / MB:.0f} MB "
                    f"errors={len(errors)} wrong={len(wrong)}")
                next_sample = now + args.sample_s
                if now >= end:
                    break
            op = rng.choices(names, weights)[0]
            counts[op.__name__] += 1
            try:
                if not op():
                    wrong.append(op.__name__)
            except Exception as exc:  # noqa: BLE001 - every error is a finding
                errors.append(f"{op.__name__}: {type(exc).__name__}: {exc}")
            if rng.random() < 0.2:
                pages.reader().clear()  # so reads come from the tiers too, not this process

        warm = [s for s in samples if s["t_s"] >= args.minutes * 60 * args.warmup] or samples
        growth = (max(s["worker_rss"] for s in warm) / warm[0]["worker_rss"] - 1) if warm[0]["worker_rss"] else 0
        over = [s for s in samples if s["memory_used"] > s["memory_cap"] or s["disk_used"] > s["disk_cap"]]
        report = {
            "minutes": args.minutes, "latency_ms": args.latency_ms, "data_bytes": total,
            "memory_cap": memory_cap, "disk_cap": disk_cap, "ops": counts, "errors": errors[:20],
            "error_count": len(errors), "wrong_reads": len(wrong), "rss_growth_after_warmup": round(growth, 4),
            "samples_over_capacity": len(over), "samples": samples, "stats": ray_cache.stats(),
        }
        print(f"{'t (s)':>7}{'ops':>6}{'worker anon MB':>15}{'memory MB':>12}{'disk MB':>10}{'obj store MB':>14}")
        for s in samples:
            print(f"{s['t_s']:>7.0f}{s['ops']:>6}{s['worker_rss'] / MB:>15.0f}{s['memory_used'] / MB:>12.0f}"
                  f"{s['disk_used'] / MB:>10.0f}{s['object_store_used'] / MB:>14.0f}")
        verdicts = {
            "worker memory growth after warm-up <= 10%": growth <= 0.10,
            "usage never above capacity": not over,
            "0 errors": not errors,
            "0 wrong reads": not wrong,
        }
        print(f"ops: {counts}")
        print(f"worker memory (RssAnon) growth after warm-up: {growth:.1%}; capacity memory {memory_cap / MB:.0f} MB, "
              f"disk {disk_cap / MB:.0f} MB; errors {len(errors)}; wrong reads {len(wrong)}")
        for name, ok in verdicts.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {name}")
        for e in errors[:5]:
            print("  error:", e)
        report["verdicts"] = verdicts
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1, default=str)
        return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
