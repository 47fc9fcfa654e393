"""Random range reads: s3fs, fsspec's ``blockcache`` and ``raycache``, on one S3 server.

Run it with::

    python benchmarks/ranges.py [--size-mb 256] [--reads 200] [--min-kb 64] [--max-kb 4096] \\
        [--seed 0] [--repeats 3] [--latency-ms 0] [--rate-mb-s 0] [--server moto|s3rver]

It writes one object of ``--size-mb`` random bytes into a local S3 server (moto by default,
or s3rver: ``ray_cache.testing.s3rver`` says why the cold figures differ) on loopback, and reads the same ``--reads`` random ranges (offsets uniform, lengths uniform
in ``[--min-kb, --max-kb]``) through each case, timing every read:

(a) s3fs directly: ``cat_file(path, start, end)``, one ranged GET per read;
(b) fsspec ``blockcache`` over s3fs, cold: a fresh cache directory, ``open`` once, then
    ``seek``/``read``;
(c) ``blockcache`` warm: the same, after the whole object was read through it once;
(d) ``raycache`` cold: fresh cache workers, ``open`` once, then ``seek``/``read``;
(e) ``raycache`` warm: the same, after the whole object was read through it once (the
    object is 4x this process's 64 MiB of object-store page buffers: other pages are
    mapped from this node's disk tier, see ``ray_cache.files.pages``);
(f) ``blockcache`` cold, sequential: another object of the same size read front to back
    in 1 MiB reads (a checkpoint being loaded), through a fresh cache directory;
(g) ``raycache`` cold, sequential: the same, through fresh cache workers (pages fetched
    ahead of the reader, ``ray_cache.files.readahead``).

The warm cases (c) and (e) are timed read by read in turn (which of the two goes first
alternates), so both see the same machine noise and the same state of the allocator
(a 4 MB read costs about as much in fresh-page faults of its result as in copying);
each is the best of ``--repeats`` such passes, and the ratio printed is over the pass
totals.

All cases read through one counting proxy in front of the server (``--latency-ms`` and
``--rate-mb-s`` make it emulate a far store), which counts the object data GETs that reach
the store. The output is a Markdown table with p50/p99 latency and MB/s (total bytes over
total read time), the command line and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from _common import log, open_store, start_local_ray

BUCKET = "ray-cache-bench"
KEY = "ranges/object.bin"
Range = Tuple[int, int]


def make_ranges(args: argparse.Namespace, size: int) -> List[Range]:
    """The same random ``(start, end)`` ranges for every case."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_kb * 1000, args.max_kb * 1000 + 1, args.reads)
    lengths = np.minimum(lengths, size)
    starts = (rng.random(args.reads) * (size - lengths + 1)).astype(np.int64)
    return [(int(s), int(s + n)) for s, n in zip(starts, lengths)]


def time_reads(read: Callable[[int, int], bytes], ranges: Sequence[Range],
               check: Callable[[int, bytes], None]) -> Dict[str, float]:
    """Latency per read and throughput over all of them."""
    latencies, total = [], 0
    for i, (start, end) in enumerate(ranges):
        t0 = time.perf_counter()
        data = read(start, end)
        latencies.append(time.perf_counter() - t0)
        total += len(data)
        check(i, data)
    lat = np.array(latencies)
    return {
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "mb_s": total / 1e6 / float(lat.sum()),
        "seconds": float(lat.sum()),
    }


def time_pair(reads: Sequence[Callable[[int, int], bytes]], ranges: Sequence[Range],
              check: Callable[[int, bytes], None]) -> List[Dict[str, float]]:
    """:func:`time_reads` for two readers, interleaved read by read (first one alternating)."""
    latencies: List[List[float]] = [[], []]
    totals = [0, 0]
    for i, (start, end) in enumerate(ranges):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            data = reads[k](start, end)
            latencies[k].append(time.perf_counter() - t0)
            totals[k] += len(data)
            check(i, data)
            del data
    out = []
    for lat_list, total in zip(latencies, totals):
        lat = np.array(lat_list)
        out.append({"p50_ms": float(np.percentile(lat, 50) * 1000),
                    "p99_ms": float(np.percentile(lat, 99) * 1000),
                    "mb_s": total / 1e6 / float(lat.sum()), "seconds": float(lat.sum())})
    return out


