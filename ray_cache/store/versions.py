"""Version checks after fetches, shared: one metadata request serves every fetch that ended before it began.

Every fetch from the store (a Parquet unit, a page, a footer) is followed by a check that
the store still reports the version the read planned (:func:`ray_cache.store.fetch.check_version`):
bytes belong to that version only if it is still current **after** they arrived. A worker
fetching the 16 pages of one object in parallel used to follow each with its own metadata
request (16 GETs, 16 HEADs). :class:`VersionChecks` keeps the guarantee and shares the
request: a check may be answered by a metadata request that **started after** the caller's
fetch ended, and by no earlier one. Per object version there is at most one request in
flight; callers that arrive while it runs wait for the next one, which starts when it ends
and answers all of them. Parallel fetches of one object then cost 2 or 3 metadata requests
in all, however many there are.

Examples
--------
>>> from ray_cache.store.keys import StoreObject
>>> checks = VersionChecks(ask=lambda fs, path: "etag:a/3")
>>> checks.check(None, StoreObject("s3", "b/k", 3, "etag:a/3"))  # still current: returns
>>> checks.check(None, StoreObject("s3", "b/k", 3, "etag:old/3"))
Traceback (most recent call last):
...
ray_cache.store.errors.ObjectChangedError: s3://b/k changed in the store while it was read (planned version etag:old/3, now etag:a/3); read it again
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ray_cache.store import underfs
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.store.errors import ObjectChangedError
from ray_cache.store.keys import StoreObject

#: ``ask(fs, path)`` -> the version the store reports now.
Ask = Callable[[Any, str], str]


class _Round:
    """One metadata request and everyone it answers."""

    def __init__(self) -> None:
        self.callers = 0  # how many it answers (seen through VersionChecks.waiting)
        self.done = threading.Event()
        self.version: Optional[str] = None
        self.error: Optional[BaseException] = None


class _Slot:
    """The rounds of one object version: the one running and the one gathering callers."""

    def __init__(self) -> None:
        self.running: Optional[_Round] = None
        self.waiting: Optional[_Round] = None


class VersionChecks:
    """Shared, version-preserving checks (see the module docstring). Thread-safe.

    Parameters
    ----------
    ask : callable, optional
        ``ask(fs, path)`` returns the object's current version (default:
        :func:`ray_cache.store.underfs.current_version`, one metadata request, looked up at
        each call).
    timeout_s : float
        Longest a caller waits for the rounds ahead of it and its own; then ``TimeoutError``.
    """

    def __init__(self, ask: Optional[Ask] = None, timeout_s: float = 2 * WORKER_TIMEOUT_S) -> None:
        self._ask = ask
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._slots: Dict[Tuple[str, str, str], _Slot] = {}
        #: Metadata requests made (for tests and curiosity).
        self.requests = 0

    def check(self, fs: Any, obj: StoreObject) -> None:
        """Return if the store reports ``obj.version`` in a request begun after this call;
        raise :class:`ObjectChangedError` if it reports another, or what the request raised."""
        key = (obj.protocol, obj.path, obj.version)
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
            mine = slot.waiting
            if mine is None:  # a running round began before this call: it cannot answer it
                mine = slot.waiting = _Round()
            mine.callers += 1
        lead = False
        while True:
            with self._lock:
                if slot.waiting is not mine:  # a round leaves "waiting" when it starts
                    break
                if slot.running is None:
                    slot.running, slot.waiting = mine, None
                    lead = True
                    break
                running = slot.running
            self._wait(running, deadline, obj)
        if lead:
            self._run(fs, obj, key, slot, mine)
        else:
            self._wait(mine, deadline, obj)
        if mine.error is not None:
            raise mine.error
        if mine.version != obj.version:
            raise ObjectChangedError(
                f"{obj.url} changed in the store while it was read "
                f"(planned version {obj.version}, now {mine.version}); read it again"
            )

    def _wait(self, rnd: _Round, deadline: float, obj: StoreObject) -> None:
        if not rnd.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{obj.url}: no answer to a version check in {self.timeout_s:g} s")

    def waiting(self, obj: StoreObject) -> int:
        """How many callers wait for a round of ``obj`` that has not started yet (lets a
        test know its callers have arrived)."""
        with self._lock:
            slot = self._slots.get((obj.protocol, obj.path, obj.version))
            return slot.waiting.callers if slot is not None and slot.waiting is not None else 0

    def _run(self, fs: Any, obj: StoreObject, key: Tuple[str, str, str], slot: _Slot,
             mine: _Round) -> None:
        try:
            with self._lock:
                self.requests += 1
            ask = self._ask or underfs.current_version
            mine.version = ask(fs, obj.path)
        except BaseException as exc:  # noqa: BLE001 - every caller of this round gets it
            mine.error = exc
        finally:
            with self._lock:
                slot.running = None
                if slot.waiting is None and self._slots.get(key) is slot:
                    del self._slots[key]
            mine.done.set()


#: This process's checks (the worker's fetch threads share them).
CHECKS = VersionChecks()
