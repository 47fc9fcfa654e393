"""The multi-node warm path: driver-owned copies of the cached blocks, made on their nodes.

When the driver is not on the cache nodes (a head node without GPUs, a notebook, Ray
Train's controller), a dataset over the workers' own object refs would fail as soon as a
worker died (``OwnerDiedError``: nothing in Ray Data catches it), and read tasks placed by
Ray Data move most bytes across nodes and re-run every epoch. Instead, for each node one or
a few copy tasks are pinned (softly) to it; each asks that node's worker for its units
(:func:`ray_cache.cluster.routing.read_units`) and returns them. (A node holding more than
its even share of rows hands the fewest units it must to nodes holding less,
:mod:`ray_cache.readers.placement`: their copies are made there from the owner's memory.)
A value a task returns is stored on the node that ran it and owned by the caller, so:

- the blocks sit on their owners' nodes, and Ray knows where (``streaming_split``'s
  locality hints, as Ray Train passes them, match them without an RPC);
- they outlive the worker that served them: a worker killed mid-iteration costs nothing;
- a node lost mid-epoch loses its copies, and Ray re-runs their copy task (lineage) on a
  live node, where the dead worker's units come from the store, counted as fallbacks;
- the dataset is materialized: every epoch iterates the same blocks, no read task runs.

Memory cost, stated plainly: while the dataset lives, the copies take as many object-store
bytes as the rows read (next to the memory tier's own). It is taken only when, on every
node, the bytes already in its object store (as its raylet counts them: the memory tier, the
copies of datasets still alive, anything else) plus the new copies fit in ``COPY_FRACTION``
of it, so the copies never make Ray spill; otherwise :func:`plan` returns None and the read
uses read tasks, whose memory Ray Data's backpressure bounds. The copies are released when
the dataset (and every dataset derived from it) is dropped.

A new read of the same units (the same objects at the same versions, the same columns, the
same workers, the same order) while a dataset made by an earlier read still lives takes that
dataset's blocks instead of copying again (``_LIVE``): a loop or a notebook cell that calls
``read_parquet`` again holds one set of copies, not two, and iterating the new dataset on a
node that already pulled those blocks reads them there. The blocks are the same immutable
objects, so both datasets read the same rows; they are released when the last dataset that
holds them is dropped (the registry holds them weakly). A dataset derived from the first
(``ds.map(...)``) holds its blocks but not the registry's record: a new read then copies anew.

Blocks: each copy task returns its units as one block (up to ``TASK_BYTES``), since Ray
Data's cost of iterating is per block as much as per byte. Blocks are dealt round-robin
over the nodes that hold them (file order within a node), so a split's consumers find
blocks of their own node all along; Ray Data does not promise file order across read tasks
either. With Ray Data's ``preserve_order`` set when the dataset is made, there is one block
per unit, in file order, as Ray's own read gives them.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_cache.cluster import hashing, membership, routing
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.readers import placement, shaping

#: Share of a node's object store that the memory tier and the copies may take together.
COPY_FRACTION = 0.7
#: Bytes of units one copy task returns, at most, as one block (less where a node's rows
#: are cut into a chunk per chain). Bigger blocks cost Ray Data less per row to iterate;
#: smaller ones let iteration start sooner, make a lost node re-run less, and give
#: ``streaming_split``'s equal split whole blocks to hand out (a block it must cut is cut
#: by a task that may run on another node).
TASK_BYTES = 64 << 20
#: Copy tasks running at once on one node, at most: each runs in a worker process of its
#: own (they take no CPU, so Ray would start a process for every one of them at once: 12
#: per node made a warm read of 24 units 3-10x slower here), so a node's tasks form this
#: many chains (fewer where the node has fewer CPUs), each task waiting for the one before.
CHAINS = 4


class _Copies:
    """The blocks one :func:`plan` made (refs and metadata, in dataset order); the datasets
    made over them hold it, :data:`_LIVE` only weakly."""

    __slots__ = ("refs", "metas", "__weakref__")

    def __init__(self, refs: Sequence[Any], metas: Sequence[Any]) -> None:
        self.refs, self.metas = list(refs), list(metas)


#: The copies of datasets still alive in this process, by what they hold (see the module
#: docstring): ``(unit digests, worker names and nodes, preserve_order)``.
_LIVE: "weakref.WeakValueDictionary[Tuple[Any, ...], _Copies]" = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def _dataset(copies: _Copies) -> "ray.data.Dataset":
    from ray_cache.readers.fastpath import dataset_from_refs

    ds = dataset_from_refs(copies.refs, copies.metas)
    ds._ray_cache_copies = copies  # keeps the record alive exactly as long as this dataset
    return ds


def _copy_here(fs: Any, requests: Sequence[Any], workers: Sequence[WorkerRef], after: Any = None,
               whole: bool = True) -> Any:
    """The tables of ``requests``, read through their owners: one block of them all
    (``whole``) or one per request; and a last, empty return that the next copy task of the
    same chain waits for (``after``: that of the task before it, resolved by Ray first)."""
    tables = list(routing.read_units(fs, requests, workers))
    if whole:  # one contiguous block (shaping.one_block): one object to store and move
        return shaping.one_block(tables), None
    return (*tables, None)


_copy_task = ray.remote(num_cpus=0, max_retries=3)(_copy_here)


def chains_on(cpus: float) -> int:
    """Copy (or read) tasks a node runs at once: ``CHAINS``, fewer where it has fewer CPUs."""
    return max(1, min(CHAINS, int(cpus)))


def cut(items: Sequence[int], sizes: Sequence[int], cpus: float) -> List[List[int]]:
    """A node's units (``items``, indexes into ``sizes``) cut into the tasks that make its
    blocks: consecutive runs of at most ``TASK_BYTES``, and at least one run per chain
    where there are units enough (each run one block)."""
    limit = max(1, min(TASK_BYTES, -(-sum(sizes[i] for i in items) // chains_on(cpus))))
    out: List[List[int]] = [[]]
    total = 0
    for i in items:
        if out[-1] and total + sizes[i] > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += sizes[i]
    return [c for c in out if c]


def _joined(metas: Sequence[Any]) -> Any:
    """The block metadata of the concatenation of blocks described by ``metas``."""
    files = [f for m in metas for f in (m.input_files or ())]
    return dataclasses.replace(metas[0], num_rows=sum(m.num_rows or 0 for m in metas),
                               size_bytes=sum(m.size_bytes or 0 for m in metas),
                               input_files=tuple(dict.fromkeys(files)) or None)


def plan(fs: Any, requests: Sequence[Any], workers: Sequence[WorkerRef]) -> Optional["ray.data.Dataset"]:
    """A materialized dataset over node-local copies, or None where the path does not apply.

    It applies when every unit is in its owner's memory tier and the copies fit (see the
    module docstring); any doubt (a worker not answering, a unit evicted) returns None and
    the caller plans read tasks, which fall back to the store by themselves.
    """
    names = [w.name for w in workers]
    if not names or not requests:
        return None
    ordered = ray.data.DataContext.get_current().execution_options.preserve_order
    key = (tuple(r.key.digest for r in requests), tuple((w.name, w.node_id) for w in workers), ordered)
    with _LIVE_LOCK:
        alive = _LIVE.get(key)
    if alive is not None:  # a dataset over these very units still lives: share its blocks
        return _dataset(alive)
    by_owner = hashing.group([r.key.digest for r in requests], names)
    calls = {o: workers[o].handle.warm_metas.remote([requests[i].key.digest for i in idx])
             for o, idx in by_owner.items()}
    metas: List[Any] = [None] * len(requests)
    used: Dict[int, int] = {}
    try:
        for o, idx in by_owner.items():
            found, used[o] = ray.get(calls[o], timeout=WORKER_TIMEOUT_S)
            for i, meta in zip(idx, found):
                if meta is None:
                    return None
                metas[i] = meta
        resources = membership.node_resources()
    except Exception:  # noqa: BLE001 - any doubt: read tasks, which fall back by themselves
        return None
    sizes = [int(m.size_bytes or 0) for m in metas]
    used_on: Dict[str, int] = {}  # each worker reports its whole node's object store
    for o in by_owner:
        used_on[workers[o].node_id] = max(used_on.get(workers[o].node_id, 0), used[o])
    home = placement.of(requests, workers)
    for node, idx in home.items():
        room = COPY_FRACTION * resources.get(node, {}).get("object_store_memory", 0) - used_on.get(node, 0)
        if sum(sizes[i] for i in idx) > room:
            return None
    # File order (one block per unit) where Ray Data is asked to keep order; otherwise one
    # block per copy task: Ray Data pays per block it iterates (24 blocks of 2.8 MB took
    # 0.06 s where one of the same rows took 0.025 s), and a block is never split across
    # nodes. A node's rows are cut into at least one chunk per chain.
    blocks: Dict[str, List[Tuple[int, Any, Any]]] = {}  # by node: (first unit, ref, meta)
    for node, idx in home.items():
        where = NodeAffinitySchedulingStrategy(node, soft=True)
        cpus = resources.get(node, {}).get("CPU", 1)
        chains: List[Any] = [None] * chains_on(cpus)
        for n, chunk in enumerate(cut(sorted(idx), sizes, cpus)):
            one = not ordered
            *out, chains[n % len(chains)] = _copy_task.options(
                num_returns=2 if one else len(chunk) + 1, scheduling_strategy=where).remote(
                fs, [requests[i] for i in chunk], workers, chains[n % len(chains)], one)
            made = [(chunk[0], out[0], _joined([metas[i] for i in chunk]))] if one else \
                [(i, ref, metas[i]) for i, ref in zip(chunk, out)]
            blocks.setdefault(node, []).extend(made)
    if ordered:
        order = sorted(b for node in blocks for b in blocks[node])
    else:
        order = _round_robin([blocks[node] for node in sorted(blocks)])
    copies = _Copies([ref for _, ref, _ in order], [meta for _, _, meta in order])
    with _LIVE_LOCK:
        _LIVE[key] = copies
    return _dataset(copies)


def _round_robin(groups: Sequence[Sequence[Any]]) -> List[Any]:
    """One from each group in turn, each group in its own order.

    >>> _round_robin([[0, 2, 4], [1], [3, 5]])
    [0, 1, 3, 2, 5, 4]
    """
    missing = object()
    return [i for row in itertools.zip_longest(*groups, fillvalue=missing) for i in row if i is not missing]


__all__ = ["plan", "cut", "chains_on", "COPY_FRACTION", "TASK_BYTES"]

