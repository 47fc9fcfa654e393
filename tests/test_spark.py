"""Spark's Python workers read through the cache with the ``raycache`` filesystem.

Real PySpark (``local[2]``, Java 17): the filesystem is pickled into a task's closure and
unpickled in Spark's Python worker processes, which have no Ray of their own; there it
joins the Ray cluster whose address was recorded at pickling and reads pages through the
cache workers (``ray_cache.files.pages``). The cache is warmed by this process first, so every
data request the Spark job could make would be counted at the proxy in front of the S3
server: there must be none.
"""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

import ray_cache
from conftest import data_gets
from ray_cache.files.fs import CacheFileSystem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark(s3_server, proxy):
    from pyspark.sql import SparkSession  # installed by scripts/test.sh (the test extra)
    from ray_cache.testing.s3server import FAKE_KEY, FAKE_SECRET, REGION

    # The store as a user's environment names it (AWS_*), for the data source with no options:
    # Spark's Python workers inherit the JVM's environment, which is this one.
    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": REGION,
           "AWS_ENDPOINT_URL": proxy.url}
    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", *env)}
    os.environ.update(dict.fromkeys(("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"), sys.executable))
    os.environ.update(env)
    session = (SparkSession.builder.master("local[2]").appName("ray_cache-test")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.python.worker.reuse", "true")
               .getOrCreate())
    yield session
    session.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_spark_python_workers_read_through_the_cache(spark, cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    blobs = {f"{prefix}/img-{i:02d}.bin": os.urandom(50_000 + 7_000 * i) for i in range(12)}
    for path, data in blobs.items():
        s3fs_direct.pipe(path, data)
    rfs = CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)
    for path in blobs:  # warm the cache from here
        rfs.cat_file(path)
    proxy.reset()

    def read(paths):
        import ray

        from ray_cache.files import pages

        for path in paths:
            data = rfs.cat_file(path)
            yield path, len(data), hashlib.sha256(data).hexdigest(), os.getpid()
        ray.get(pages.reader().flush_touches(), timeout=60)  # pages mapped here, told to owners
        stats = pages.reader().stats()
        yield "stats", stats["worker_pages"] + stats["mapped_pages"] + stats["buffer_hits"], \
            stats["direct_pages"] + stats["fallback_pages"], os.getpid()

    rows = spark.sparkContext.parallelize(sorted(blobs), 2).mapPartitions(read).collect()
    got = {r[0]: (r[1], r[2]) for r in rows if r[0] != "stats"}
    assert got == {p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in blobs.items()}
    assert {r[3] for r in rows} - {os.getpid()}, "the reads ran in Spark's worker processes"
    stats = [r for r in rows if r[0] == "stats"]
    assert stats and all(cached > 0 and direct == 0 for _s, cached, direct, _pid in stats), stats
    assert data_gets(proxy) == [], "every page came from the cache, none from the store"
    # This process's reads were the misses; the owners counted Spark's reads as hits.
    assert ray_cache.stats()["hits"] >= len(blobs), ray_cache.stats()


# -- the ray_cache data source -------------------------------------------------------------

def _rich_table(n: int = 3_000):
    import datetime
    import decimal

    import pyarrow as pa

    rng = __import__("numpy").random.default_rng(5)
    return pa.table({
        "id": pa.array(range(n), pa.int64()),
        "small": pa.array(rng.integers(-100, 100, n), pa.int32()),
        "x": pa.array(rng.random(n)),
        "name": pa.array([None if i % 7 == 0 else f"n{i % 13}" for i in range(n)], pa.string()),
        "flag": pa.array([i % 3 == 0 for i in range(n)]),
        "day": pa.array([datetime.date(2024, 1, 1) + datetime.timedelta(days=i % 400) for i in range(n)]),
        "at": pa.array([datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)
                        + datetime.timedelta(seconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
        "price": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(10, 2)),
        "blob": pa.array([bytes([i % 256]) * (i % 5) for i in range(n)], pa.binary()),
        "tags": pa.array([[f"t{j}" for j in range(i % 3)] for i in range(n)], pa.list_(pa.string())),
        "point": pa.array([{"a": i, "b": float(i) / 2} for i in range(n)],
                          pa.struct([("a", pa.int64()), ("b", pa.float64())])),
    })


def _layouts(s3fs_direct, prefix, tmp_path):
    """The same files on the S3 server and on local disk (Spark's own reader reads the copy)."""
    import pyarrow.parquet as pq

    table = _rich_table()
    trees = {
        "flat": {"a.parquet": table.slice(0, 1_500), "b.parquet": table.slice(1_500)},
        "partitioned": {f"year={y}/region={r}/part.parquet": table.slice(i * 700, 700)
                        for i, (y, r) in enumerate([(2024, "eu"), (2024, "us"), (2025, "eu"), (2025, "us")])},
    }
    out = {}
    for name, files in trees.items():
        for rel, t in files.items():
            local = tmp_path / name / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t, local, row_group_size=500)
            s3fs_direct.put_file(str(local), f"{prefix}/{name}/{rel}")
        out[name] = (f"s3://{prefix}/{name}/", str(tmp_path / name))
    return out


