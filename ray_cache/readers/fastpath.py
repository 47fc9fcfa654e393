"""Warm reads without read tasks: a dataset made straight from the cached objects.

When every unit of a read is in the memory tier, there is nothing to read: the blocks
already sit in the object store. Handing Ray Data those object refs (as
``ray.data.from_arrow_refs`` does, but with the metadata the workers already know, so no
metadata tasks run) makes iteration as fast as a materialized in-memory dataset, and
consumers get Ray's locality-aware scheduling for free.

The trade-off, stated plainly: those objects are owned by the worker actors. If a worker
dies while such a dataset is being iterated, Ray raises ``OwnerDiedError``; call
``read_parquet`` again (it falls back to the store) or pass ``zero_copy=False`` to get a
dataset whose read tasks fall back by themselves. The blocks also stay alive as long as
the dataset does, even if the cache evicts them meanwhile.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import ray


def dataset_from_refs(refs: Sequence[ray.ObjectRef], metas: Sequence[Any]) -> "ray.data.Dataset":
    """A materialized dataset over ``refs`` with known ``BlockMetadataWithSchema``.

    Uses Ray Data's internal ``FromArrow`` operator (pinned Ray 2.60.x); if that ever
    moves, falls back to the public ``from_arrow_refs`` (which recomputes metadata).
    """
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.from_operators import FromArrow
        from ray.data._internal.stats import DatasetStats
        from ray.data.context import DataContext
        from ray.data.dataset import MaterializedDataset
    except ImportError:  # pragma: no cover - depends on Ray's internals
        return ray.data.from_arrow_refs(list(refs))
    stats = DatasetStats(metadata={"FromArrow": list(metas)}, parent=None)
    context = DataContext.get_current().copy()
    plan = LogicalPlan(FromArrow(list(refs), list(metas)), context)
    return MaterializedDataset(plan, context, stats)


def try_zero_copy(requests: Sequence[Any], workers: Sequence[Any]) -> Optional["ray.data.Dataset"]:
    """The dataset from cached refs if every unit is in a worker's memory tier, else None."""
    from ray_cache.cluster import hashing

    names = [w.name for w in workers]
    if not names or not requests:
        return None
    by_owner = hashing.group([r.key.digest for r in requests], names)
    calls = {o: workers[o].handle.lookup.remote([requests[i].key.digest for i in idx])
             for o, idx in by_owner.items()}
    found: List[Any] = [None] * len(requests)
    try:
        for o, idx in by_owner.items():
            for i, item in zip(idx, ray.get(calls[o], timeout=30)):
                if item is None:
                    return None
                found[i] = item
    except Exception:  # noqa: BLE001 - any doubt: take the read-task path, which falls back
        return None
    return dataset_from_refs([item[0][0] for item in found], [item[1] for item in found])
