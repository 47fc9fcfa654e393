"""Eviction policies: LRU, the scan-resistant TinyLFU and the adaptive default, pure and through real workers.

The pure tests drive a :class:`~ray_cache.node.tiers.base.Tier` (byte accounting, pins,
admission, eviction) with unit-sized keys. The last test reads a data set twice the
cache's size for three epochs through real workers and counts the data GETs that reach
the S3 server at the proxy: from the second epoch on, TinyLFU serves about half of the
units from the cache while LRU serves none.
"""

from __future__ import annotations

import random
from typing import Iterable, List, Optional

import pyarrow.parquet as pq
import pytest

import ray_cache
from conftest import data_gets, write_dataset
from ray_cache.cluster import membership
from ray_cache.config import WorkerConfig
from ray_cache.node.tiers.base import Tier
from ray_cache.node.tiers.policy import POLICIES, AdaptivePolicy, LRUPolicy, TinyLFUPolicy, make_policy


class BytesTier(Tier):
    """A tier that stores nothing: accounting and policy only."""

    def _drop(self, key: str) -> None:
        pass


def read(tier: Tier, key: str, nbytes: int = 1) -> bool:
    """One access as a cache worker makes it: a hit touches, a miss offers the key."""
    if key in tier:
        tier.touch(key)
        return True
    tier.reserve(key, nbytes)
    return False


def epochs(tier: Tier, keys: List[str], n: int, shuffle_seed: Optional[int] = None) -> List[float]:
    """Hit ratio of each of ``n`` passes over ``keys`` (reshuffled per pass if seeded)."""
    rng = random.Random(shuffle_seed)
    ratios = []
    for _ in range(n):
        order = list(keys)
        if shuffle_seed is not None:
            rng.shuffle(order)
        ratios.append(sum(read(tier, k) for k in order) / len(order))
    return ratios


def keys(n: int, prefix: str = "k") -> List[str]:
    return [f"{prefix}{i}" for i in range(n)]


# -- the registry -----------------------------------------------------------------------
def test_the_policies_are_registered_and_adaptive_is_the_default():
    assert POLICIES["lru"] is LRUPolicy and POLICIES["tinylfu"] is TinyLFUPolicy
    assert POLICIES["adaptive"] is AdaptivePolicy
    assert isinstance(make_policy("tinylfu"), TinyLFUPolicy)
    assert isinstance(BytesTier(10).policy, AdaptivePolicy)
    assert WorkerConfig(memory_bytes=1, disk_bytes=1, disk_dir="/tmp").policy == "adaptive"
    with pytest.raises(ValueError, match="tinylfu"):
        make_policy("arc")


# -- scans larger than the tier ------------------------------------------------------------
def test_lru_misses_every_read_of_a_sequential_scan_twice_its_size():
    tier = BytesTier(50, "lru")
    assert epochs(tier, keys(100), 4) == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("shuffle_seed", [None, 7], ids=["sequential", "shuffled"])
def test_tinylfu_keeps_a_stable_half_of_a_scan_twice_its_size(shuffle_seed):
    tier = BytesTier(50, "tinylfu")
    ratios = epochs(tier, keys(100), 6, shuffle_seed)
    assert ratios[0] == 0.0
    assert ratios[1:] == [0.5] * 5, "capacity / size from the second epoch on"
    assert tier.evictions == 0, "a stable subset: nothing churns"


def test_lru_churns_under_shuffled_epochs_where_tinylfu_holds():
    lru = epochs(BytesTier(500, "lru"), keys(1000), 5, shuffle_seed=3)
    tiny = epochs(BytesTier(500, "tinylfu"), keys(1000), 5, shuffle_seed=3)
    assert max(lru[1:]) < 0.35
    assert min(tiny[1:]) == 0.5


@pytest.mark.parametrize("size", [150, 200, 300, 1000])
@pytest.mark.parametrize("window_factor", [1, 2, 3, 7])
def test_tinylfu_holds_through_aging_in_any_phase(size, window_factor):
    # Aging every window_factor x 100 accesses: before, at or in the middle of an epoch.
    tier = BytesTier(100, "tinylfu")
    policy = tier.policy
    policy.window_factor, policy.min_window = window_factor, 1
    ratios = epochs(tier, keys(size), 25, shuffle_seed=size + window_factor)
    assert policy.agings >= 25 * size // (window_factor * 100) - 1
    assert ratios[1:] == [100 / size] * 24
    assert max(policy.frequency(k) for k in keys(size)) <= policy.max_count


