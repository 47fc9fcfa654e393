"""Eviction policies behind one small interface, registered by name.

A policy only orders keys (and may refuse new ones); the tier owns bytes and capacity.
The tier calls, under its own lock:

- ``touch(key)`` on every hit of a resident key (and when it re-indexes one);
- ``admit(key, nbytes, free, capacity, victims=...)`` on every attempt to store a new
  key, with the resident keys that would be evicted to make room for it;
- ``insert(key)`` once an admitted key is stored;
- ``victims()`` when it needs room, and ``remove(key)`` when a key leaves.

Three policies are registered in :data:`POLICIES`:

``"adaptive"`` (the default)
    TinyLFU while the cached set is in use, LRU's quick replacement once it has gone
    cold (:class:`AdaptivePolicy`). Within 0.1 points of the best of the three on every
    trace of ``benchmarks/policies.py`` at 300 and 2,000 entries (BENCHMARKS.md).
``"lru"``
    Least recently used first. Right when the working set fits: a new data set replaces
    an old one at once. A repeated scan larger than the tier evicts every entry before
    its next use, so each epoch misses everything.
``"tinylfu"``
    LRU order plus TinyLFU admission (Einziger, Friedman and Manes, 2017): when the tier
    is full, a new key enters only if it was used clearly more often (by ``min_lead``
    accesses, 3 by default) than every key it would evict; otherwise the incumbents
    stay. Repeated epochs over a data set larger than the tier then keep a stable
    subset cached (hit ratio near capacity / size, like CoorDL's "MinIO" policy),
    sequential or shuffled, instead of churning. Frequencies count hits *and* insert
    attempts (a miss is an access), are capped at 15 and halved every ``window``
    recorded accesses, so a new working set displaces an old one after a few passes.
    The price: while the tier is full, a data set read for the first time is served
    but not cached (that is the scan resistance).

Policies are not thread-safe on their own: the tier that owns one holds its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Sequence, Type


class EvictionPolicy:
    """Base class: which new keys enter a tier, and the order in which entries leave."""

    name = "base"

    def touch(self, key: str) -> None:
        """Record a use of ``key`` (a hit); a key not known yet becomes resident."""
        raise NotImplementedError

    def insert(self, key: str) -> None:
        """Record that an admitted ``key`` is now stored (default: a :meth:`touch`)."""
        self.touch(key)

    def remove(self, key: str) -> None:
        """Forget ``key`` as resident (it was evicted or dropped)."""
        raise NotImplementedError

    def victims(self) -> Iterator[str]:
        """Resident keys in the order they should be evicted, first victim first.

        A snapshot: the tier may remove keys while iterating.
        """
        raise NotImplementedError

    def admit(
        self, key: str, nbytes: int, free: int, capacity: int, victims: Sequence[str] = ()
    ) -> bool:
        """Whether a new entry may enter the tier (default: if it fits at all).

        Parameters
        ----------
        key : str
            The new entry.
        nbytes : int
            Its size.
        free : int
            Bytes free in the tier now.
        capacity : int
            The tier's capacity.
        victims : sequence of str
            The resident keys the tier would evict to make room (empty if it fits).
        """
        return nbytes <= capacity


class LRUPolicy(EvictionPolicy):
    """Least recently used first.

    Simple and right for working sets that fit; a repeated scan larger than the tier
    evicts every entry before its next use (see :class:`TinyLFUPolicy`).

    Examples
    --------
    >>> p = LRUPolicy()
    >>> for k in "abc": p.touch(k)
    >>> p.touch("a")
    >>> list(p.victims())
    ['b', 'c', 'a']
    """

    name = "lru"

    def __init__(self) -> None:
        self._order: "OrderedDict[str, None]" = OrderedDict()

    def touch(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter(list(self._order))


class TinyLFUPolicy(LRUPolicy):
    """LRU eviction order behind a TinyLFU admission filter: scan-resistant.

    A new key is admitted when it fits in free space, or when its access frequency
    (this attempt included) is at least ``min_lead`` higher than that of every key it
    would evict; otherwise the incumbents stay. Why a lead of 3, not 1: two keys read
    once per epoch can differ by one access through timing alone (in a shuffled epoch
    one was read already, the other not yet), and by one more through aging (a halving
    in mid-epoch rounds down one that was read before it and not the other). Admitting
    on such leads makes repeated epochs churn: about 15% hits instead of 50% with a
    lead of 1 on shuffled epochs over twice the tier's size, about 30% with a lead of 2
    when the aging period is not a whole number of epochs (``tests/test_policy.py``
    checks a lead of 3 holds). Frequencies are exact counts per key, capped at
    ``max_count``, and all halved (dropping those that reach zero) after every
    ``window`` recorded accesses, where ``window`` is ``window_factor`` times the number
    of resident keys (at least ``min_window``): old popularity fades, so memory stays
    bounded by the keys seen in the last couple of windows.

    Parameters
    ----------
    window_factor : int
        Accesses per aging period, per resident key (Caffeine uses 10).
    min_window : int
        Smallest aging period, for tiers holding few keys.
    max_count : int
        Saturation of a key's count (4 bits, as in Caffeine's sketch).
    min_lead : int
        How many more accesses than each would-be victim a new key needs to enter.

    Examples
    --------
    A scan of four keys over a tier with room for two keeps the first two:

    >>> p = TinyLFUPolicy()
    >>> resident = []
    >>> for epoch in range(3):
    ...     for k in "abcd":
    ...         if k in resident:
    ...             p.touch(k)
    ...         elif len(resident) < 2:
    ...             assert p.admit(k, 1, 1, 2)
    ...             p.insert(k); resident.append(k)
    ...         else:
    ...             assert not p.admit(k, 1, 0, 2, victims=list(p.victims())[:1])
    >>> resident
    ['a', 'b']
    >>> p.frequency("a"), p.frequency("c")
    (3, 3)
    """

    name = "tinylfu"

    def __init__(
        self, window_factor: int = 10, min_window: int = 1024, max_count: int = 15, min_lead: int = 3
    ) -> None:
        super().__init__()
        if min(window_factor, min_window, max_count, min_lead) < 1:
            raise ValueError("window_factor, min_window, max_count and min_lead must be positive")
        self.min_lead = min_lead
        self.window_factor = window_factor
        self.min_window = min_window
        self.max_count = max_count
        self._counts: Dict[str, int] = {}
        self._events = 0
        #: How many times the counts were halved (for tests and status).
        self.agings = 0

    # -- frequencies -----------------------------------------------------------------
    def frequency(self, key: str) -> int:
        """Recorded accesses of ``key`` (hits and insert attempts), after aging."""
        return self._counts.get(key, 0)

    @property
    def window(self) -> int:
        """Recorded accesses between two halvings of all counts."""
        return max(self.min_window, self.window_factor * len(self._order))

    def _record(self, key: str) -> None:
        count = self._counts.get(key, 0)
        if count < self.max_count:
            self._counts[key] = count + 1
        self._events += 1
        if self._events >= self.window:
            self._age()

    def _age(self) -> None:
        self._counts = {k: c >> 1 for k, c in self._counts.items() if c > 1}
        self._events = 0
        self.agings += 1

    # -- the policy ------------------------------------------------------------------
    def touch(self, key: str) -> None:
        self._record(key)
        super().touch(key)

    def insert(self, key: str) -> None:
        # The attempt was counted by ``admit``; storing it is not another access.
        LRUPolicy.touch(self, key)

    def admit(
        self, key: str, nbytes: int, free: int, capacity: int, victims: Sequence[str] = ()
    ) -> bool:
        self._record(key)
        if nbytes > capacity:
            return False
        if nbytes <= free or not victims:
            return True
        mine = self._counts.get(key, 0)
        return all(mine >= self._counts.get(v, 0) + self.min_lead for v in victims)


class AdaptivePolicy(TinyLFUPolicy):
    """TinyLFU's scan resistance while the cached set is in use; LRU's quick replacement
    once it has gone cold. The default: it needs no knowledge of the workload.

    TinyLFU alone keeps what it holds even after the job moved to another data set: the
    old entries' counts stay high, so the new data set is served from the store for
    several passes. LRU alone churns on repeated epochs over more than the tier holds. The
    difference between the two situations is visible: after a switch the entries held get
    **no hits at all**, while in repeated epochs they keep getting some. So this policy
    counts the misses since the last hit; after a run of ``min(min_cold, resident / 4)``
    of them (at least 4) the resident set is taken to be cold, and a key not seen in the
    last two aging periods is admitted as LRU would admit it, evicting the least recently
    used; new keys refused earlier in that run get in at their next read. Keys seen before
    still need TinyLFU's lead, so a repeated scan (whose keys are all seen from its second
    pass on) stays stable; the first hit ends the cold spell.

    Examples
    --------
    A data set replaced by another is taken in within one pass (the first few of its
    keys, read before the old set counted as cold, come in at their next read):

    >>> from ray_cache.node.tiers.base import Tier
    >>> class Counting(Tier):
    ...     def _drop(self, key): pass
    >>> tier = Counting(8, "adaptive")
    >>> def read(k):
    ...     hit = k in tier
    ...     _ = tier.touch(k) if hit else tier.reserve(k, 1)
    ...     return hit
    >>> old, new = [f"old{i}" for i in range(8)], [f"new{i}" for i in range(8)]
    >>> for _ in range(5):
    ...     _ = [read(k) for k in old]
    >>> [sum(read(k) for k in new) for _ in range(3)]  # hits per pass over the new set
    [0, 4, 8]
    """

    name = "adaptive"

    def __init__(self, min_cold: int = 16, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.min_cold = min_cold
        self._misses = 0  # admission attempts since the last hit
        self._seen_now: set = set()  # keys met in this aging period ...
        self._seen_last: set = set()  # ... and in the one before
        self._refused_new: List[str] = []  # new keys refused since the last hit
        self._late: set = set()  # ... admitted at their next attempt, once that run went cold

    def _record(self, key: str) -> None:
        self._seen_now.add(key)
        super()._record(key)

    def _age(self) -> None:
        super()._age()
        self._seen_last, self._seen_now = self._seen_now, set()

    def touch(self, key: str) -> None:
        self._misses = 0
        self._refused_new.clear()
        super().touch(key)

    def admit(
        self, key: str, nbytes: int, free: int, capacity: int, victims: Sequence[str] = ()
    ) -> bool:
        new = key not in self._seen_now and key not in self._seen_last
        self._misses += 1
        if super().admit(key, nbytes, free, capacity, victims):
            self._late.discard(key)
            return True
        if nbytes > capacity:
            return False
        if key in self._late:
            self._late.discard(key)
            return True
        if self._misses > max(4, min(self.min_cold, len(self._order) // 4)):  # the held set is cold
            self._late.update(self._refused_new)  # new keys of this run refused before it was known
            self._refused_new.clear()
            return new
        if new and len(self._refused_new) < self.min_cold:
            self._refused_new.append(key)
        return False


#: Registered policies by name.
POLICIES: Dict[str, Type[EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
    TinyLFUPolicy.name: TinyLFUPolicy,
    AdaptivePolicy.name: AdaptivePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    """Instantiate a registered policy, or ``ValueError`` naming the known ones.

    Examples
    --------
    >>> make_policy("tinylfu").name
    'tinylfu'
    """
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None


def register_policy(cls: Type[EvictionPolicy]) -> Type[EvictionPolicy]:
    """Class decorator adding a policy to :data:`POLICIES` under ``cls.name``."""
    POLICIES[cls.name] = cls
    return cls


__all__: list = [
    "EvictionPolicy", "LRUPolicy", "TinyLFUPolicy", "AdaptivePolicy", "POLICIES", "make_policy", "register_policy",
]
