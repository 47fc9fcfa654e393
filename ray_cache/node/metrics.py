"""Ray metrics for the cache, through ``ray.util.metrics``.

They appear wherever the cluster's Prometheus already scrapes Ray (each node's metrics
export port, with Ray's dashboard agent from ``ray[default]``), tagged by node. Ray
prefixes every name with ``ray_``, so ``cache_hits`` is scraped as
``ray_cache_hits_total``. Counters advance by the change since the last export;
gauges carry used and capacity bytes per tier.
"""

from __future__ import annotations

import os
from typing import Any, Dict

#: Worker counters exported as Prometheus counters (scraped as ``ray_cache_<name>_total``).
COUNTER_FIELDS = (
    "hits", "misses", "memory_hits", "disk_hits", "bytes_from_memory", "bytes_from_disk",
    "bytes_from_under_store", "requests_to_under_store", "evictions", "fallbacks",
    "bytes_served_local", "bytes_served_remote", "loaded_entries",
    "written_entries", "uploads_aborted", "replica_entries",
)
#: Worker fields exported as gauges.
GAUGE_FIELDS = (
    "memory_bytes_used", "memory_bytes_capacity", "disk_bytes_used", "disk_bytes_capacity",
    "memory_bytes_pinned", "disk_bytes_pinned", "entries",
)


class WorkerMetrics:
    """The metrics of one worker; :meth:`export` publishes a status record."""

    def __init__(self, node_id: str) -> None:
        try:
            from ray.util.metrics import Counter, Gauge
        except ImportError:  # pragma: no cover - part of Ray
            self._counters, self._gauges = {}, {}
            return
        # node_id for dashboards; worker_pid tells a restarted worker's series apart.
        tags = {"node_id": node_id, "worker_pid": str(os.getpid())}
        self._counters = {}
        for name in COUNTER_FIELDS:
            c = Counter(f"cache_{name}", description=f"ray_cache: {name.replace('_', ' ')}", tag_keys=tuple(tags))
            c.set_default_tags(tags)
            self._counters[name] = c
        self._gauges = {}
        for name in GAUGE_FIELDS:
            g = Gauge(f"cache_{name}", description=f"ray_cache: {name.replace('_', ' ')}", tag_keys=tuple(tags))
            g.set_default_tags(tags)
            self._gauges[name] = g
        self._last: Dict[str, int] = {name: 0 for name in COUNTER_FIELDS}

    def export(self, record: Dict[str, Any]) -> None:
        for name, counter in self._counters.items():
            value = int(record.get(name, 0))
            delta = value - self._last[name]
            if delta > 0:
                counter.inc(delta)
                self._last[name] = value
        for name, gauge in self._gauges.items():
            gauge.set(float(record.get(name, 0)))
