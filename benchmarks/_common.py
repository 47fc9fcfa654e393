"""What the benchmarks share: progress lines, a local S3 server behind the counting proxy,
and a Ray of their own with Ray Data kept quiet.

Each benchmark runs as a script (``python benchmarks/NAME.py``), so this module is
imported as ``_common`` from the script's folder.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Store:
    """The S3 server, the counting proxy in front of it, and s3fs clients of both."""

    server: Any
    proxy: Any
    #: Straight to the server: for writing the data and for uncounted baselines.
    direct_fs: Any
    #: Through the proxy: every request counted, throttled when the store is "far".
    far_fs: Any

    def client(self, proxy: Optional[Any] = None) -> Any:
        """A new s3fs filesystem reading through ``proxy`` (default: this store's)."""
        import s3fs

        url = (proxy or self.proxy).url
        return s3fs.S3FileSystem(**self.server.storage_options(url), skip_instance_cache=True)

    def another_proxy(self, stack: ExitStack) -> Any:
        """A second proxy like the first, for a case whose requests are counted apart."""
        from ray_cache.testing import CountingProxy

        return stack.enter_context(CountingProxy(
            self.server.endpoint_url, rate_bytes_per_s=self.proxy.rate_bytes_per_s,
            latency_ms=self.proxy.latency_ms))


def open_store(stack: ExitStack, bucket: str, rate_mb_s: float = 0.0,
               latency_ms: float = 0.0, server: str = "moto") -> Store:
    """Start the S3 server (with ``bucket``) and the proxy; both stop with ``stack``.

    ``rate_mb_s`` (0: unlimited) and ``latency_ms`` make the proxy emulate a far store.
    ``server``: ``"moto"`` (the test suite's) or ``"s3rver"`` (ranges served in proportion
    to their size and concurrently, as real stores do: ``ray_cache.testing.s3rver``).
    """
    import s3fs

    from ray_cache.testing import CountingProxy, S3Server
    from ray_cache.testing.s3rver import S3rverServer

    far = " (throttled)" if rate_mb_s or latency_ms else ""
    log(f"starting the S3 server ({server}) and the counting proxy{far} …")
    servers = {"moto": S3Server, "s3rver": S3rverServer}
    if server not in servers:
        raise ValueError(f"server must be one of {sorted(servers)}, got {server!r}")
    server = stack.enter_context(servers[server]())
    server.create_bucket(bucket)
    proxy = stack.enter_context(CountingProxy(
        server.endpoint_url, rate_bytes_per_s=rate_mb_s * 1e6 or None, latency_ms=latency_ms))
    direct = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    store = Store(server, proxy, direct, None)
    store.far_fs = store.client()
    return store


def quiet_ray_data(warm_up: bool = True) -> None:
    """No progress bars or info logs from Ray Data; optionally run one tiny job first, so
    the first measured read does not pay for starting Ray Data's workers."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if warm_up:
        ray.data.range(8, override_num_blocks=4).map_batches(lambda b: b).take_all()


def start_local_ray(stack: ExitStack, **options: Any) -> None:
    """A Ray of this benchmark's own (``address="local"``, even if another one runs here),
    2 CPUs, no dashboard; shut down with ``stack``. ``options`` go to ``ray.init``."""
    import ray

    log("starting Ray …")
    ray.init(**{"address": "local", "num_cpus": 2, "include_dashboard": False,
                "logging_level": logging.WARNING, **options})
    stack.callback(ray.shutdown)
