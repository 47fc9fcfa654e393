"""A cache that spans the cluster: several raylets on this machine, nodes declaring GPUs.

Placement on GPU nodes, warm reads with no data GETs, joins and leaves that move only
their share of keys, node loss and worker death mid-read, single flight.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from ray_cache.cluster import hashing, routing, membership
from ray_cache.readers.datasource import CachedParquetDatasource
from ray_cache.testing import CountingProxy
from conftest import (BUCKET, data_gets, expected_rows, fresh_cache, gpu_node_ids, home_nodes, owner_nodes,
                      make_table, read_all, write_dataset, write_spread_dataset)
from ray_cache.testing import s3_data_gets

pytestmark = pytest.mark.slow

def _fetched_bytes(proxy, under=""):
    return sum(r["response_body_bytes"] for r in data_gets(proxy, under))


def test_workers_go_to_gpu_nodes_and_new_nodes_join(gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, prefix):
    add, _ = gpu_nodes
    fresh_cache(tmp_path)
    assert {w["node_id"] for w in ray_cache.status().workers} == gpu_node_ids()
    head = ray.get_runtime_context().get_node_id()
    assert head not in {w["node_id"] for w in ray_cache.status().workers}
    add(1)  # a node joins: the next read starts its worker, the others keep running
    pids = {w["node_id"]: w["pid"] for w in ray_cache.status().workers}
    write_dataset(s3fs_direct, prefix, files=1, rows=2_000, rg_rows=1_000)
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    after = {w["node_id"]: w["pid"] for w in ray_cache.status().workers}
    assert set(after) == gpu_node_ids() and len(after) == 3
    assert all(after[n] == pid for n, pid in pids.items())
    # workers take no CPU or GPU from training
    assert ray.available_resources().get("GPU", 0) == 3
    ray_cache.shutdown()
    ray_cache.start(nodes="all", memory_bytes=64 << 20, disk_bytes=128 << 20, disk_dir=str(tmp_path))
    assert len(ray_cache.status().workers) == 4


def test_warm_cluster_read_sends_no_data_request(gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    fresh_cache(tmp_path)
    prefix, paths = write_spread_dataset(s3fs_direct, prefix, files=6, rows=10_000, rg_rows=10_000)
    want = expected_rows(s3fs_direct, paths)
    assert read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied)).equals(want)
    per_worker = [w["misses"] for w in ray_cache.status().workers]
    assert all(m > 0 for m in per_worker), f"keys spread over both workers: {per_worker}"
    proxy.reset()
    assert read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied)).equals(want)
    assert data_gets(proxy) == []
    s = ray_cache.stats()
    assert s["bytes_served_local"] + s["bytes_served_remote"] > 0


def test_join_refetches_at_most_its_share(gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    add, _ = gpu_nodes
    fresh_cache(tmp_path)
    paths = write_dataset(s3fs_direct, prefix, files=24, rows=4_000, rg_rows=4_000)
    url = f"s3://{prefix}/"
    proxy.reset()
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    cold = _fetched_bytes(proxy)
    add(1)  # N=2 -> N+1=3
    proxy.reset()
    got = read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    moved = _fetched_bytes(proxy)
    assert got.equals(expected_rows(s3fs_direct, paths))
    assert len(ray_cache.status().workers) == 3
    assert 0 < moved <= 1.5 / 3 * cold, f"re-fetched {moved} of {cold} bytes after a join"


def test_leave_refetches_at_most_what_the_node_held(gpu_nodes, ray_cluster, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    _, added = gpu_nodes
    fresh_cache(tmp_path)
    paths = write_dataset(s3fs_direct, prefix, files=12, rows=4_000, rg_rows=4_000)
    url = f"s3://{prefix}/"
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    leaving = added[0]
    held = {w["node_id"]: w["bytes_from_under_store"] for w in ray_cache.status().workers}
    leaving_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == leaving.node_manager_port)
    ray_cluster.remove_node(leaving)
    assert leaving_id not in {w["node_id"] for w in ray_cache.status().workers}
    proxy.reset()
    got = read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    assert got.equals(expected_rows(s3fs_direct, paths))
    assert _fetched_bytes(proxy, prefix) <= held[leaving_id] * 1.05 + 64 * 1024


@pytest.mark.parametrize("zero_copy", ["auto", False])
def test_node_removed_mid_epoch_costs_no_error_and_no_wrong_row(
        gpu_nodes, ray_cluster, tmp_path, s3fs_direct, s3fs_proxied, prefix, zero_copy):
    """Warm copies ("auto"), or read tasks pinned to the owners' nodes (False): a node
    removed mid-epoch costs no error and no wrong row (its pinned reads run elsewhere)."""
    _, added = gpu_nodes
    fresh_cache(tmp_path)
    paths = write_dataset(s3fs_direct, prefix, files=12, rows=4_000, rg_rows=2_000)
    url = f"s3://{prefix}/"
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))  # warm the cache
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied, zero_copy=zero_copy)
    import pyarrow as pa

    seen = []
    it = iter(ds.iter_batches(batch_size=1_000, batch_format="pyarrow"))
    seen.append(next(it))
    ray_cluster.remove_node(added[0])  # mid-epoch
    seen.extend(it)
    got = pa.concat_tables(seen).sort_by("id")
    assert got.equals(expected_rows(s3fs_direct, paths))


def test_killed_worker_mid_read_tasks_falls_back_counted(gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, prefix):
    fresh_cache(tmp_path)
    paths = write_dataset(s3fs_direct, prefix, files=8, rows=4_000, rg_rows=4_000)
    url = f"s3://{prefix}/"
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied, zero_copy=False)  # read tasks, both workers
    workers = membership.live_workers()
    objects = ray_cache.store.underfs.list_objects(s3fs_proxied, paths)
    requests = CachedParquetDatasource(s3fs_proxied, objects, workers).requests
    names = [w.name for w in workers]
    victim = workers[hashing.owner(requests[0].key.digest, names)]  # owns at least one unit
    ray.kill(victim.handle, no_restart=True)
    got = read_all(ds)
    assert got.equals(expected_rows(s3fs_direct, paths))
    assert ray_cache.stats()["fallbacks"] > 0, "fallbacks must be visible, not silent"


def test_single_flight_one_fetch_for_many_readers(cache, s3_server, s3fs_direct, prefix):
    import s3fs

    paths = write_dataset(s3fs_direct, prefix, files=1, rows=8_000, rg_rows=8_000)
    with CountingProxy(s3_server.endpoint_url, latency_ms=400) as slow:
        fs = s3fs.S3FileSystem(**s3_server.storage_options(endpoint_url=slow.url), skip_instance_cache=True)
        objects = ray_cache.store.underfs.list_objects(fs, [paths[0]])
        workers = membership.live_workers()
        source = CachedParquetDatasource(fs, objects, workers)
        (req,) = source.requests
        slow.reset()

        @ray.remote(num_cpus=0)
        def reader():
            return list(routing.read_units(fs, [req], workers))[0]

        tables = ray.get([reader.remote() for _ in range(6)])
        direct = workers[0].handle.get_many.options(num_returns="streaming").remote(fs, [req] * 8)
        items = [ray.get(r) for r in direct]
        gets = s3_data_gets(slow.requests(), BUCKET)
    assert all(t.equals(tables[0]) for t in tables)
    assert all(i[0] == "ok" for i in items)
    assert len(gets) == 1, f"{len(gets)} fetches of one cold unit"


def test_a_worker_asked_as_ready_answers_a_fast_page_before_a_slow_one(cache, s3_server, s3fs_direct, prefix):
    """A whole-file reader asks for its pages as they are ready: a page whose GET is held
    up at the store does not hold up the page after it (in order, it would)."""
    import s3fs

    from ray_cache.files.pagebuf import page_buffer, page_requests
    from ray_cache.store.underfs import object_of

    paths = {f"{prefix}/slow.bin": b"s" * 1000, f"{prefix}/fast.bin": b"f" * 1000}
    s3fs_direct.pipe(paths)
    (w,) = membership.live_workers()
    with CountingProxy(s3_server.endpoint_url) as px:
        fs = s3fs.S3FileSystem(**s3_server.storage_options(endpoint_url=px.url), skip_instance_cache=True)
        reqs = [page_requests(object_of(fs, fs.info(p), "s3", p), 0, 1000, 1 << 20)[0] for p in paths]
        px.inject({"kind": "stall", "method": "GET", "path_contains": "slow.bin", "times": 1, "stall_s": 3})
        items = [ray.get(r, timeout=120) for r in
                 w.handle.get_many.options(num_returns="streaming").remote(fs, reqs, as_ready=True)]
        fired = px.faults_fired()
    assert fired == 1, "the slow page's first GET was held up"
    assert [i for i, _item in items] == [1, 0], "the fast page first, each request once"
    assert [item[0] for _i, item in items] == ["ok", "ok"], items
    got = {i: page_buffer(ray.get(item[1][0]).column(0)).tobytes() for i, item in items}
    assert [got[0], got[1]] == list(paths.values())


def test_a_whole_file_read_across_owners_survives_a_worker_killed_mid_read(
        gpu_nodes, tmp_path, s3_server, s3fs_direct, prefix):
    """A large file read whole from the driver (off the cache nodes): its pages come from
    both nodes' workers, copied into the result as each arrives. One worker is killed
    while the store is still sending: the read returns the file's bytes, from the other
    worker or the store, and does not hang."""
    import threading

    import s3fs

    from ray_cache.files.fs import CacheFileSystem
    from ray_cache.files.pagebuf import ASSEMBLE_AHEAD_BYTES, page_requests
    from ray_cache.store.underfs import object_of

    fresh_cache(tmp_path)
    data = np.random.default_rng(5).integers(0, 256, 24 << 20, dtype=np.uint8).tobytes()
    assert len(data) >= ASSEMBLE_AHEAD_BYTES, "a read assembled as its pages arrive"
    path = f"{prefix}/model.bin"
    s3fs_direct.pipe(path, data)
    workers = membership.live_workers()
    names = [w.name for w in workers]
    obj = object_of(s3fs_direct, s3fs_direct.info(path), "s3", path)
    owners = [hashing.owner(r.key.digest, names) for r in page_requests(obj, 0, len(data), 1 << 20)]
    assert set(owners) == {0, 1}, "pages owned by both nodes' workers"
    victim = workers[owners[-1]]
    with CountingProxy(s3_server.endpoint_url, rate_bytes_per_s=6e6) as slow:  # 24 MiB: ~4 s
        fs = s3fs.S3FileSystem(**s3_server.storage_options(endpoint_url=slow.url), skip_instance_cache=True)
        rfs = CacheFileSystem(fs=fs, page_size=1 << 20, skip_instance_cache=True)
        out: dict = {}
        reader = threading.Thread(target=lambda: out.update(got=rfs.cat_file(path)), daemon=True)
        reader.start()
        _until(lambda: s3_data_gets(slow.requests(), BUCKET), every_s=0.02)  # the store's first data GET
        reading = reader.is_alive()
        ray.kill(victim.handle, no_restart=True)
        reader.join(timeout=240)
    assert reading, "the worker was killed while the read was under way"
    assert not reader.is_alive(), "the read returned"
    assert out["got"] == data


def test_forked_dataloader_on_a_gpu_node_reads_pages_of_every_node_warm(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    """A training process on a cache node (a Ray task, as a Ray Train worker is) whose
    DataLoader forks its workers: pages owned by this node's worker and by the other
    node's are read through the cache (cold: filled once; warm: 0 data GETs)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_cache.files.fs import CacheFileSystem
    from ray_cache.files.pagebuf import PAGE_SIZE, page_requests
    from ray_cache.store.underfs import object_of

    fresh_cache(tmp_path)
    rng = np.random.default_rng(3)
    paths = [f"{prefix}/img/{i:03d}.bin" for i in range(24)]
    blobs = [rng.integers(0, 256, 30_000, dtype=np.uint8).tobytes() for _ in paths]
    s3fs_direct.pipe(dict(zip(paths, blobs)))
    rfs = CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)
    workers = membership.live_workers()
    names = [w.name for w in workers]
    here = sorted(gpu_node_ids())[0]
    owners = {names[hashing.owner(page_requests(object_of(s3fs_direct, s3fs_direct.info(p), "s3", p),
                                                0, 1, PAGE_SIZE)[0].key.digest, names)]
              for p in paths}
    assert owners == set(names), "pages owned by both nodes' workers"

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
    def epoch(fs, paths):
        import os

        import torch

        class Files(torch.utils.data.Dataset):
            def __len__(self):
                return len(paths)

            def __getitem__(self, i):
                from ray_cache.files import pages

                fs.info(paths[i])
                return fs.cat_file(paths[i]), pages.reader().stats(), os.getpid()

        last, got = {}, []
        for data, stats, pid in torch.utils.data.DataLoader(Files(), batch_size=None, num_workers=2, timeout=120):
            last[pid] = stats
            got.append(bytes(data))
        assert os.getpid() not in last
        return got, {k: sum(s[k] for s in last.values()) for k in ("channel_pages", "direct_pages",
                                                                    "fallback_pages", "mapped_pages")}

    proxy.reset()
    got, cold = ray.get(epoch.remote(rfs, paths), timeout=300)
    assert got == blobs
    assert cold["direct_pages"] == 0 and cold["fallback_pages"] == 0
    assert cold["channel_pages"] == len(paths), "every cold page through the node's worker"
    assert len(data_gets(proxy)) == len(paths), "and fetched once, by its owner"
    ray.get([w.handle.flush.remote() for w in workers], timeout=60)
    for _ in range(2):
        proxy.reset()
        got, warm = ray.get(epoch.remote(rfs, paths), timeout=300)
        assert got == blobs
        assert warm["direct_pages"] == 0 and warm["fallback_pages"] == 0
        assert data_gets(proxy) == [], "pages on this node (mapped) and on the other (relayed)"
        assert warm["channel_pages"] >= sum(o != f"worker-{here}" for o in [
            names[hashing.owner(page_requests(object_of(s3fs_direct, s3fs_direct.info(p), "s3", p),
                                              0, 1, PAGE_SIZE)[0].key.digest, names)] for p in paths])


