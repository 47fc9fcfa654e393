"""Faults injected between the cache and a real S3 server, at a proxy of our own.

For each fault (503 SlowDown, 500, a connection cut mid-reply, a body truncated behind a
consistent Content-Length, a stalled reply) and each way in (Parquet, files, ``load``,
writes): the right data or a clear ``OSError`` naming the object, in bounded time; nothing
wrong or partial cached (a second, fault-free read must be right and sent no data GET);
the cache keeps serving what it has. Faults are counted at the proxy, not by us. Also the
object store full (a Ray of its own that may not spill): right bytes, read from the store.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ray_cache
from conftest import data_gets, read_all, write_dataset
from ray_cache.files import pages
from ray_cache.files.fs import CacheFileSystem
from ray_cache.testing import CountingProxy

FAULTS = {
    "503 on every 3rd GET": [{"kind": "503", "every": 3}],
    "500 on every 3rd GET": [{"kind": "500", "every": 3}],
    "cut mid-reply, 3 times": [{"kind": "cut", "every": 2, "times": 3, "ranged": True}],
    "body truncated, 3 times": [{"kind": "truncate", "every": 2, "times": 3, "ranged": True}],
    "reply stalled once": [{"kind": "stall", "times": 1, "ranged": True}],
}
#: The reader's own timeout for a stalled reply; our bound above it is READ_TIMEOUT_S.
READ_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def faulty(s3_server):
    with CountingProxy(s3_server.endpoint_url) as p:
        yield p


def _fs(s3_server, proxy):
    import s3fs

    opts = s3_server.storage_options(endpoint_url=proxy.url)
    return s3fs.S3FileSystem(**opts, skip_instance_cache=True,
                             config_kwargs={"read_timeout": READ_TIMEOUT_S, "connect_timeout": READ_TIMEOUT_S})


@contextlib.contextmanager
def _injected(proxy, *rules):
    """Counts cleared, ``rules`` injected for the block; then ``run["fired"]`` says how many
    faults fired (counted at the proxy) and the proxy is fault-free again."""
    run = {}
    proxy.reset()
    proxy.inject(*rules)
    try:
        yield run
    finally:
        run["fired"] = proxy.faults_fired()
        proxy.inject()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_parquet_reads_are_right_under_faults(cache, s3_server, s3fs_direct, faulty, prefix, fault):
    paths = write_dataset(s3fs_direct, prefix, files=3, rows=12_000, rg_rows=3_000)
    want = pa.concat_tables([pq.read_table(p, filesystem=s3fs_direct) for p in paths]).sort_by("id")
    fs = _fs(s3_server, faulty)
    got = None
    with _injected(faulty, *FAULTS[fault]) as run:
        try:
            got = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs, zero_copy=False))
        except OSError as exc:  # allowed: a clear error naming the object ...
            assert prefix in str(exc)
    assert run["fired"] > 0, "the fault never fired: the test proved nothing"
    if got is not None:
        assert got.equals(want)
    # ... but nothing wrong or partial was cached: fault-free, right, and all from the cache
    # for what the faulty read did cache
    faulty.reset()
    again = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs, zero_copy=False))
    assert again.equals(want)
    faulty.reset()
    assert read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs)).equals(want)
    assert data_gets(faulty) == []


@pytest.mark.parametrize("fault", list(FAULTS))
def test_file_reads_are_right_under_faults(cache, s3_server, s3fs_direct, faulty, prefix, fault):
    rng = np.random.default_rng(3)
    blobs = {f"{prefix}/f-{i}.bin": rng.integers(0, 256, 600_000, dtype=np.uint8).tobytes() for i in range(3)}
    for path, data in blobs.items():
        s3fs_direct.pipe(path, data)
    fs = _fs(s3_server, faulty)
    pages.reader().clear()
    rfs = CacheFileSystem(fs=fs, page_size=128 << 10, skip_instance_cache=True)
    with _injected(faulty, *FAULTS[fault]) as run:
        for path, data in blobs.items():
            try:
                with rfs.open(path, "rb") as f:
                    assert f.read() == data
            except OSError as exc:  # allowed: a clear error naming the object
                assert path in str(exc)
    assert run["fired"] > 0
    pages.reader().clear()
    for path, data in blobs.items():
        assert rfs.cat_file(path) == data
    faulty.reset()
    pages.reader().clear()
    for path, data in blobs.items():
        assert rfs.cat_file(path) == data
    assert data_gets(faulty) == []


@pytest.mark.parametrize("fault", ["503 on every 3rd GET", "cut mid-reply, 3 times"])
def test_load_under_faults_then_warm(cache, s3_server, s3fs_direct, faulty, prefix, fault):
    paths = write_dataset(s3fs_direct, prefix, files=2, rows=8_000, rg_rows=2_000)
    want = pa.concat_tables([pq.read_table(p, filesystem=s3fs_direct) for p in paths]).sort_by("id")
    fs = _fs(s3_server, faulty)
    with _injected(faulty, *FAULTS[fault]) as run:
        ray_cache.load(f"s3://{prefix}/", filesystem=fs)
    assert run["fired"] > 0
    faulty.reset()
    assert read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs)).equals(want)
    assert data_gets(faulty) == []


@pytest.mark.parametrize("kind", ["503", "500"])
def test_writes_through_the_cache_retry_and_land_whole(cache, s3_server, s3fs_direct, faulty, prefix, kind):
    fs = _fs(s3_server, faulty)
    rfs = CacheFileSystem(fs=fs, skip_instance_cache=True)
    data = np.random.default_rng(4).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    with _injected(faulty, {"kind": kind, "method": "PUT", "times": 1}) as run:
        rfs.pipe_file(f"{prefix}/w.bin", data)
        with rfs.open(f"{prefix}/w2.bin", "wb") as f:
            f.write(data)
    assert run["fired"] == 1
    for name in ("w.bin", "w2.bin"):
        assert s3fs_direct.cat_file(f"{prefix}/{name}") == data
        assert rfs.cat_file(f"{prefix}/{name}") == data


FULL_STORE = """
import json, os, sys
import fsspec, numpy as np, ray
import ray_cache
from ray_cache.files import pages
from ray_cache.files.fs import CacheFileSystem

