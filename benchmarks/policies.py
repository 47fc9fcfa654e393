"""Trace-driven comparison of the eviction policies (no Ray): hit ratios per policy and trace.

Each trace is a sequence of keys read through a tier that stores nothing (its byte
accounting and policy are the real ones, ``ray_cache.node.tiers``), with unit-sized
entries and a tier of ``--capacity`` entries, read as a cache worker reads: a hit
touches the key, a miss offers it. Belady's optimum (evict the key used furthest in the
future; a cache that may also decline to admit) is the bound no policy can beat.

Traces (``--capacity`` C):
- ``loop-1.5x``/``loop-2x``/``loop-4x``: epochs over 1.5C/2C/4C keys, reshuffled each epoch
  (training with shuffled file order); hit ratio from epoch 2 on.
- ``seq-2x``/``seq-4x``: the same, in the same order every epoch (Ray Data reading files
  in order); from epoch 2 on.
- ``fits``: epochs over 0.8C keys, shuffled: the working set fits; from epoch 2 on.
- ``switch``: 4 epochs over data set A (0.8C), then 4 over a new data set B (0.8C); hit
  ratio over B's epochs 2-4 (the first pass over B is cold for every policy).
- ``zipf``: 30C reads of 20C keys drawn by a Zipf law (s=0.9); hit ratio after a warm-up of 5C.

Usage: ``python benchmarks/policies.py [--capacity 500] [--epochs 6] [--seed 0]``
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import sys
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ray_cache.node.tiers.base import Tier  # noqa: E402
from ray_cache.node.tiers.policy import POLICIES  # noqa: E402


class CountingTier(Tier):
    """Accounting and policy only: no bytes are stored."""

    def _drop(self, key: str) -> None:
        pass


#: A trace: the keys read, and from which position on hits are counted.
Trace = Tuple[List[str], int]


def loop(c: int, factor: float, epochs: int, rng: random.Random, shuffle: bool = True) -> Trace:
    keys = [f"k{i}" for i in range(int(c * factor))]
    out: List[str] = []
    for _ in range(epochs):
        order = list(keys)
        if shuffle:
            rng.shuffle(order)
        out += order
    return out, len(keys)


def switch(c: int, epochs: int, rng: random.Random) -> Trace:
    a = [f"a{i}" for i in range(int(0.8 * c))]
    b = [f"b{i}" for i in range(int(0.8 * c))]
    out: List[str] = []
    for data in (a, b):
        for _ in range(4):
            order = list(data)
            rng.shuffle(order)
            out += order
    return out, 5 * len(a)


def zipf(c: int, rng: random.Random, s: float = 0.9) -> Trace:
    n = 20 * c
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    keys = [f"z{i}" for i in rng.choices(range(n), weights=weights, k=30 * c)]
    return keys, 5 * c


def hit_ratio(policy: str, trace: Trace, c: int) -> float:
    keys, start = trace
    tier = CountingTier(c, policy)
    hits = 0
    for i, k in enumerate(keys):
        if k in tier:
            tier.touch(k)
            hits += i >= start
        else:
            tier.reserve(k, 1)
    return hits / max(1, len(keys) - start)


def belady(trace: Trace, c: int) -> float:
    """The optimum: on a miss, keep the ``c`` keys whose next use comes soonest."""
    keys, start = trace
    nxt: List[int] = [0] * len(keys)
    last: Dict[str, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = last.get(keys[i], len(keys) + i)
        last[keys[i]] = i
    held: Dict[str, int] = {}
    heap: List[Tuple[int, str]] = []
    hits = 0
    for i, k in enumerate(keys):
        if k in held:
            hits += i >= start
        elif len(held) >= c:
            while heap and held.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)  # stale entries
            far, victim = -heap[0][0], heap[0][1]
            if far > nxt[i]:  # keep k only if it is needed before the furthest held key
                heapq.heappop(heap)
                del held[victim]
            else:
                continue
        held[k] = nxt[i]
        heapq.heappush(heap, (-nxt[i], k))
    return hits / max(1, len(keys) - start)


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    c, e = args.capacity, args.epochs
    traces: Dict[str, Callable[[random.Random], Trace]] = {
        "loop-1.5x": lambda r: loop(c, 1.5, e, r),
        "loop-2x": lambda r: loop(c, 2, e, r),
        "loop-4x": lambda r: loop(c, 4, e, r),
        "seq-2x": lambda r: loop(c, 2, e, r, shuffle=False),
        "seq-4x": lambda r: loop(c, 4, e, r, shuffle=False),
        "fits": lambda r: loop(c, 0.8, e, r),
        "switch": lambda r: switch(c, e, r),
        "zipf": lambda r: zipf(c, r),
    }
    policies = sorted(POLICIES)
    print(f"hit ratio (%), tier of {c} entries, {e} epochs, seed {args.seed}")
    print(f"| trace | {' | '.join(policies)} | belady (bound) | default - best |")
    print("|---" * (len(policies) + 3) + "|")
    default = Tier(1).policy.name
    worst_gap = 0.0
    for name, make in traces.items():
        trace = make(random.Random(args.seed))
        got = {p: 100 * hit_ratio(p, trace, c) for p in policies}
        gap = got[default] - max(got.values())
        worst_gap = min(worst_gap, gap)
        cells = " | ".join(f"{got[p]:.1f}" for p in policies)
        print(f"| {name} | {cells} | {100 * belady(trace, c):.1f} | {gap:+.1f} |")
    print(f"default policy: {default}; its largest shortfall against the best policy: {worst_gap:+.1f} points")


if __name__ == "__main__":
    main()
