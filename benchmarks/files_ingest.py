"""Image-folder training from a far object store: one small file per sample, as ResNet-50 reads ImageNet.

Run it with::

    python benchmarks/files_ingest.py [--files 2000] [--file-kib 110] [--classes 10] \\
        [--workers 4] [--batch-size 32] [--compute-ms 30] [--rate-mb-s 10] [--latency-ms 25] \\
        [--collate tensor|bytes] [--json out.json]

The store is a real S3 server (moto, on loopback) behind the counting proxy, which caps the
bandwidth (``--rate-mb-s``, shared by all connections) and delays every request
(``--latency-ms``): a store in another region. The data set is ``--files`` files of
``--file-kib`` KiB (random bytes, the size of an ImageNet JPEG) in ``--classes`` class
folders. A PyTorch ``DataLoader`` with ``--workers`` worker processes (the default ``fork``
context, workers started anew each epoch, shuffled) feeds a simulated accelerator that
"computes" ``--compute-ms`` per batch of ``--batch-size`` (a sleep). Decoding is left out
(``loader=bytes``): it costs the same in every case, and this measures the data path.
With ``--collate tensor`` (the default) each worker turns a file's bytes into a ``uint8``
tensor and PyTorch's default collate stacks a batch into one tensor in shared memory, which is
what an image pipeline hands its training loop (decoded images of one shape); with
``--collate bytes`` a batch is a list of ``bytes`` the training loop receives through the
worker's pipe and unpickles (3.5 MB per batch of 32 here: ~5 ms of the loop's time per batch,
whatever the files were read from).
AU = compute time / epoch time; data wait = time blocked on the next batch / epoch time.

Cases, all in one run against the same store:

(a) **s3fs direct**: a dataset that opens and reads each file with s3fs (``fs.open(path).read()``,
    what a PyTorch ``Dataset`` over an object store does), 1 epoch;
(b) **ray_cache cold**: ``ray_cache.ImageFolder(url)`` with defaults, on a fresh cache, epoch 1;
(c) **ray_cache warm**: the same dataset, epochs 2 and 3, each started after the ``raycache``
    metadata TTL (5 s) has passed;
(c2) **raycache fs, no snapshot**: a dataset reading each file with ``fsspec.open("raycache::s3://...")``,
    warm, after the TTL: what a user of the bare filesystem gets (a HEAD per file);
(d) **local disk**: the same files on this machine's disk, read with ``open()``.

Then, in one process, the warm per-file read time of ``ImageFolder`` (p50/p99, and its
throughput against local disk), in this process and in a freshly forked child (what each
DataLoader worker pays in its first epoch), and store requests per file per epoch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from _common import log, open_store, start_local_ray

BUCKET = "ray-cache-files-bench"
PREFIX = "train"


def identity(batch: List[Any]) -> List[Any]:
    return batch


class AsTensor:
    """A dataset of ``(bytes, target)`` samples as ``(uint8 tensor, target)``: what a decoded
    image is to the default collate, which stacks a batch into one shared-memory tensor."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        import torch

        data, target = self.ds[i]
        return torch.from_numpy(np.frombuffer(data, np.uint8).copy()), target


class S3Files:
    """A map-style dataset reading each file with s3fs (built anew in each worker process)."""

    def __init__(self, options: Dict[str, Any], samples: List[Any]) -> None:
        self.options, self.samples, self._fs, self._pid = options, samples, None, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        if self._pid != os.getpid():
            import s3fs

            self._fs, self._pid = s3fs.S3FileSystem(**self.options, skip_instance_cache=True), os.getpid()
        path, target = self.samples[i]
        with self._fs.open(path, "rb") as f:
            return f.read(), target


class URLFiles:
    """A map-style dataset reading each file with ``fsspec.open(url)`` (raycache:: or local)."""

    def __init__(self, urls: List[Any], options: Dict[str, Any]) -> None:
        self.urls, self.options = urls, options

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> Any:
        import fsspec

        url, target = self.urls[i]
        with fsspec.open(url, "rb", **self.options) as f:
            return f.read(), target


@dataclass
class Epoch:
    case: str
    label: str
    epoch: int
    epoch_s: float
    au: float
    wait_share: float
    samples: int
    requests: int
    data_gets: int
    heads: int
    lists: int

    @property
    def per_file(self) -> float:
        return self.requests / max(1, self.samples)


def run_epoch(ds: Any, args: argparse.Namespace) -> Dict[str, float]:
    import torch

    tensors = args.collate == "tensor"
    loader = torch.utils.data.DataLoader(AsTensor(ds) if tensors else ds, batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers,
                                         collate_fn=None if tensors else identity, timeout=600)
    compute = wait = 0.0
    samples = 0
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        samples += len(batch[1]) if tensors else len(batch)  # (images, targets), or samples
        time.sleep(args.compute_ms / 1000)
        compute += args.compute_ms / 1000
    epoch_s = time.perf_counter() - start
    return {"epoch_s": epoch_s, "au": compute / epoch_s, "wait_share": wait / epoch_s, "samples": samples}