def file_reader(f: Any) -> Callable[[int, int], bytes]:
    def read(start: int, end: int) -> bytes:
        f.seek(start)
        return f.read(end - start)

    return read


def read_whole(f: Any, chunk: int = 16 << 20) -> None:
    # Never ask past the end: fsspec's MMapCache (blockcache) then requests a block
    # beyond the object and fails with "range not satisfiable".
    f.seek(0)
    while f.tell() < f.size:
        f.read(min(chunk, f.size - f.tell()))


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--min-kb", type=int, default=64)
    parser.add_argument("--max-kb", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-mb-s", type=float, default=0.0)
    parser.add_argument("--server", choices=("moto", "s3rver"), default="moto",
                        help="the S3 server: moto (the suite's) or s3rver (ranges cost their size)")
    args = parser.parse_args(list(argv) or None)

    import fsspec
    import ray
    import s3fs

    import ray_cache
    from ray_cache.files import pages
    from ray_cache.files.fs import CacheFileSystem
    from ray_cache.testing import s3_data_gets

    size = args.size_mb * 1_000_000
    results: Dict[str, Dict[str, float]] = {}
    gets: Dict[str, int] = {}
    with ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="ranges-bench-")
        stack.callback(shutil.rmtree, tmp, True)
        store = open_store(stack, BUCKET, args.rate_mb_s, args.latency_ms, args.server)
        proxy = store.proxy
        bproxy = store.another_proxy(stack)  # blockcache's: warm GETs counted per cache
        writer = store.direct_fs
        data = np.random.default_rng(args.seed + 1).integers(0, 256, size, dtype=np.uint8).tobytes()
        log(f"writing {args.size_mb} MB to the S3 server")
        writer.pipe(f"{BUCKET}/{KEY}", data)
        ranges = make_ranges(args, size)
        path = f"{BUCKET}/{KEY}"

        def check(i: int, got: bytes) -> None:
            start, end = ranges[i]
            if got != data[start:end]:
                raise AssertionError(f"read {i} [{start}, {end}) returned wrong bytes")

        def reader_fs(via: Any = proxy) -> Any:
            return store.client(via)

        def run(name: str, read: Callable[[int, int], bytes], via: Any = proxy) -> None:
            via.reset()
            log(f"{name}: {len(ranges)} reads")
            r = time_reads(read, ranges, check)
            results[name] = r
            gets[name] = len(s3_data_gets(via.requests(), BUCKET))

        direct = reader_fs()
        run("a s3fs direct", lambda s, e: direct.cat_file(path, start=s, end=e))

        block = fsspec.filesystem("blockcache", fs=reader_fs(bproxy), cache_storage=os.path.join(tmp, "bc"),
                                  skip_instance_cache=True)
        bf = stack.enter_context(block.open(path, "rb"))
        run("b blockcache cold", file_reader(bf), bproxy)
        read_whole(bf)

        start_local_ray(stack, object_store_memory=max(1 << 30, 3 * size))
        ray_cache.start(memory_bytes=2 * size, disk_bytes=2 * size, disk_dir=os.path.join(tmp, "rc"))
        stack.callback(ray_cache.shutdown)
        rfs = CacheFileSystem(fs=reader_fs(), skip_instance_cache=True)
        rf = stack.enter_context(rfs.open(path, "rb"))
        run("d raycache cold", file_reader(rf))
        read_whole(rf)

        # Warm passes: the two caches read by read in turn (see the module docstring).
        ratios = []
        for _ in range(args.repeats):
            proxy.reset()
            bproxy.reset()
            log(f"c blockcache warm / e raycache warm, interleaved: {len(ranges)} reads each")
            pair = time_pair([file_reader(bf), file_reader(rf)], ranges, check)
            ratios.append(pair[0]["seconds"] / pair[1]["seconds"])
            for name, r in zip(("c blockcache warm", "e raycache warm"), pair):
                if name not in results or r["mb_s"] > results[name]["mb_s"]:
                    results[name] = r
            for name, via in (("c blockcache warm", bproxy), ("e raycache warm", proxy)):
                gets[name] = gets.get(name, 0) + len(s3_data_gets(via.requests(), BUCKET))
        counts = pages.reader().stats()

        # Cold sequential reads of objects neither cache has seen.
        seq: Dict[str, float] = {}
        for name, key, fs_of in (("f blockcache cold, sequential", "seq-f.bin", lambda: fsspec.filesystem(
                "blockcache", fs=reader_fs(bproxy), cache_storage=os.path.join(tmp, "bc2"),
                skip_instance_cache=True)),
                ("g raycache cold, sequential", "seq-g.bin", lambda: CacheFileSystem(
                    fs=reader_fs(), skip_instance_cache=True))):
            seq_path = f"{BUCKET}/ranges/{key}"
            writer.pipe(seq_path, data)
            pages.reader().clear()
            log(f"{name}: {args.size_mb} MB in 1 MiB reads")
            with fs_of().open(seq_path, "rb") as f:
                t0, parts = time.perf_counter(), []
                while f.tell() < f.size:
                    parts.append(f.read(min(1 << 20, f.size - f.tell())))
                seq[name] = size / 1e6 / (time.perf_counter() - t0)
            if b"".join(parts) != data:
                raise AssertionError(f"{name} returned wrong bytes")

    command = "python benchmarks/ranges.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"Command: `{command.strip()}`\n")
    print(f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
          f"Python {platform.python_version()}, Ray {ray.__version__}, fsspec {fsspec.__version__}, "
          f"s3fs {s3fs.__version__}\n")
    print(f"Object: {args.size_mb} MB; {args.reads} random reads of {args.min_kb} KB-{args.max_kb} KB "
          f"(seed {args.seed}); warm cases best of {args.repeats} passes; "
          f"S3 server {args.server}; proxy latency {args.latency_ms} ms, rate "
          f"{args.rate_mb_s or 'unlimited'} MB/s; raycache page size {pages.PAGE_SIZE >> 20} MiB, "
          f"page buffers {pages.reader().buffers.capacity >> 20} MiB; over all raycache reads, pages "
          f"from this process's buffers {counts['buffer_hits']}, mapped from the node's disk tier "
          f"{counts['mapped_pages']}, from the worker through Ray {counts['worker_pages']}\n")
    print("| case | p50 ms | p99 ms | MB/s | data GETs at store |")
    print("|---|---:|---:|---:|---:|")
    for name, r in sorted(results.items()):
        print(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mb_s']:.0f} | {gets[name]} |")
    print("\n| cold sequential read of a whole object (1 MiB reads) | MB/s |\n|---|---:|")
    for name, mb_s in seq.items():
        print(f"| {name} | {mb_s:.0f} |")
    print(f"\nraycache / blockcache, cold sequential: "
          f"{seq['g raycache cold, sequential'] / seq['f blockcache cold, sequential']:.2f}x")
    warm, block_warm = results["e raycache warm"]["mb_s"], results["c blockcache warm"]["mb_s"]
    print(f"\nraycache warm / blockcache warm: {warm / block_warm:.2f}x (best passes); per pass: "
          + ", ".join(f"{r:.2f}x" for r in ratios) + "; "
          f"raycache warm / s3fs direct: {warm / results['a s3fs direct']['mb_s']:.2f}x")


if __name__ == "__main__":
    main()
