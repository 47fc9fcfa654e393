"""The ``raycache`` fsspec filesystem over the local S3 server: reads, metadata, writes, errors.

Every claim about the store is checked at the counting proxy in front of it (data GETs),
not with our own counters.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import fsspec
import pytest
import s3fs
import ray

import ray_cache
from conftest import data_gets
from ray_cache.files import pages, readahead
from ray_cache.store.errors import ObjectChangedError
from ray_cache.files.fs import CacheFileSystem
from ray_cache.store.keys import StoreObject
from ray_cache.store.underfs import version_of

MiB = 1 << 20


def blob(n: int, seed: int = 0) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture()
def rfs(cache, s3fs_proxied):
    """A raycache filesystem over the proxied s3fs, with the process's page buffers empty."""
    pages.reader().clear()
    return CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)


def test_three_ways_to_build_it_read_the_same_bytes(cache, s3_server, proxy, s3fs_direct, prefix):
    data = blob(100_000)
    s3fs_direct.pipe(f"{prefix}/a.bin", data)
    opts = s3_server.storage_options(endpoint_url=proxy.url)
    with fsspec.open(f"raycache::s3://{prefix}/a.bin", "rb", s3=opts) as f:
        assert f.read() == data
    by_protocol = fsspec.filesystem("raycache", target_protocol="s3", target_options=opts)
    by_instance = fsspec.filesystem("raycache", fs=fsspec.filesystem("s3", **opts))
    with fsspec.open(f"raycache::s3://{prefix}/b.bin", "wb", s3=opts) as f:  # writes pass through
        f.write(data[:10])
    assert s3fs_direct.cat_file(f"{prefix}/b.bin") == data[:10]
    for fs in (by_protocol, by_instance):
        assert isinstance(fs, CacheFileSystem)
        for path in (f"{prefix}/a.bin", f"s3://{prefix}/a.bin", f"raycache://{prefix}/a.bin"):
            assert fs.cat_file(path, start=10, end=20) == data[10:20]


def test_ranges_are_assembled_from_pages_and_warm_reads_send_no_data_request(rfs, s3fs_direct, proxy, prefix):
    data = blob(13 * MiB + 123)  # pages 0-3 of 4 MiB
    path = f"{prefix}/big.bin"
    s3fs_direct.pipe(path, data)
    proxy.reset()
    assert rfs.cat_file(path, start=3 * MiB, end=9 * MiB) == data[3 * MiB : 9 * MiB]
    gets = data_gets(proxy)
    assert [r["range"] for r in gets] == [f"bytes=0-{12 * MiB - 1}"], \
        "pages 0, 1 and 2 of 4 MiB: consecutive cold pages fetched as one part, one GET"
    proxy.reset()
    assert rfs.cat_file(path, start=4 * MiB - 5, end=4 * MiB + 5) == data[4 * MiB - 5 : 4 * MiB + 5]
    assert rfs.cat_ranges([path, path], [0, 5 * MiB], [100, 6 * MiB]) == [data[:100], data[5 * MiB : 6 * MiB]]
    with rfs.open(path, "rb") as f:
        f.seek(7 * MiB)
        assert f.read(MiB) == data[7 * MiB : 8 * MiB]
        f.seek(-50, os.SEEK_CUR)
        assert f.read(100) == data[8 * MiB - 50 : 8 * MiB + 50]
    assert data_gets(proxy) == [], "warm range reads must not GET object data"
    proxy.reset()
    reader = pages.reader()
    reader.clear()  # not from this process's buffers: from the worker's memory tier
    reader.short_circuit = False
    try:
        assert rfs.cat_file(path) == data
    finally:
        reader.short_circuit = True
    assert len(data_gets(proxy)) == 1, "only the last page (never read) is fetched"
    assert ray_cache.stats()["memory_hits"] >= 3


def test_page_fetches_from_s3_carry_their_version_check(cache, s3_server, s3fs_direct, prefix, proxy):
    data = blob(9 * MiB)  # 9 pages of 1 MiB, fetched by their owner in parallel
    path = f"{prefix}/conditional.bin"
    s3fs_direct.pipe(path, data)
    etag = s3fs_direct.info(path)["ETag"]
    far = s3fs.S3FileSystem(**s3_server.storage_options(endpoint_url=proxy.url), skip_instance_cache=True)
    rfs = CacheFileSystem(fs=far, page_size=MiB, skip_instance_cache=True)
    proxy.reset()
    assert rfs.cat_file(path) == data
    reqs = [r for r in proxy.requests() if r["path"].split("?")[0] == "/" + path]
    gets = [r for r in reqs if r["method"] == "GET"]
    assert [r["range"] for r in gets] == [f"bytes=0-{9 * MiB - 1}"], "9 pages, one part, one GET"
    assert {r["if_match"] for r in gets} == {etag}, "the GET is conditional on the planned ETag"
    assert [r["method"] for r in reqs if r["method"] != "GET"] == ["HEAD"], \
        "one HEAD for info() when planning; no version check after the GETs"