def _until(done, every_s: float = 0.2, within_s: float = 60.0) -> bool:
    """Poll ``done()`` until it is true or ``within_s`` has passed; whether it became true.
    For what Ray does asynchronously: objects are freed some time after their last
    reference is gone."""
    deadline = time.monotonic() + within_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)
    return True


def _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix, files=6):
    """A warm cache of ``files`` units (blocks big enough to live in the object store, not
    inlined), and a dataset over the copies made on the owners' nodes, waited for."""
    prefix, paths = write_spread_dataset(s3fs_direct, prefix, files=files, rows=30_000, rg_rows=30_000)
    url = f"s3://{prefix}/"
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    gc.collect()  # what of the cold read only the collector frees goes now, not mid-test
    ray.get([w.handle.flush.remote() for w in membership.live_workers()], timeout=60)
    proxy.reset()
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied)
    refs = [ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]
    ready, _ = ray.wait(refs, num_returns=len(refs), fetch_local=False, timeout=120)
    assert len(ready) == len(refs), "a materialized dataset"
    return paths, ds, refs


def _evened_out(fs, paths):
    """Each file's home node (its owner's, evened out by rows); asserts the nodes hold equal
    rows (the files here have equal rows, an even count of them on two nodes)."""
    home_of = home_nodes(fs, paths)
    per_node = [list(home_of.values()).count(n) for n in gpu_node_ids()]
    assert per_node == [len(paths) // 2] * 2, f"files per node, evened out: {per_node}"
    return home_of


def test_warm_read_off_the_cache_nodes_is_copies_on_their_nodes_evened_out(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    fresh_cache(tmp_path)
    assert ray.get_runtime_context().get_node_id() not in gpu_node_ids(), "driver off the cache nodes"
    paths, ds, refs = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix)
    home_of = _evened_out(s3fs_direct, paths)
    assert len(refs) == 2, "one block per copy task: per node of one CPU, one"
    where = ray.experimental.get_object_locations(refs)
    for ref in refs:
        files = {f"part-{i // 30_000:03d}.parquet" for i in ray.get(ref)["id"].to_pylist()}
        assert where[ref]["node_ids"] == list({home_of[f] for f in files}), "one node: its units' home"
    assert read_all(ds).equals(expected_rows(s3fs_direct, paths))
    assert data_gets(proxy) == [], "warm: the copies sent nothing to the store"


def test_a_cold_read_off_the_cache_nodes_runs_on_its_owners_nodes_at_every_execution(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    """Read tasks pinned per node (the owners', evened out by rows): the cold execution
    fetches each unit once, and the next execution of the same dataset (Ray Train's next
    epoch) reads every unit warm, its blocks again made on the same nodes."""
    fresh_cache(tmp_path)
    assert ray.get_runtime_context().get_node_id() not in gpu_node_ids(), "driver off the cache nodes"
    prefix, paths = write_spread_dataset(s3fs_direct, prefix, files=6, rows=30_000, rg_rows=30_000)
    home_of = _evened_out(s3fs_direct, paths)
    proxy.reset()
    ds = ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied)  # cold
    for execution in ("cold", "warm"):
        refs = [ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]
        assert len(refs) == 2, "one block per read task: per node of one CPU, one"
        where = ray.experimental.get_object_locations(refs)
        for ref in refs:
            files = {f"part-{i // 30_000:03d}.parquet" for i in ray.get(ref)["id"].to_pylist()}
            assert where[ref]["node_ids"] == list({home_of[f] for f in files}), (
                f"{execution}: a block is made on its unit's home node")
        import pyarrow as pa

        assert pa.concat_tables(ray.get(refs)).sort_by("id").equals(expected_rows(s3fs_direct, paths))
        fetched = sorted(r["path"].split("?")[0].split("/")[-1] for r in data_gets(proxy))
        assert fetched == (sorted(home_of) if execution == "cold" else []), (
            f"{execution}: each unit fetched once, cold; nothing warm")
        proxy.reset()


def test_preserve_order_off_the_cache_nodes_gives_file_order_cold_and_warm(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, prefix):
    """With Ray Data's ``preserve_order``, rows come in file order on a cluster too: the cold
    read keeps Ray's one read (no per-node union) and the warm copies are in file order."""
    fresh_cache(tmp_path)
    prefix, paths = write_spread_dataset(s3fs_direct, prefix, files=6, rows=30_000, rg_rows=30_000)
    want = expected_rows(s3fs_direct, paths)
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        for execution in ("cold", "warm"):
            ds = ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied)
            assert read_all(ds, sort=False).equals(want), f"{execution}: file order"
    finally:
        ctx.execution_options.preserve_order = old


