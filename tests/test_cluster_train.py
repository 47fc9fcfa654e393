"""Ray Train on a cluster shaped as users deploy it: the driver (and the trainer's
controller) on a head node without GPUs, two training workers on the two GPU nodes that
run the cache workers; one dataset read from a warm cache, one from a cold one.

Each epoch must see every row exactly once across the workers; a warm dataset sends nothing
to the store and a cold one each unit once (its first epoch), however many epochs run; each
worker's shard must come from blocks on its own node, every row of it: blocks are made on
their owners' nodes evened out by rows, and Ray Train's ``DataConfig`` passes the workers'
nodes to the split as locality hints.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np
import pytest
import ray

import ray_cache
from conftest import data_gets, fresh_cache, gpu_node_ids, home_nodes, read_all, write_dataset

pytestmark = pytest.mark.slow
pytest.importorskip("torch")

FILES, ROWS, EPOCHS = 6, 20_000, 2


def make_train_loop():
    """Per worker and dataset: ``EPOCHS`` epochs of ``iter_torch_batches`` (ids saved per
    epoch), then one more epoch read block by block, asking Ray where each block lives."""

    def train_loop(config: Dict[str, Any]) -> None:
        import numpy as np
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        here = ray.get_runtime_context().get_node_id()
        shards = {name: ray.train.get_dataset_shard(name) for name in config["datasets"]}
        for epoch in range(config["epochs"]):
            for name, shard in shards.items():
                ids = [b["id"].numpy() for b in shard.iter_torch_batches(batch_size=1_000)]
                np.save(os.path.join(config["out"], f"{name}-e{epoch}-r{rank}.npy"), np.concatenate(ids))
        for name, shard in shards.items():
            local = total = 0
            bundles, _, _ = shard._to_ref_bundle_iterator()
            for bundle in bundles:
                refs = list(bundle.block_refs)
                where = ray.experimental.get_object_locations(refs)
                for ref, block in zip(refs, ray.get(refs)):
                    total += block.num_rows
                    local += block.num_rows if here in where[ref]["node_ids"] else 0
            with open(os.path.join(config["out"], f"{name}-where-r{rank}.json"), "w") as fh:
                json.dump({"node": here, "local_rows": local, "rows": total}, fh)

    return train_loop


def _home_rows(fs, paths, columns):
    """Rows of ``paths`` whose blocks are made on each node (owners' nodes, evened out)."""
    home = home_nodes(fs, paths, columns)
    return {node: ROWS * list(home.values()).count(node) for node in gpu_node_ids()}


def test_torch_trainer_on_the_gpu_nodes_reads_its_own_nodes_blocks_every_row_once(
        gpu_nodes, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    """Two datasets in one run: ``warm`` (cached before the run: node copies) and ``cold``
    (nothing cached: read tasks on the owners' nodes, re-run every epoch). Both: every row
    once per epoch, each worker's rows from its own node as far as the split allows; the
    cold one fetches each unit once over all epochs (its later epochs are warm)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fresh_cache(tmp_path / "cache")
    columns = ["id", "x", "label"]  # numeric: what iter_torch_batches turns into tensors
    paths = {name: write_dataset(s3fs_direct, f"{prefix}/{name}", files=FILES, rows=ROWS, rg_rows=ROWS)
             for name in ("warm", "cold")}
    read_all(ray_cache.read_parquet(f"s3://{prefix}/warm/", filesystem=s3fs_proxied, columns=columns))
    own_rows = {name: _home_rows(s3fs_proxied, p, columns) for name, p in paths.items()}
    proxy.reset()
    datasets = {name: ray_cache.read_parquet(f"s3://{prefix}/{name}/", filesystem=s3fs_proxied, columns=columns)
                for name in paths}
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        make_train_loop(),
        train_loop_config={"out": str(out), "epochs": EPOCHS, "datasets": list(datasets)},
        datasets=datasets,
        # One worker per GPU node: each asks for that node's slot (the GPUs are declared, not real).
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                     resources_per_worker={"CPU": 0.5, "gpu_node_slot": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_train"), name="cluster-ingest"),
    )
    trainer.fit()

    everything = np.arange(FILES * ROWS)
    for name in datasets:
        for epoch in range(EPOCHS):
            seen = [np.load(out / f"{name}-e{epoch}-r{rank}.npy") for rank in (0, 1)]
            assert len(seen[0]) == len(seen[1]) == FILES * ROWS // 2, f"{name}: equal shards"
            assert np.array_equal(np.sort(np.concatenate(seen)), everything), f"{name} epoch {epoch}: every row once"
    fetched = sorted(r["path"].split("?")[0] for r in data_gets(proxy))
    assert fetched == sorted(f"/{p}" for p in paths["cold"]), (
        "the warm dataset sent nothing to the store, the cold one each unit once: its later epochs were warm")
    for name in datasets:
        where = [json.loads((out / f"{name}-where-r{rank}.json").read_text()) for rank in (0, 1)]
        assert {w["node"] for w in where} == gpu_node_ids(), "one training worker on each GPU node"
        # Blocks are evened out over the nodes (whatever hashing gave each worker), so the
        # equal split forces no worker to take another node's rows.
        assert own_rows[name] == {n: FILES * ROWS // 2 for n in gpu_node_ids()}, f"{name}: evened out"
        for w in where:
            assert w["local_rows"] == w["rows"] == FILES * ROWS // 2, (
                f"{name}: worker on {w['node'][:8]}: {w['rows'] - w['local_rows']} rows from another node")
