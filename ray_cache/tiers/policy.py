"""Eviction policies behind one small interface, registered by name.

A policy only orders keys; the tier owns bytes and capacity. A tier calls ``touch`` on
every hit, ``admit`` before storing a new entry and ``victims`` when it needs room.
Policies are not thread-safe on their own: the tier that owns one holds its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Iterator, Type


class EvictionPolicy:
    """Base class: the order in which a tier gives up entries."""

    name = "base"

    def touch(self, key: str) -> None:
        """Record a use of ``key`` (an insert or a hit)."""
        raise NotImplementedError

    def remove(self, key: str) -> None:
        """Forget ``key`` (it was evicted or dropped)."""
        raise NotImplementedError

    def victims(self) -> Iterator[str]:
        """Keys in the order they should be evicted, first victim first."""
        raise NotImplementedError

    def admit(self, key: str, nbytes: int, free: int, capacity: int) -> bool:
        """Whether a new entry should enter the tier at all (default: if it fits)."""
        return nbytes <= capacity


class LRUPolicy(EvictionPolicy):
    """Least recently used first.

    Simple and right for working sets that fit; a scan larger than the tier evicts
    everything (see the scan-resistant policy in a later issue).

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


#: Registered policies by name.
POLICIES: Dict[str, Type[EvictionPolicy]] = {LRUPolicy.name: LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """Instantiate a registered policy, or ``ValueError`` naming the known ones."""
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


__all__: list = ["EvictionPolicy", "LRUPolicy", "POLICIES", "make_policy", "register_policy"]
