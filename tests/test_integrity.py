"""Verified cache contents and the tiers' bookkeeping under races (issue 15).

Damage is made the way a failing disk or a torn write makes it: bytes flipped or cut in
the cached files themselves, with the workers stopped. Every damaged entry must be
detected, dropped, counted and re-fetched (GETs counted at the proxy), never served.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from conftest import data_gets, read_all, write_dataset
from ray_cache.files import pages
from ray_cache.files.fs import CacheFileSystem
from ray_cache.files.pagebuf import map_page
from ray_cache.node.pageentry import page_table
from ray_cache.node.tiers import checksum, disk
from ray_cache.node.tiers.disk import DiskTier, read_entry
from ray_cache.node.tiers.ipcpage import map_page_file
from ray_cache.readers import datasource


def _table(n: int) -> pa.Table:
    rng = np.random.default_rng(n)
    return pa.table({"v": np.arange(n, dtype=np.int64), "x": rng.random(n)})


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x40]))


def _arrow_files(root) -> list:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".arrow"))


def test_a_flipped_byte_anywhere_in_an_entry_is_never_served(tmp_path):
    tier = DiskTier(str(tmp_path), capacity=10**9)
    t = _table(5_000)
    assert tier.put("ab01", t, ("s3", "b/f.parquet"))
    path = tier._path("ab01")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        pristine = fh.read()
    for at in np.linspace(0, size - 1, 97).astype(int):  # schema, data, footer and trailer
        _flip(path, int(at))
        assert read_entry(path, "ab01") is None, f"a flip at byte {at} of {size} was not detected"
        with open(path, "wb") as fh:
            fh.write(pristine)
    assert read_entry(path, "ab01").equals(t.replace_schema_metadata(read_entry(path, "ab01").schema.metadata))
    _flip(path, size // 2)
    assert tier.get("ab01") is None and "ab01" not in tier and not os.path.exists(path)
    assert tier.damaged == 1 and tier.used == 0
    tier.close()


def test_truncated_entries_are_dropped_on_read_and_on_reindex(tmp_path):
    tier = DiskTier(str(tmp_path), capacity=10**9)
    for key in ("aa01", "aa02"):
        tier.put(key, _table(2_000))
    size = os.path.getsize(tier._path("aa01"))
    for key in ("aa01", "aa02"):
        with open(tier._path(key), "r+b") as fh:
            fh.truncate(size - 3)
    assert tier.get("aa01") is None and tier.damaged == 1
    tier.close()
    again = DiskTier(str(tmp_path), capacity=10**9)  # a restart finds the other one cut
    assert "aa02" not in again and again.damaged == 1 and len(again) == 0
    again.close()


def test_damaged_page_files_are_refused_by_same_node_readers(tmp_path):
    tier = DiskTier(str(tmp_path), capacity=10**9)
    data = np.random.default_rng(1).integers(0, 256, 110_000, dtype=np.uint8).tobytes()
    key = "cd" + "e" * 62
    tier.put(key, page_table(data), ("s3", "b/img.jpg"))
    path = tier._path(key)
    assert bytes(map_page_file(path, key, len(data))) == data
    _flip(path, os.path.getsize(path) // 2)  # inside the page's bytes
    assert map_page_file(path, key, len(data)) is None
    assert map_page(tier.slot, key, len(data)) is None  # the pyarrow fallback checks it too
    tier.close()


def test_an_entry_the_tier_refuses_is_never_written(tmp_path, monkeypatch):
    tier = DiskTier(str(tmp_path), capacity=50_000, policy="lru")
    opened = []
    real_open = os.open
    monkeypatch.setattr(disk.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    assert tier.put("ee01", _table(100_000)) is False  # larger than the tier
    assert opened == [] and len(tier) == 0 and tier.used == 0
    assert tier.put("ee02", _table(1_000)) is True
    assert len(opened) == 1 and tier.used == os.path.getsize(tier._path("ee02"))
    tier.close()


def test_an_entry_evicted_while_being_written_leaves_nothing(tmp_path, monkeypatch):
    tier = DiskTier(str(tmp_path), capacity=10**9)
    real_seal = checksum.seal

    def evict_then_seal(path):
        tier.remove("ff01")  # what another writer's eviction does mid-write
        return real_seal(path)

    monkeypatch.setattr(disk.checksum, "seal", evict_then_seal)
    assert tier.put("ff01", _table(1_000)) is False
    assert len(tier) == 0 and tier.used == 0
    assert [f for _, _, fs in os.walk(tier.slot) for f in fs] == []
    tier.close()


def test_sizes_on_disk_equal_the_books(tmp_path):
    tier = DiskTier(str(tmp_path), capacity=10**9)
    for i, n in enumerate((1, 10, 1_000, 100_000)):
        assert tier.put(f"a{i:03d}", _table(n), ("s3", "b/" + "x" * i))
    assert tier.used == sum(os.path.getsize(p) for p in _arrow_files(tmp_path))
    tier.close()


def test_two_pins_at_once_never_both_pass_a_check_only_one_fits(cache):
    from ray_cache.config import WorkerConfig
    from ray_cache.node.entries import LocalCache
    from ray_cache.store.errors import PinCapacityError

    lc = LocalCache(WorkerConfig(memory_bytes=1 << 20, disk_bytes=10**9, disk_dir=str(cache / "lc"),
                                 policy="lru"))
    try:
        one = _table(40_000)  # 640 KB in memory: one fits the 1 MiB tier's pins, two do not
        for outcome_round in range(10):
            lc.unpin(list(lc.memory.sizes))
            keys = [f"p{outcome_round}a", f"p{outcome_round}b"]
            for k in keys:
                lc.memory.put(k, one)
            present = [k for k in keys if k in lc.memory]
            if len(present) < 2:
                continue  # one evicted the other: nothing to race
            barrier, errors = threading.Barrier(2), []

            def pin(k):
                barrier.wait()
                try:
                    lc.pin([k])
                except PinCapacityError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=pin, args=(k,)) for k in keys]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(errors) == 1, "exactly one of two pins that cannot both fit must fail"
            assert lc.memory.pinned_bytes <= lc.memory.capacity
    finally:
        lc.disk.close()


def test_labels_leave_with_their_entries(cache, s3fs_direct, s3fs_proxied, prefix):
    ray_cache.shutdown()
    write_dataset(s3fs_direct, prefix, files=8, rows=4_000, rg_rows=4_000)
    unit = pq.read_table(f"{prefix}/part-000.parquet", filesystem=s3fs_direct).nbytes
    ray_cache.start(memory_bytes=int(unit * 2.5), disk_bytes=int(unit * 2.5) * 2,
                    disk_dir=str(cache / "small"), policy="lru")
    try:
        for _ in range(2):
            read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, zero_copy=False))
        ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
        for w in ray_cache.status().workers:
            held = w["entries"]
            assert w["evictions"] > 0
            # one label per entry held (footers and row groups), none for evicted ones
            assert w["labels"] == held, (w["labels"], held)
    finally:
        ray_cache.shutdown()


def test_damaged_parquet_entries_are_refetched_never_served(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=3, rows=6_000, rg_rows=2_000)
    want = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    ray_cache.shutdown()  # flushes the disk tier, stops the workers
    files = _arrow_files(cache)
    assert files
    for f in files:  # row groups and footers alike
        _flip(f, os.path.getsize(f) // 2)
    ray_cache.start(memory_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=str(cache))
    datasource._footers.clear()  # so this driver asks the workers for footers again
    proxy.reset()
    got = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    assert got.equals(want)
    assert ray_cache.stats()["damaged_entries"] == len(files)
    assert len(data_gets(proxy)) >= len(paths), "each damaged entry is fetched again"
    ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
    proxy.reset()
    again = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    assert again.equals(want) and data_gets(proxy) == []


def test_damaged_file_pages_are_refetched_never_served(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    rng = np.random.default_rng(7)
    blobs = {f"{prefix}/img-{i}.bin": rng.integers(0, 256, 150_000, dtype=np.uint8).tobytes() for i in range(4)}
    for path, data in blobs.items():
        s3fs_direct.pipe(path, data)
    pages.reader().clear()
    rfs = CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)
    for path, data in blobs.items():
        assert rfs.cat_file(path) == data
    ray_cache.shutdown()
    files = [f for f in _arrow_files(cache) if os.path.getsize(f) > 100_000]
    assert len(files) == len(blobs)
    for f in files:
        _flip(f, os.path.getsize(f) // 2)
    ray_cache.start(memory_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=str(cache))
    pages.reader().clear()
    proxy.reset()
    rfs = CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)
    for path, data in blobs.items():
        assert rfs.cat_file(path) == data
    assert ray_cache.stats()["damaged_entries"] == len(blobs)
    assert len(data_gets(proxy)) >= len(blobs)


WRITER = """
import sys, numpy as np, pyarrow as pa
from ray_cache.node.tiers.disk import DiskTier
tier = DiskTier(sys.argv[1], capacity=10**12)
n = int(sys.argv[2])
if len(sys.argv) > 3:  # a kernel that refuses the write: a file-size limit (EFBIG, as ENOSPC)
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
try:
    tier.put("bb" + "0" * 62, pa.table({"v": np.arange(n, dtype=np.int64)}), ("s3", "b/big.parquet"))