d = sys.argv[1]
# A Ray of its own: no spilling, and every disk counts as full, so an object the object
# store has no room for is refused (as on a node whose spill disk is full).
ray.init(address="local", num_cpus=2, object_store_memory=80 << 20, include_dashboard=False,
         logging_level="ERROR",
         _system_config={"automatic_object_spilling_enabled": False, "local_fs_capacity_threshold": 0.0})
ray_cache.start(memory_bytes=40 << 20, disk_bytes=256 << 20, disk_dir=os.path.join(d, "cache"))
blobs = {os.path.join(d, f"f{i}.bin"): os.urandom(6 << 20) for i in range(3)}
for p, b in blobs.items():
    open(p, "wb").write(b)
hold, refused = [], None
while refused is None:
    try:
        hold.append(ray.put(np.zeros(4 << 20, dtype=np.uint8)))
    except Exception as exc:
        refused = type(exc).__name__
rfs = CacheFileSystem(fs=fsspec.filesystem("file"), skip_instance_cache=True)
out = {"refused": refused, "full": [rfs.cat_file(p) == b for p, b in blobs.items()],
       "fallback_pages": pages.reader().stats()["fallback_pages"], "fallbacks": ray_cache.stats()["fallbacks"]}
del hold
pages.reader().clear()
out["after"] = [rfs.cat_file(p) == b for p, b in blobs.items()]
store_bytes = ray_cache.stats()["bytes_from_under_store"]
pages.reader().clear()
out["again"] = [rfs.cat_file(p) == b for p, b in blobs.items()]
out["store_bytes_again"] = ray_cache.stats()["bytes_from_under_store"] - store_bytes
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_full_object_store_costs_no_error_and_caches_nothing_partial(tmp_path):
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FULL_STORE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["refused"] in ("ObjectStoreFullError", "OutOfDiskError"), "the object store was full"
    assert out["full"] == [True] * 3, "right bytes while the object store had no room"
    assert out["fallback_pages"] > 0 and out["fallbacks"] == out["fallback_pages"], out
    assert out["after"] == out["again"] == [True] * 3
    assert out["store_bytes_again"] == 0, "once there was room, what was cached is served"