def test_copy_tasks_run_one_chain_per_cpu_of_their_node(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix, monkeypatch):
    """One copy task per unit (``TASK_BYTES`` tiny): on a node of one CPU they still run one
    at a time, each after the one before (copy tasks take no CPU, and unchained Ray would
    start a worker process for each of them at once)."""
    from ray_cache.readers import nodecopies

    @ray.remote(num_cpus=0)
    class Gauge:
        def __init__(self):
            self.now, self.most = {}, {}

        def enter(self, node):
            self.now[node] = self.now.get(node, 0) + 1
            self.most[node] = max(self.most.get(node, 0), self.now[node])

        def leave(self, node):
            self.now[node] -= 1

        def peak(self):
            return self.most

    gauge = Gauge.remote()
    copy_here = nodecopies._copy_here

    def counted(*args):
        import time

        node = ray.get_runtime_context().get_node_id()
        ray.get(gauge.enter.remote(node))
        try:
            time.sleep(0.5)  # a slow copy: long enough for Ray to start other tasks beside it
            return copy_here(*args)
        finally:
            ray.get(gauge.leave.remote(node))

    fresh_cache(tmp_path)
    paths, _, _ = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix, files=8)
    monkeypatch.setattr(nodecopies, "TASK_BYTES", 1)
    monkeypatch.setattr(nodecopies, "_copy_task", ray.remote(num_cpus=0, max_retries=3)(counted))
    ds = ray_cache.read_parquet(f"s3://{paths[0].rsplit('/', 1)[0]}/", filesystem=s3fs_proxied)
    assert read_all(ds).equals(expected_rows(s3fs_direct, paths))
    peak = ray.get(gauge.peak.remote())
    assert set(peak) == gpu_node_ids() and all(v == 1 for v in peak.values()), (
        f"copy tasks at once per node (one CPU each): {peak}")


