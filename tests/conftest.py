"""Shared fixtures: one Ray instance, one S3 server with a counting proxy, fresh caches.

Every server here is a real process on loopback, started by the test run and stopped by
its own pid at the end.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Dict

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports, no Prometheus probes
# What the run writes by default (proofs of read rights, a default disk tier) stays in a
# folder of its own, not the user's ~/.cache; Ray's workers inherit it.
os.environ.setdefault("RAY_CACHE_DIR", tempfile.mkdtemp(prefix="ray-cache-tests-"))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from ray_cache.testing import CountingProxy, S3Server, s3_data_gets

BUCKET = "ray-cache-tests"


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole run: a head node now, more raylets added by tests.

    Starting Ray costs seconds, so every test shares it. Multi-node tests add nodes
    (declaring GPUs they do not have) and remove them again when they end.
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 1 << 30, "include_dashboard": False},
    )
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    _drop_gpu_pool()
    ray_cache.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """Ray is up (on the shared cluster's head node)."""
    yield


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def proxy(s3_server):
    """Counts every request that reaches the S3 server (the readers go through it)."""
    with CountingProxy(s3_server.endpoint_url) as p:
        yield p


@pytest.fixture()
def s3fs_direct(s3_server):
    """An s3fs talking to the server directly: for writing test data, uncounted."""
    import s3fs

    return s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)


@pytest.fixture()
def s3fs_proxied(s3_server, proxy):
    """An s3fs whose every request passes the counting proxy: what readers use."""
    import s3fs

    return s3fs.S3FileSystem(
        **s3_server.storage_options(endpoint_url=proxy.url), skip_instance_cache=True
    )


@pytest.fixture()
def cache(ray_session, tmp_path):
    """Fresh cache workers (empty tiers) under a per-test disk directory."""
    ray_cache.shutdown()
    disk_dir = tmp_path / "cache"
    ray_cache.start(memory_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=str(disk_dir))
    yield disk_dir
    ray_cache.shutdown()


@pytest.fixture()
def prefix():
    """A unique key prefix per test, so tests never see each other's objects."""
    return f"{BUCKET}/t-{uuid.uuid4().hex[:10]}"


def make_table(n: int, seed: int = 0, offset: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": np.arange(offset, offset + n, dtype=np.int64),
            "x": rng.random(n),
            "y": rng.random(n).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32),
            "name": pa.array([f"row-{i}" for i in range(offset, offset + n)]),
        }
    )


def write_dataset(fs, prefix: str, files: int = 3, rows: int = 20_000, rg_rows: int = 5_000, seed: int = 0):
    """Write ``files`` Parquet objects under ``prefix``; returns their paths in order."""
    paths = []
    for i in range(files):
        path = f"{prefix}/part-{i:03d}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(make_table(rows, seed + i, offset=i * rows), f, row_group_size=rg_rows)
        paths.append(path)
    return paths


def data_gets(proxy: CountingProxy, under: str = "") -> list:
    """The object data GETs that reached the store, those of keys under ``under`` only if
    given: a test that removes a node counts its own objects alone, since Ray re-makes
    whatever lost blocks earlier tests' datasets still hold references to."""
    gets = s3_data_gets(proxy.requests(), BUCKET)
    return [r for r in gets if r["path"].split("?")[0].startswith(f"/{under}/")] if under else gets


def read_all(ds, sort: bool = True) -> pa.Table:
    """All rows of a dataset; sorted by ``id`` unless ``sort=False``.

    Ray Data hands out blocks as read tasks finish (unless ``preserve_order``), so
    tests compare row sets sorted by ``id``; ``test_order_is_kept`` checks order itself.
    """
    tables = ray.get(ds.to_arrow_refs())
    table = pa.concat_tables(tables) if tables else pa.table({})
    if sort and "id" in table.column_names:
        table = table.sort_by("id")
    return table


@pytest.fixture()
def tmpdir_factory_local():
    d = tempfile.mkdtemp(prefix="ray-cache-local-")
    yield d


os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# -- several raylets: GPU nodes for the cluster tests ---------------------------------

#: A GPU node: one CPU, one (declared) GPU, and a slot a Ray Train worker can ask for by name.
NODE = dict(num_cpus=1, num_gpus=1, object_store_memory=256 << 20, resources={"gpu_node_slot": 1})


#: GPU raylets kept from one GPU test to the next (starting two costs ~5 s): (cluster, nodes).
_GPU_POOL: Dict[str, Any] = {"cluster": None, "nodes": []}