def test_pages_survive_a_worker_restart_on_its_disk_tier(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    data = blob(5 * MiB)
    path = f"{prefix}/d.bin"
    s3fs_direct.pipe(path, data)
    rfs = CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)
    assert rfs.cat_file(path) == data
    ray_cache.status()  # waits for nothing; flush below makes the disk writes visible
    for w in ray_cache.status().workers:
        assert w["entries"] >= 2
    ray_cache.shutdown()  # flushes the disk tier
    ray_cache.start(memory_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=str(cache))
    reader = pages.reader()
    reader.clear()
    ray.get(reader.flush_touches(), timeout=60)  # reports of earlier mapped reads: counted now
    proxy.reset()
    reader.short_circuit = False  # through the worker, which reads its disk tier
    try:
        assert rfs.cat_file(path) == data
    finally:
        reader.short_circuit = True
    assert data_gets(proxy) == []
    assert ray_cache.stats()["disk_hits"] == 2
    reader.buffers.clear()  # and mapped straight from this node's disk tier: no worker call
    mapped = reader.stats()["mapped_pages"]
    assert rfs.cat_file(path) == data
    assert reader.stats()["mapped_pages"] == mapped + 2
    assert data_gets(proxy) == []
    # The owner learns of the mapped reads (its hit counters and disk-tier recency): a
    # report may already have gone out on its own (once a second); flushing sends the rest.
    ray.get(reader.flush_touches(), timeout=60)
    assert ray_cache.stats()["disk_hits"] == 4


def test_reads_past_the_end_return_what_fsspec_filesystems_return(rfs, s3fs_direct, prefix):
    data = b"0123456789"
    s3fs_direct.pipe(f"{prefix}/ten", data)
    s3fs_direct.pipe(f"{prefix}/empty", b"")
    memory = fsspec.filesystem("memory")
    memory.pipe(f"/{prefix}/ten", data)
    cases = [(20, 30), (5, 30), (8, None), (-3, None), (None, -2), (5, 3), (10, 12), (-30, None), (0, -30)]
    for start, end in cases:
        want = memory.cat_file(f"/{prefix}/ten", start=start, end=end)
        assert rfs.cat_file(f"{prefix}/ten", start=start, end=end) == want, (start, end)
    with rfs.open(f"{prefix}/ten") as f:
        f.seek(20)
        assert f.read(5) == b""
    assert rfs.cat_file(f"{prefix}/empty") == b""
    assert rfs.cat(f"{prefix}/*") == {f"{prefix}/empty": b"", f"{prefix}/ten": data}


def test_text_mode_and_readline(rfs, s3fs_direct, prefix):
    s3fs_direct.pipe(f"{prefix}/t.txt", b"alpha\nbeta\ngamma\n")
    with rfs.open(f"{prefix}/t.txt", "r") as f:
        assert f.readline() == "alpha\n"
        assert f.read() == "beta\ngamma\n"


def test_metadata_matches_the_target(rfs, s3fs_direct, prefix):
    for name, size in [("a/1.bin", 10), ("a/2.bin", 20), ("a/b/3.bin", 30), ("c.txt", 5)]:
        s3fs_direct.pipe(f"{prefix}/{name}", b"x" * size)
    assert rfs.ls(prefix, detail=False) == s3fs_direct.ls(prefix, detail=False)
    assert rfs.find(prefix) == s3fs_direct.find(prefix)
    assert rfs.glob(f"{prefix}/a/*.bin") == [f"{prefix}/a/1.bin", f"{prefix}/a/2.bin"]
    assert rfs.glob(f"s3://{prefix}/**/*.bin") == s3fs_direct.glob(f"{prefix}/**/*.bin")
    assert rfs.du(prefix) == 65
    assert rfs.info(f"{prefix}/a/b/3.bin")["size"] == 30
    assert rfs.isdir(f"{prefix}/a") and rfs.isfile(f"{prefix}/c.txt") and not rfs.exists(f"{prefix}/zz")
    assert [p for p, _dirs, _files in rfs.walk(prefix)] == [p for p, _d, _f in s3fs_direct.walk(prefix)]