def test_worker_killed_after_the_copies_costs_nothing(gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    fresh_cache(tmp_path)
    paths, ds, refs = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix)
    it = iter(ds.iter_batches(batch_size=10_000, batch_format="pyarrow"))
    seen = [next(it)]
    proxy.reset()
    for w in membership.live_workers():
        ray.kill(w.handle, no_restart=True)  # the driver owns the copies: they outlive the workers
    seen.extend(it)
    import pyarrow as pa

    assert pa.concat_tables(seen).sort_by("id").equals(expected_rows(s3fs_direct, paths))
    assert data_gets(proxy) == []


@pytest.mark.parametrize("task_bytes", ["default", "one unit"])
def test_node_lost_after_the_copies_remakes_its_share_from_the_store_counted(
        gpu_nodes, ray_cluster, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix, task_bytes, monkeypatch):
    """With one copy task per node, or a chain of one-unit copy tasks per node (each waiting
    for the one before: Ray re-runs a lost one with the chain's argument it kept)."""
    from ray_cache.readers import nodecopies

    if task_bytes == "one unit":
        monkeypatch.setattr(nodecopies, "TASK_BYTES", 1)
    _, added = gpu_nodes
    fresh_cache(tmp_path)
    paths, ds, refs = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix, files=8)
    leaving = added[0]
    leaving_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == leaving.node_manager_port)
    # Lost with the node: its worker and the copies made there; what it owned and held a
    # copy of comes from the store again (a copy it held of another owner's unit is made
    # again from that owner, a copy of its own unit held elsewhere survives).
    home_of = home_nodes(s3fs_direct, paths)
    lost = [p for p, node in owner_nodes(s3fs_direct, paths).items() if node == leaving_id == home_of[p]]
    assert lost, "the leaving node held copies of its own units"
    proxy.reset()
    ray_cluster.remove_node(leaving)
    assert read_all(ds).equals(expected_rows(s3fs_direct, paths))
    fetched = {r["path"].split("?")[0].split("/")[-1] for r in data_gets(proxy, paths[0].rsplit("/", 1)[0])}
    assert fetched == set(lost), "exactly the lost node's units came from the store again"
    assert ray_cache.stats()["fallbacks"] >= len(lost)


