"""Save a model as safetensors through ray_cache, then load it on every node of the cluster.

Run the self-contained demo (a local S3 server behind a 40 MB/s link stands in for a far
object store; under a minute)::

    python examples/load_safetensors.py [--mb 200]

or load your own checkpoint on every node of a running cluster::

    python examples/load_safetensors.py --url s3://bucket/ckpt/model.safetensors --address auto

What it shows:

The demo's link caps what the store sends at 40 MB/s (a gateway), so a load from the
store would take a few seconds per 100 MB; from the cache it does not.

1. **Save through the cache** (``fsspec.open("raycache::s3://...", "wb")``, or any writer
   given a ``raycache`` filesystem): the file reaches the store as s3fs writes it, and its
   pages are in the cache under the new version, so no node has to fetch it back.
2. **Load on every node at once**: one Ray task pinned to each node reads the file with
   ``cat_file`` (one call: the pages are asked of their owners together, and an owner
   fetches runs of cold pages as single ranged GETs of up to 32 MiB, so the store sees big
   sequential reads, never page-fault-sized ones) and builds the tensors with
   ``safetensors.torch.load``. Each page has one owner, so however many nodes load at once
   the store serves the file once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from typing import Any, Dict, List


def load_everywhere(url: str, storage_options: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Load the safetensors file at ``url`` into torch tensors on every alive node; one
    record per node: its id, the seconds it took, and how many tensors and bytes it got."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def load(url: str, options: Dict[str, Any]) -> Dict[str, Any]:
        import fsspec
        from safetensors.torch import load as load_bytes

        t0 = time.perf_counter()
        with fsspec.open(f"raycache::{url}", "rb", **{url.split("://")[0]: options}) as f:
            tensors = load_bytes(f.read())
        return {"node": ray.get_runtime_context().get_node_id()[:8], "s": time.perf_counter() - t0,
                "tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors.values())}

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    return ray.get([load.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                    .remote(url, storage_options) for n in nodes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an existing safetensors file (default: the demo's own)")
    ap.add_argument("--storage-options", default="{}", help="JSON options for the store's filesystem")
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: a local one)")
    ap.add_argument("--mb", type=int, default=200, help="size of the demo's checkpoint")
    args = ap.parse_args()

    import fsspec
    import ray
    import torch
    from safetensors.torch import save

    import ray_cache

    with ExitStack() as stack:
        ray.init(address=args.address or "local", include_dashboard=False, logging_level="WARNING")
        stack.callback(ray.shutdown)
        ray_cache.start()
        if args.url:
            for row in load_everywhere(args.url, json.loads(args.storage_options)):
                print(row)
            return
        from ray_cache.testing import CountingProxy, S3Server, s3_data_gets

        server = stack.enter_context(S3Server())
        server.create_bucket("demo-models")
        proxy = stack.enter_context(CountingProxy(server.endpoint_url, rate_bytes_per_s=40e6))
        options = server.storage_options(proxy.url)
        n = args.mb * 2**20 // (4 * 4096)
        tensors = {f"layer{i}.weight": torch.randn(n // 8, 4096) for i in range(8)}
        url = "s3://demo-models/run-1/model.safetensors"
        blob = save(tensors)
        t0 = time.perf_counter()
        with fsspec.open(f"raycache::{url}", "wb", s3=options) as f:
            f.write(blob)
        print(f"saved {len(blob) / 1e6:.0f} MB through the cache in {time.perf_counter() - t0:.1f} s")
        proxy.reset()
        for rollout in ("first", "second"):
            rows = load_everywhere(url, options)
            for row in rows:
                print(f"{rollout} load, node {row['node']}: {row['tensors']} tensors, "
                      f"{row['bytes'] / 1e6:.0f} MB in {row['s']:.2f} s")
        gets = s3_data_gets(proxy.requests(), "demo-models")
        print(f"the store served {sum(r['response_body_bytes'] for r in gets) / 1e6:.0f} MB "
              f"in {len(gets)} GETs to {len(rows)} node(s)")
    ray_cache.shutdown() if ray.is_initialized() else None
    sys.exit(0)


if __name__ == "__main__":
    main()