def _drop_gpu_pool(keep: int = 0) -> None:
    """Remove the kept GPU raylets beyond the first ``keep`` (their workers stopped first)."""
    cluster, nodes = _GPU_POOL["cluster"], _GPU_POOL["nodes"]
    alive = [n for n in nodes if cluster is not None and n in cluster.list_all_nodes()]
    if len(alive) > keep:
        ray_cache.shutdown()
    for node in alive[keep:]:
        cluster.remove_node(node)
    _GPU_POOL["nodes"] = alive[:keep]


@pytest.fixture(autouse=True)
def _gpu_nodes_only_where_asked(request):
    """A test that does not ask for GPU nodes runs without them (the pool goes at the first
    such test), so every other test sees the one-node cluster it was written for."""
    if _GPU_POOL["nodes"] and "gpu_nodes" not in request.fixturenames:
        _drop_gpu_pool()
    yield


@pytest.fixture()
def gpu_nodes(ray_cluster):
    """Two raylets that declare one GPU each, no cache worker on them yet. A test may add
    nodes (``add``) or remove some; the next GPU test starts from two again (the same two
    where they are still there), and the first test without GPU nodes removes them."""
    ray_cache.shutdown()
    _GPU_POOL["cluster"] = ray_cluster
    _drop_gpu_pool(keep=2)
    added = list(_GPU_POOL["nodes"])

    def add(n: int = 1):
        new = [ray_cluster.add_node(**NODE) for _ in range(n)]
        ray_cluster.wait_for_nodes()
        added.extend(new)
        _GPU_POOL["nodes"].extend(new)
        return new

    if len(added) < 2:
        add(2 - len(added))
    yield add, added
    ray_cache.shutdown()


def fresh_cache(tmp_path):
    """New workers on every cache node, empty tiers under ``tmp_path``."""
    ray_cache.shutdown()
    ray_cache.start(memory_bytes=64 << 20, disk_bytes=128 << 20, disk_dir=str(tmp_path))


def gpu_node_ids():
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


def expected_rows(fs, paths):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in paths]).sort_by("id")


def _units(fs, paths, columns=None):
    """(file name, owner's node id, rows) of each planned unit, in the datasource's order."""
    from ray_cache.cluster import hashing, membership
    from ray_cache.readers.datasource import CachedParquetDatasource

    workers = membership.live_workers()
    names = [w.name for w in workers]
    source = CachedParquetDatasource(fs, ray_cache.store.underfs.list_objects(fs, paths), workers, columns=columns)
    return [(r.obj.path.split("/")[-1], workers[hashing.owner(r.key.digest, names)].node_id, r.unit.num_rows)
            for r in source.requests]


def owner_nodes(fs, paths, columns=None):
    """Node id of the live worker that owns each file's units, by file name (one unit per
    file: the datasets here have one row group per file)."""
    return {name: node for name, node, _ in _units(fs, paths, columns)}


def write_spread_dataset(fs, prefix: str, files: int, **kwargs):
    """``write_dataset`` under ``prefix/<n>``, the first ``n`` whose units are owned by every
    live worker: rendezvous hashing of a few keys gives all of them to one worker now and
    then (6 files on 2 workers: 1 run in 32), which a test of spread must not depend on.
    Returns that prefix and the paths."""
    from ray_cache.cluster import membership

    want = len({w.node_id for w in membership.live_workers()})
    for n in range(16):
        sub = f"{prefix}/{n}"
        paths = write_dataset(fs, sub, files=files, **kwargs)
        if len(set(owner_nodes(fs, paths).values())) == want:
            return sub, paths
        fs.rm(sub, recursive=True)
    raise AssertionError(f"no spread of {files} files over {want} nodes in 16 tries")


def home_nodes(fs, paths, columns=None):
    """Node id where each file's block is made on a cluster read (its owner's, evened out by
    rows: ``ray_cache.readers.placement``), by file name."""
    from ray_cache.cluster import membership
    from ray_cache.readers import placement
    from ray_cache.readers.datasource import CachedParquetDatasource

    workers = membership.live_workers()
    reqs = CachedParquetDatasource(fs, ray_cache.store.underfs.list_objects(fs, paths), workers,
                                   columns=columns).requests
    return {reqs[i].obj.path.split("/")[-1]: node for node, idx in placement.of(reqs, workers).items() for i in idx}