def test_copies_that_would_not_fit_leave_the_read_to_read_tasks(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix, monkeypatch):
    from ray.data.dataset import MaterializedDataset

    from ray_cache.readers import nodecopies

    fresh_cache(tmp_path)
    paths = write_dataset(s3fs_direct, prefix, files=4, rows=30_000, rg_rows=30_000)
    url = f"s3://{prefix}/"
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))
    assert isinstance(ray_cache.read_parquet(url, filesystem=s3fs_proxied), MaterializedDataset)
    monkeypatch.setattr(nodecopies, "COPY_FRACTION", 0.0)  # no room beside the memory tier
    proxy.reset()
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied)
    assert not isinstance(ds, MaterializedDataset), "no copies made: read tasks, bounded by Ray Data"
    assert read_all(ds).equals(expected_rows(s3fs_direct, paths))
    assert data_gets(proxy) == []


def test_a_read_while_the_last_dataset_lives_shares_its_copies(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    """A loop's ``ds = read_parquet(...)`` (or a notebook cell run again) while the last
    dataset over the same units lives: the new dataset is over the very same blocks (no copy
    made, one set held); an object changed since is read anew (never the old rows); once every
    dataset over the copies is dropped, a read copies anew."""
    from ray_cache.readers import nodecopies

    fresh_cache(tmp_path)
    paths, ds, refs = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix)
    url = f"s3://{paths[0].rsplit('/', 1)[0]}/"
    again = ray_cache.read_parquet(url, filesystem=s3fs_proxied)
    assert [r for b in again.iter_internal_ref_bundles() for r in b.block_refs] == refs, "the same blocks"
    assert read_all(again).equals(expected_rows(s3fs_direct, paths))
    assert data_gets(proxy) == []

    first = {r.hex() for r in refs}
    del again, ds, refs
    gc.collect()
    assert not nodecopies._LIVE, "the record goes with the last dataset over the copies"
    third = ray_cache.read_parquet(url, filesystem=s3fs_proxied)
    made = {r.hex() for b in third.iter_internal_ref_bundles() for r in b.block_refs}
    assert made and not made & first, "copies made anew"
    assert read_all(third).equals(expected_rows(s3fs_direct, paths))

    before = expected_rows(s3fs_direct, paths)
    with s3fs_direct.open(paths[0], "wb") as f:  # a new version while ``third`` lives
        pq.write_table(make_table(5, 99, offset=10**6), f)
    fourth = ray_cache.read_parquet(url, filesystem=s3fs_proxied)
    assert read_all(fourth).equals(expected_rows(s3fs_direct, paths)), "the new version's rows"
    assert not read_all(fourth).equals(before)
    assert read_all(third).equals(before), "the dataset made before is a snapshot of the old versions"


