"""Read tasks on their units' owners' nodes: one read per node, joined with ``union``.

When a dataset must be read by read tasks on a cluster (a cold read, units not all in
memory, copies that would not fit), Ray Data places every read task with the same remote
arguments (``ReadTask`` has none of its own), so most blocks are made on a node other than
their owner's: bytes cross the network on the read, and again when a split consumer on the
owner's node asks for them. Ray Data does pin reads to a node with a ``label_selector``, so
:func:`plan` makes one read per owner node, over that node's units only, pinned there, and
joins them with ``union``:

- each read task asks the worker on its own node (a warm unit is a same-node object-store
  read, a cold one a store fetch that also fills that worker's tiers), and its blocks are
  made where the owner is (but for the few units moved to even the nodes' rows,
  :mod:`ray_cache.readers.placement`, read from their owner on another node), so ``streaming_split``'s locality hints (Ray Train passes them)
  match them;
- **every execution is placed so**: Ray Train re-executes the dataset every epoch, and an
  epoch after a cold first one reads every unit warm, on its owner's node, with no store
  request (``get_read_tasks`` runs again at every execution);
- the read tasks take no CPU (``num_cpus=0``: they wait on a worker, or on the store through
  it), so a pinned node never refuses one for want of resources (Ray Train's workers may
  hold every CPU there); at most as many run at once on a node as it has CPUs
  (``concurrency``): without that cap Ray Data starts them all at once, each in a new
  worker process (24 units on 2 nodes of one CPU: a cold read 4.5x slower, measured). Their fallback is any
  node (``fallback_strategy``): it is taken only when the pinned node is gone, and there the
  routing reads the lost owner's units from the store, counted as fallbacks. Blocks lost with
  a node are made again the same way (Ray's lineage re-runs their read task).

Not used when the caller passes Ray's own remote arguments (they say where reads go), a file
shuffle (one order per execution over all files), Ray Data's ``preserve_order`` (a union
yields its inputs one after another, not in file order), or when every owner is on the
driver's node (Ray's default placement is already local there).

Examples
--------
>>> import ray_cache  # doctest: +SKIP
>>> ds = ray_cache.read_parquet("s3://bucket/train/")  # cold, driver off the cache nodes  # doctest: +SKIP
>>> ds  # one pinned read per cache node, joined  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray

from ray_cache.cluster import hashing, membership
from ray_cache.cluster.membership import WorkerRef
from ray_cache.readers import placement
from ray_cache.store.keys import StoreObject
from ray_cache.store.parquet import Unit

#: Ray's label naming the node a task runs on.
NODE_LABEL = "ray.io/node-id"
#: Where a pinned read goes when its node is gone: any node.
ANYWHERE = [{"label_selector": {}}]


def owners_by_node(source: Any, workers: Sequence[WorkerRef]) -> Dict[str, List[Any]]:
    """The planned units of ``source`` (their ids), by the node that reads each: its
    owner's, evened out by rows (:func:`ray_cache.readers.placement.homes`)."""
    names = [w.name for w in workers]
    reqs = source.requests
    home = placement.homes([r.unit.num_rows for r in reqs],
                           [workers[hashing.owner(r.key.digest, names)].node_id for r in reqs],
                           [w.node_id for w in workers])
    return {node: [unit_id(reqs[i].obj, reqs[i].unit) for i in sorted(idx)] for node, idx in home.items()}


def unit_id(obj: StoreObject, unit: Unit) -> Tuple[str, str, int]:
    """What names one unit whatever columns are read: its object version and first row group."""
    return (obj.path, obj.version, unit.start)


def plan(source: Any, workers: Sequence[WorkerRef]) -> Optional["ray.data.Dataset"]:
    """One read per owner node, pinned there, joined; None where Ray's own placement will do."""
    if not workers or not source.num_units or source.shuffled or _ordered():
        return None
    by_node = owners_by_node(source, workers)
    if set(by_node) == {ray.get_runtime_context().get_node_id()}:
        return None
    cpus = {n["NodeID"]: int(n.get("Resources", {}).get("CPU", 0)) for n in membership.alive_nodes()}
    reads = [ray.data.read_datasource(source.restricted(ids), override_num_blocks=len(ids), num_cpus=0,
                                      concurrency=max(1, cpus.get(node, 1)),
                                      label_selector={NODE_LABEL: node}, fallback_strategy=ANYWHERE)
             for node, ids in sorted(by_node.items())]
    return reads[0] if len(reads) == 1 else reads[0].union(*reads[1:])


def _ordered() -> bool:
    """Whether Ray Data is asked to keep the blocks' order (``DataContext.execution_options``)."""
    return bool(ray.data.DataContext.get_current().execution_options.preserve_order)


__all__ = ["plan", "owners_by_node", "unit_id"]
