"""Whether this process may use Ray: not in a child forked from a process where Ray ran.

Ray's core worker does not survive ``fork``: its threads are gone in the child, so any
Ray call there waits forever. A child forked from a process where Ray was initialized
(PyTorch ``DataLoader`` workers with the default ``fork`` context on Linux,
``multiprocessing`` pools) is marked here at fork time. The ``raycache`` filesystem
still reads through the cache there (through this node's workers' channels, see
:mod:`ray_cache.files.local`); calls that need Ray itself raise :class:`RayForkedError`
at once, naming the remedy, instead of hanging.

Examples
--------
>>> ray_forked()
False
>>> check_ray_usable("ray_cache.stats()")  # returns: Ray is usable in this process
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import ray

_FORKED = False
_AFTER_FORK: List[Callable[[], None]] = []


class RayForkedError(RuntimeError):
    """A call that needs Ray, made in a process forked from one running Ray."""


def ray_forked() -> bool:
    """True in a process forked from one that had Ray initialized (Ray is unusable here)."""
    return _FORKED


def check_ray_usable(what: str) -> None:
    """Raise :class:`RayForkedError` naming ``what`` and the remedy if Ray is unusable here."""
    if _FORKED:
        raise RayForkedError(
            f"{what} needs Ray, which cannot be used in process {os.getpid()}: it was forked "
            "from a process running Ray. Reads through the raycache filesystem work here; for "
            "anything else start this process with a 'spawn' or 'forkserver' multiprocessing "
            "context (DataLoader(multiprocessing_context='spawn'))."
        )


class ProcessThreads:
    """A thread pool of this process, made on first use and made anew in a forked child
    (a child's copy of the parent's pool has no threads: they do not survive fork).

    Examples
    --------
    >>> threads = ProcessThreads(2, "ray-cache-example")
    >>> threads.pool().submit(sum, [1, 2]).result()
    3
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers, self.name = max_workers, name
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        after_fork(self._forget)

    def _forget(self) -> None:
        # In a forked child: the parent's pool has no threads here, and a lock held at the
        # fork would stay held.
        self._lock, self._pool = threading.Lock(), None

    def pool(self) -> ThreadPoolExecutor:
        """This process's pool."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.name)
            return self._pool


def after_fork(fn: Callable[[], None]) -> None:
    """Run ``fn`` in every child forked from this process, after it is marked."""
    _AFTER_FORK.append(fn)


def _in_child() -> None:
    global _FORKED
    _FORKED = _FORKED or ray.is_initialized()
    for fn in _AFTER_FORK:
        fn()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
