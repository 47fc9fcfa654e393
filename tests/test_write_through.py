"""Write-through: what is written through ``raycache`` is read back with no data request.

Every count of requests is taken at the counting proxy in front of the S3 server; bytes
read back are compared with what s3fs itself reads from the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from conftest import data_gets, fresh_cache, gpu_node_ids, make_table
from ray_cache.cluster import membership
from ray_cache.files import pages
from ray_cache.files.fs import CacheFileSystem
from ray_cache.files.pagebuf import PAGE_SIZE
from ray_cache.files.spool import INLINE_BYTES

MiB = 1 << 20


def _blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _rfs(s3fs_proxied) -> CacheFileSystem:
    return CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)


def _uploads(s3fs_direct, prefix: str) -> list:
    bucket, _, key = prefix.partition("/")
    out = s3fs_direct.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    return out.get("Uploads", [])


def _read_back_cold_here(rfs, path):
    """Read ``path`` with this process's buffers empty: every page from the workers or the store."""
    pages.reader().clear()
    return rfs.cat_file(path)


@pytest.mark.parametrize("size, write", [(0, 3 * MiB), (1000, 3 * MiB), (INLINE_BYTES, 100_000),
                                         (INLINE_BYTES + 1, 400_000), (9 * MiB + 5, 3 * MiB)],
                         ids=["empty", "small", "small in many writes (sent with the call)",
                              "one byte over (spooled)", "pages"])
