"""Model distribution: N nodes loading one checkpoint at once through a capped gateway.

Run it with::

    python benchmarks/model_distribution.py [--mb 1024] [--nodes 1,2,4] [--link-mb-s 40] \\
        [--concurrent 32] [--concurrent-mb 128] [--server moto|s3rver] [--json out.json]

It builds a Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head node with
no cache worker (the driver), plus N raylets that declare one GPU each (the cache nodes).
A ``safetensors`` checkpoint of ``--mb`` MB sits in a local S3 server (``--server``: moto,
the suite's, which copies the whole object for every ranged GET; or s3rver, which serves
ranges as real stores do) behind the
counting proxy, whose link is capped at ``--link-mb-s`` MB/s for all clients together
(the gateway every rollout has to pass). For each N, all N nodes load it at once (one Ray
task pinned to each node: read the whole file, build torch tensors with
``safetensors.torch.load``), in these ways:

- **s3fs direct**: each node reads the store with s3fs (``cat_file``).
- **ray_cache cold**: fresh, empty cache; each node reads ``raycache::s3://...``.
- **ray_cache warm**: the same again (the pages are now on their owners' nodes).
- **ray_cache after load(replicas="all")**: ``ray_cache.load(url, replicas="all")`` copies
  every page onto every cache node (timed apart), then every node reads it from its own disk.
- **read once + ray.put/ray.get**: one task reads the store and ``ray.put``s the bytes,
  every node ``ray.get``s them (the Ray-native broadcast; Ray's object transfer fans out).

For each it reports per-node load time (p50, p95, max), the wall time from the launch to
the last node done, and the bytes and data GETs that reached the store. The launch is
synchronized: every task waits at a gate actor until all are ready, so no node starts
early. Then ``--concurrent`` tasks on one cache node read one cold file of
``--concurrent-mb`` MB through ``raycache`` at once: store bytes over the file's size, and
per-reader p50/p99.

What a loopback cluster can and cannot show: all "nodes" share this machine's cores,
memory bandwidth and one loopback interface, so node-to-node transfers are memory copies
and compete with each other for 2 cores; the capped proxy is the one real bottleneck, as a
gateway is. Origin bytes and GETs are exact; times say how the store link is shared, not
how a real network would carry node-to-node traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from _common import log, open_store

BUCKET = "ray-cache-models"
NODE = dict(num_cpus=1, num_gpus=1, object_store_memory=1800 << 20)


def checkpoint_bytes(mb: int) -> bytes:
    """A safetensors checkpoint of about ``mb`` MB: 8 float32 tensors of random values."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    cols = 4096
    rows = max(1, mb * 10**6 // (8 * 4 * cols))
    return save({f"layer{i}.weight": torch.randn(rows, cols, generator=g) for i in range(8)})


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def all_at_once(nodes: Sequence[str], read: Callable[..., Any], *args: Any,
                per_node: int = 1) -> tuple[List[Dict[str, Any]], float]:
    """Run ``read(*args)`` as ``per_node`` tasks pinned to each node, released together;
    return their records and the seconds from release to the last one done."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            import asyncio

            self.open = asyncio.Event()
            self.ready = 0

        async def arrive(self) -> None:
            self.ready += 1
            await self.open.wait()

        def count(self) -> int:
            return self.ready

        def release(self) -> None:
            self.open.set()

    # max_calls=1: every load runs in a new worker process, as a node starting to serve a
    # model does. A reused process would still hold the pages an earlier way mapped (a
    # process keeps what it read mapped, by version), and its "cold" load would not be.
    @ray.remote(num_cpus=0, max_retries=0, max_calls=1)
    def task(gate: Any, fn: Callable[..., Any], *a: Any) -> Dict[str, Any]:
        import fsspec  # noqa: F401 - imported before the clock starts: a node loads
        import s3fs  # noqa: F401    a model with its libraries already imported

        import ray_cache.files.fs  # noqa: F401

        if fn is not read_bytes:
            import safetensors.torch  # noqa: F401

        ray.get(gate.arrive.remote())
        t0 = time.perf_counter()
        got = fn(*a)
        return {"node": ray.get_runtime_context().get_node_id(), "s": time.perf_counter() - t0, **got}

    gate = Gate.remote()
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
            .remote(gate, read, *args) for n in nodes for _ in range(per_node)]
    deadline = time.monotonic() + 120
    while ray.get(gate.count.remote()) < len(refs):
        if time.monotonic() > deadline:
            raise RuntimeError("tasks did not reach the gate in 120 s")
        done, _ = ray.wait(refs, timeout=0.1)
        ray.get(done)  # a task that failed before the gate raises here, not after 120 s
    t0 = time.perf_counter()
    ray.get(gate.release.remote())
    records = ray.get(refs)
    return records, time.perf_counter() - t0


def store_fs(options: Dict[str, Any]) -> Any:
    """s3fs to the store through the proxy (a new instance: no cached listings)."""
    import s3fs

    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def cache_fs(options: Dict[str, Any]) -> Any:
    """The ``raycache`` filesystem over the same store."""
    import fsspec

    return fsspec.filesystem("raycache", target_protocol="s3", target_options=options)


def tensor_bytes(blob: bytes) -> Dict[str, Any]:
    """Build the checkpoint's torch tensors; their total size."""
    from safetensors.torch import load

    return {"bytes": sum(t.nbytes for t in load(blob).values())}


def read_direct(url: str, options: Dict[str, Any]) -> Dict[str, Any]:
    return tensor_bytes(store_fs(options).cat_file(url))


def read_cached(url: str, options: Dict[str, Any]) -> Dict[str, Any]:
    return tensor_bytes(cache_fs(options).cat_file(url))


def read_bytes(url: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """The whole file through ``raycache``, as bytes (no torch: many of these share a node)."""
    return {"bytes": len(cache_fs(options).cat_file(url))}


def fetch_once(url: str, options: Dict[str, Any]) -> np.ndarray:
    """The checkpoint's bytes read once from the store, as an array for the object store."""
    return np.frombuffer(store_fs(options).cat_file(url), dtype=np.uint8)


def read_ref(holder: List[Any]) -> Dict[str, Any]:
    import ray

    return tensor_bytes(ray.get(holder[0]).tobytes())


def row(way: str, n: int, records: List[Dict[str, Any]], wall: float, store: Any,
        size: int) -> Dict[str, Any]:
    from ray_cache.testing import s3_data_gets

    gets = s3_data_gets(store.proxy.requests(), BUCKET)
    times = [r["s"] for r in records]
    bad = [r for r in records if r["bytes"] <= 0]
    if bad:
        raise RuntimeError(f"{way}: {len(bad)} loads returned no tensors")
    sent = sum(int(g["response_body_bytes"]) for g in gets)
    return {"way": way, "nodes": n, "p50_s": pct(times, 50), "p95_s": pct(times, 95),
            "max_s": max(times), "wall_s": wall, "store_bytes": sent, "store_x": sent / size,
            "gets": len(gets)}


def markdown(rows: List[Dict[str, Any]], conc: Dict[str, Any], info: Dict[str, Any]) -> str:
    out = [f"`{info['command']}` ({info['mb']} MB safetensors, link {info['link_mb_s']} MB/s, "
           f"{info['cores']} cores, Ray {info['ray']})", "",
           "| way | nodes | p50 s | p95 s | max s | wall s | store bytes / size | data GETs |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['way']} | {r['nodes']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                   f"{r['max_s']:.2f} | {r['wall_s']:.2f} | {r['store_x']:.3f} | {r['gets']} |")
    out += ["", "Placing the copies (`load(replicas='all')` after the warm row: the pages each node "
            "does not own, from their owners' nodes): " + ", ".join(
                f"{r['nodes']} node(s) {r['placed_s']:.2f} s for {r['replica_bytes'] / 1e6:.0f} MB"
                for r in rows if "placed_s" in r) + "."]
    out += ["", f"{conc['readers']} concurrent readers of one {conc['mb']} MB file on one node "
            f"(cold): store bytes / size {conc['store_x']:.3f}, {conc['gets']} GETs, "
            f"p50 {conc['p50_s']:.2f} s, p99 {conc['p99_s']:.2f} s (p99/p50 {conc['p99_s'] / conc['p50_s']:.2f})"]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; return 0 when every load returned the checkpoint's tensors."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="checkpoint size in MB")
    ap.add_argument("--nodes", default="1,2,4", help="comma-separated node counts")
    ap.add_argument("--link-mb-s", type=float, default=40.0, help="the gateway's cap")
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--concurrent-mb", type=int, default=128)
    ap.add_argument("--server", choices=("moto", "s3rver"), default="moto",
                    help="the local S3 server (s3rver serves large objects' ranges as real stores do)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    counts = sorted({int(x) for x in args.nodes.split(",")})
    if min(args.mb, args.concurrent, args.concurrent_mb, *counts) < 1 or args.link_mb_s <= 0:
        ap.error("--mb, --nodes, --concurrent, --concurrent-mb and --link-mb-s must be positive")

    import ray
    from ray.cluster_utils import Cluster

    import ray_cache

    rows: List[Dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="ray_cache_models_")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        store = open_store(stack, BUCKET, rate_mb_s=args.link_mb_s, server=args.server)
        options = store.server.storage_options(store.proxy.url)
        log(f"writing a {args.mb} MB checkpoint and a {args.concurrent_mb} MB one …")
        blob = checkpoint_bytes(args.mb)
        size = len(blob)
        url = f"s3://{BUCKET}/run-1/model.safetensors"
        store.direct_fs.pipe_file(url, blob)
        small_url = f"s3://{BUCKET}/run-1/small.safetensors"
        store.direct_fs.pipe_file(small_url, checkpoint_bytes(args.concurrent_mb))
        small_size = store.direct_fs.size(small_url)
        del blob

        log("starting the Ray cluster (head node, no cache worker) …")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "object_store_memory": 1200 << 20, "include_dashboard": False})
        stack.callback(cluster.shutdown)
        ray.init(address=cluster.address, logging_level="WARNING")
        stack.callback(ray.shutdown)
        stack.callback(ray_cache.shutdown)
        gpu: List[Any] = []
        for n in counts:
            while len(gpu) < n:
                gpu.append(cluster.add_node(**NODE))
            cluster.wait_for_nodes()
            ids = [x["NodeID"] for x in ray.nodes() if x["Alive"] and x["Resources"].get("GPU")]
            ray_cache.shutdown()

            log(f"N={n}: s3fs direct …")
            store.proxy.reset()
            rows.append(row("s3fs direct", n, *all_at_once(ids, read_direct, url, options), store, size))

            log(f"N={n}: read once + ray.put/ray.get …")
            store.proxy.reset()
            t0 = time.perf_counter()
            ref = ray.remote(num_cpus=0)(fetch_once).remote(url, options)
            ray.wait([ref], fetch_local=False)
            first = time.perf_counter() - t0
            records, wall = all_at_once(ids, read_ref, [ref])
            for r in records:
                r["s"] += first  # every node waits for the one read first
            rows.append(row("read once + ray.put/ray.get", n, records, wall + first, store, size))
            del ref

            ray_cache.start(memory_bytes=int(1.2 * size), disk_bytes=int(1.5 * size),
                            disk_dir=tempfile.mkdtemp(prefix=f"cache-n{n}-", dir=tmp))
            for way in ("ray_cache cold", "ray_cache warm"):
                log(f"N={n}: {way} …")
                store.proxy.reset()
                rows.append(row(way, n, *all_at_once(ids, read_cached, url, options), store, size))
            log(f"N={n}: load(replicas='all'), then every node reads …")
            t0 = time.perf_counter()
            placed = ray_cache.load(url, storage_options=options, replicas="all", progress=False)
            place_s = time.perf_counter() - t0
            store.proxy.reset()
            rows.append(row("ray_cache after load(replicas='all')", n,
                            *all_at_once(ids, read_cached, url, options), store, size))
            rows[-1].update(placed_s=place_s, replica_bytes=placed.replica_bytes)
            log("  " + "; ".join(f"{r['way']}: max {r['max_s']:.2f} s, store {r['store_x']:.2f}x"
                                 for r in rows[-5:]) + f"; placing the copies took {place_s:.2f} s")

        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows}, f, indent=2)  # kept should the last part fail
        log(f"{args.concurrent} concurrent readers on one node …")
        store.proxy.reset()
        records, wall = all_at_once(ids[:1], read_bytes, small_url, options, per_node=args.concurrent)
        c = row("concurrent", 1, records, wall, store, small_size)
        times = [r["s"] for r in records]
        conc = {"readers": args.concurrent, "mb": args.concurrent_mb, "store_x": c["store_x"],
                "gets": c["gets"], "p50_s": pct(times, 50), "p99_s": pct(times, 99)}

    argv_used = sys.argv[1:] if argv is None else list(argv)
    info = {"command": shlex.join(["python", "benchmarks/model_distribution.py", *argv_used]),
            "mb": args.mb, "link_mb_s": args.link_mb_s, "cores": os.cpu_count(),
            "platform": f"{platform.system()} {platform.machine()}", "ray": ray.__version__}
    print(markdown(rows, conc, info))
    for way, how in (("s3fs direct", "reading directly"), ("ray_cache cold", "through ray_cache, cold")):
        one = next(r for r in rows if r["way"] == way and r["nodes"] == counts[0])
        print(f"\n{counts[0]} node(s) {how} used "
              f"{counts[0] * size / one['wall_s'] / 1e6 / args.link_mb_s:.0%} of the link")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows, "concurrent": conc}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
