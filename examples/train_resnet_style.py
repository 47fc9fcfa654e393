"""Train a small ResNet-style CNN with Ray Train, reading its images through ray_cache.

Run the self-contained demo (a local S3 server behind a throttled link stands in for a
far object store; about a minute on 2 cores)::

    python examples/train_resnet_style.py

or point it at your own Parquet images (a ``binary`` column of raw ``uint8`` CHW
pixels and an integer ``label``)::

    python examples/train_resnet_style.py --url s3://bucket/images/ --image-shape 3,32,32 \\
        --storage-options '{"anon": false}' --workers 4 --use-gpu

What it shows, in the order a training script does it:

1. **Start the cache** on the training nodes. The default eviction policy
   (``adaptive``) needs no choice: when the data set fits, everything stays; when it
   does not, every epoch is served a stable part from the cache instead of LRU missing
   everything (see ``ray_cache.node.tiers.policy``; ``--policy lru`` to compare).
2. **Read** with ``ray_cache.read_parquet``: a ``ray.data.Dataset`` like any other. On a
   cold cache, ``ray_cache.train.prefetch`` fetches the units in read order in the
   background so the first epoch keeps the link busy. On a warm cache the read returns
   a dataset over the cached objects themselves (zero-copy).
3. **Train** with ``TorchTrainer(datasets={"train": ds})``: each worker gets its shard with
   ``ray.train.get_dataset_shard("train")``. Ray Train re-executes the dataset every
   epoch, and from the second epoch on every read is a cache hit: nothing reaches the
   store (the demo counts the requests at its proxy).
4. **Shuffle per epoch**: ``local_shuffle_buffer_size`` (a streaming shuffle of rows
   inside each worker, cheap) is used here. For a global shuffle pass
   ``ds.random_shuffle()`` instead (an all-to-all exchange every epoch, on cached data);
   for a cheap reordering of whole blocks, ``ds.randomize_block_order()`` (cheapest on a
   warm, zero-copy dataset; on a cold one it waits for every block before the first).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from typing import Any, Dict, Optional, Tuple

import numpy as np


def make_model(classes: int) -> Any:
    """A small ResNet-style network: a stem, two residual stages, global pooling."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.skip(x))

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def train_loop(config: Dict[str, Any]) -> None:
    """Runs on every Ray Train worker: epochs over this worker's shard of the cached data."""
    import numpy as np
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    shape = tuple(config["image_shape"])

    def collate(batch: Dict[str, np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        # Raw uint8 pixels in a binary column -> float images; labels as they are.
        pixels = np.frombuffer(b"".join(batch["image"]), np.uint8).reshape(-1, *shape)
        return torch.from_numpy(pixels.astype(np.float32) / 255.0), torch.as_tensor(batch["label"])

    model = prepare_model(make_model(config["classes"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    shard = ray.train.get_dataset_shard("train")
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(config["epochs"]):
        start, seen, total_loss = time.perf_counter(), 0, 0.0
        for images, labels in shard.iter_torch_batches(
            batch_size=config["batch_size"], collate_fn=collate,
            local_shuffle_buffer_size=4 * config["batch_size"],  # per-epoch shuffle
        ):
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            total_loss += float(loss) * len(labels)
        seconds = time.perf_counter() - start
        ray.train.report({"epoch": epoch, "loss": total_loss / max(seen, 1), "seconds": seconds})
        if rank == 0:
            print(f"epoch {epoch}: {seen} images on rank 0 in {seconds:.1f} s, "
                  f"loss {total_loss / max(seen, 1):.3f}", flush=True)


def demo_store(stack: ExitStack, images: int, shape: Tuple[int, ...]) -> Tuple[str, Any, Any]:
    """A local S3 server behind a 20 MB/s, 25 ms link, with synthetic images; (url, fs, proxy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from ray_cache.testing import CountingProxy, S3Server

    server = stack.enter_context(S3Server())
    server.create_bucket("images")
    proxy = stack.enter_context(CountingProxy(server.endpoint_url, rate_bytes_per_s=20e6, latency_ms=25))
    writer = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    rng = np.random.default_rng(0)
    size, per_file = int(np.prod(shape)), 250
    for f, start in enumerate(range(0, images, per_file)):
        n = min(per_file, images - start)
        labels = rng.integers(0, 10, n)
        # Learnable toy data: the label sets the mean brightness.
        pixels = (rng.integers(0, 128, (n, size)) + labels[:, None] * 12).astype(np.uint8)
        table = pa.table({"image": pa.array([p.tobytes() for p in pixels], pa.binary()),
                          "label": pa.array(labels, pa.int64())})
        with writer.open(f"images/train/part-{f:04d}.parquet", "wb") as fh:
            pq.write_table(table, fh)
    reader = s3fs.S3FileSystem(**server.storage_options(proxy.url), skip_instance_cache=True)
    return "s3://images/train/", reader, proxy


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="Parquet images (default: a local demo store)")
    ap.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options, JSON")
    ap.add_argument("--image-shape", default="3,32,32", help="C,H,W of the raw uint8 pixels")
    ap.add_argument("--images", type=int, default=2000, help="demo store: how many images")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--policy", default="adaptive", help="eviction policy: adaptive (default), lru or tinylfu")
    ap.add_argument("--cache-dir", default=None, help="disk tier root (default ~/.cache/ray_cache)")
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.image_shape.split(","))

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray_cache
    import ray_cache.train
    from ray_cache.testing import s3_data_gets

    with ExitStack() as stack:
        proxy, filesystem = None, None
        url = args.url
        if url is None:
            url, filesystem, proxy = demo_store(stack, args.images, shape)
        ray.init(ignore_reinit_error=True)
        # 1. Cache workers on the training nodes (num_cpus=0: they take no training slot).
        #    Running workers are attached to as they are, keeping their contents and policy.
        ray_cache.start(disk_dir=args.cache_dir, policy=args.policy)
        # 2. Read through the cache; prefetch in read order while epoch 1 runs (cold cache).
        read = dict(columns=["image", "label"], filesystem=filesystem, storage_options=args.storage_options)
        ds = ray_cache.read_parquet(url, **read)
        job = ray_cache.train.prefetch(url, **read)
        if proxy is not None:
            proxy.reset()
        # 3. Train: Ray Train splits the dataset across workers and re-reads it every epoch.
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"epochs": args.epochs, "batch_size": args.batch_size,
                               "classes": args.classes, "image_shape": list(shape)},
            datasets={"train": ds},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                         resources_per_worker=None if args.use_gpu else {"CPU": 0.5}),
            run_config=RunConfig(name="resnet-style-ray-cache"),
        )
        trainer.fit()
        print("prefetch:", job.wait())
        print("cache:", {k: v for k, v in ray_cache.stats().items() if k in ("hits", "misses", "evictions")})
        if proxy is not None:
            print(f"data GETs at the store during training: {len(s3_data_gets(proxy.requests()))} "
                  "(all in the first epoch: later epochs are served by the cache)")
            ray_cache.shutdown()  # the demo store goes away; a real cache stays for the next job


if __name__ == "__main__":
    main()
