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
def spark():
    from pyspark.sql import SparkSession  # installed by scripts/test.sh (the test extra)

    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    os.environ.update(dict.fromkeys(saved, sys.executable))  # workers run this venv's Python
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
