"""Spark reading the same Parquet data four ways, in one Spark session.

Run it with::

    python benchmarks/spark_ingest.py [--files 8] [--rows 250000] [--latency-ms 20] [--repeats 3]

1. ``spark.read.parquet`` of a local copy (Spark's own reader, the data on local disk);
2. a plain Python data source reading the store with pyarrow, one partition per file
   (what a user writes without us);
3. ``spark.read.format("ray_cache")`` cold (every worker's tiers empty);
4. the same, warm.

Each run is ``SUM`` over every numeric column plus ``COUNT(*)`` (every byte decoded, as a
preprocessing job would), best of ``--repeats`` (cold: once per fresh cache). The store is
the local S3 server behind the counting proxy, ``--latency-ms`` per request (a store some
distance away); data GETs are counted there. Spark runs ``local[2]``; one node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Dict, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import log, open_store, start_local_ray

BUCKET = "bench-spark-ingest"


def _table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "id": pa.array(np.arange(rows, dtype=np.int64) + seed * rows),
        "a": rng.random(rows), "b": rng.random(rows), "c": rng.integers(0, 1 << 30, rows),
        "label": pa.array(rng.integers(0, 1000, rows).astype(str)),
    })


def plain_source() -> Any:
    """A Python data source a user would write without ray_cache: pyarrow reads the store."""
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition

    class PlainReader(DataSourceReader):
        def __init__(self, options: Dict[str, str]) -> None:
            self.options = options

        def partitions(self):
            return [InputPartition(p) for p in json.loads(self.options["files"])]

        def read(self, partition) -> Iterator[pa.RecordBatch]:
            import s3fs
            from pyspark.sql.pandas.types import to_arrow_schema

            fs = s3fs.S3FileSystem(**json.loads(self.options["storage"]))
            table = pq.read_table(partition.value, filesystem=fs)
            target = to_arrow_schema(self.schema_, timezone="UTC")
            yield from table.cast(target).to_batches()

    class PlainSource(DataSource):
        @classmethod
        def name(cls) -> str:
            return "plain_parquet"

        def schema(self):
            return "id bigint, a double, b double, c bigint, label string"

        def reader(self, schema):
            r = PlainReader(dict(self.options))
            r.schema_ = schema
            return r

    return PlainSource


def _timed(df: Any) -> float:
    t0 = time.perf_counter()
    df.selectExpr("sum(id)", "sum(a)", "sum(b)", "sum(c)", "count(label)", "count(*)").collect()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows", type=int, default=250_000)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray_cache
    import ray_cache.spark
    from pyspark.sql import SparkSession
    from ray_cache.testing import s3_data_gets
    from ray_cache.testing.s3server import FAKE_KEY, FAKE_SECRET, REGION

    with ExitStack() as stack:
        start_local_ray(stack, num_cpus=4)
        store = open_store(stack, BUCKET, latency_ms=args.latency_ms)
        local = stack.enter_context(tempfile.TemporaryDirectory())
        files = []
        for i in range(args.files):
            path = os.path.join(local, f"part-{i:03d}.parquet")
            pq.write_table(_table(args.rows, i), path, row_group_size=args.rows // 2)
            store.direct_fs.put_file(path, f"{BUCKET}/data/part-{i:03d}.parquet")
            files.append(f"{BUCKET}/data/part-{i:03d}.parquet")
        os.environ.update({"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
                           "AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                           "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": store.proxy.url})
        log("starting Spark …")
        spark = (SparkSession.builder.master("local[2]").appName("spark_ingest")
                 .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1").config("spark.python.worker.reuse", "true")
                 .getOrCreate())
        stack.callback(spark.stop)
        spark.dataSource.register(plain_source())
        ray_cache.spark.register(spark)
        storage = json.dumps(store.server.storage_options(store.proxy.url))
        url = f"s3://{BUCKET}/data/"
        rows_total = args.files * args.rows
        results: Dict[str, Dict[str, float]] = {}

        def run(name: str, make: Any, repeats: int, before: Any = None) -> None:
            best, gets = float("inf"), 0
            for _ in range(repeats):
                if before is not None:
                    before()
                store.proxy.reset()
                took = _timed(make())
                gets = len(s3_data_gets(store.proxy.requests(), BUCKET))
                log(f"  {name}: {took:.3f} s, {gets} data GETs, stats {ray_cache.stats()['misses']} misses")
                if os.environ.get("DEBUG_BENCH"):
                    log(f"    {[(r['method'], r['path'][:80]) for r in store.proxy.requests()]}")
                    log(f"    {[(w.get('node_id','')[:6], w.get('entries'), w.get('misses'), w.get('disk_dir')) for w in ray_cache.status().workers]}")
                best = min(best, took)
            results[name] = {"s": best, "rows_s": rows_total / best, "gets": gets,
                             "store_requests": len(store.proxy.requests())}
            log(f"{name}: {results[name]}")

        def fresh() -> None:
            ray_cache.shutdown()
            ray_cache.start(memory_bytes=2 << 30, disk_bytes=4 << 30,
                            disk_dir=stack.enter_context(tempfile.TemporaryDirectory()))

        run("spark.read.parquet (local files)", lambda: spark.read.parquet(local), args.repeats)
        run("plain Python data source (store)", lambda: spark.read.format("plain_parquet")
            .option("files", json.dumps(files)).option("storage", storage).load(), args.repeats)
        run("ray_cache cold", lambda: spark.read.format("ray_cache").load(url), args.repeats, before=fresh)
        run("ray_cache warm", lambda: spark.read.format("ray_cache").load(url), args.repeats)

    base = results["spark.read.parquet (local files)"]["rows_s"]
    plain = results["plain Python data source (store)"]["rows_s"]
    print(f"{args.files} files x {args.rows} rows, store {args.latency_ms:g} ms away, Spark local[2]")
    print("| read | rows/s | vs local spark.read.parquet | vs plain data source | data GETs |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rows_s']:,.0f} | {r['rows_s'] / base:.2f}x | {r['rows_s'] / plain:.2f}x | {r['gets']} |")


if __name__ == "__main__":
    main()
