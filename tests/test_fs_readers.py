"""Readers that take an fsspec filesystem or URL, reading through ``raycache``.

pandas (``raycache::`` URLs), pyarrow datasets (``PyFileSystem(FSSpecHandler(fs))``),
PyTorch ``DataLoader`` worker processes (``spawn`` and the default ``fork``) and Ray Data.
Warm reads are checked at the S3 server's counting proxy.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem

from conftest import data_gets, make_table, read_all, write_dataset
import ray_cache
from ray_cache.files import pages
from ray_cache.cluster.membership import live_workers
from ray_cache.files.fs import CacheFileSystem


@pytest.fixture()
def rfs(cache, s3fs_proxied):
    pages.reader().clear()
    return CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)


def test_pandas_read_csv_and_parquet_with_raycache_urls(cache, s3_server, s3fs_direct, proxy, prefix):
    frame = make_table(2_000).to_pandas()
    with s3fs_direct.open(f"{prefix}/t.csv", "wb") as f:
        frame.to_csv(f, index=False)
    with s3fs_direct.open(f"{prefix}/t.parquet", "wb") as f:
        frame.to_parquet(f, index=False)
    options = {"s3": s3_server.storage_options(endpoint_url=proxy.url)}
    for _ in ("cold", "warm"):
        proxy.reset()
        got_csv = pd.read_csv(f"raycache::s3://{prefix}/t.csv", storage_options=options)
        got_parquet = pd.read_parquet(f"raycache::s3://{prefix}/t.parquet", storage_options=options)
        pd.testing.assert_frame_equal(got_csv, pd.read_csv(s3fs_direct.open(f"{prefix}/t.csv")))
        pd.testing.assert_frame_equal(got_parquet, frame)
    assert data_gets(proxy) == []


def test_pyarrow_dataset_with_a_filter(rfs, s3fs_direct, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=2, rows=4_000, rg_rows=1_000)
    arrow_fs = PyFileSystem(FSSpecHandler(rfs))
    for _ in ("cold", "warm"):
        proxy.reset()
        ds = pads.dataset(f"{prefix}/", filesystem=arrow_fs, format="parquet")
        got = ds.to_table(filter=pads.field("label") == 3).sort_by("id")
    assert data_gets(proxy) == []
    want = pq.read_table(f"{prefix}/", filesystem=s3fs_direct).filter(pads.field("label") == 3).sort_by("id")
    assert got.equals(want) and got.num_rows > 0


class Blobs(torch.utils.data.Dataset):
    """Image-sized blobs, one file each, read through the filesystem given (with a stat and
    a listing per item, as dataset code does)."""

    def __init__(self, fs, paths):
        self.fs, self.paths = fs, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        size = self.fs.info(path)["size"]
        listed = path in self.fs.ls(path.rsplit("/", 1)[0], detail=False)
        with self.fs.open(path, "rb") as f:
            data = f.read()
        assert size == len(data) and listed
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), pages.reader().stats(), os.getpid()


def _blobs(fs_direct, prefix, n=16, size=48_000):
    rng = np.random.default_rng(7)
    paths = [f"{prefix}/img/{i:03d}.jpg" for i in range(n)]
    blobs = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in paths]
    fs_direct.pipe(dict(zip(paths, blobs)))
    return paths, blobs


def loader_epoch(fs, paths, blobs, workers=3, context=None):
    """One epoch of a DataLoader; each worker's page counters after its last item, summed."""
    items = list(torch.utils.data.DataLoader(Blobs(fs, paths), batch_size=None, num_workers=workers,
                                             multiprocessing_context=context, timeout=120))
    assert [bytes(t.numpy()) for t, _s, _p in items] == blobs
    last: dict = {}
    for _t, stats, pid in items:
        last[pid] = stats
    assert os.getpid() not in last
    return {k: sum(s[k] for s in last.values()) for k in next(iter(last.values()))}


def test_torch_dataloader_spawned_workers_read_through_the_cache(rfs, s3fs_direct, proxy, prefix):
    paths, blobs = _blobs(s3fs_direct, prefix)
    assert rfs.cat(paths) == dict(zip(paths, blobs))  # warm the cache in this process
    proxy.reset()
    got = loader_epoch(rfs, paths, blobs, workers=2, context="spawn")
    assert got["direct_pages"] == 0 and got["channel_pages"] == 0
    assert data_gets(proxy) == [], "spawned workers join the cluster and read warm pages"


