"""Operating the cache on a real S3 server: load, pin, unpin, free, invalidate, TTL, capacities."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from ray_cache.testing import CountingProxy, s3_data_gets
from conftest import BUCKET, data_gets, read_all, write_dataset


def _read(prefix, fs, **kw):
    return read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs, **kw))


def test_first_read_after_load_sends_no_data_request(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=3)
    s3fs_direct.pipe(f"{prefix}-raw/blob.bin", b"x" * 5_000_000)  # a non-Parquet object: pages
    report = ray_cache.load([f"s3://{prefix}/", f"s3://{prefix}-raw/blob.bin"], filesystem=s3fs_proxied)
    assert report.failures == [] and report.fetched == report.entries > 3
    assert report.bytes > 0 and report.seconds > 0
    proxy.reset()
    got = _read(prefix, s3fs_proxied)
    assert data_gets(proxy) == []
    assert got.num_rows == 60_000
    again = ray_cache.load(f"s3://{prefix}/", filesystem=s3fs_proxied)  # resumable: nothing left
    assert again.fetched == 0 and again.already_cached == again.entries
    assert data_gets(proxy) == []


def test_load_with_columns_serves_that_projection(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=2)
    ray_cache.load(f"s3://{prefix}/", columns=["id", "x"], filesystem=s3fs_proxied)
    proxy.reset()
    got = _read(prefix, s3fs_proxied, columns=["id", "x"])
    assert got.column_names == ["id", "x"] and data_gets(proxy) == []


def test_background_load_can_be_cancelled_and_resumed(cache, s3_server, s3fs_direct, prefix):
    import s3fs

    write_dataset(s3fs_direct, prefix, files=40, rows=1_000, rg_rows=1_000)
    with CountingProxy(s3_server.endpoint_url, latency_ms=100) as slow:
        fs = s3fs.S3FileSystem(**s3_server.storage_options(endpoint_url=slow.url), skip_instance_cache=True)
        job = ray_cache.load(f"s3://{prefix}/", filesystem=fs, background=True)
        job.cancel()
        first = job.wait(timeout=300)
        assert first.cancelled and first.fetched < first.entries
        second = ray_cache.load(f"s3://{prefix}/", filesystem=fs)
        assert second.fetched == second.entries - first.fetched - first.already_cached
        slow.reset()
        read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs))
        assert s3_data_gets(slow.requests(), BUCKET) == []


def _small_cache(tmp_path, unit_bytes, memory_units=2.5, disk_units=3.5):
    ray_cache.shutdown()
    # LRU named: these tests are about capacity and pins under eviction pressure; the
    # default policy would decline much of the pressure instead (tests/test_policy.py).
    ray_cache.start(memory_bytes=int(unit_bytes * memory_units), disk_bytes=int(unit_bytes * disk_units) + (1 << 20),
                    disk_dir=str(tmp_path / "small"), policy="lru")


def _assert_within_capacity():
    for w in ray_cache.status().workers:
        assert w["memory_bytes_used"] <= w["memory_bytes_capacity"]
        assert w["disk_bytes_used"] <= w["disk_bytes_capacity"]


def test_pinned_data_survives_a_read_larger_than_both_tiers(ray_session, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    pinned = write_dataset(s3fs_direct, prefix + "/pinned", files=1, rows=20_000, rg_rows=20_000)
    write_dataset(s3fs_direct, prefix + "/big", files=10, rows=20_000, rg_rows=20_000, seed=5)
    unit = pq.read_table(pinned[0], filesystem=s3fs_direct).nbytes
    _small_cache(tmp_path, unit)
    try:
        ray_cache.pin(f"s3://{prefix}/pinned/", filesystem=s3fs_proxied)
        for _ in range(2):  # ~10 units through tiers of 2.5 and 3.5 units
            _read(prefix + "/big", s3fs_proxied)
            ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
            _assert_within_capacity()
        assert ray_cache.stats()["evictions"] > 0
        proxy.reset()
        _read(prefix + "/pinned", s3fs_proxied)
        assert data_gets(proxy) == [], "pinned entries (and their footers) were evicted"
        # unpinned, the same pressure evicts them
        assert ray_cache.unpin(f"s3://{prefix}/pinned/", filesystem=s3fs_proxied) >= 2
        _read(prefix + "/big", s3fs_proxied)
        _read(prefix + "/big", s3fs_proxied)
        proxy.reset()
        _read(prefix + "/pinned", s3fs_proxied)
        assert len(data_gets(proxy)) > 0
    finally:
        ray_cache.shutdown()


def test_pinning_more_than_capacity_fails_and_keeps_other_pins(ray_session, tmp_path, s3fs_direct, s3fs_proxied, prefix):
    first = write_dataset(s3fs_direct, prefix + "/a", files=1, rows=20_000, rg_rows=20_000)
    write_dataset(s3fs_direct, prefix + "/b", files=4, rows=20_000, rg_rows=20_000, seed=3)
    unit = pq.read_table(first[0], filesystem=s3fs_direct).nbytes
    _small_cache(tmp_path, unit)
    try:
        ray_cache.pin(f"s3://{prefix}/a/", filesystem=s3fs_proxied)
        before = ray_cache.status().workers[0]
        with pytest.raises(ray_cache.PinCapacityError) as err:
            ray_cache.pin(f"s3://{prefix}/b/", filesystem=s3fs_proxied)
        assert "pin" in str(err.value)
        after = ray_cache.status().workers[0]
        assert after["memory_bytes_pinned"] == before["memory_bytes_pinned"] > 0
        assert after["disk_bytes_pinned"] == before["disk_bytes_pinned"] > 0
        _assert_within_capacity()
    finally:
        ray_cache.shutdown()


def test_free_drops_only_those_paths(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix + "/keep", files=1)
    write_dataset(s3fs_direct, prefix + "/drop", files=2, seed=9)
    ray_cache.load(f"s3://{prefix}/", filesystem=s3fs_proxied)
    dropped = ray_cache.free(f"s3://{prefix}/drop", filesystem=s3fs_proxied)
    assert dropped == 4  # two units, two footers
    proxy.reset()
    _read(prefix + "/keep", s3fs_proxied)
    assert data_gets(proxy) == []
    _read(prefix + "/drop", s3fs_proxied)
    assert len(data_gets(proxy)) > 0


def test_invalidate_makes_the_next_read_refetch(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=2)
    _read(prefix, s3fs_proxied)
    assert ray_cache.invalidate(f"s3://{prefix}/", filesystem=s3fs_proxied) > 0
    proxy.reset()
    _read(prefix, s3fs_proxied)
    assert len(data_gets(proxy)) > 0


def test_ttl_expires_loaded_entries(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=1)
    # Within the TTL: served from the cache. (A long TTL, so a slow machine cannot let it
    # pass between the load and the read.)
    ray_cache.load(f"s3://{prefix}/", filesystem=s3fs_proxied, ttl=600.0)
    proxy.reset()
    _read(prefix, s3fs_proxied)
    assert data_gets(proxy) == []
    # Past it: fetched again. The same entries, re-loaded with a short TTL that has passed
    # for certain when the read starts.
    ray_cache.load(f"s3://{prefix}/", filesystem=s3fs_proxied, ttl=0.5)
    time.sleep(0.6)  # the behaviour under test is the passage of time itself
    proxy.reset()
    _read(prefix, s3fs_proxied)
    assert len(data_gets(proxy)) > 0
    assert ray_cache.stats()["expired"] >= 1
    with pytest.raises(ValueError):
        ray_cache.load(f"s3://{prefix}/", filesystem=s3fs_proxied, ttl=0)


def test_capacities_change_at_run_time(cache, s3fs_direct, s3fs_proxied, prefix):
    write_dataset(s3fs_direct, prefix, files=4)
    _read(prefix, s3fs_proxied)
    ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
    before = ray_cache.status().workers[0]
    ray_cache.configure(memory_bytes=before["memory_bytes_used"] // 2, disk_bytes=before["disk_bytes_used"] // 2)
    after = ray_cache.status().workers[0]
    assert after["memory_bytes_capacity"] == before["memory_bytes_used"] // 2
    assert after["memory_bytes_used"] <= after["memory_bytes_capacity"]
    assert after["disk_bytes_used"] <= after["disk_bytes_capacity"]
    assert after["evictions"] > before["evictions"]
    assert after["pid"] == before["pid"], "no restart"
