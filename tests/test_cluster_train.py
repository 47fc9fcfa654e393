"""Ray Train on a cluster shaped as users deploy it: the driver (and the trainer's
controller) on a head node without GPUs, two training workers on the two GPU nodes that
run the cache workers, a warm cache.

Each epoch must see every row exactly once across the workers and send nothing to the
store; each worker's shard must come from blocks on its own node as far as the equal
split allows (Ray Train's ``DataConfig`` passes the workers' nodes as locality hints).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np
import pytest
import ray

import ray_cache
from ray_cache.cluster import hashing, membership
from ray_cache.readers.datasource import CachedParquetDatasource
from conftest import data_gets, fresh_cache, gpu_node_ids, read_all, write_dataset

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

FILES, ROWS, EPOCHS = 6, 20_000, 2


def make_train_loop():
    """Per worker: ``EPOCHS`` epochs of ``iter_torch_batches`` (ids saved per epoch), then one
    more epoch read block by block, asking Ray where each block lives (bytes local/total)."""

    def train_loop(config: Dict[str, Any]) -> None:
        import numpy as np
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        here = ray.get_runtime_context().get_node_id()
        shard = ray.train.get_dataset_shard("train")
        for epoch in range(config["epochs"]):
            ids = [b["id"].numpy() for b in shard.iter_torch_batches(batch_size=1_000)]
            np.save(os.path.join(config["out"], f"e{epoch}-r{rank}.npy"), np.concatenate(ids))
        local = total = rows = 0
        bundles, _, _ = shard._to_ref_bundle_iterator()
        for bundle in bundles:
            refs = list(bundle.block_refs)
            where = ray.experimental.get_object_locations(refs)
            for ref, block in zip(refs, ray.get(refs)):
                total += block.num_rows
                local += block.num_rows if here in where[ref]["node_ids"] else 0
        with open(os.path.join(config["out"], f"where-r{rank}.json"), "w") as fh:
            json.dump({"node": here, "local_rows": local, "rows": total}, fh)

    return train_loop


def test_torch_trainer_on_the_gpu_nodes_reads_its_own_nodes_blocks_every_row_once(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fresh_cache(tmp_path / "cache")
    paths = write_dataset(s3fs_direct, prefix, files=FILES, rows=ROWS, rg_rows=ROWS)
    url = f"s3://{prefix}/"
    columns = ["id", "x", "label"]  # numeric: what iter_torch_batches turns into tensors
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied, columns=columns))  # warm
    workers = membership.live_workers()
    names = [w.name for w in workers]
    source = CachedParquetDatasource(s3fs_proxied, ray_cache.store.underfs.list_objects(s3fs_proxied, paths),
                                     workers, columns=columns)
    own_rows = {w.node_id: 0 for w in workers}  # rows each node's worker owns
    for r in source.requests:
        own_rows[workers[hashing.owner(r.key.digest, names)].node_id] += r.unit.num_rows
    proxy.reset()
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied, columns=columns)
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        make_train_loop(),
        train_loop_config={"out": str(out), "epochs": EPOCHS},
        datasets={"train": ds},
        # One worker per GPU node: each asks for that node's slot (the GPUs are declared, not real).
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                     resources_per_worker={"CPU": 0.5, "gpu_node_slot": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_train"), name="cluster-ingest"),
    )
    trainer.fit()

    everything = np.arange(FILES * ROWS)
    for epoch in range(EPOCHS):
        seen = [np.load(out / f"e{epoch}-r{rank}.npy") for rank in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == FILES * ROWS // 2, "equal shards"
        assert np.array_equal(np.sort(np.concatenate(seen)), everything), f"epoch {epoch}: every row once"
    assert data_gets(proxy) == [], "warm: no epoch sent a data request to the store"
    where = [json.loads((out / f"where-r{rank}.json").read_text()) for rank in (0, 1)]
    assert {w["node"] for w in where} == gpu_node_ids(), "one training worker on each GPU node"
    for w in where:
        # The equal split may hand a worker another node's rows only where its own node
        # holds fewer than its share.
        allowed_remote = max(0, FILES * ROWS // 2 - own_rows[w["node"]])
        assert w["rows"] == FILES * ROWS // 2
        assert w["rows"] - w["local_rows"] <= allowed_remote, (
            f"worker on {w['node'][:8]}: {w['rows'] - w['local_rows']} rows from another node, "
            f"the split forces at most {allowed_remote}")
