"""Settings of a cache worker, their defaults, and their validation.

Defaults are sized from the machine: the memory tier takes a fraction of the node's
Ray object store, the disk tier a fraction of the free space under the cache directory.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, asdict
from typing import Any, Dict, Optional

#: Ray namespace holding the named, detached cache workers.
NAMESPACE = "ray_cache"
#: Share of a node's object store the memory tier takes by default.
MEMORY_FRACTION = 0.3
#: Share of free disk the disk tier takes by default, and its cap.
DISK_FRACTION = 0.25
DISK_DEFAULT_CAP = 64 * 1024**3
#: A run of row groups is grouped into one entry up to this many uncompressed bytes.
UNIT_TARGET_BYTES = 64 * 1024**2
#: Size of a page of a raw object on the fsspec path (see ray_cache.files.fs for why).
PAGE_SIZE = 4 * 1024**2
#: Seconds a caller waits on a worker before treating it as gone and reading the store.
WORKER_TIMEOUT_S = 120.0


def default_disk_dir() -> str:
    """The per-user cache directory: ``$RAY_CACHE_DIR`` or ``~/.cache/ray_cache``."""
    env = os.environ.get("RAY_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ray_cache")


@dataclass(frozen=True)
class WorkerConfig:
    """Capacities and location of one worker's tiers.

    Attributes
    ----------
    memory_bytes : int
        Capacity of the memory tier (decoded Arrow data in the Ray object store).
    disk_bytes : int
        Capacity of the disk tier (Arrow IPC files).
    disk_dir : str
        Root directory of the disk tier; each worker claims its own ``slot-N`` below it.
    policy : str
        Name of the eviction policy (see ``ray_cache.node.tiers.policy.POLICIES``).
    nodes : str
        The node selector the cache was started with (new nodes are chosen alike).
    requested_memory_bytes, requested_disk_bytes : int or None
        What the user asked for (None: sized from each node), applied to new nodes.
    """

    memory_bytes: int
    disk_bytes: int
    disk_dir: str
    policy: str = "adaptive"
    nodes: str = "auto"
    requested_memory_bytes: Optional[int] = None
    requested_disk_bytes: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def validate_capacity(name: str, value: Optional[int]) -> Optional[int]:
    """Check a byte capacity given by a user; ``None`` means "use the default".

    Examples
    --------
    >>> validate_capacity("memory_bytes", 1024)
    1024
    >>> validate_capacity("memory_bytes", 0)
    Traceback (most recent call last):
    ...
    ValueError: memory_bytes must be a positive number of bytes (at least 1, finite), got 0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise ValueError(f"{name} must be a positive number of bytes (at least 1, finite), got {value!r}")
    return int(value)


def validate_disk_dir(path: str) -> str:
    """Create ``path`` (owner-only) if needed and prove it is writable, else ``ValueError``."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(
            f"disk_dir {path!r} is not a writable directory ({exc.strerror or exc})"
        ) from None
    return path


def default_disk_bytes(path: str) -> int:
    """A quarter of the free space under ``path``, capped at 64 GiB, at least 64 MiB."""
    free = shutil.disk_usage(path).free
    return max(64 * 1024**2, min(int(free * DISK_FRACTION), DISK_DEFAULT_CAP))


#: Each worker's counters (``ray_cache.stats()`` sums them over the workers).
COUNTERS = (
    "hits", "misses", "memory_hits", "disk_hits", "bytes_from_cache", "bytes_from_memory",
    "bytes_from_disk", "bytes_from_under_store", "requests_to_under_store",
    "single_flight_waits", "disk_write_errors", "errors", "fallbacks", "fallback_bytes",
    "bytes_served_local", "bytes_served_remote", "expired", "loaded_entries",
    "written_entries", "uploads_aborted", "replica_entries",
)
