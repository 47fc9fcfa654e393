"""Where each unit's block is made on a cluster: its owner's node, evened out by rows.

Blocks made on their owners' nodes are node-local for a split consumer there, but
rendezvous hashing gives nodes unequal shares of a few units (24 units on 3 nodes: 9, 9
and 6 here), and Ray Train's ``streaming_split(equal=True)`` gives every consumer the same
number of rows, so a consumer on a node that holds less than its share takes the rest
from other nodes, on its critical path (the scale benchmark measured 75% local there).
:func:`homes` moves the fewest units it must from nodes above the even share to nodes
below it: such a unit's block is made on its new home (its bytes cross the network once,
while the dataset is made, the bytes the split would have moved anyway), and every
consumer can then read its whole share from its own node.

The owner does not change: a moved unit is still read through its owner (warm: a copy
from the owner's memory; cold: the owner fetches and caches it), only the block lands
elsewhere.

Examples
--------
>>> homes([10, 10, 10, 10], ["a", "a", "a", "b"])
{'a': [0, 1], 'b': [3, 2]}
>>> homes([10, 10], ["a", "a"])
{'a': [0, 1]}
>>> homes([10, 10], ["a", "a"], nodes=["a", "b"])
{'a': [0], 'b': [1]}
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from ray_cache.cluster import hashing


def homes(rows: Sequence[int], owner_nodes: Sequence[str], nodes: Sequence[str] = ()) -> Dict[str, List[int]]:
    """Unit positions by the node whose block each gets, starting from ``owner_nodes[i]``.

    ``rows[i]`` and ``owner_nodes[i]`` describe unit ``i``; the candidate homes are
    ``nodes`` (the cache nodes; a node that owns none of these units may still take some)
    and the owners' nodes. A unit moves from a node with the most rows to the one with the
    fewest while that lowers the larger of the two, the unit leaving them closest; a node
    that took units gives none away (nothing is moved twice), keeps its own in their
    order and takes moved ones after them. Nodes left with no unit are left out.
    """
    out: Dict[str, List[int]] = {node: [] for node in nodes}
    for i, node in enumerate(owner_nodes):
        out.setdefault(node, []).append(i)
    load = {node: sum(rows[i] for i in idx) for node, idx in out.items()}
    took, gave = set(), set()
    for _ in range(len(rows)):
        least = min(load, key=lambda n: (load[n], n in gave, n))
        tops = [n for n in load if load[n] == max(load.values()) and n not in took]
        gap = max(load.values()) - load[least]
        # one of its own units (a node that took units gives none away), the one leaving
        # the two closest (not overshooting their middle, of two as close)
        fits = [(n, i) for n in tops for i in out[n] if 0 < rows[i] < gap]
        if not fits:
            break
        most, unit = min(fits, key=lambda f: (abs(gap - 2 * rows[f[1]]), 2 * rows[f[1]] > gap, f[0], -f[1]))
        out[most].remove(unit)
        out[least].append(unit)
        took.add(least)
        gave.add(most)
        load[most] -= rows[unit]
        load[least] += rows[unit]
    return {node: idx for node, idx in out.items() if idx}


def of(requests: Sequence[Any], workers: Sequence[Any]) -> Dict[str, List[int]]:
    """:func:`homes` of planned units (``UnitRequest``) owned by rendezvous hashing over
    ``workers``, every worker's node a candidate."""
    names = [w.name for w in workers]
    return homes([r.unit.num_rows for r in requests],
                 [workers[hashing.owner(r.key.digest, names)].node_id for r in requests],
                 [w.node_id for w in workers])


__all__ = ["homes", "of"]
