"""Bounded waits on Ray calls to cache workers: the one place their time limit applies.

``next()`` on a Ray streaming generator has no timeout, and a hung (not dead) worker
must not hang its caller, so every wait for a worker's next answer goes through
:func:`next_item`, bounded by :data:`ray_cache.config.WORKER_TIMEOUT_S`.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.exceptions import GetTimeoutError

from ray_cache.config import WORKER_TIMEOUT_S


def next_item(stream: Any, timeout_s: Optional[float] = None) -> Any:
    """The ``ObjectRef`` of a streaming call's next item, waiting at most ``timeout_s``
    (default ``WORKER_TIMEOUT_S``); ``GetTimeoutError`` when none came, ``StopIteration``
    at the end."""
    timeout_s = WORKER_TIMEOUT_S if timeout_s is None else timeout_s
    next_sync = getattr(stream, "_next_sync", None)
    if next_sync is None:  # pragma: no cover - older/newer Ray
        return next(stream)
    ref = next_sync(timeout_s=timeout_s)
    if ref.is_nil():
        raise GetTimeoutError(f"no answer from a cache worker in {timeout_s:g} s")
    return ref