def test_a_file_written_through_is_read_back_with_no_data_request(cache, s3fs_direct, s3fs_proxied, proxy,
                                                                  prefix, size, write):
    rfs, data, path = _rfs(s3fs_proxied), _blob(size), f"{prefix}/w.bin"
    before = ray_cache.stats()["written_entries"]
    with rfs.open(path, "wb") as f:
        for i in range(0, size, write):
            f.write(data[i:i + write])
    assert s3fs_direct.cat_file(path) == data, "the store has the bytes"
    proxy.reset()
    assert _read_back_cold_here(rfs, path) == data
    assert data_gets(proxy) == []
    assert ray_cache.stats()["written_entries"] - before == -(-size // PAGE_SIZE)


def test_multipart_writes_and_every_write_method_are_written_through(cache, s3fs_direct, s3fs_proxied, proxy,
                                                                     prefix, tmp_path):
    rfs = _rfs(s3fs_proxied)
    big = _blob(11 * MiB, 1)
    with rfs.open(f"{prefix}/mpu.bin", "wb", block_size=5 * MiB) as f:  # three parts
        f.write(big)
    assert "-" in s3fs_direct.info(f"{prefix}/mpu.bin")["ETag"], "the store saw a multipart upload"
    rfs.pipe_file(f"{prefix}/piped.bin", big[:1234])
    local = tmp_path / "up.bin"
    local.write_bytes(big[:5 * MiB])
    rfs.put(str(local), f"{prefix}/put.bin")
    with rfs.open(f"{prefix}/text.txt", "w") as f:
        f.write("alpha\nbeta\n")
    table = make_table(5_000)
    pq.write_table(table, f"{prefix}/t.parquet", filesystem=rfs)
    pd.DataFrame({"x": range(100)}).to_csv(f"raycache::s3://{prefix}/p.csv", index=False,
                                          storage_options={"s3": dict(s3fs_proxied.storage_options)})
    names = ["mpu.bin", "piped.bin", "put.bin", "text.txt", "t.parquet", "p.csv"]
    want = {n: s3fs_direct.cat_file(f"{prefix}/{n}") for n in names}
    proxy.reset()
    pages.reader().clear()
    got = {n: rfs.cat_file(f"{prefix}/{n}") for n in names}
    assert got == want
    assert pq.read_table(f"{prefix}/t.parquet", filesystem=rfs).equals(table)
    assert data_gets(proxy) == [], "every one of them was cached as written"


def test_a_write_that_fails_leaves_no_object_no_upload_and_no_entry(cache, s3fs_direct, s3fs_proxied, prefix):
    rfs = _rfs(s3fs_proxied)
    entries = sum(w["entries"] for w in ray_cache.status().workers)
    before = ray_cache.stats()["written_entries"]
    for size, block in ((1000, None), (12 * MiB, 5 * MiB)):  # one-shot PUT, and a started multipart upload
        path = f"{prefix}/broken-{size}.bin"
        with pytest.raises(RuntimeError, match="writer failed"):
            with rfs.open(path, "wb", **({"block_size": block} if block else {})) as f:
                f.write(_blob(size))
                raise RuntimeError("writer failed")
        assert not s3fs_direct.exists(path)
    assert _uploads(s3fs_direct, prefix) == []
    assert ray_cache.stats()["written_entries"] == before
    assert sum(w["entries"] for w in ray_cache.status().workers) == entries


KILLED_WRITER = """
import os, signal, sys, json, ray, s3fs
from ray_cache.files.fs import CacheFileSystem
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
rfs = CacheFileSystem(fs=s3fs.S3FileSystem(**json.loads(sys.argv[1]), skip_instance_cache=True),
                      skip_instance_cache=True)
f = rfs.open(sys.argv[2], "wb", block_size=5 * 2**20)
f.write(os.urandom(6 * 2**20))  # the upload starts, a part is sent
f.flush()
print("part sent", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_upload_leaves_nothing_behind(cache, s3_server, s3fs_direct, prefix):
    path = f"{prefix}/killed.bin"
    aborted = ray_cache.stats()["uploads_aborted"]
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, json.dumps(s3_server.storage_options()), path],
                         env=dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == -9 and "part sent" in run.stdout, run.stderr[-3000:]
    # The worker on this node looks at its writers every second; wait for it, bounded.
    deadline = time.monotonic() + 60
    while _uploads(s3fs_direct, prefix) and time.monotonic() < deadline:
        ray.get([w.handle.status.remote() for w in membership.live_workers()], timeout=30)
    assert _uploads(s3fs_direct, prefix) == [], "the dead writer's multipart upload was aborted"
    assert not s3fs_direct.exists(path)
    assert ray_cache.stats()["uploads_aborted"] == aborted + 1


def test_a_write_whose_version_the_store_does_not_name_is_not_cached(cache, s3fs_direct, s3fs_proxied,
                                                                      proxy, prefix):
    """The store's answer to our commit is the proof of the version; without it (here the
    proxy drops the PUT's ETag header) the write succeeds and nothing is kept."""
    rfs, path = _rfs(s3fs_proxied), f"{prefix}/unproven.bin"
    before = ray_cache.stats()["written_entries"]
    proxy.inject({"kind": "no-etag", "method": "PUT", "path_contains": "unproven"})
    try:
        with rfs.open(path, "wb") as f:
            f.write(b"x" * 1000)
    finally:
        proxy.inject()
    assert proxy_fired(proxy)
    assert s3fs_direct.cat_file(path) == b"x" * 1000
    proxy.reset()
    assert _read_back_cold_here(rfs, path) == b"x" * 1000
    assert len(data_gets(proxy)) == 1, "not kept: read from the store"
    assert ray_cache.stats()["written_entries"] == before
    assert rfs.local_stats()["unproven_writes"] >= 1


def proxy_fired(proxy) -> bool:
    return any(r.get("fault") == "no-etag" for r in proxy.requests())


@pytest.mark.slow
def test_written_on_one_node_read_on_another_with_no_data_request(gpu_nodes, tmp_path, s3fs_direct,
                                                                  s3fs_proxied, proxy, prefix):
    """The rollout shape: the checkpoint written by a task on one GPU node, read by a task
    on the other, the driver on a node with no cache worker."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fresh_cache(tmp_path)
    a, b = sorted(gpu_node_ids())
    rfs = _rfs(s3fs_proxied)
    data = _blob(13 * MiB + 3, 2)
    paths = [f"{prefix}/ckpt/one-shot.bin", f"{prefix}/ckpt/multipart.bin", f"{prefix}/ckpt/config.json"]
    small = data[:300_000]  # sent to its owner with the call, not through the object store

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(a, soft=False))
    def write(fs):
        with fs.open(paths[0], "wb") as f:
            f.write(data)
        with fs.open(paths[1], "wb", block_size=5 * MiB) as f:
            f.write(data)
        with fs.open(paths[2], "wb") as f:
            f.write(small)
        return ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(b, soft=False))
    def read(fs):
        return [fs.cat_file(p) for p in paths], ray.get_runtime_context().get_node_id()

    assert ray.get(write.remote(rfs), timeout=300) == a
    proxy.reset()
    got, node = ray.get(read.remote(rfs), timeout=300)
    assert node == b and got == [data, data, small] == [s3fs_direct.cat_file(p) for p in paths]
    assert data_gets(proxy) == [], "written on one node, read on another: no data request"


def _ray_rows(url, fs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ray.data.read_parquet(url, filesystem=fs)
    return ds.schema(), sorted(ds.take_all(), key=lambda r: tuple(str(r[k]) for k in sorted(r)))


def _ours_rows(ds):
    return ds.schema(), sorted(ds.take_all(), key=lambda r: tuple(str(r[k]) for k in sorted(r)))


def test_parquet_written_through_is_read_by_read_parquet_with_no_data_request(
        cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    """A pipeline's output, written three ways (pyarrow, pandas, Ray Data with hive
    partitions), read next by ``read_parquet``: the rows Ray reads, and no data GET."""
    rfs = _rfs(s3fs_proxied)
    table = make_table(20_000)
    pq.write_table(table, f"{prefix}/flat/pyarrow.parquet", filesystem=rfs, row_group_size=5_000)
    table.slice(0, 3_000).to_pandas().to_parquet(
        f"raycache::s3://{prefix}/flat/pandas.parquet", storage_options={"s3": dict(s3fs_proxied.storage_options)})
    ds = ray.data.from_arrow(table.slice(0, 4_000).append_column("part", pa.array(["a", "b"] * 2_000)))
    ds.write_parquet(f"{prefix}/hive", filesystem=rfs, partition_cols=["part"])
    for url in (f"s3://{prefix}/flat/", f"s3://{prefix}/hive/"):
        proxy.reset()
        got = _ours_rows(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
        assert data_gets(proxy) == [], f"{url}: the next stage's read sends no data request"
        want = _ray_rows(url, s3fs_direct)
        assert got[0].names == want[0].names and got[0].types == want[0].types, url
        assert got[1] == want[1], url


def test_a_hand_over_whose_bytes_never_come_is_fetched_by_the_reader_waiting_on_it(ray_session, tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ray_cache.config import WorkerConfig
    from ray_cache.node.entries import LocalCache
    from ray_cache.node.pageentry import page_table
    from ray_cache.store.keys import EntryKey

    lc = LocalCache(WorkerConfig(memory_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=str(tmp_path)))
    pool = ThreadPoolExecutor(1)
    key = EntryKey("s3", "b/k", "etag:e/1", "page4", 0, 1)
    release = threading.Event()

    def lost():
        release.wait(60)
        raise OSError("the writer's object is gone")

    try:
        assert lc.fill_later(key, lost, pool.submit), "claimed"
        assert not lc.fill_later(key, lost, pool.submit), "claimed once"
        got = {}
        reader = threading.Thread(target=lambda: got.setdefault("v", lc.get_or_load(key, lambda: page_table(b"z"))))
        reader.start()
        deadline = time.monotonic() + 60
        while lc.counters["single_flight_waits"] == 0 and time.monotonic() < deadline:
            reader.join(0.01)  # until the reader waits on the claimed fill
        assert lc.counters["single_flight_waits"] == 1
        release.set()
        reader.join(60)
        ref, nbytes, tier = got["v"]
        assert tier == "store" and ray.get(ref).column(0)[0].as_py() == b"z", "the reader loaded it itself"
        assert lc.counters["misses"] == 1 and lc.counters["written_entries"] == 0
    finally:
        pool.shutdown()
        lc.flush()
        lc.disk.close()


@pytest.mark.slow
def test_a_safetensors_checkpoint_loads_on_every_node_reading_the_store_once_in_big_ranges(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    """A rollout: tasks pinned to each GPU node load one cold checkpoint into torch tensors
    at once; every page is fetched once (by its owner), in ranges of whole pages."""
    import torch
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from safetensors.torch import save

    fresh_cache(tmp_path)
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(512, 1024 + i, generator=g) for i in range(10)}
    blob = save(tensors)  # ~21 MB
    path = f"{prefix}/model.safetensors"
    s3fs_direct.pipe_file(path, blob)  # written around the cache: cold
    rfs = _rfs(s3fs_proxied)

    def loader(node):
        @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        def load(fs):
            from safetensors.torch import load as load_bytes

            return load_bytes(fs.cat_file(path)), ray.get_runtime_context().get_node_id()
        return load

    nodes = sorted(gpu_node_ids())
    proxy.reset()
    loaded = ray.get([loader(n).remote(rfs) for n in nodes], timeout=300)
    assert [node for _t, node in loaded] == nodes
    for got, _node in loaded:
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    gets = data_gets(proxy)
    fetched = sum(r["response_body_bytes"] for r in gets)
    assert fetched <= 1.05 * len(blob), f"{len(nodes)} nodes at once: the store served {fetched / len(blob):.2f}x"
    assert fetched / len(gets) >= PAGE_SIZE / 2, f"{len(gets)} GETs: ranges of pages, not of page faults"
    proxy.reset()
    again = ray.get([loader(n).remote(rfs) for n in nodes], timeout=300)
    assert all(torch.equal(t["layer3.weight"], tensors["layer3.weight"]) for t, _n in again)
    assert data_gets(proxy) == [], "the next rollout reads no byte from the store"


def test_a_page_the_memory_tier_declined_is_served_while_its_disk_write_waits(ray_session, tmp_path):
    """A written page (or a fetched one) that the memory tier has no room for lives only in
    its pending disk write for a while: a reader asking then gets it, and nothing is
    fetched again (a full memory tier once cost a written-through file 2 data GETs)."""
    import threading

    from ray_cache.config import WorkerConfig
    from ray_cache.node.entries import LocalCache
    from ray_cache.node.pageentry import page_table
    from ray_cache.store.keys import EntryKey

    lc = LocalCache(WorkerConfig(memory_bytes=1 << 10, disk_bytes=1 << 30, disk_dir=str(tmp_path)))
    key = EntryKey("s3", "b/k", "etag:e/1", "page4", 0, 1)
    data = b"p" * (64 << 10)  # larger than the memory tier: never kept there
    gate = threading.Event()
    lc._writer.submit(gate.wait, 60)  # the disk writer is busy: the page's write waits
    try:
        loads = []

        def load():
            loads.append(1)
            return page_table(data)

        _ref, _n, tier = lc.get_or_load(key, load)
        assert tier == "store" and key.digest not in lc.memory.sizes and key.digest not in lc.disk.sizes
        assert lc.holds_or_fills(key.digest), "on its way to disk"
        ref, _n, tier = lc.get_or_load(key, load)
        assert loads == [1], "served from the pending write, not loaded again"
        assert bytes(ray.get(ref).column(0)[0].as_py()) == data
    finally:
        gate.set()
        lc.flush()
    assert key.digest in lc.disk.sizes and not lc._writing
    lc.disk.close()
