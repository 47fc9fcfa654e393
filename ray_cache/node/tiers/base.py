"""Byte accounting shared by the tiers: capacity, usage, admission and choosing victims.

Thread-safe: a worker serves several requests at once, so every method takes the
tier's lock. Usage never exceeds capacity: an entry is accounted for before it is
stored, and an entry larger than the whole tier is refused.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional

from ray_cache.node.tiers.policy import EvictionPolicy, make_policy


class Tier:
    """Capacity bookkeeping for one tier; subclasses hold the bytes.

    Subclasses implement ``_drop(key)`` to free an entry's storage when evicted.
    """

    name = "tier"

    def __init__(self, capacity: int, policy: str = "adaptive") -> None:
        self.capacity = int(capacity)
        self.policy: EvictionPolicy = make_policy(policy)
        self.sizes: Dict[str, int] = {}
        self.used = 0
        self.evictions = 0
        self.pinned: set = set()
        self.lock = threading.RLock()
        #: Called with each key that leaves (evicted or removed), under the lock.
        self.on_remove: Callable[[str], None] = lambda key: None

    # -- storage hooks -------------------------------------------------------------
    def _drop(self, key: str) -> None:
        raise NotImplementedError

    # -- accounting ----------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        with self.lock:
            return key in self.sizes

    def __len__(self) -> int:
        with self.lock:
            return len(self.sizes)

    def touch(self, key: str) -> None:
        with self.lock:
            if key in self.sizes:
                self.policy.touch(key)

    @property
    def pinned_bytes(self) -> int:
        with self.lock:
            return sum(self.sizes.get(k, 0) for k in self.pinned)

    def pin(self, keys) -> None:
        """Never evict ``keys`` (those present) until :meth:`unpin`."""
        with self.lock:
            self.pinned.update(k for k in keys if k in self.sizes)

    def unpin(self, keys) -> None:
        with self.lock:
            self.pinned.difference_update(keys)

    def reserve(self, key: str, nbytes: int) -> bool:
        """Make room for ``nbytes`` and account for ``key``; False if it cannot enter.

        The policy sees every attempt (``admit``, with the keys that would be evicted
        for it) and may refuse it. Room is made only from unpinned entries: a new entry
        never evicts a pinned one.
        """
        with self.lock:
            if key in self.sizes:
                self.policy.touch(key)
                return True
            victims = self._victims_for(nbytes)
            admitted = self.policy.admit(
                key, nbytes, self.capacity - self.used, self.capacity, victims=victims or ()
            )
            if not admitted or victims is None:
                return False
            for victim in victims:
                self.remove(victim)
                self.evictions += 1
            self.sizes[key] = nbytes
            self.used += nbytes
            self.policy.insert(key)
            return True

    def _victims_for(self, nbytes: int) -> Optional[List[str]]:
        # The unpinned keys, in the policy's order, whose eviction makes room for
        # ``nbytes``; None when even evicting all of them would not.
        if nbytes > self.capacity:
            return None
        need = self.used + nbytes - self.capacity
        chosen: List[str] = []
        if need <= 0:
            return chosen
        for victim in self.policy.victims():
            if victim in self.sizes and victim not in self.pinned:
                chosen.append(victim)
                need -= self.sizes[victim]
                if need <= 0:
                    return chosen
        return None

    def remove(self, key: str) -> Optional[int]:
        """Forget and drop ``key``; returns its size, or None if absent."""
        with self.lock:
            nbytes = self.sizes.pop(key, None)
            if nbytes is None:
                return None
            self.pinned.discard(key)
            self.used -= nbytes
            self.policy.remove(key)
            self._drop(key)
            self.on_remove(key)
            return nbytes

    def resize(self, capacity: int) -> List[str]:
        """Change capacity at run time, evicting what no longer fits (never pins)."""
        with self.lock:
            if capacity < self.pinned_bytes:
                raise ValueError(
                    f"{self.name} capacity {capacity} is below the {self.pinned_bytes} bytes "
                    "pinned there; unpin first"
                )
            self.capacity = int(capacity)
            return self._evict_until(self.capacity)

    def _evict_until(self, limit: int) -> List[str]:
        evicted: List[str] = []
        if self.used <= limit:
            return evicted
        for victim in self.policy.victims():
            if self.used <= limit:
                break
            if victim in self.sizes and victim not in self.pinned:
                self.remove(victim)
                self.evictions += 1
                evicted.append(victim)
        return evicted