# -- admission ----------------------------------------------------------------------------
def test_tinylfu_admits_freely_while_there_is_room():
    tier = BytesTier(10, "tinylfu")
    for k in keys(10):
        assert tier.reserve(k, 1)
    assert len(tier) == 10 and tier.used == 10


def test_a_miss_counts_as_an_access_so_a_hot_newcomer_gets_in():
    tier = BytesTier(3, "tinylfu")
    for k in "abc":
        tier.reserve(k, 1)
    assert not tier.reserve("hot", 1), "seen once: the incumbents stay"
    assert tier.policy.frequency("hot") == 1, "the refused attempt was counted"
    assert not tier.reserve("hot", 1), "a lead of one is not enough"
    assert not tier.reserve("hot", 1), "nor of two"
    assert tier.reserve("hot", 1), "four attempts lead the coldest incumbent by three"
    assert "hot" in tier and "a" not in tier, "the least recently used incumbent left"


def test_a_newcomer_must_beat_every_entry_it_would_displace():
    tier = BytesTier(4, "tinylfu")
    tier.reserve("cold", 2)
    tier.reserve("warm", 2)
    for _ in range(5):
        tier.touch("warm")
    for _ in range(4):
        tier.reserve("big", 4)
    assert "big" not in tier, "leads 'cold' by 3 but not 'warm', which it would also evict"
    for _ in range(5):
        tier.reserve("big", 4)
    assert "big" in tier and len(tier) == 1


def test_pinned_entries_stay_and_oversized_entries_are_refused():
    tier = BytesTier(4, "tinylfu")
    for k in "abcd":
        tier.reserve(k, 1)
    tier.pin(["a", "b", "c", "d"])
    for _ in range(10):
        assert not tier.reserve("x", 1)
    assert set(tier.sizes) == set("abcd")
    assert not tier.reserve("huge", 5)
    assert tier.used <= tier.capacity


def test_a_new_working_set_displaces_an_old_one_after_a_few_passes():
    tier = BytesTier(100, "tinylfu")
    old, new = keys(100, "old"), keys(100, "new")
    epochs(tier, old, 5)
    ratios = epochs(tier, new, 10)
    assert ratios[0] == 0.0, "a first pass over new data does not flush the cache"
    assert ratios[-1] == 1.0, "a repeatedly used new set wins in the end"


@pytest.mark.parametrize("shuffle_seed", [None, 7], ids=["sequential", "shuffled"])
@pytest.mark.parametrize("size", [150, 200, 400])
def test_adaptive_keeps_a_stable_subset_of_repeated_scans_larger_than_the_tier(shuffle_seed, size):
    tier = BytesTier(100, "adaptive")
    ratios = epochs(tier, keys(size), 6, shuffle_seed)
    assert ratios[1:] == [100 / size] * 5, "capacity / size from the second epoch on"


def test_adaptive_takes_in_a_new_data_set_within_one_pass():
    tier = BytesTier(100, "adaptive")
    old, new = keys(80, "old"), keys(80, "new")
    epochs(tier, old, 5, shuffle_seed=1)
    ratios = epochs(tier, new, 3, shuffle_seed=2)
    assert ratios[0] == 0.0 and min(ratios[1:]) >= 0.95, ratios
    tinylfu = BytesTier(100, "tinylfu")  # the scan-resistant policy alone does not
    epochs(tinylfu, old, 5, shuffle_seed=1)
    assert epochs(tinylfu, new, 3, shuffle_seed=2)[1] <= 0.5


def test_adaptive_lets_no_one_off_key_displace_a_hot_set():
    # A Zipf-like mix: a hot set read all the time, one-off keys in between (never in a
    # long run of misses): the one-offs do not get in.
    tier = BytesTier(50, "adaptive")
    hot = keys(50, "hot")
    for k in hot:
        read(tier, k)
    rng = random.Random(5)
    for i in range(2000):
        read(tier, rng.choice(hot) if i % 3 else f"once{i}")
    assert sum(k in tier for k in hot) >= 48