def _collect(df):
    return sorted(df.collect(), key=lambda r: r["id"])


def test_the_data_source_reads_what_sparks_parquet_reader_reads_cold_and_warm(
        spark, cache, s3fs_direct, proxy, prefix, tmp_path):
    import ray_cache.spark

    ray_cache.spark.register(spark)
    for name, (url, local) in _layouts(s3fs_direct, prefix, tmp_path).items():
        want = spark.read.parquet(local)
        for temp in ("cold", "warm"):
            proxy.reset()
            got = spark.read.format("ray_cache").load(url)  # no options: AWS_* from the environment
            assert got.schema == want.schema, (name, temp, got.schema.simpleString(), want.schema.simpleString())
            assert _collect(got) == _collect(want), (name, temp)
            if temp == "warm":
                assert data_gets(proxy) == [], f"{name}: a warm Spark read sends no data request"
        cols = spark.read.format("ray_cache").option("columns", "id,name").load(url)
        assert _collect(cols) == _collect(want.select("id", "name")), name


@pytest.mark.parametrize("pushdown", ["on", "off"])
def test_filters_give_sparks_rows_and_pushed_ones_read_less(spark, cache, s3fs_direct, proxy, prefix, tmp_path,
                                                            pushdown):
    import ray_cache.spark

    url, local = _layouts(s3fs_direct, prefix, tmp_path)["partitioned"]
    spark.conf.set("spark.sql.python.filterPushdown.enabled", "true" if pushdown == "on" else "false")
    try:
        ray_cache.spark.register(spark)
        where = "year = 2025 AND small > 0 AND name IS NOT NULL"
        spark.read.format("ray_cache").load(url).schema  # planning reads the footers: not counted
        proxy.reset()
        got = spark.read.format("ray_cache").load(url).where(where)
        assert _collect(got) == _collect(spark.read.parquet(local).where(where))
        from urllib.parse import unquote

        fetched = {unquote(r["path"].split("?")[0]).rsplit("/", 3)[-3] for r in data_gets(proxy)}
        if pushdown == "on":
            assert fetched == {"year=2025"}, "the 2024 partitions' units were never read"
        else:
            assert fetched == {"year=2024", "year=2025"}, "without pushdown every unit is read"
    finally:
        spark.conf.set("spark.sql.python.filterPushdown.enabled", "false")
        ray_cache.spark.register(spark)


def test_spark_writes_through_the_cache_and_the_next_read_is_warm(spark, cache, s3fs_direct, s3fs_proxied,
                                                                  proxy, prefix, tmp_path):
    import ray_cache.spark

    ray_cache.spark.register(spark)
    url, local = _layouts(s3fs_direct, prefix, tmp_path)["flat"]
    src = spark.read.parquet(local).select("id", "small", "x", "name")
    out = f"s3://{prefix}/written/"
    src.repartition(3).write.format("ray_cache").mode("overwrite").save(out)
    files = [p for p in s3fs_direct.find(f"{prefix}/written/") if p.endswith(".parquet")]
    assert len(files) == 3, "exactly one file per partition"
    proxy.reset()
    ds = ray_cache.read_parquet(out, filesystem=s3fs_proxied)  # the training job's read
    got = sorted(ds.take_all(), key=lambda r: r["id"])
    assert data_gets(proxy) == [], "what Spark wrote through the cache is read warm"
    assert [r["id"] for r in got] == [r["id"] for r in _collect(src)]
    again = spark.read.format("ray_cache").load(out)
    assert _collect(again) == _collect(src)
    # overwrite keeps only the new job's files
    src.repartition(2).write.format("ray_cache").mode("overwrite").save(out)
    assert len([p for p in s3fs_direct.find(f"{prefix}/written/") if p.endswith(".parquet")]) == 2


def test_a_failed_spark_write_leaves_no_file(spark, cache, s3fs_direct, prefix):
    import ray_cache.spark
    from pyspark.sql.functions import udf

    ray_cache.spark.register(spark)

    @udf("long")
    def boom(i):
        if i == 2_500:
            raise RuntimeError("a task fails mid-write")
        return i

    df = spark.range(0, 3_000, numPartitions=3).withColumn("v", boom("id"))
    with pytest.raises(Exception, match="a task fails mid-write"):
        df.write.format("ray_cache").mode("append").save(f"s3://{prefix}/failed/")
    assert [p for p in s3fs_direct.find(f"{prefix}/failed/") if not p.rsplit("/", 1)[-1].startswith("_")] == []


def test_a_task_that_closes_its_file_after_the_abort_deletes_it(spark, cache, s3fs_direct, prefix):
    # The race a listing alone misses: abort() has listed and deleted while another task was
    # still closing its file. Here the abort comes first and the task finishes after it.
    import pyarrow as pa

    import ray_cache.spark

    ray_cache.spark.register(spark)
    source = ray_cache.spark.RayCacheSource({"path": f"s3://{prefix}/late/"})
    writer = source.writer(None, False)
    writer.abort([])
    written = writer.write(iter([pa.record_batch({"id": pa.array(range(100))})]))
    assert written.path is None
    assert [p for p in s3fs_direct.find(f"{prefix}/late/") if p.endswith(".parquet")] == []
