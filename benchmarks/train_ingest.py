"""Accelerator utilization (AU) of simulated training fed from a far object store, MLPerf Storage style.

Run it with::

    python benchmarks/train_ingest.py [--samples 10000] [--sample-kib 32] [--samples-per-file 100] \\
        [--batch-size 32] [--compute-ms 30] [--rate-mb-s 10] [--latency-ms 25] \\
        [--accelerators 1] [--json out.json]

The store is a real S3 server (moto, on loopback) behind the counting proxy, which caps
the bandwidth (``--rate-mb-s``, shared by all connections) and adds latency to every
request (``--latency-ms``): a far store, with a real client, server and protocol. The data
set is ``--samples`` rows of one ``--sample-kib`` KiB binary column (random bytes, as
encoded images) plus an int64 label, in files of ``--samples-per-file`` rows (one row
group each, so one cache unit per file).

A simulated accelerator takes ``--batch-size`` samples at a time and "computes" for
``--compute-ms`` (a sleep; no GPU). Per epoch, AU = compute time / epoch time, where the
epoch runs from asking for the first batch to the end of the last step, so the wait for
the first batch counts; the data-wait share is the time spent blocked on the next batch.
With ``--accelerators N`` > 1 the dataset is ``streaming_split`` into N shards, as Ray
Train does, each consumed by its own simulated accelerator (a thread) and AU is their mean.
The read call itself (listing and planning; a job makes it once) is timed apart, in the
``read call s`` column, and is not part of any epoch.

Epoch length: each epoch pays Ray Data's iterator start once (20-40 ms here to the first
batch, the same for an in-memory dataset; shown in the ``first batch ms`` column) and
~0.3 ms of hand-off per batch. The default 10,000 samples make ~9 s epochs, still far
shorter than a real one (an ImageNet epoch at this batch size and step time is ~20
minutes); with 3,000 samples (~3 s epochs) that fixed start alone is ~1% of the epoch.

Cases, all in one run, against the same store:

(a)  ``ray.data.read_parquet`` straight from the store, 1 epoch;
(b)  ``ray_cache.read_parquet`` cold (fresh cache), epoch 1, then epoch 2 of the same
     dataset (read tasks served by the cache: what Ray Train's later epochs see);
(b2) as (b) with :func:`ray_cache.train.prefetch` started right after the read call:
     units fetched in read order, 4 in flight, while the epoch runs;
(c)  ``ray_cache.read_parquet`` warm (a new read: the zero-copy dataset), 3 epochs;
(d)  a materialized in-memory dataset (the limit; one block per file, as the cache
     holds them), 3 epochs;
(e)  data set twice the cache (memory tier = half the data's Arrow bytes, disk tier
     off), 3 epochs each under ``lru`` and ``tinylfu``: the per-epoch hit ratio,
     1 - data GETs at the store / data GETs of a fully cold epoch (counted at the proxy).

The output is a Markdown table for BENCHMARKS.md, with the command line and the machine,
next to the reference figures (data-loader time 82% -> 1%, GPU utilization 17% -> 93%).
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
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import log, open_store, quiet_ray_data, start_local_ray

BUCKET = "ray-cache-train-bench"
PREFIX = "train"
#: Memory tier for the cases where the data set fits (a multiple of its size).
FIT_FACTOR = 4


def write_dataset(fs: Any, samples: int, sample_bytes: int, per_file: int) -> Dict[str, int]:
    """Write the samples under ``BUCKET/PREFIX``; return files, Parquet and Arrow bytes."""
    rng = np.random.default_rng(0)
    files = parquet_bytes = arrow_bytes = 0
    for start in range(0, samples, per_file):
        n = min(per_file, samples - start)
        data = rng.integers(0, 256, n * sample_bytes, dtype=np.uint8).tobytes()
        image = pa.array([data[i * sample_bytes:(i + 1) * sample_bytes] for i in range(n)],
                         pa.binary())
        table = pa.table({"image": image,
                          "label": pa.array(rng.integers(0, 1000, n), pa.int64())})
        path = f"{BUCKET}/{PREFIX}/part-{files:05d}.parquet"
        with fs.open(path, "wb") as fh:
            pq.write_table(table, fh, row_group_size=n)
        parquet_bytes += fs.info(path)["size"]
        arrow_bytes += table.nbytes
        files += 1
    return {"files": files, "parquet_bytes": parquet_bytes, "arrow_bytes": arrow_bytes}


@dataclass
class Epoch:
    """What one epoch cost, summed over accelerators (``au`` and ``wait`` are means)."""

    case: str
    label: str
    epoch: int
    read_call_s: float
    read_call_gets: int
    epoch_s: float
    compute_s: float
    wait_s: float
    au: float
    wait_share: float
    samples: int
    data_gets: int
    hit_ratio: Optional[float] = None
    first_wait_s: float = 0.0
    per_accelerator: List[Dict[str, float]] = field(default_factory=list)


def accelerator(batches: Any, compute_s: float, start: float) -> Dict[str, float]:
    """Consume ``batches`` like a training step loop; return its time split.

    Each batch costs ``compute_s`` of simulated compute (a sleep, counted at its nominal
    length). ``wait`` is the time blocked on the next batch; the epoch runs from
    ``start`` (when all accelerators began) to this one's last step.
    """
    compute = wait = 0.0
    first: Optional[float] = None
    samples = 0
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        waited = time.perf_counter() - t0
        wait += waited
        first = waited if first is None else first
        if batch is None:
            break
        samples += batch.num_rows
        time.sleep(compute_s)
        compute += compute_s  # nominal: a late wake-up is the host's time, not compute
    end = time.perf_counter()
    return {"epoch_s": end - start, "compute_s": compute, "wait_s": wait, "samples": samples,
            "first_wait_s": first or 0.0}


class Runner:
    """Runs epochs of simulated accelerators over datasets and keeps the results."""

    def __init__(self, args: argparse.Namespace, proxy: Any, units: int) -> None:
        self.args, self.proxy, self.units = args, proxy, units
        self.epochs: List[Epoch] = []

    def run(self, case: str, label: str, make_ds: Callable[[], Any], epochs: int,
            cold_gets: Optional[int] = None) -> List[Epoch]:
        """Build the dataset (timed as the read call), then run ``epochs`` epochs."""
        from ray_cache.testing import s3_data_gets

        args = self.args
        n = args.accelerators
        self.proxy.reset()
        t0 = time.perf_counter()
        ds = make_ds()
        read_call = time.perf_counter() - t0
        read_gets = len(s3_data_gets(self.proxy.requests(), BUCKET))
        self.proxy.reset()
        iterators = ds.streaming_split(n, equal=True) if n > 1 else [ds.iterator()]
        done: List[Epoch] = []
        for e in range(1, epochs + 1):
            results: List[Optional[Dict[str, float]]] = [None] * n
            start = time.perf_counter()

            def work(i: int) -> None:
                batches = iterators[i].iter_batches(batch_size=args.batch_size, batch_format="pyarrow")
                results[i] = accelerator(batches, args.compute_ms / 1000, start)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            gets = len(s3_data_gets(self.proxy.requests(), BUCKET))
            self.proxy.reset()
            res = [r for r in results if r is not None]
            epoch_s = max(r["epoch_s"] for r in res)
            ep = Epoch(
                case=case, label=label, epoch=e, read_call_s=read_call if e == 1 else 0.0,
                read_call_gets=read_gets if e == 1 else 0,
                epoch_s=epoch_s, compute_s=sum(r["compute_s"] for r in res),
                wait_s=sum(r["wait_s"] for r in res),
                au=float(np.mean([r["compute_s"] / r["epoch_s"] for r in res])),
                wait_share=float(np.mean([r["wait_s"] / r["epoch_s"] for r in res])),
                samples=int(sum(r["samples"] for r in res)), data_gets=gets,
                hit_ratio=None if cold_gets is None else max(0.0, 1 - gets / cold_gets),
                first_wait_s=float(np.mean([r["first_wait_s"] for r in res])),
                per_accelerator=res,
            )
            if ep.samples != args.samples - (args.samples % n):
                raise RuntimeError(f"{case} epoch {e}: {ep.samples} samples, expected {args.samples}")
            log(f"{case} epoch {e}: AU {ep.au:.1%}, data wait {ep.wait_share:.1%}, "
                f"{epoch_s:.2f} s, {gets} data GETs" +
                ("" if ep.hit_ratio is None else f", hit ratio {ep.hit_ratio:.0%}"))
            done.append(ep)
        self.epochs.extend(done)
        return done


def markdown(runner: Runner, info: Dict[str, Any]) -> str:
    """The report: command, machine, data, the AU table and the targets."""
    a = runner.args
    out = [f"Command: `{info['command']}`", "",
           f"Machine: {info['cores']} cores, {info['platform']}, Python {info['python']}, "
           f"Ray {info['ray']}, pyarrow {info['pyarrow']}, ray_cache {info['ray_cache']}", "",
           f"Store: S3 server behind the counting proxy at {a.rate_mb_s:g} MB/s and "
           f"{a.latency_ms:g} ms per request. Data: {a.samples:,} samples of {a.sample_kib} KiB "
           f"+ label in {info['files']} files ({info['parquet_bytes'] / 1e6:.1f} MB Parquet, "
           f"{info['arrow_bytes'] / 1e6:.1f} MB Arrow; one unit per file). "
           f"{a.accelerators} simulated accelerator(s), batches of {a.batch_size}, "
           f"{a.compute_ms:g} ms of compute per batch. "
           f"Case e: memory tier {info['small_cache_bytes'] / 1e6:.1f} MB "
           f"({info['small_cache_bytes'] / info['arrow_bytes']:.0%} of the data), disk tier off.",
           "",
           "| case | read | epoch | read call s (GETs) | epoch s | first batch ms | data wait | AU "
           "| data GETs in epoch | hit ratio |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ep in runner.epochs:
        hit = "-" if ep.hit_ratio is None else f"{ep.hit_ratio:.0%}"
        call = f"{ep.read_call_s:.2f} ({ep.read_call_gets})" if ep.epoch == 1 else ""
        out.append(f"| {ep.case} | {ep.label} | {ep.epoch} | {call} | {ep.epoch_s:.2f} "
                   f"| {ep.first_wait_s * 1000:.0f} | {ep.wait_share:.1%} | {ep.au:.1%} | {ep.data_gets} | {hit} |")
    out += ["", "| figure | reference (ResNet-50, S3 FUSE -> cache) | here: direct -> ray_cache warm |",
            "|---|---|---|",
            f"| share of time waiting on data | 82% -> 1% | {info['direct_wait']:.1%} -> "
            f"{info['warm_wait']:.1%} |",
            f"| accelerator utilization | 17% -> 93% | {info['direct_au']:.1%} -> {info['warm_au']:.1%} |",
            "", "| target | value | met |", "|---|---:|---|"]
    out += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in info["targets"]]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; return 0 when every target is met."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--sample-kib", type=int, default=32)
    ap.add_argument("--samples-per-file", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--compute-ms", type=float, default=30.0)
    ap.add_argument("--rate-mb-s", type=float, default=10.0)
    ap.add_argument("--latency-ms", type=float, default=25.0)
    ap.add_argument("--accelerators", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if min(args.samples, args.sample_kib, args.samples_per_file, args.batch_size,
           args.accelerators) < 1 or args.compute_ms <= 0 or args.rate_mb_s <= 0:
        ap.error("sizes, counts, --compute-ms and --rate-mb-s must be positive")

    import ray

    import ray_cache
    from ray_cache.cluster import membership
    from ray_cache.train import prefetch

    tmp = tempfile.mkdtemp(prefix="ray_cache_train_bench_")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        store = open_store(stack, BUCKET, args.rate_mb_s, args.latency_ms)
        proxy, direct_fs, far_fs = store.proxy, store.direct_fs, store.far_fs
        log(f"writing {args.samples:,} samples of {args.sample_kib} KiB …")
        data = write_dataset(direct_fs, args.samples, args.sample_kib * 1024, args.samples_per_file)
        start_local_ray(stack)
        quiet_ray_data()

        url = f"s3://{BUCKET}/{PREFIX}/"
        runner = Runner(args, proxy, data["files"])
        cache_dir = os.path.join(tmp, "cache")

        def fresh_cache(memory_bytes: int, disk_bytes: int, policy: str = "lru") -> None:
            ray_cache.shutdown()
            shutil.rmtree(cache_dir, ignore_errors=True)
            membership.ensure_workers(memory_bytes, disk_bytes, cache_dir, policy=policy)

        stack.callback(ray_cache.shutdown)
        big = FIT_FACTOR * data["arrow_bytes"]

        runner.run("a", "ray.data.read_parquet, far store", lambda: ray.data.read_parquet(
            url, filesystem=far_fs), epochs=1)
        fresh_cache(big, big)
        cold = runner.run("b", "ray_cache cold; epoch 2: same dataset, read tasks",
                          lambda: ray_cache.read_parquet(url, filesystem=far_fs), epochs=2)
        cold_gets = cold[0].data_gets
        fresh_cache(big, big)
        jobs: List[Any] = []

        def read_then_prefetch() -> Any:
            ds = ray_cache.read_parquet(url, filesystem=far_fs)
            jobs.append(prefetch(url, filesystem=far_fs))  # footers are cached by now
            return ds

        runner.run("b2", "ray_cache cold + ray_cache.train.prefetch", read_then_prefetch, epochs=1)
        log(f"b2 prefetch: {jobs[0].wait()}")
        runner.run("c", "ray_cache warm (new read: zero-copy)",
                   lambda: ray_cache.read_parquet(url, filesystem=far_fs), epochs=3)
        log("materializing the in-memory dataset for (d) …")
        mat = ray.data.read_parquet(url, filesystem=direct_fs,
                                    override_num_blocks=data["files"]).materialize()
        runner.run("d", "in-memory materialized dataset (limit)", lambda: mat, epochs=3)
        del mat

        small = data["arrow_bytes"] // 2
        for policy in ("lru", "tinylfu"):
            fresh_cache(small, 1, policy)
            # Plan (footers) before counting, so the epochs count unit GETs only.
            ds = ray_cache.read_parquet(url, filesystem=far_fs)
            runner.run("e", f"data = 2x cache, policy {policy}", lambda: ds, epochs=3,
                       cold_gets=cold_gets)

    info = _info(args, data, runner, small, ray, ray_cache)
    print(markdown(runner, info), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "epochs": [asdict(e) for e in runner.epochs]}, fh, indent=2)
        log(f"wrote {args.json}")
    return 0 if all(ok for _n, _v, ok in info["targets"]) else 1


def _info(args: argparse.Namespace, data: Dict[str, int], runner: Runner, small: int,
          ray: Any, ray_cache: Any) -> Dict[str, Any]:
    def pick(case: str, label_part: str = "", epoch: Optional[int] = None) -> List[Epoch]:
        return [e for e in runner.epochs if e.case == case and label_part in e.label
                and (epoch is None or e.epoch == epoch)]

    direct = pick("a")[0]
    cold = pick("b", epoch=1)[0]
    cold_e2 = pick("b", epoch=2)[0]
    prefetched = pick("b2")[0]
    warm = pick("c")
    mem = pick("d")
    warm_au = float(np.mean([e.au for e in warm]))
    warm_wait = float(np.mean([e.wait_share for e in warm]))
    mem_au = float(np.mean([e.au for e in mem]))
    mem_wait = float(np.mean([e.wait_share for e in mem]))
    lru = [e.hit_ratio or 0.0 for e in pick("e", "lru")][1:]
    tiny = [e.hit_ratio or 0.0 for e in pick("e", "tinylfu")][1:]
    targets = [
        ("warm AU (c, mean) >= 95%", f"{warm_au:.1%}", warm_au >= 0.95),
        ("warm AU within 2 points of in-memory (d)", f"{(warm_au - mem_au) * 100:+.1f} pts (warm - memory)",
         mem_au - warm_au <= 0.02),
        ("warm data-wait share <= 2%", f"{warm_wait:.2%} (in-memory: {mem_wait:.2%})", warm_wait <= 0.02),
        ("cold AU (b) >= direct AU (a)", f"{cold.au:.1%} vs {direct.au:.1%}", cold.au >= direct.au),
        ("cold + prefetch AU (b2) >= cold AU (b)", f"{prefetched.au:.1%} vs {cold.au:.1%}",
         prefetched.au >= cold.au),
        ("2x cache, tinylfu hit ratio from epoch 2 >= 40%", ", ".join(f"{h:.0%}" for h in tiny),
         min(tiny) >= 0.40),
        ("2x cache, lru hit ratio from epoch 2 near 0 (<= 10%)", ", ".join(f"{h:.0%}" for h in lru),
         max(lru) <= 0.10),
        ("warm epochs make no data GET", str(sum(e.data_gets for e in warm + [cold_e2])),
         all(e.data_gets == 0 for e in warm + [cold_e2])),
    ]
    argv_used = sys.argv[1:]
    return {"command": shlex.join(["python", "benchmarks/train_ingest.py", *argv_used]),
            "cores": os.cpu_count(), "platform": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "ray": ray.__version__,
            "pyarrow": pa.__version__, "ray_cache": ray_cache.__version__,
            **data, "small_cache_bytes": small, "direct_au": direct.au,
            "direct_wait": direct.wait_share, "warm_au": warm_au, "warm_wait": warm_wait,
            "memory_au": mem_au, "targets": targets}


if __name__ == "__main__":
    sys.exit(main())
