"""Read tasks on their blocks' nodes: one read per node, joined with ``union``.

When a dataset must be read by read tasks on a cluster (a cold read, units not all in
memory, copies that would not fit), Ray Data places every read task with the same remote
arguments (``ReadTask`` has none of its own), so most blocks are made on a node other than
their owner's: bytes cross the network on the read, and again when a split consumer on the
owner's node asks for them. Ray Data does pin reads to a node with a ``label_selector``, so
:func:`plan` makes one read per node, over the units whose blocks belong there (their
owners' nodes, evened out by rows: :mod:`ray_cache.readers.placement`), pinned there, and
joins them with ``union``:

- each read task asks the worker on its own node (a warm unit is a same-node object-store
  read, a cold one a store fetch that also fills that worker's tiers; the few units moved
  to even the rows out are read from their owner on another node), and its blocks are made
  on that node, so ``streaming_split``'s locality hints (Ray Train passes them) match them;
- **every execution is placed so**: Ray Train re-executes the dataset every epoch, and an
  epoch after a cold first one reads every unit warm, on its node, with no store request
  (``get_read_tasks`` runs again at every execution);
- the read tasks take no CPU (``num_cpus=0``: they wait on a worker, or on the store through
  it), so a pinned node never refuses one for want of resources (Ray Train's workers may
  hold every CPU there); at most as many run at once on a node as it has CPUs
  (``concurrency``): without that cap Ray Data starts them all at once, each in a new
  worker process (24 units on 2 nodes of one CPU: a cold read 4.5x slower, measured);
- a node's units are cut into read tasks as the warm copies are (a task per chain, each up
  to ``TASK_BYTES``), and each task yields its units as one block: Ray Data pays per read
  task and per block (an epoch of 24 warm units on 2 nodes: 0.74-0.86 s as 24 tasks and
  blocks, 0.25-0.34 s as 2), and the owner reads a task's units in parallel anyway;
- their fallback is any node (``fallback_strategy``): it is taken only when the pinned node
  is gone, and there the routing reads the lost owner's units from the store, counted as
  fallbacks. Blocks lost with a node are made again the same way (Ray's lineage re-runs
  their read task).

Not used when the caller passes Ray's own remote arguments (they say where reads go), a file
shuffle (one order per execution over all files), Ray Data's ``preserve_order`` (a union
yields its inputs one after another, not in file order), or when every block belongs on the
driver's node (Ray's default placement is already local there).

Examples
--------
>>> import ray_cache  # doctest: +SKIP
>>> ds = ray_cache.read_parquet("s3://bucket/train/")  # cold, driver off the cache nodes  # doctest: +SKIP
>>> ds  # one pinned read per cache node, joined  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ray

from ray_cache.cluster import membership
from ray_cache.cluster.membership import WorkerRef
from ray_cache.readers import nodecopies, placement
from ray_cache.readers.datasource import unit_id

#: Ray's label naming the node a task runs on.
NODE_LABEL = "ray.io/node-id"
#: Where a pinned read goes when its node is gone: any node.
ANYWHERE = [{"label_selector": {}}]


def plan(source: Any, workers: Sequence[WorkerRef]) -> Optional["ray.data.Dataset"]:
    """One read per owner node, pinned there, joined; None where Ray's own placement will do."""
    if not workers or not source.num_units or source.shuffled or _ordered():
        return None
    reqs = source.requests
    by_node = placement.of(reqs, workers)
    if set(by_node) == {ray.get_runtime_context().get_node_id()}:
        return None
    resources = membership.node_resources()
    sizes = [r.unit.nbytes for r in reqs]
    reads = []
    for node, idx in sorted(by_node.items()):
        cpus = max(1, int(resources.get(node, {}).get("CPU", 1)))
        tasks = nodecopies.cut(sorted(idx), sizes, cpus)  # as the warm copies are cut
        reads.append(ray.data.read_datasource(
            source.restricted([unit_id(reqs[i].obj, reqs[i].unit) for i in idx], whole=True),
            override_num_blocks=len(tasks), num_cpus=0, concurrency=cpus,
            label_selector={NODE_LABEL: node}, fallback_strategy=ANYWHERE))
    return reads[0] if len(reads) == 1 else reads[0].union(*reads[1:])


def _ordered() -> bool:
    """Whether Ray Data is asked to keep the blocks' order (``DataContext.execution_options``)."""
    return bool(ray.data.DataContext.get_current().execution_options.preserve_order)


__all__ = ["plan"]
