"""Answers of a target filesystem's metadata calls, reused for a short time (``raycache``).

``info``, ``ls`` and ``find`` of :class:`ray_cache.files.fs.CacheFileSystem` go through one
:class:`MetadataCache` per filesystem instance: each answer is reused for ``ttl`` seconds
(``metadata_ttl=``; 0 asks every time) and forgotten at once after a write through the
same filesystem. What this window means for rewritten objects is in :mod:`ray_cache.files.fs`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Tuple


class MetadataCache:
    """Answers of the target's metadata calls, each reused for ``ttl`` seconds (thread-safe).

    Examples
    --------
    >>> meta = MetadataCache(ttl=5.0)
    >>> meta.get(("info", "b/k"), lambda: {"size": 1})
    {'size': 1}
    >>> meta.get(("info", "b/k"), lambda: {"size": 2})  # reused within the TTL
    {'size': 1}
    >>> meta.forget(); meta.get(("info", "b/k"), lambda: {"size": 2})
    {'size': 2}
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._items: Dict[Any, Tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        if self.ttl > 0:
            with self._lock:
                hit = self._items.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
        value = load()
        self.put(key, value)
        return value

    def put(self, key: Any, value: Any) -> None:
        if self.ttl > 0:
            with self._lock:
                self._items[key] = (time.monotonic(), value)

    def forget(self, key: Any = None) -> None:
        with self._lock:
            if key is None:
                self._items.clear()
            else:
                self._items.pop(key, None)
