"""``ray_cache.load(path, replicas=...)`` ahead of a rollout: a copy of every page on every
cache node (or on the first N of each page's ranking), so that readers on each node map every
page from their own node's disk and ask no other node's worker; the store is read once
(counted at the proxy), and the next rollout reads nothing from it."""

from __future__ import annotations

import hashlib
import os

import pytest
import ray

import ray_cache
from conftest import data_gets, fresh_cache, gpu_node_ids
from ray_cache.cluster import hashing, membership
from ray_cache.files.fs import CacheFileSystem
from ray_cache.files.pagebuf import PAGE_SIZE

PAGES = 5


def _read_on(node, fs, path):
    """Read ``path`` whole on ``node``: its MD5 and that process's page counters."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    def read(fs):
        from ray_cache.files import pages

        before = pages.reader().stats()
        digest = hashlib.md5(fs.cat_file(path)).hexdigest()
        after = pages.reader().stats()
        return digest, {k: after[k] - before.get(k, 0) for k in after}

    return read.remote(fs)


def _owned_by_both(fs, stem, blob, names):
    """Write ``blob`` at ``stem-<n>.bin`` for the first ``n`` whose pages both workers own."""
    for n in range(50):
        path = f"{stem}-{n}.bin"
        fs.pipe_file(path, blob)
        if len({hashing.owner(d, names) for d in _page_digests(fs, path)}) == 2:
            return path
    raise AssertionError(f"no name under {stem} spread its pages over both workers in 50 tries")


@pytest.mark.slow
def test_replicas_on_every_node_are_mapped_there_and_the_store_is_read_once(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    fresh_cache(tmp_path)
    blob = os.urandom(PAGES * PAGE_SIZE - 1000)
    workers = membership.live_workers()
    names = [w.name for w in workers]
    assert len(workers) == 2
    # The model and the control need pages owned by each worker (5 pages all on one owner: 1
    # in 16), or a node would have no replica to map, or nothing to ask of another's worker.
    path = _owned_by_both(s3fs_direct, f"{prefix}/model", blob, names)
    control = _owned_by_both(s3fs_direct, f"{prefix}/other", blob[::-1], names)
    proxy.reset()
    report = ray_cache.load(f"s3://{path}", filesystem=s3fs_proxied, replicas="all")
    assert report.failures == [] and report.fetched == PAGES
    assert report.replicas == PAGES * (len(workers) - 1), "every page copied to the node that does not own it"
    assert sum(g["response_body_bytes"] for g in data_gets(proxy)) == len(blob), "the store read once"
    ray_cache.load(f"s3://{control}", filesystem=s3fs_proxied)  # owners only: the control

    rfs = CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True)
    proxy.reset()
    for node in sorted(gpu_node_ids()):
        here = next(i for i, w in enumerate(workers) if w.node_id == node)
        owned_elsewhere = sum(hashing.owner(d, names) != here for d in _page_digests(s3fs_proxied, path))
        digest, counts = ray.get(_read_on(node, rfs, path), timeout=300)
        assert digest == hashlib.md5(blob).hexdigest()
        assert counts["mapped_pages"] == PAGES and counts["worker_pages"] == 0, counts
        assert counts["replica_pages"] == owned_elsewhere > 0, counts
        digest, counts = ray.get(_read_on(node, rfs, control), timeout=300)
        assert digest == hashlib.md5(blob[::-1]).hexdigest()
        control_elsewhere = sum(hashing.owner(d, names) != here for d in _page_digests(s3fs_proxied, control))
        assert counts["worker_pages"] == control_elsewhere > 0, "without replicas a page owned elsewhere is asked of its owner"
    assert data_gets(proxy) == [], "the rollout reads nothing from the store"
    assert ray_cache.load(f"s3://{path}", filesystem=s3fs_proxied, replicas="all").replicas == 0, \
        "copies held are not copied again"


def _page_digests(fs, path):
    from ray_cache.store import fetch, underfs

    obj = underfs.list_objects(fs, [path])[0]
    return [fetch.page_request(obj, i, PAGE_SIZE).key.digest for i in range(PAGES)]


def test_replicas_must_be_a_node_count_or_all(cache, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    for bad in (0, -1, "some", 1.5, True):
        with pytest.raises(ValueError, match="replicas must be None, 'all' or a number of nodes"):
            ray_cache.load(str(tmp_path / "f.bin"), replicas=bad)
    assert ray_cache.load(str(tmp_path / "f.bin"), replicas=2).replicas == 0, "one node: nowhere to copy to"
