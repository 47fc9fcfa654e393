"""Ray Train ingestion through the cache: TorchTrainer, two CPU workers, two epochs.

The trainer gets a ``ray_cache.read_parquet`` dataset planned on a cold cache. Each
worker iterates its shard every epoch with a local shuffle buffer, and a second dataset
(the same read, ``random_shuffle``d every epoch) checks a global per-epoch shuffle. The
workers write the ids they saw per epoch; after each epoch (a barrier) rank 0 counts the
data GETs that reached the S3 server at the proxy. Every epoch must see every row exactly
once across the workers, and no data request may reach the store after the first epoch.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any, Dict

import numpy as np
import pytest

import ray_cache
from conftest import BUCKET, data_gets, write_dataset

pytest.importorskip("torch")

FILES, ROWS, EPOCHS = 4, 1_000, 2


def make_train_loop():
    """The per-worker loop: epochs over both shards; ids per epoch to files, store GETs after each.

    Defined in a function so that Ray pickles it by value: Ray Train workers cannot
    import this test module.
    """

    def train_loop(config: Dict[str, Any]) -> None:
        import numpy as np
        import ray.train
        import torch.distributed as dist

        from ray_cache.testing import s3_data_gets

        rank = ray.train.get_context().get_world_rank()
        shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "shuffled")}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for epoch in range(config["epochs"]):
            for name, shard in shards.items():
                ids = [b["id"].numpy() for b in shard.iter_torch_batches(
                    batch_size=100, local_shuffle_buffer_size=200 if name == "train" else None)]
                np.save(os.path.join(config["out"], f"{name}-e{epoch}-r{rank}.npy"), np.concatenate(ids))
            dist.barrier()  # every worker is done with this epoch; the next has not begun
            if rank == 0:
                # The proxy's own control endpoint: every request it forwarded so far.
                with opener.open(config["proxy"] + "/__proxy__/requests", timeout=30) as resp:
                    gets = len(s3_data_gets(json.loads(resp.read()), config["bucket"]))
                with open(os.path.join(config["out"], f"gets-e{epoch}.json"), "w") as fh:
                    json.dump(gets, fh)
            dist.barrier()
        # The trained model, saved as a checkpoint to storage reached through raycache.
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"w": torch.arange(300_000, dtype=torch.float32)}, os.path.join(d, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"epochs": config["epochs"]}, checkpoint=checkpoint)

    return train_loop


def test_torch_trainer_epochs_read_every_row_once_and_only_the_first_touches_the_store(
    cache, s3fs_direct, s3fs_proxied, proxy, prefix, tmp_path
):
    import pyarrow.fs

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_cache.files import pages
    from ray_cache.files.fs import CacheFileSystem

    write_dataset(s3fs_direct, prefix, files=FILES, rows=ROWS, rg_rows=ROWS // 2)
    ds = ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, columns=["id", "x", "label"])
    proxy.reset()  # planning read the footers; count only what the epochs read
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        make_train_loop(),
        train_loop_config={"out": str(out), "proxy": proxy.url, "bucket": BUCKET, "epochs": EPOCHS},
        datasets={"train": ds, "shuffled": ds.random_shuffle()},
        # Half a CPU each: the other CPU of this 2-CPU cluster runs the read tasks.
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        # Checkpoints go to the S3 server through raycache (uncounted: the proxy counts reads).
        run_config=RunConfig(storage_path=f"{prefix}/ray_train", name="ingest", storage_filesystem=pyarrow.fs.PyFileSystem(
            pyarrow.fs.FSSpecHandler(CacheFileSystem(fs=s3fs_direct, skip_instance_cache=True)))),
    )
    result = trainer.fit()

    everything = np.arange(FILES * ROWS)
    orders = {}
    for epoch in range(EPOCHS):
        for name in ("train", "shuffled"):
            seen = [np.load(out / f"{name}-e{epoch}-r{rank}.npy") for rank in (0, 1)]
            assert len(seen[0]) == len(seen[1]) == FILES * ROWS // 2, "equal shards"
            assert np.array_equal(np.sort(np.concatenate(seen)), everything), (
                f"{name}, epoch {epoch}: every row exactly once across the workers")
            orders[name, epoch] = np.concatenate(seen)
    for name in ("train", "shuffled"):
        assert not np.array_equal(orders[name, 0], orders[name, 1]), f"{name}: reshuffled per epoch"

    gets = [json.loads((out / f"gets-e{epoch}.json").read_text()) for epoch in range(EPOCHS)]
    assert FILES <= gets[0] <= 2 * FILES, f"the first epoch fetches each unit once: {gets[0]} GETs"
    assert all(g == gets[0] for g in gets[1:]), (
        f"data GETs at the store after each epoch: {gets}; later epochs must add none")
    assert gets[-1] == len(data_gets(proxy))
    assert ray_cache.stats()["hits"] > 0

    # The checkpoint was written through: read back (as a rollout would), no data request.
    saved = [p for p in s3fs_direct.find(result.checkpoint.path) if p.endswith("model.pt")]
    assert len(saved) == 1
    want = s3fs_direct.cat_file(saved[0])
    proxy.reset()
    pages.reader().clear()
    assert CacheFileSystem(fs=s3fs_proxied, skip_instance_cache=True).cat_file(saved[0]) == want
    assert data_gets(proxy) == [], "a checkpoint saved through raycache is read back warm"


def test_prefetch_fills_a_cold_cache_so_the_first_epoch_sends_no_data_request(
    cache, s3fs_direct, s3fs_proxied, proxy, prefix
):
    from ray_cache.steering.prefetch import prefetch

    write_dataset(s3fs_direct, prefix, files=3, rows=2_000, rg_rows=1_000)
    url = f"s3://{prefix}/"
    report = prefetch(url, filesystem=s3fs_proxied, columns=["id", "x"], ahead=2).wait()
    assert (report.units, report.fetched, report.skipped, report.failures) == (3, 3, 0, [])
    proxy.reset()
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied, columns=["id", "x"], zero_copy=False)
    ids = sorted(i for b in ds.iter_batches(batch_format="pyarrow") for i in b.column("id").to_pylist())
    assert ids == list(range(6_000))
    assert data_gets(proxy) == [], "every unit was prefetched"
    again = prefetch(url, filesystem=s3fs_proxied, columns=["id", "x"]).wait()
    assert (again.fetched, again.already_cached) == (0, 3)
    assert data_gets(proxy) == []


def test_prefetch_leaves_out_what_the_cache_cannot_keep(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    from ray_cache.steering.prefetch import prefetch

    write_dataset(s3fs_direct, prefix, files=4, rows=20_000, rg_rows=20_000)
    ray_cache.configure(memory_bytes=2 << 20, disk_bytes=2 << 20)  # about two units of ~0.9 MB
    proxy.reset()
    report = prefetch(f"s3://{prefix}/", filesystem=s3fs_proxied).wait()
    assert report.units == 4 and report.skipped >= 1
    assert report.fetched == 4 - report.skipped
    assert len(data_gets(proxy)) == report.fetched + 4, "the units kept, and the four footers"
    with pytest.raises(ValueError, match="ahead"):
        prefetch(f"s3://{prefix}/", filesystem=s3fs_proxied, ahead=0)