def test_torch_dataloader_forked_workers_fill_the_cache_then_read_it(rfs, s3fs_direct, proxy, prefix):
    paths, blobs = _blobs(s3fs_direct, prefix, n=24)
    rfs.info(paths[0])  # Ray is in use in this process before the fork
    proxy.reset()
    cold = loader_epoch(rfs, paths, blobs)  # the default context on Linux: fork
    assert cold["direct_pages"] == 0, "forked workers read through the node's worker, not the store"
    assert cold["channel_pages"] == len(paths), cold
    assert len(data_gets(proxy)) == len(paths), "each page fetched once, by its owner"
    assert ray_cache.stats()["misses"] >= len(paths)
    for _epoch in range(3):  # warm: from the owner's memory (channel) or disk (mapped)
        proxy.reset()
        warm = loader_epoch(rfs, paths, blobs)
        assert warm["direct_pages"] == 0 and warm["fallback_pages"] == 0
        assert warm["channel_pages"] + warm["mapped_pages"] == len(paths)
        assert data_gets(proxy) == []


def test_forked_workers_read_pages_held_in_memory_or_only_on_disk(rfs, s3fs_direct, proxy, prefix, monkeypatch):
    paths, blobs = _blobs(s3fs_direct, prefix)
    assert rfs.cat(paths) == dict(zip(paths, blobs))
    ray.get([w.handle.flush.remote() for w in live_workers()], timeout=60)
    before = ray_cache.stats()
    proxy.reset()
    monkeypatch.setenv("RAY_CACHE_SHORT_CIRCUIT", "0")  # children may not map the disk tier
    got = loader_epoch(rfs, paths, blobs)
    assert got["channel_pages"] == len(paths) and got["mapped_pages"] == 0
    assert ray_cache.stats()["memory_hits"] - before["memory_hits"] == len(paths)
    assert data_gets(proxy) == []
    ray_cache.configure(memory_bytes=1)  # memory tier emptied: pages only on disk
    before = ray_cache.stats()
    got = loader_epoch(rfs, paths, blobs)
    assert got["channel_pages"] == len(paths)
    assert ray_cache.stats()["disk_hits"] - before["disk_hits"] == len(paths)
    monkeypatch.delenv("RAY_CACHE_SHORT_CIRCUIT")
    got = loader_epoch(rfs, paths, blobs)  # mapped straight from the worker's disk tier
    assert got["mapped_pages"] == len(paths) and got["channel_pages"] == 0
    assert data_gets(proxy) == []
    pages.reader().clear()
    assert rfs.cat(paths) == dict(zip(paths, blobs))  # this process maps them too ...
    assert pages.reader().stats()["mapped_pages"] >= len(paths)
    got = loader_epoch(rfs, paths, blobs)  # ... and its forked children inherit the mappings
    assert got["mapped_pages"] == 0 and got["channel_pages"] == 0 and got["buffer_hits"] >= len(paths)
    assert data_gets(proxy) == []


def _forked(fn, *args):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply_async(fn, args).get(timeout=60)


def _stats_in_child():
    try:
        ray_cache.stats()
    except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
        return type(exc).__name__, str(exc)
    return None


def test_a_ray_call_in_a_forked_child_fails_at_once_naming_the_remedy(rfs):
    rfs.info  # noqa: B018 - this process uses Ray
    name, message = _forked(_stats_in_child)
    assert name == "RayForkedError" and "spawn" in message


def test_ray_data_read_parquet_and_binary_files(rfs, s3fs_direct, proxy, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=2, rows=3_000, rg_rows=1_000)
    want = pa.concat_tables([pq.read_table(p, filesystem=s3fs_direct) for p in paths]).sort_by("id")
    rfs.cat(paths)  # cached here first; Ray Data's read tasks then find every page warm
    proxy.reset()
    got = read_all(ray.data.read_parquet(paths, filesystem=rfs))
    raw = ray.data.read_binary_files(paths, filesystem=rfs, include_paths=True).take_all()
    assert data_gets(proxy) == [], "read tasks (other processes) read the cached pages"
    assert got.equals(want)
    assert sorted((r["path"], r["bytes"]) for r in raw) == [(p, s3fs_direct.cat_file(p)) for p in paths]