def test_writes_pass_through_and_are_read_back_at_once(cache, s3fs_direct, s3fs_proxied, prefix, tmp_path):
    rfs = CacheFileSystem(fs=s3fs_proxied, metadata_ttl=600, skip_instance_cache=True)
    path = f"{prefix}/w.bin"
    rfs.pipe(path, b"one")
    assert rfs.cat_file(path) == b"one"
    with rfs.open(path, "wb") as f:
        f.write(b"two!")
    assert rfs.cat_file(path) == b"two!" and s3fs_direct.cat_file(path) == b"two!"
    local = tmp_path / "up.bin"
    local.write_bytes(b"three")
    rfs.put(str(local), path)
    assert rfs.cat_file(path) == b"three"
    rfs.cp(path, f"{prefix}/copy.bin")
    rfs.mv(f"{prefix}/copy.bin", f"{prefix}/moved.bin")
    assert rfs.cat_file(f"{prefix}/moved.bin") == b"three"
    assert not rfs.exists(f"{prefix}/copy.bin")
    rfs.rm(path)
    assert not rfs.exists(path)
    with pytest.raises(FileNotFoundError):
        rfs.cat_file(path)


def test_a_rewrite_by_another_writer_within_the_ttl_and_after(cache, s3fs_direct, s3fs_proxied, prefix):
    path = f"{prefix}/r.bin"
    s3fs_direct.pipe(path, b"A" * 1000)
    patient = CacheFileSystem(fs=s3fs_proxied, metadata_ttl=600, skip_instance_cache=True)
    strict = CacheFileSystem(fs=s3fs_proxied, metadata_ttl=0, skip_instance_cache=True)
    assert patient.cat_file(path) == strict.cat_file(path) == b"A" * 1000
    s3fs_direct.pipe(path, b"B" * 1000)
    assert strict.cat_file(path) == b"B" * 1000, "metadata_ttl=0 asks the store on every read"
    assert patient.cat_file(path) == b"A" * 1000, "the documented window: the version seen within the TTL"
    patient.invalidate_cache(path)
    assert patient.cat_file(path) == b"B" * 1000


