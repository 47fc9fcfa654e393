"""A self-contained demo of ray_cache: the "main job" against an emulated far store.

Run it with::

    python -m ray_cache.demo [--rows 2000000] [--files 4] [--latency-ms 10] [--rate-mb-s 50]

It starts a local S3 server and, in front of it, a counting proxy that adds latency
and caps bandwidth (a far object store), writes a synthetic Parquet dataset into a
bucket, then reads it three ways, each iterated to the last batch:

(a) ``ray.data.read_parquet`` straight from the store (through the proxy),
(b) ``ray_cache.read_parquet`` cold (fills the cache),
(c) ``ray_cache.read_parquet`` warm (served by the cache workers).

For each read it prints the time, rows/s, the object data GETs that reached the
store and the MB they carried (counted at the proxy), and the speed-up over (a);
it checks that all three reads saw the same rows, then prints ``ray_cache.status()``
and stops everything it started.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BUCKET = "ray-cache-demo"
PREFIX = "train"
BATCH_SIZE = 65536
ROW_GROUP_ROWS = 250_000
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]

_TTY = sys.stdout.isatty()


def _style(text: str, code: str) -> str:
    """``text`` in ANSI style ``code`` when stdout is a terminal."""
    return f"\033[{code}m{text}\033[0m" if _TTY else text


def say(msg: str) -> None:
    """Print one progress line."""
    print(f"{_style('▸', '36')} {msg}", flush=True)


@dataclass
class ReadResult:
    """What one full pass over a dataset measured."""

    name: str
    seconds: float
    rows: int
    id_sum: int
    gets: int
    store_bytes: int


def make_table(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    """Rows ``start .. start+n-1`` of the synthetic dataset (flat columns)."""
    vocab = pa.array(WORDS)
    return pa.table({
        "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "x": pa.array(rng.standard_normal(n)),
        "y": pa.array(rng.random(n, dtype=np.float32)),
        "label": pa.array(rng.integers(0, 10, n, dtype=np.int32)),
        "text": pc.take(vocab, pa.array(rng.integers(0, len(WORDS), n))),
    })


def write_dataset(fs: Any, rows: int, files: int) -> int:
    """Write ``rows`` rows as ``files`` Parquet files under ``BUCKET/PREFIX``; return bytes."""
    rng = np.random.default_rng(0)
    per_file = math.ceil(rows / files)
    total, start = 0, 0
    for i in range(files):
        n = min(per_file, rows - start)
        if n <= 0:
            break
        path = f"{BUCKET}/{PREFIX}/part-{i:05d}.parquet"
        pq.write_table(make_table(start, n, rng), path, filesystem=fs,
                       row_group_size=ROW_GROUP_ROWS)
        total += int(fs.info(path)["size"])
        start += n
    return total


def timed_read(name: str, make_ds: Callable[[], Any], proxy: Any) -> ReadResult:
    """Reset the proxy, build the dataset, iterate it fully; count rows and data GETs."""
    from ray_cache.testing import s3_data_gets

    proxy.reset()
    rows, id_sum = 0, 0
    t0 = time.perf_counter()
    ds = make_ds()
    for batch in ds.iter_batches(batch_size=BATCH_SIZE, batch_format="pyarrow"):
        rows += batch.num_rows
        id_sum += pc.sum(batch["id"]).as_py() or 0
    seconds = time.perf_counter() - t0
    gets = s3_data_gets(proxy.requests(), BUCKET)
    return ReadResult(name, seconds, rows, id_sum, len(gets),
                      sum(int(g["response_bytes"]) for g in gets))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A box-drawn table; the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths))]
        return "│ " + " │ ".join(parts) + " │"

    def rule(left: str, mid: str, right: str) -> str:
        return left + mid.join("─" * (w + 2) for w in widths) + right

    out = [rule("┌", "┬", "┐"), _style(line(header), "1"), rule("├", "┼", "┤")]
    out += [line(r) for r in rows]
    out.append(rule("└", "┴", "┘"))
    return "\n".join(out)


def report(results: Sequence[ReadResult]) -> str:
    """The results table, with speed-ups relative to the first (direct) read."""
    base = results[0].seconds
    rows = [[r.name, f"{r.seconds:.2f}", f"{r.rows / r.seconds:,.0f}", str(r.gets),
             f"{r.store_bytes / 1e6:.1f}", f"{base / r.seconds:.1f}x"] for r in results]
    header = ["read", "seconds", "rows/s", "data GETs at store", "MB from store",
              "speed-up vs direct"]
    return format_table(header, rows)


def _quiet_ray_data() -> None:
    """No progress bars or per-dataset log lines: keep the demo's output readable."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("enable_operator_progress_bars", "print_on_execution_start",
                 "enable_rich_progress_bars"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _warm_up_ray() -> None:
    """Start Ray's worker processes now, so that no timed read pays for their start-up."""
    import ray

    ray.data.range(8, override_num_blocks=4).map_batches(lambda b: b).take_all()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; return 0 when all three reads agree, 1 otherwise."""
    ap = argparse.ArgumentParser(prog="python -m ray_cache.demo",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows in the dataset")
    ap.add_argument("--files", type=int, default=4, help="number of Parquet files")
    ap.add_argument("--latency-ms", type=float, default=10.0,
                    help="latency the proxy adds to each request to the store")
    ap.add_argument("--rate-mb-s", type=float, default=50.0,
                    help="bandwidth cap of the link to the store, MB/s (0: no cap)")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.files < 1:
        ap.error("--rows and --files must be positive")

    import ray
    import s3fs

    import ray_cache
    from ray_cache.testing import CountingProxy, S3Server

    tmp = tempfile.mkdtemp(prefix="ray_cache_demo_")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        link = (f"{args.latency_ms:g} ms per request, "
                + (f"{args.rate_mb_s:g} MB/s" if args.rate_mb_s else "no bandwidth cap"))
        say(f"starting a local S3 server and a far-link proxy in front of it ({link})")
        server = stack.enter_context(S3Server())
        server.create_bucket(BUCKET)
        proxy = stack.enter_context(CountingProxy(
            server.endpoint_url, rate_bytes_per_s=args.rate_mb_s * 1e6 or None,
            latency_ms=args.latency_ms))
        local_fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
        far_fs = s3fs.S3FileSystem(**server.storage_options(proxy.url), skip_instance_cache=True)

        say(f"writing {args.rows:,} rows as {args.files} Parquet files "
            f"to s3://{BUCKET}/{PREFIX}/ …")
        nbytes = write_dataset(local_fs, args.rows, args.files)
        say(f"wrote {nbytes / 1e6:.1f} MB")

        say("starting Ray and the cache workers …")
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        _quiet_ray_data()
        _warm_up_ray()
        ray_cache.start(memory_bytes=1 << 30, disk_bytes=2 << 30, disk_dir=f"{tmp}/cache")
        stack.callback(ray_cache.shutdown)

        url = f"s3://{BUCKET}/{PREFIX}/"
        results = []
        say("reading directly with ray.data.read_parquet …")
        results.append(timed_read("(a) direct: ray.data.read_parquet",
                                  lambda: ray.data.read_parquet(url, filesystem=far_fs), proxy))
        say("reading through ray_cache (cold: fills the cache) …")
        results.append(timed_read("(b) ray_cache cold", lambda: ray_cache.read_parquet(
            url, filesystem=far_fs), proxy))
        say("reading through ray_cache again (warm) …")
        results.append(timed_read("(c) ray_cache warm", lambda: ray_cache.read_parquet(
            url, filesystem=far_fs), proxy))

        print()
        print(_style(f"Reading {args.rows:,} rows ({nbytes / 1e6:.1f} MB of Parquet) "
                     f"from an emulated far store ({link})", "1"))
        print(report(results))
        same_rows = len({r.rows for r in results}) == 1 and results[0].rows == args.rows
        expected_sum = args.rows * (args.rows - 1) // 2
        same_sum = all(r.id_sum == expected_sum for r in results)
        ok, bad = _style("✔ ok", "32"), _style("✘ MISMATCH", "31")
        print(f"rows seen:  {', '.join(f'{r.rows:,}' for r in results)}  "
              f"{ok if same_rows else bad}")
        print(f"sum(id):    {', '.join(f'{r.id_sum:,}' for r in results)}  "
              f"{ok if same_sum else bad}")
        s = ray_cache.stats()
        print(f"cache stats: hits={s['hits']} misses={s['misses']} "
              f"from cache={s['bytes_from_cache'] / 1e6:.1f} MB "
              f"from store={s['bytes_from_under_store'] / 1e6:.1f} MB "
              f"store requests={s['requests_to_under_store']} "
              f"evictions={s['evictions']} fallbacks={s['fallbacks']}")
        print()
        print(_style("ray_cache.status()", "1"))
        print(repr(ray_cache.status()))
        print()
        say("stopping the cache workers, Ray, the proxy and the S3 server …")
    say("done")
    return 0 if same_rows and same_sum else 1


if __name__ == "__main__":
    sys.exit(main())