def test_the_default_is_within_five_points_of_the_best_on_every_trace():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import policies as bench

    c = 200
    traces = {"loop-2x": bench.loop(c, 2, 5, random.Random(0)),
              "seq-4x": bench.loop(c, 4, 5, random.Random(0), shuffle=False),
              "switch": bench.switch(c, 4, random.Random(0)),
              "zipf": bench.zipf(c, random.Random(0))}
    for name, trace in traces.items():
        got = {p: bench.hit_ratio(p, trace, c) for p in POLICIES}
        assert got["adaptive"] >= max(got.values()) - 0.05, (name, got)
    assert bench.hit_ratio("adaptive", traces["loop-2x"], c) >= 0.4


def test_resize_and_remove_keep_the_policy_consistent():
    tier = BytesTier(10, "tinylfu")
    for k in keys(10):
        tier.reserve(k, 1)
    assert len(tier.resize(5)) == 5 and tier.used == 5
    tier.remove("k9")
    assert "k9" not in set(tier.policy.victims())
    assert tier.reserve("new", 1), "room again: admitted without a contest"


# -- through real workers on the S3 server ----------------------------------------------------
UNITS = 12


def _gets_per_epoch(ds, proxy, n: int, want_ids: Iterable[int]) -> List[int]:
    want = sorted(want_ids)
    gets = []
    for _ in range(n):
        proxy.reset()
        ids = [i for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
               for i in b.column("id").to_pylist()]
        assert sorted(ids) == want, "every epoch reads every row exactly once"
        gets.append(len(data_gets(proxy)))
    return gets


@pytest.mark.parametrize("policy", ["lru", "tinylfu", "adaptive"])
def test_data_twice_the_cache_three_epochs_hit_ratio_at_the_store(
    ray_session, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix, policy
):
    """The memory tier holds half the units; the disk tier is too small to hold any."""
    paths = write_dataset(s3fs_direct, prefix, files=UNITS, rows=10_000, rg_rows=10_000)
    unit_bytes = sum(pq.read_table(p, filesystem=s3fs_direct).nbytes for p in paths)
    ray_cache.shutdown()
    try:
        membership.ensure_workers(64 << 20, 1, str(tmp_path / "cache"), policy=policy)
        ds = ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, zero_copy=False)
        footers = ray_cache.status().workers[0]["memory_bytes_used"]  # planning cached them
        ray_cache.configure(memory_bytes=footers + unit_bytes // 2)
        gets = _gets_per_epoch(ds, proxy, 3, range(UNITS * 10_000))
    finally:
        ray_cache.shutdown()
    assert gets[0] >= UNITS, "the first epoch fetches every unit"
    hit_ratios = [1 - g / gets[0] for g in gets[1:]]
    if policy in ("tinylfu", "adaptive"):
        assert min(hit_ratios) >= 0.4, (gets, hit_ratios)
    else:
        assert max(hit_ratios) <= 0.1, (gets, hit_ratios)


def test_reads_mapped_by_readers_count_as_disk_hits_and_keep_entries_recent(tmp_path):
    import pyarrow as pa

    from ray_cache.node.entries import LocalCache

    # LRU named: the test is about recency (the default may decline the newcomer instead).
    cache = LocalCache(WorkerConfig(memory_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=str(tmp_path),
                                    policy="lru"))
    try:
        a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
        table = pa.table({"v": [b"x" * 1000]})
        assert cache.disk.put(a, table) and cache.disk.put(b, table)
        size = cache.disk.sizes[a]
        cache.disk.resize(2 * size + size // 2)  # room for two entries
        assert cache.touch([a, "dd" * 32]) == 1, "only entries the disk tier holds are counted"
        assert (cache.counters["disk_hits"], cache.counters["bytes_from_disk"]) == (1, size)
        assert cache.disk.put(c, table)
        assert a in cache.disk and b not in cache.disk, "the touched entry is the recent one: b goes"
    finally:
        cache.disk.close()
