"""The ``ray-cache`` command: look at and steer the cache of a running Ray cluster.

Examples
--------
    ray-cache status                 # a table per worker
    ray-cache stats --json           # counters for scripts
    ray-cache start --memory 4GiB --disk 100GiB
    ray-cache load s3://bucket/train/ --columns x,y --storage-options '{"anon": false}'
    ray-cache pin s3://bucket/eval/      ray-cache unpin s3://bucket/eval/
    ray-cache free s3://bucket/old/      ray-cache invalidate s3://bucket/daily/
    ray-cache stop
"""

from __future__ import annotations

import argparse
import os
import json
import re
import sys
from typing import List, Optional

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``"4GiB"`` -> 4294967296; plain numbers are bytes.

    Examples
    --------
    >>> parse_size("1.5KiB")
    1536
    >>> parse_size("100")
    100
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB, 4GiB, 100GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection (Ray itself would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port ("auto", "ray://..."): let Ray decide
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _connect(address: str) -> None:
    import ray

    if not _reachable(address):
        raise SystemExit(
            f"ray-cache: no Ray cluster answers at --address {address!r}. "
            "Start one with `ray start --head` or pass the right address."
        )
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise SystemExit(
            f"ray-cache: no Ray cluster at --address {address!r} ({exc}). "
            "Start one with `ray start --head` or pass --address."
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--address`` and ``--json`` go before or after the subcommand
    (``ray-cache status --address auto``, as ``ray status --address auto``).

    Examples
    --------
    >>> p = build_parser()
    >>> a = p.parse_args(["stats", "--address", "10.0.0.1:6379", "--json"])
    >>> a.command, a.address, a.json
    ('stats', '10.0.0.1:6379', True)
    >>> p.parse_args(["status"]).address
    'auto'
    """
    parser = argparse.ArgumentParser(prog="ray-cache", description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # The same two options after the subcommand; SUPPRESS keeps what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=argparse.SUPPRESS, help="Ray cluster address (default: auto)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[common])

    command("status", "one line per cache worker")
    command("stats", "counters summed over workers")
    start = command("start", "start or resize workers on the cache nodes")
    start.add_argument("--memory", type=parse_size, help="memory tier per worker, e.g. 4GiB")
    start.add_argument("--disk", type=parse_size, help="disk tier per worker, e.g. 100GiB")
    start.add_argument("--disk-dir", help="disk tier directory on each node")
    start.add_argument("--nodes", default="auto", help="auto, all, gpu, resource:NAME or label:KEY=VALUE")
    start.add_argument("--policy", default="adaptive", help="eviction policy: adaptive (default), lru or tinylfu")
    command("stop", "stop the workers (disk tiers stay)")
    for name, text in (("load", "preload objects (resumable)"), ("pin", "load and pin objects"),
                       ("unpin", "unpin objects"), ("free", "drop cached objects"),
                       ("invalidate", "drop cached objects after a source update")):
        cmd = command(name, text)
        cmd.add_argument("paths", nargs="+", help="files, prefixes or globs (s3://, gs://, abfs://, local)")
        cmd.add_argument("--storage-options", type=json.loads, default=None,
                         help="fsspec options as JSON (credentials are better left to the environment)")
        if name in ("load", "pin"):
            cmd.add_argument("--columns", type=lambda t: [c for c in t.split(",") if c],
                             help="comma-separated Parquet columns")
            cmd.add_argument("--ttl", type=float, help="seconds until the entries expire")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``ray-cache`` command."""
    args = build_parser().parse_args(argv)

    _connect(args.address)
    import ray_cache
    from ray_cache.display import human

    if args.command == "status":
        st = ray_cache.status()
        if not st.workers and not args.json:
            print("ray-cache: no cache workers are running (start them with `ray-cache start`)")
            return 1
        print(json.dumps(st.workers, indent=2) if args.json else repr(st))
    elif args.command == "stats":
        s = ray_cache.stats()
        print(json.dumps(s, indent=2) if args.json else "\n".join(f"{k:26s} {v}" for k, v in s.items()))
    elif args.command == "start":
        workers = ray_cache.start(memory_bytes=args.memory, disk_bytes=args.disk,
                                  disk_dir=args.disk_dir, nodes=args.nodes, policy=args.policy)
        print(json.dumps([w.node_id for w in workers]) if args.json else f"{len(workers)} cache workers running")
    elif args.command == "stop":
        n = ray_cache.shutdown()
        print(json.dumps({"stopped": n}) if args.json else f"stopped {n} cache workers")
    elif args.command in ("load", "pin"):
        fn = ray_cache.load if args.command == "load" else ray_cache.pin
        report = fn(args.paths, columns=args.columns, storage_options=args.storage_options, ttl=args.ttl)
        fields = {k: v for k, v in vars(report).items() if k != "digests"}
        if args.json:
            print(json.dumps(fields))
        else:
            print(f"{report.entries} entries ({human(report.bytes)}): {report.fetched} fetched, "
                  f"{report.already_cached} already cached, {len(report.failures)} failed, "
                  f"{report.seconds:.1f} s")
            for url, why in report.failures:
                print(f"  failed: {url}: {why}")
        return 1 if report.failures else 0
    else:  # unpin, free, invalidate
        n = getattr(ray_cache, args.command)(args.paths, storage_options=args.storage_options)
        print(json.dumps({args.command: n}) if args.json else f"{args.command}: {n} entries")
    return 0


def run() -> None:
    """Console entry point: exit without Ray's slow driver teardown (~1 s) once done.

    A CLI call only reads from the cluster; nothing needs flushing but our own output.
    """
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (print(exc.code, file=sys.stderr) or 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    run()
