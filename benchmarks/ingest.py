"""Ingest throughput: ray_cache against Ray Data reading S3, local files and memory.

Run it with::

    python benchmarks/ingest.py [--rows 8000000] [--files 8] [--row-group-rows 250000] \\
        [--repeats 3] [--json out.json]

It writes one synthetic Parquet dataset (id int64, x float64, y float32, label int64)
both into a local S3 server (moto, on loopback) and into a local directory, then times
full passes over it, each from the read call to the last batch of
``iter_batches(batch_size=65536, batch_format="pyarrow")``:

(a)  ``ray.data.read_parquet`` from the S3 server (s3fs, no throttling);
(b)  ``ray_cache.read_parquet`` cold: the first read into a fresh cache, once;
(c)  ``ray_cache.read_parquet`` warm (zero-copy from the memory tier);
(c2) ``ray_cache.read_parquet(..., zero_copy=False)`` warm: the read-task path;
(c3) ray_cache warm from the disk tier only: workers restarted on the same disk_dir,
     first read after the restart, once;
(d)  ``ray.data.read_parquet`` of the local files;
(e)  iterating ``ray.data.read_parquet(local).materialize()``: the in-memory limit.

Every number except (b) and (c3) is the best of ``--repeats``. The ray_cache reads go
through an (unthrottled) counting proxy in front of the S3 server, which counts the
object data GETs that reach the store; a warm read must make none. The output is a
Markdown table for BENCHMARKS.md, with the command line and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import log, open_store, quiet_ray_data, start_local_ray

BUCKET = "ray-cache-bench"
PREFIX = "ingest"
BATCH_SIZE = 65536
MEMORY_BYTES = 2 << 30
DISK_BYTES = 4 << 30


def make_table(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    """Rows ``start .. start+n-1`` of the synthetic dataset."""
    return pa.table({
        "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "x": pa.array(rng.standard_normal(n)),
        "y": pa.array(rng.random(n, dtype=np.float32)),
        "label": pa.array(rng.integers(0, 1000, n, dtype=np.int64)),
    })


def write_dataset(args: argparse.Namespace, s3: Any, local_dir: str) -> int:
    """Write the same files to ``BUCKET/PREFIX`` on ``s3`` and to ``local_dir``; return bytes."""
    rng = np.random.default_rng(0)
    per_file = math.ceil(args.rows / args.files)
    start, total = 0, 0
    for i in range(args.files):
        n = min(per_file, args.rows - start)
        if n <= 0:
            break
        name = f"part-{i:05d}.parquet"
        local = os.path.join(local_dir, name)
        pq.write_table(make_table(start, n, rng), local, row_group_size=args.row_group_rows)
        s3.put(local, f"{BUCKET}/{PREFIX}/{name}")
        total += os.path.getsize(local)
        start += n
    return total


def one_pass(make_ds: Callable[[], Any], expect_rows: int) -> float:
    """Seconds from building the dataset to its last batch; checks the row count."""
    rows = 0
    t0 = time.perf_counter()
    for batch in make_ds().iter_batches(batch_size=BATCH_SIZE, batch_format="pyarrow"):
        rows += batch.num_rows
    seconds = time.perf_counter() - t0
    if rows != expect_rows:
        raise RuntimeError(f"read {rows} rows, expected {expect_rows}")
    return seconds


class Bench:
    """Runs the cases, keeps their results and counts data GETs at the proxy."""

    def __init__(self, rows: int, repeats: int, proxy: Any) -> None:
        self.rows, self.repeats, self.proxy = rows, repeats, proxy
        self.results: Dict[str, Dict[str, Any]] = {}

    def run(self, key: str, label: str, make_ds: Callable[[], Any], repeats: Optional[int] = None,
            count_gets: bool = False) -> None:
        """Time ``repeats`` passes (default ``--repeats``) and keep the best."""
        from ray_cache.testing import s3_data_gets

        n = self.repeats if repeats is None else repeats
        log(f"{key}: {label} ({n} pass{'es' if n > 1 else ''}) …")
        if count_gets:
            self.proxy.reset()
        times = [one_pass(make_ds, self.rows) for _ in range(n)]
        gets: Optional[int] = None
        if count_gets:
            gets = len(s3_data_gets(self.proxy.requests(), BUCKET))
        best = min(times)
        self.results[key] = {"label": label, "seconds": best, "all_seconds": times,
                             "rows_per_s": self.rows / best, "data_gets": gets}
        log(f"{key}: best {best:.3f} s, {self.rows / best:,.0f} rows/s"
            + (f", {gets} data GETs at the store" if gets is not None else ""))

    def ratio(self, a: str, b: str) -> float:
        """Throughput of case ``a`` over that of case ``b``."""
        return self.results[a]["rows_per_s"] / self.results[b]["rows_per_s"]


def markdown(bench: Bench, ratios: Dict[str, float], info: Dict[str, Any]) -> str:
    """The report: command, machine, results table and ratios table."""
    out = [f"Command: `{info['command']}`", "",
           f"Machine: {info['cores']} cores, {info['platform']}, Python {info['python']}, "
           f"Ray {info['ray']}, pyarrow {info['pyarrow']}, ray_cache {info['ray_cache']}", "",
           f"Data: {info['rows']:,} rows in {info['files']} files, {info['row_group_rows']:,} rows "
           f"per row group, {info['parquet_bytes'] / 1e6:.0f} MB of Parquet "
           f"({info['arrow_bytes'] / 1e6:.0f} MB in Arrow); "
           f"best of {info['repeats']} unless noted.",
           "", "| case | read | seconds | rows/s | data GETs at store |",
           "|---|---|---:|---:|---:|"]
    for key, r in bench.results.items():
        gets = "-" if r["data_gets"] is None else str(r["data_gets"])
        out.append(f"| {key} | {r['label']} | {r['seconds']:.3f} | {r['rows_per_s']:,.0f} "
                   f"| {gets} |")
    out += ["", "| ratio (rows/s) | value |", "|---|---:|"]
    out += [f"| {name} | {value:.2f}x |" for name, value in ratios.items()]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; return 0 when the warm reads made no data GETs."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group-rows", type=int, default=250_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if min(args.rows, args.files, args.row_group_rows, args.repeats) < 1:
        ap.error("--rows, --files, --row-group-rows and --repeats must be positive")

    import ray

    import ray_cache

    tmp = tempfile.mkdtemp(prefix="ray_cache_bench_")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        store = open_store(stack, BUCKET)
        proxy, plain_fs, proxy_fs = store.proxy, store.direct_fs, store.far_fs
        local_dir = os.path.join(tmp, "data")
        os.makedirs(local_dir)
        log(f"writing {args.rows:,} rows in {args.files} files to the S3 server and {local_dir} …")
        parquet_bytes = write_dataset(args, plain_fs, local_dir)

        start_local_ray(stack)
        quiet_ray_data()

        url = f"s3://{BUCKET}/{PREFIX}/"
        bench = Bench(args.rows, args.repeats, proxy)
        bench.run("a", "ray.data.read_parquet, S3 server", lambda: ray.data.read_parquet(
            url, filesystem=plain_fs))

        cache_dir = os.path.join(tmp, "cache")
        caps = dict(memory_bytes=MEMORY_BYTES, disk_bytes=DISK_BYTES, disk_dir=cache_dir)
        ray_cache.start(**caps)
        stack.callback(ray_cache.shutdown)
        bench.run("b", "ray_cache cold (first read, fresh cache)", lambda: ray_cache.read_parquet(
            url, filesystem=proxy_fs), repeats=1, count_gets=True)
        bench.run("c", "ray_cache warm (zero-copy, memory tier)", lambda: ray_cache.read_parquet(
            url, filesystem=proxy_fs), count_gets=True)
        bench.run("c2", "ray_cache warm, zero_copy=False (read tasks)",
                  lambda: ray_cache.read_parquet(url, filesystem=proxy_fs, zero_copy=False),
                  count_gets=True)
        log("restarting the cache workers on the same disk_dir (memory tier empty) …")
        ray_cache.shutdown()
        ray_cache.start(**caps)
        bench.run("c3", "ray_cache warm from disk tier (first read after restart)",
                  lambda: ray_cache.read_parquet(url, filesystem=proxy_fs), repeats=1,
                  count_gets=True)
        stats = ray_cache.stats()

        bench.run("d", "ray.data.read_parquet, local files",
                  lambda: ray.data.read_parquet(local_dir))
        log("materializing the local dataset for (e) …")
        mat = ray.data.read_parquet(local_dir).materialize()
        bench.run("e", "iterate materialized in-memory dataset (limit)", lambda: mat)
        arrow_bytes = int(mat.size_bytes())
        del mat

    ratios = {"c warm / a S3": bench.ratio("c", "a"), "c warm / d local": bench.ratio("c", "d"),
              "c warm / e memory": bench.ratio("c", "e"),
              "c2 warm read tasks / d local": bench.ratio("c2", "d"),
              "c2 warm read tasks / e memory": bench.ratio("c2", "e"),
              "c3 warm disk tier / d local": bench.ratio("c3", "d"),
              "c3 warm disk tier / e memory": bench.ratio("c3", "e"),
              "b cold / a S3": bench.ratio("b", "a")}
    argv_used = sys.argv[1:] if argv is None else list(argv)
    info = {"command": shlex.join(["python", "benchmarks/ingest.py", *argv_used]),
            "cores": os.cpu_count(), "platform": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "ray": ray.__version__,
            "pyarrow": pa.__version__, "ray_cache": ray_cache.__version__,
            "rows": args.rows, "files": args.files, "row_group_rows": args.row_group_rows,
            "repeats": args.repeats, "parquet_bytes": parquet_bytes, "arrow_bytes": arrow_bytes}
    print(markdown(bench, ratios, info), flush=True)
    warm_gets = {k: bench.results[k]["data_gets"] for k in ("c", "c2", "c3")}
    ok = all(v == 0 for v in warm_gets.values())
    print(f"\nWarm reads made {sum(warm_gets.values())} data GETs at the store "
          f"({'ok' if ok else 'EXPECTED 0'}); cache stats after c3: hits={stats['hits']} "
          f"misses={stats['misses']} fallbacks={stats['fallbacks']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "results": bench.results, "ratios": ratios,
                       "cache_stats_after_c3": stats}, fh, indent=2)
        log(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