def test_copies_of_a_dataset_still_alive_count_against_the_room(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix, monkeypatch):
    """Room for copies is what each node's object store really holds (its raylet's count):
    with the last dataset's copies still alive, a read of other units (here all files but
    one: nothing to share) whose copies would not fit beside them makes none (read tasks
    instead: no spilling); once the first dataset is dropped, it does."""
    from ray.data.dataset import MaterializedDataset

    from ray_cache.readers import nodecopies

    gc.collect()  # earlier tests' datasets go now, not while this one measures the room
    fresh_cache(tmp_path)
    paths, ds, refs = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix, files=6)
    subset = [f"s3://{p}" for p in paths[:-1]]
    from ray_cache.node.tiers.memory import node_store_used

    def in_use():  # the most any GPU node's object store holds, as its raylet counts it
        return max(node_store_used(n) for n in gpu_node_ids())

    sizes = [b.size_bytes for bundle in ds.iter_internal_ref_bundles() for b in bundle.metadata]
    copies = max(sizes)
    # Some of the cold read's bytes (a node's share of its blocks, 3.4 MB here) are freed
    # only when the garbage collector runs: at a random moment, they made the room grow
    # between the sample below and the read (a flake). Collect now, and wait until each GPU
    # node's store holds about what it must: its worker's memory tier and its copies.
    gc.collect()
    tier = {w["node_id"]: int(w["memory_bytes_used"]) for w in ray_cache.status().workers}
    locations = ray.experimental.get_object_locations(refs)  # keyed by the refs: dropped below
    where = [locations[ref]["node_ids"] for ref in refs]
    del locations
    must = {n: tier.get(n, 0) + sum(size for nodes, size in zip(where, sizes) if n in nodes)
            for n in gpu_node_ids()}
    _until(lambda: all(node_store_used(n) <= must[n] + copies // 4 for n in must))
    held = in_use()
    capacity = 256 << 20  # conftest.NODE's object store
    monkeypatch.setattr(nodecopies, "COPY_FRACTION", (held + copies // 2) / capacity)
    assert not isinstance(ray_cache.read_parquet(subset, filesystem=s3fs_proxied), MaterializedDataset), (
        "no second copies beside the first: read tasks")
    del ds, refs
    gc.collect()
    _until(lambda: in_use() <= held - copies // 2)
    ds = ray_cache.read_parquet(subset, filesystem=s3fs_proxied)
    assert isinstance(ds, MaterializedDataset), "the first dropped: copies again"
    assert read_all(ds).equals(expected_rows(s3fs_direct, paths[:-1]))
    assert data_gets(proxy) == []


def test_copies_are_freed_with_the_dataset(gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    """Dropping the dataset frees its copies: once Python's collector has run. An executed
    Ray Data dataset's blocks stay reachable through reference cycles after it is dropped
    (one seen: Ray Data's usage callback holding the logical plan), Ray's own too (an
    iterated ``from_arrow_refs`` dataset's 80 MB stayed until ``gc.collect()``): only the
    collector frees them (``gc.collect()`` here)."""
    from ray._private import state
    from ray._private.internal_api import get_memory_info_reply

    def store_bytes():
        return int(get_memory_info_reply(state.state).store_stats.object_store_bytes_used)

    fresh_cache(tmp_path)
    paths, ds, refs = _warm_copies(s3fs_direct, s3fs_proxied, proxy, prefix, files=6)
    copies = sum(b.size_bytes for b in ds.iter_internal_ref_bundles() for b in b.metadata)
    held = store_bytes()
    del ds, refs
    gc.collect()
    _until(lambda: store_bytes() <= held - 0.9 * copies)
    assert store_bytes() <= held - 0.9 * copies, "dropping the dataset frees its copies"