def count(proxy: Any) -> Dict[str, int]:
    reqs = [r for r in proxy.requests() if r["path"].lstrip("/").startswith(BUCKET)]
    lists = [r for r in reqs if r["method"] == "GET" and "list-type" in r["path"]]
    gets = [r for r in reqs if r["method"] == "GET" and "list-type" not in r["path"]]
    return {"requests": len(reqs), "data_gets": len(gets), "lists": len(lists),
            "heads": sum(1 for r in reqs if r["method"] == "HEAD")}


def per_file_times(read: Callable[[int], Any], n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        read(i)
        out[i] = time.perf_counter() - t0
    return out


def _forked_times(conn: Any, read: Callable[[int], Any], n: int) -> None:
    conn.send(per_file_times(read, n).tolist())
    conn.close()


def in_forked_child(read: Callable[[int], Any], n: int) -> np.ndarray:
    """Per-file times in a child forked from this process (as a DataLoader worker is)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_forked_times, args=(child, read, n))
    proc.start()
    times = np.array(parent.recv())
    proc.join(60)
    return times


def markdown(epochs: List[Epoch], info: Dict[str, Any]) -> str:
    a = info["args"]
    out = [f"Command: `{info['command']}`", "",
           f"Machine: {info['cores']} cores, {info['platform']}, Python {info['python']}, "
           f"Ray {info['ray']}, ray_cache {info['ray_cache']}", "",
           f"Store: S3 server behind the counting proxy at {a['rate_mb_s']:g} MB/s and "
           f"{a['latency_ms']:g} ms per request. Data: {a['files']:,} files of {a['file_kib']} KiB in "
           f"{a['classes']} class folders. DataLoader: {a['workers']} forked workers, batches of "
           f"{a['batch_size']}, shuffled, collated as {a['collate']}; {a['compute_ms']:g} ms of compute "
           "per batch.", "",
           "| case | read | epoch | epoch s | data wait | AU | store requests / file | GETs | HEADs | LISTs |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in epochs:
        out.append(f"| {e.case} | {e.label} | {e.epoch} | {e.epoch_s:.2f} | {e.wait_share:.1%} | {e.au:.1%} "
                   f"| {e.per_file:.3f} | {e.data_gets} | {e.heads} | {e.lists} |")
    t = info["times"]
    out += ["", "Warm per-file read, one process (µs):", "",
            "| reader | p50 | p99 | mean | files/s vs local disk (same kind of process) |",
            "|---|---:|---:|---:|---:|"]
    for name, base in (("local disk", "local disk"), ("ImageFolder warm, this process", "local disk"),
                       ("local disk, fresh forked child", "local disk, fresh forked child"),
                       ("ImageFolder warm, fresh forked child", "local disk, fresh forked child"),
                       ("raycache fs warm, after the TTL", "local disk")):
        s = t[name]
        out.append(f"| {name} | {s['p50_us']:.0f} | {s['p99_us']:.0f} | {s['mean_us']:.0f} | "
                   f"{t[base]['mean_us'] / s['mean_us']:.2f}x |")
    out += ["", "| target | value | met |", "|---|---:|---|"]
    out += [f"| {name} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in info["targets"]]
    return "\n".join(out)


def stats(times: np.ndarray) -> Dict[str, float]:
    return {"p50_us": float(np.percentile(times, 50) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6),
            "mean_us": float(times.mean() * 1e6)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; return 0 when every target is met."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kib", type=int, default=110)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--compute-ms", type=float, default=30.0)
    ap.add_argument("--rate-mb-s", type=float, default=10.0)
    ap.add_argument("--latency-ms", type=float, default=25.0)
    ap.add_argument("--collate", choices=("tensor", "bytes"), default="tensor",
                    help="what a batch is: one uint8 tensor in shared memory, or a list of bytes")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if min(args.files, args.file_kib, args.classes, args.workers, args.batch_size) < 1:
        ap.error("sizes and counts must be positive")

    import ray

    import ray_cache
    from ray_cache.files.fs import METADATA_TTL_S
    from ray_cache.files import pages

    tmp = tempfile.mkdtemp(prefix="ray_cache_files_bench_")
    epochs: List[Epoch] = []
    times: Dict[str, Dict[str, float]] = {}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        store = open_store(stack, BUCKET, args.rate_mb_s, args.latency_ms)
        proxy = store.proxy
        log(f"writing {args.files:,} files of {args.file_kib} KiB …")
        rng = np.random.default_rng(0)
        local_root = os.path.join(tmp, "local")
        size = args.file_kib * 1024
        for i in range(args.files):
            rel = f"class{i % args.classes:03d}/img{i:06d}.jpg"
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            store.direct_fs.pipe_file(f"{BUCKET}/{PREFIX}/{rel}", data)
            os.makedirs(os.path.dirname(os.path.join(local_root, rel)), exist_ok=True)
            with open(os.path.join(local_root, rel), "wb") as fh:
                fh.write(data)
        start_local_ray(stack)
        ray_cache.start(disk_dir=os.path.join(tmp, "cache"))  # defaults otherwise
        stack.callback(ray_cache.shutdown)
        url = f"s3://{BUCKET}/{PREFIX}/"
        far_options = store.server.storage_options(proxy.url)

        def record(case: str, label: str, epoch: int, ds: Any) -> Epoch:
            proxy.reset()
            r = run_epoch(ds, args)
            c = count(proxy)
            e = Epoch(case, label, epoch, r["epoch_s"], r["au"], r["wait_share"], int(r["samples"]), **c)
            if e.samples != args.files:
                raise RuntimeError(f"{case}: {e.samples} samples, expected {args.files}")
            log(f"{case} epoch {epoch}: AU {e.au:.1%}, data wait {e.wait_share:.1%}, {e.epoch_s:.2f} s, "
                f"{e.per_file:.3f} requests/file")
            epochs.append(e)
            return e

        proxy.reset()
        ds = ray_cache.ImageFolder(url, filesystem=store.client(), loader=bytes)
        listing = count(proxy)
        log(f"ImageFolder: {len(ds)} samples, {len(ds.classes)} classes, {listing['requests']} requests to list")
        record("a", "s3fs direct, fs.open(path).read()", 1, S3Files(far_options, ds.samples))
        record("b", "ray_cache.ImageFolder, cold", 1, ds)
        for epoch in (2, 3):
            time.sleep(METADATA_TTL_S + 0.5)  # every epoch starts after the metadata TTL
            record("c", "ray_cache.ImageFolder, warm (after the TTL)", epoch, ds)
        urls = [(f"raycache::s3://{p}", t) for p, t in ds.samples]
        time.sleep(METADATA_TTL_S + 0.5)
        record("c2", "raycache:: URLs, no snapshot, warm (after the TTL)", 1, URLFiles(urls, {"s3": far_options}))
        local = [(os.path.join(local_root, p.split(f"{PREFIX}/", 1)[1]), t) for p, t in ds.samples]
        record("d", "local disk", 1, URLFiles(local, {}))

        log("per-file read times …")
        n = len(ds)
        pages.reader().clear()
        times["local disk"] = stats(per_file_times(lambda i: open(local[i][0], "rb").read(), n))
        ds[0]
        in_child = in_forked_child(lambda i: ds[i], n)  # before this process maps every page
        times["ImageFolder warm, fresh forked child"] = stats(in_child)
        times["local disk, fresh forked child"] = stats(
            in_forked_child(lambda i: open(local[i][0], "rb").read(), n))
        per_file_times(lambda i: ds[i], n)  # maps each page in this process
        times["ImageFolder warm, this process"] = stats(per_file_times(lambda i: ds[i], n))
        times["local disk"] = stats(per_file_times(lambda i: open(local[i][0], "rb").read(), n))
        import fsspec

        bare = fsspec.filesystem("raycache", target_protocol="s3", target_options=far_options)
        time.sleep(METADATA_TTL_S + 0.5)
        times["raycache fs warm, after the TTL"] = stats(
            per_file_times(lambda i: bare.cat_file(ds.samples[i][0]), min(n, 300)))

    def pick(case: str) -> List[Epoch]:
        return [e for e in epochs if e.case == case]

    direct, cold, warm, local_e = pick("a")[0], pick("b")[0], pick("c"), pick("d")[0]
    warm_rate = times["local disk"]["mean_us"] / times["ImageFolder warm, this process"]["mean_us"]
    targets = [
        ("warm epoch: store requests per file (LISTs included)",
         f"{max(e.per_file for e in warm):.3f}", max(e.per_file for e in warm) <= 0.05),
        ("warm epoch: data GETs", str(max(e.data_gets for e in warm)), max(e.data_gets for e in warm) == 0),
        ("warm small-file reads vs local disk, one process (>= 0.5x)", f"{warm_rate:.2f}x", warm_rate >= 0.5),
        ("cold epoch vs s3fs direct (>= 0.8x)", f"{direct.epoch_s / cold.epoch_s:.2f}x",
         direct.epoch_s / cold.epoch_s >= 0.8),
        ("warm AU (>= 95%)", f"{min(e.au for e in warm):.1%} (local disk: {local_e.au:.1%})",
         min(e.au for e in warm) >= 0.95),
    ]
    info = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
            "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "ray": ray.__version__, "ray_cache": ray_cache.__version__, "args": vars(args),
            "times": times, "targets": targets, "listing": listing, "local_au": local_e.au}
    print(markdown(epochs, info), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "epochs": [asdict(e) for e in epochs]}, fh, indent=2)
    return 0 if all(ok for _n, _v, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
