"""The memory tier: decoded Arrow tables held in the Ray object store.

The worker ``ray.put``s each table and keeps the ``ObjectRef``; readers on the same node
map the object-store buffer without a copy. Objects are owned by the worker actor, so a
reader must be ready for ``OwnerDiedError`` if the worker dies (the client handles it).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import pyarrow as pa
import ray

from ray_cache.node.tiers.base import Tier


def block_metadata(table: pa.Table) -> Any:
    """Ray Data block metadata of a table, kept so warm reads need no metadata tasks."""
    from ray.data.block import BlockMetadataWithSchema

    return BlockMetadataWithSchema.from_block(table)


def node_store_used(node_id: str, timeout_s: float = 2.0) -> Optional[int]:
    """Bytes in use in the object store of node ``node_id`` (everything in it: memory
    tiers, datasets' blocks, anyone's objects), as its raylet counts them; None if it
    does not answer within ``timeout_s`` (one local RPC, ~3 ms)."""
    try:
        from ray.core.generated import node_manager_pb2

        stub = _raylet(node_id)
        reply = stub.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(include_memory_info=False),
                                  timeout=timeout_s)
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - Ray's internals moved, or the raylet is busy: unknown
        return None


@functools.lru_cache(maxsize=8)
def _raylet(node_id: str) -> Any:
    """A client of node ``node_id``'s raylet (Ray's own gRPC service, as ``ray memory`` uses)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import node_manager_pb2_grpc

    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    return node_manager_pb2_grpc.NodeManagerServiceStub(channel)


class MemoryTier(Tier):
    """Tables in the object store, within ``capacity`` bytes (``Table.nbytes``)."""

    name = "memory"

    def __init__(self, capacity: int, policy: str = "adaptive") -> None:
        super().__init__(capacity, policy)
        self._refs: Dict[str, ray.ObjectRef] = {}
        self._meta: Dict[str, Any] = {}

    def _drop(self, key: str) -> None:
        self._refs.pop(key, None)
        self._meta.pop(key, None)

    def lookup(self, key: str) -> Optional[Tuple[ray.ObjectRef, Any]]:
        """The entry's ref and block metadata (and a touch), or None on a miss."""
        with self.lock:
            ref = self._refs.get(key)
            if ref is None:
                return None
            self.policy.touch(key)
            return ref, self._meta.get(key)

    def get(self, key: str) -> Optional[ray.ObjectRef]:
        """The entry's object ref (and a touch), or None on a miss."""
        with self.lock:
            ref = self._refs.get(key)
            if ref is not None:
                self.policy.touch(key)
            return ref

    def put(self, key: str, table: pa.Table) -> Optional[ray.ObjectRef]:
        """Store ``table`` if the policy admits it; returns its ref either way.

        A table the tier cannot hold is still put in the object store for this one
        reader (the caller's borrowed ref keeps it alive), just not retained.
        """
        ref = ray.put(table)
        meta = block_metadata(table)
        with self.lock:
            if self.reserve(key, table.nbytes):
                self._refs[key] = ref
                self._meta[key] = meta
        return ref
