"""Which worker owns a key: rendezvous (highest-random-weight) hashing.

Every process computes the same owner from the same worker names (no per-process salted
``hash()``), and when a worker joins or leaves only the keys it wins or held move:
about 1/N of them.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, TypeVar

T = TypeVar("T")


def _score(key: str, member: str) -> int:
    digest = hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(key: str, members: Sequence[str]) -> int:
    """Index in ``members`` of the member that owns ``key``.

    Examples
    --------
    >>> members = ["node-a", "node-b", "node-c"]
    >>> owner("k1", members) == owner("k1", list(members))
    True
    >>> owner("k1", ["only"])
    0
    """
    if not members:
        raise ValueError("no members to own a key")
    best, best_score = 0, -1
    for i, m in enumerate(members):
        s = _score(key, m)
        if s > best_score:
            best, best_score = i, s
    return best


def group(keys: Sequence[str], members: Sequence[str]) -> Dict[int, List[int]]:
    """Positions in ``keys`` by the index of the member that owns each, in key order.

    >>> g = group(["a", "b", "c"], ["only"])
    >>> g
    {0: [0, 1, 2]}
    """
    out: Dict[int, List[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(owner(key, members), []).append(i)
    return out


def rank(key: str, members: Sequence[str]) -> list:
    """Member indices in preference order for ``key`` (owner first, then fallbacks)."""
    return sorted(range(len(members)), key=lambda i: _score(key, members[i]), reverse=True)