def test_a_page_of_another_version_is_discarded_never_served(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    path = f"{prefix}/v.bin"
    s3fs_direct.pipe(path, b"old!" * 1000)
    info = s3fs_proxied.info(path)
    planned = StoreObject("s3", path, info["size"], version_of(info))
    s3fs_direct.pipe(path, b"new!" * 1000)  # rewritten between planning and reading
    for _ in range(2):
        proxy.reset()
        with pytest.raises(ObjectChangedError):
            pages.reader().read_range(s3fs_proxied, planned, 0, 4000)
        assert len(data_gets(proxy)) == 1, "fetched each time: the mismatching page was not kept"
    assert sum(w["entries"] for w in ray_cache.status().workers) == 0
    # Through the filesystem: a version remembered from before the rewrite is looked up again.
    s3fs_direct.pipe(path, b"old!" * 1000)
    rfs = CacheFileSystem(fs=s3fs_proxied, metadata_ttl=600, skip_instance_cache=True)
    assert rfs.info(path)["size"] == 4000
    s3fs_direct.pipe(path, b"new!" * 1000)
    assert rfs.cat_file(path) == b"new!" * 1000
    assert rfs.cat_ranges([path], [0], [8]) == [b"new!new!"]


def test_an_open_file_is_a_snapshot_of_one_version(rfs, s3fs_direct, prefix):
    path = f"{prefix}/snap.bin"
    s3fs_direct.pipe(path, b"1" * (5 * MiB))
    with rfs.open(path) as f:
        assert f.read(10) == b"1" * 10
        s3fs_direct.pipe(path, b"2" * (5 * MiB))
        f.seek(4 * MiB + 1)  # the second page was never read: it is of the new version now
        with pytest.raises(ObjectChangedError) as err:
            f.read(10)
    assert path in str(err.value)


def test_missing_object_and_unknown_protocol(rfs, prefix):
    for call in (lambda: rfs.cat_file(f"{prefix}/nope.bin"), lambda: rfs.open(f"{prefix}/nope.bin"),
                 lambda: rfs.info(f"{prefix}/nope.bin")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert f"{prefix}/nope.bin" in str(err.value)
    out = rfs.cat_ranges([f"{prefix}/nope.bin"], [0], [1])
    assert isinstance(out[0], FileNotFoundError)
    with pytest.raises(ValueError) as err:
        fsspec.filesystem("raycache", target_protocol="nosuchstore")
    assert "nosuchstore" in str(err.value) and "s3" in str(err.value) and "gcs" in str(err.value)
    with pytest.raises(ValueError):
        CacheFileSystem()


def test_pickled_filesystem_reads_in_ray_tasks(rfs, s3fs_direct, proxy, prefix):
    data = blob(300_000, seed=3)
    path = f"{prefix}/task.bin"
    s3fs_direct.pipe(path, data)
    again = pickle.loads(pickle.dumps(rfs))
    assert again.cat_file(path) == data

    @ray.remote(num_cpus=0)
    def read(fs, p):
        return fs.cat_file(p, start=1000, end=2000)

    proxy.reset()
    assert ray.get(read.remote(rfs, path)) == data[1000:2000]
    assert data_gets(proxy) == [], "the task reads the page the driver cached"


SCRIPT = """
import json, sys, fsspec
opts, path = json.loads(sys.argv[1]), sys.argv[2]
with fsspec.open("raycache::s3://" + path, "rb", s3=opts) as f:
    data = f.read()
import ray, ray_cache
print(json.dumps({"n": len(data), "ray": ray.is_initialized(), "misses": ray_cache.stats()["misses"]}))
ray_cache.shutdown()
ray.shutdown()
"""


def test_works_in_a_process_without_ray(s3_server, proxy, s3fs_direct, prefix, tmp_path):
    s3fs_direct.pipe(f"{prefix}/plain.bin", b"z" * 5000)
    env = dict(os.environ, RAY_ADDRESS="local", RAY_CACHE_DIR=str(tmp_path / "cache"))
    opts = json.dumps(s3_server.storage_options(endpoint_url=proxy.url))
    done = subprocess.run([sys.executable, "-c", SCRIPT, opts, f"{prefix}/plain.bin"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"n": 5000, "ray": True, "misses": 1}


def _pages_got() -> int:  # pages this process got from a worker or mapped from its disk
    st = pages.reader().stats()
    return st["worker_pages"] + st["mapped_pages"]


def test_a_sequential_reader_fetches_ahead_each_page_once(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    data = blob(12 * MiB + 3)
    path = f"{prefix}/sequential.bin"
    s3fs_direct.pipe(path, data)
    rfs = CacheFileSystem(fs=s3fs_proxied, page_size=MiB, skip_instance_cache=True)
    pages.reader().clear()
    proxy.reset()
    got, before = [], pages.reader().stats()["worker_pages"]
    with rfs.open(path) as f:
        while chunk := f.read(256 * 1024):
            got.append(chunk)
        assert f._ahead.window == readahead.MAX_PAGES, "the window grew while the reads stayed in order"
    assert b"".join(got) == data
    spans = sorted(tuple(int(x) for x in r["range"].split("=")[1].split("-")) for r in data_gets(proxy))
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 1 and len(spans) < 13
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:])), "each byte fetched once"
    assert pages.reader().stats()["worker_pages"] - before == 13, \
        "and received once: a read waits for a page being fetched ahead"
    pages.reader().clear()
    before = _pages_got()
    with rfs.open(path) as f:  # random reads fetch nothing ahead
        for start in (9 * MiB, 2 * MiB, 7 * MiB, 0):
            f.seek(start)
            assert f.read(1000) == data[start:start + 1000]
        assert f._ahead.window == 0
    assert _pages_got() - before == 4


def test_concurrent_readers_of_one_cold_file_share_its_fetch(cache, s3_server, s3fs_direct, prefix):
    from ray_cache.testing import CountingProxy

    data = blob(3 * MiB + 11)
    path = f"{prefix}/shared-cold.bin"
    s3fs_direct.pipe(path, data)
    with CountingProxy(s3_server.endpoint_url, latency_ms=400) as slow:
        far = s3fs.S3FileSystem(**s3_server.storage_options(endpoint_url=slow.url), skip_instance_cache=True)
        rfs = CacheFileSystem(fs=far, page_size=MiB, skip_instance_cache=True)
        rfs.info(path)

        @ray.remote(num_cpus=0)
        def read_all(fs):
            return fs.cat_file(path)

        got = ray.get([read_all.remote(rfs) for _ in range(6)], timeout=120)
        gets = [r for r in slow.requests() if r["method"] == "GET" and r["path"].split("?")[0] == "/" + path]
    assert all(g == data for g in got)
    assert len(gets) == 1, f"six readers of one cold file: {[r['range'] for r in gets]}"
