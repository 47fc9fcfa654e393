"""Which nodes get cache workers; starting, finding and listing those workers.

Workers are named (``worker-<node id>``), detached actors in the ``ray_cache``
namespace, pinned to their node with a hard node-affinity strategy, taking no CPU or
GPU. A new driver attaches to them by name; Ray itself is the membership service.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_cache.cluster import forks
from ray.exceptions import GetTimeoutError

from ray_cache.config import (
    WORKER_TIMEOUT_S,
    MEMORY_FRACTION,
    NAMESPACE,
    WorkerConfig,
    default_disk_dir,
    validate_disk_dir,
)

log = logging.getLogger("ray_cache.cluster.membership")

#: How ``start(nodes=...)`` may choose cache nodes.
NODE_SELECTORS = ("auto", "all", "gpu")


@dataclass(frozen=True)
class WorkerRef:
    """A live worker: its node and its actor handle."""

    node_id: str
    name: str
    handle: Any


def worker_name(node_id: str) -> str:
    return f"worker-{node_id}"


def alive_nodes() -> List[Dict[str, Any]]:
    """The cluster's alive nodes (one request to Ray's GCS)."""
    return [n for n in ray.nodes() if n.get("Alive") or n.get("alive")]


def node_resources() -> Dict[str, Dict[str, float]]:
    """Each alive node's total resources (``CPU``, ``object_store_memory``, ...), by node id."""
    return {n["NodeID"]: dict(n.get("Resources") or {}) for n in alive_nodes()}


def cache_nodes(nodes: str = "auto", alive: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Alive nodes that should hold a worker (``alive``: :func:`alive_nodes`, if known).

    ``"auto"``: nodes with GPUs, or every node when none has one; ``"all"``; ``"gpu"``;
    ``"resource:NAME"``: nodes offering custom resource NAME; ``"label:KEY=VALUE"``: nodes
    with that Ray node label.
    """
    alive = alive_nodes() if alive is None else alive
    if nodes == "all":
        return alive
    if nodes.startswith("label:") and "=" in nodes:
        key, value = nodes[len("label:") :].split("=", 1)
        return [n for n in alive if (n.get("Labels") or {}).get(key) == value]
    if nodes.startswith("resource:"):
        name = nodes.split(":", 1)[1]
        return [n for n in alive if n.get("Resources", {}).get(name, 0) > 0]
    gpu = [n for n in alive if n.get("Resources", {}).get("GPU", 0) > 0]
    if nodes == "gpu":
        return gpu
    if nodes == "auto":
        return gpu or alive
    raise ValueError(
        f"nodes must be one of {NODE_SELECTORS}, 'resource:NAME' or 'label:KEY=VALUE', got {nodes!r}"
    )


def _actor_class():
    from ray_cache.node.worker import CacheWorker  # the worker stack (pyarrow...) only where workers start

    return ray.remote(CacheWorker)


def ensure_workers(
    memory_bytes: Optional[int],
    disk_bytes: Optional[int],
    disk_dir: str,
    nodes: str = "auto",
    policy: str = "adaptive",
    resize: bool = True,
) -> List[WorkerRef]:
    """Start a worker on every cache node that has none; attach to the others.

    Returns the live workers. Existing workers keep their contents; when capacities are
    given explicitly (and ``resize``) they are applied to them at run time.
    """
    cls = _actor_class()
    created, refs = [], []
    for node in cache_nodes(nodes):
        node_id = node["NodeID"]
        name = worker_name(node_id)
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
            fresh = False
        except ValueError:
            store = int(node.get("Resources", {}).get("object_store_memory", 2 * 1024**3))
            cfg = WorkerConfig(
                memory_bytes=memory_bytes or max(64 * 1024**2, int(store * MEMORY_FRACTION)),
                disk_bytes=disk_bytes or 0,
                disk_dir=disk_dir,
                policy=policy,
                nodes=nodes,
                requested_memory_bytes=memory_bytes,
                requested_disk_bytes=disk_bytes,
            )
            handle = cls.options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=64,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(cfg.to_dict(), node_id)
            fresh = True
        if fresh:
            created.append(handle.ping.remote())
        elif resize and (memory_bytes or disk_bytes):
            created.append(handle.configure.remote(memory_bytes, disk_bytes))
        refs.append(WorkerRef(node_id, name, handle))
    try:
        ray.get(created, timeout=WORKER_TIMEOUT_S)
    except GetTimeoutError:
        raise TimeoutError(f"cache workers did not start in {WORKER_TIMEOUT_S:g} s on "
                           f"{len(created)} node(s); see `ray status` for what they wait on") from None
    return refs


def live_workers(alive: Optional[List[Dict[str, Any]]] = None) -> List[WorkerRef]:
    """Workers on alive nodes (``alive``: :func:`alive_nodes`, if known), found by name
    (no process-local registry)."""
    forks.check_ray_usable("ray_cache's list of workers")
    out = []
    alive_ids = {n["NodeID"] for n in (alive_nodes() if alive is None else alive)}
    for info in ray.util.list_named_actors(all_namespaces=True):
        if info.get("namespace") != NAMESPACE or not info["name"].startswith("worker-"):
            continue
        node_id = info["name"][len("worker-") :]
        if node_id not in alive_ids:
            continue
        try:
            handle = ray.get_actor(info["name"], namespace=NAMESPACE)
        except ValueError:
            continue
        out.append(WorkerRef(node_id, info["name"], handle))
    return sorted(out, key=lambda w: w.name)


def stop_workers(timeout_s: float = 60.0) -> int:
    """Kill every worker (their disk tiers stay on disk); returns how many.

    Returns only once the names are free again: ``ray.kill`` is asynchronous, and a
    ``start`` racing it would attach to the dying worker instead of starting a new one.
    """
    import time

    workers = live_workers()
    for w in workers:
        try:
            ray.get(w.handle.flush.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - a dead worker has nothing to flush
            pass
        ray.kill(w.handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    for w in workers:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(w.name, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.05)  # polling Ray's actor table for the name to be released
    return len(workers)


def ensure_ray() -> None:
    """Connect to Ray, or start a local Ray (without its dashboard) if none is running.

    Raises :class:`ray_cache.cluster.forks.RayForkedError` at once in a process forked from
    one running Ray, where any Ray call would hang.
    """
    forks.check_ray_usable("this ray_cache call")
    if not ray.is_initialized():
        # No dashboard: nothing should listen on a port the user did not ask for.
        ray.init(logging_level=logging.WARNING, include_dashboard=False)


def workers() -> List[WorkerRef]:
    """The live workers, after starting one on any cache node that joined since."""
    ensure_ray()
    alive = alive_nodes()
    found = live_workers(alive)
    if not found:  # none yet: start them with the defaults, as ray_cache.start() does
        return ensure_workers(None, None, validate_disk_dir(default_disk_dir()))
    have = {w.node_id for w in found}
    if all(n["NodeID"] in have for n in alive):  # cache nodes are alive nodes: none missing
        return found
    try:
        cfg = ray.get(found[0].handle.get_config.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - that worker is going away; use what is alive
        return found
    if any(n["NodeID"] not in have for n in cache_nodes(cfg["nodes"], alive)):
        found = ensure_workers(
            cfg["requested_memory_bytes"], cfg["requested_disk_bytes"], cfg["disk_dir"],
            nodes=cfg["nodes"], policy=cfg["policy"], resize=False,
        )
    return found