except OSError as exc:
    print("OSError", exc.errno, tier.used, len(tier), flush=True)
    sys.exit(3)
print("stored", flush=True)
"""


def _kept_entry(root):
    tier = DiskTier(str(root), capacity=10**12)
    tier.put("aa" + "0" * 62, _table(10_000), ("s3", "b/kept.parquet"))
    tier.close()


def test_a_writer_killed_mid_write_leaves_no_entry_and_damages_none(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    _kept_entry(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(150_000_000)])
    deadline = time.monotonic() + 120
    tmp_seen = []
    while not tmp_seen and proc.poll() is None and time.monotonic() < deadline:
        tmp_seen = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert tmp_seen, "the writer finished before it could be killed mid-write"
    tier = DiskTier(str(tmp_path), capacity=10**12)  # what a restarted worker finds
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")] == []
    assert "bb" + "0" * 62 not in tier and tier.damaged == 0
    assert tier.get("aa" + "0" * 62).equals(_table(10_000).replace_schema_metadata(
        tier.get("aa" + "0" * 62).schema.metadata))
    tier.close()


def test_a_refused_disk_write_raises_oserror_and_leaves_nothing(tmp_path):
    import subprocess
    import sys

    _kept_entry(tmp_path)
    run = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), str(1_000_000), str(1 << 20)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stdout + run.stderr
    word, errno_, used, entries = run.stdout.split()
    assert word == "OSError" and int(errno_) == 27  # EFBIG
    kept = sum(os.path.getsize(p) for p in _arrow_files(tmp_path))
    assert (int(used), int(entries)) == (kept, 1), "only the kept entry is booked"
    tier = DiskTier(str(tmp_path), capacity=10**12)
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")] == []
    assert len(tier) == 1 and tier.get("aa" + "0" * 62) is not None and tier.damaged == 0
    tier.close()


def test_page_entries_do_not_keep_the_bytes_they_were_built_from():
    """pyarrow 26 never releases a memoryview it copied in ``pa.array([view])``: every page a
    worker fetched stayed in its memory (the soak found it). Entries are built without it."""
    import gc

    def anon_mb() -> float:
        with open(f"/proc/{os.getpid()}/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("RssAnon")) / 1024

    for _ in range(50):  # warm the allocator up
        page_table(memoryview(os.urandom(100_000))[1:])
    gc.collect()
    before = anon_mb()
    for _ in range(2_000):  # 200 MB through page entries
        t = page_table(memoryview(os.urandom(100_000))[1:])
        assert t.num_rows == 1
        del t
    gc.collect()
    assert anon_mb() - before < 40, f"{anon_mb() - before:.0f} MB kept after 200 MB of pages"


def test_a_worker_killed_while_writing_a_disk_entry_restarts_clean_and_serves_right_rows(cache, tmp_path):
    """The cache worker itself SIGKILLed while its write-behind writes a disk entry: Ray
    restarts it, its re-index removes the half-written file, the entry written before is
    served from disk, and the interrupted one is read again, right."""
    import signal
    import time

    from ray_cache.cluster import membership

    src = tmp_path / "src"
    src.mkdir()
    small, big = _table(10_000), _table(10_000_000)  # 160 MB: its disk write takes a while
    pq.write_table(small, src / "small.parquet")
    pq.write_table(big, src / "big.parquet", row_group_size=len(big), compression="none")
    assert read_all(ray_cache.read_parquet(str(src / "small.parquet"))).equals(small)
    (worker,) = membership.live_workers()
    ray.get(worker.handle.flush.remote(), timeout=60)
    pid = ray_cache.status().workers[0]["pid"]
    killed = threading.Event()

    def kill_mid_write() -> None:  # as soon as the big entry's write-behind has begun
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(f.startswith(".tmp-") for _, _, fs in os.walk(cache) for f in fs):
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return

    killer = threading.Thread(target=kill_mid_write, daemon=True)
    killer.start()
    try:
        ray_cache.load(str(src / "big.parquet"))  # into the tiers, no rows shipped here
    except Exception:  # noqa: BLE001 - the worker may die under the call; what counts is below
        pass
    killer.join(130)
    assert killed.is_set(), "the worker was killed while it wrote the big entry"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray restarts the worker (max_restarts=-1)
        try:
            if ray.get(worker.handle.status.remote(), timeout=30)["pid"] != pid:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
    after = ray.get(worker.handle.status.remote(), timeout=30)
    assert after["pid"] != pid, "a new worker process"
    ray.get(worker.handle.flush.remote(), timeout=120)  # a load retried on it has written its own
    assert [f for _, _, fs in os.walk(cache) for f in fs if f.startswith(".tmp-")] == [], "re-index removed it"
    assert after["damaged_entries"] == 0
    before = ray_cache.stats()
    assert read_all(ray_cache.read_parquet(str(src / "small.parquet"))).equals(small)
    assert read_all(ray_cache.read_parquet(str(src / "big.parquet"))).equals(big)
    now = ray_cache.stats()
    assert now["disk_hits"] - before.get("disk_hits", 0) >= 1, "the entry written before: from disk"
