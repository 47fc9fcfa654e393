"""This node's cache workers, as a reader sees them: disk slots to map, channels to call.

- :func:`local_slots`: the disk-tier slot of each worker on this Ray node, so a reader
  can memory-map pages that worker owns (``ray_cache.files.pages``, step 2).
- :class:`LocalChannels`: for a process that cannot use Ray (forked from one that ran
  it, see :mod:`ray_cache.cluster.forks`), pages through this node's workers'
  channels (:mod:`ray_cache.node.channel`): a page owned by a worker on this node is
  asked of it (served from its tiers, or fetched and so cached); a page owned elsewhere
  is asked of a worker on this node, which relays it from its owner through Ray. A cold
  read fills the cache and a warm one is served from wherever the cache holds it.

Which process can use Ray
-------------------------
- A Ray driver, task or actor: Ray as it is.
- A process without Ray (a script, a ``spawn``/``forkserver`` DataLoader worker, a Spark
  executor): it connects to the cluster whose address was recorded when the filesystem
  was pickled (:meth:`PageReader.remember_address`), else goes through
  ``ray_cache.cluster.membership.workers()``, which starts a local Ray and a worker if none is running.
- A process **forked** from one where Ray ran (``DataLoader`` workers with the default
  ``fork`` context): Ray is unusable there (:mod:`ray_cache.cluster.forks`), yet it reads
  through the cache: this node's disk tier mapped directly, every other page through this
  node's workers' channels (:mod:`ray_cache.files.local`), filling the cache on a miss.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray

from ray_cache.cluster import hashing
from ray_cache.cluster.membership import WorkerRef
from ray_cache.config import WORKER_TIMEOUT_S
from ray_cache.node.channel import ChannelClient, ChannelError, channel_path
from ray_cache.store.errors import ObjectChangedError
from ray_cache.store.fetch import PageRequest

log = logging.getLogger("ray_cache.pages")

#: One page's answer through a channel: ``("ok", buffer)``, ``("err", exc)``, ``("gone", why)``.
Answer = Tuple[str, Any]


def local_slots(workers: Sequence[WorkerRef]) -> Dict[int, str]:
    """Disk-tier slots of the workers on this node, by index (none where unreadable)."""
    try:
        here = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no node, no local workers
        return {}
    local = [(i, w) for i, w in enumerate(workers) if w.node_id == here]
    calls = [(i, w.handle.status.remote()) for i, w in local]
    slots: Dict[int, str] = {}
    for i, call in calls:
        try:
            slot = ray.get(call, timeout=WORKER_TIMEOUT_S).get("disk_dir")
        except Exception:  # noqa: BLE001 - that worker is read through Ray, or not at all
            continue
        if slot and os.access(slot, os.R_OK | os.X_OK):
            slots[i] = slot
    return slots


class LocalChannels:
    """Pages through this node's workers' channels, for a process without Ray."""

    def __init__(self) -> None:
        self._clients: Dict[str, ChannelClient] = {}
        self._warned: set = set()
        self._warned_direct = False

    def read(self, reader: Any, fs: Any, reqs: Sequence[PageRequest]) -> Dict[str, Any]:
        """Each page's bytes (or exception) by digest, for ``reader`` (a
        :class:`ray_cache.files.pages.PageReader`: its layout, buffers and counters).

        Through the channels where a worker runs on this node; where none does, or its
        channel does not answer, from the store (``reader._direct``), counted.
        """
        layout = reader.layout
        names, slots = (layout.names, layout.slots) if layout is not None else ([], {})
        answers = self.fetch(fs, reqs, names, slots) if names else {}
        out: Dict[str, Any] = {}
        for r in reqs:
            d = r.key.digest
            status, value = answers.get(d, ("gone", "no cache worker on this node"))
            if status == "ok":
                buf = memoryview(value)
                if buf.nbytes != r.end - r.start:
                    out[d] = ObjectChangedError(f"{r.obj.url}: page of {buf.nbytes} bytes at "
                                                f"{r.start}, expected {r.end - r.start}")
                    continue
                reader.buffers.put(d, None, buf)
                reader._count(channel_pages=1, channel_bytes=buf.nbytes)
                out[d] = buf
            elif status == "err":
                out[d] = value
            elif not slots:  # no worker on this node: the store, counted and explained once
                self._warn_direct()
                out[d] = reader._direct(fs, r, "direct")
            else:  # the worker here, or the owner it relays from, is gone
                out[d] = reader._direct(fs, r, "fallback")
        return out

    def _warn_direct(self) -> None:
        if not self._warned_direct:
            self._warned_direct = True
            log.warning(
                "ray_cache: process %d was forked from a process running Ray and no cache worker "
                "runs on this node; pages are read straight from the store (counted in "
                "ray_cache.files.pages.reader().stats()['direct_pages']). Run the readers on a "
                "cache node, or start them with a 'spawn' or 'forkserver' multiprocessing "
                "context (DataLoader(multiprocessing_context=...)).", os.getpid())

    def _client(self, slot: str) -> ChannelClient:
        client = self._clients.get(slot)
        if client is None:
            client = self._clients[slot] = ChannelClient(channel_path(slot))
        return client

    def fetch(self, fs: Any, reqs: Sequence[PageRequest], names: List[str],
              slots: Dict[int, str]) -> Dict[str, Answer]:
        """Each page's answer by digest (``slots``: owner index -> slot of this node's
        workers; none means no worker here, and every page is ``("gone", ...)``)."""
        out: Dict[str, Answer] = {}
        if not slots:
            return {r.key.digest: ("gone", "no cache worker on this node") for r in reqs}
        via = min(slots)  # pages owned elsewhere are relayed by one worker here
        batches: Dict[Tuple[int, Optional[str]], List[PageRequest]] = {}
        for r in reqs:
            o = hashing.owner(r.key.digest, names)
            key = (o, None) if o in slots else (via, names[o])
            batches.setdefault(key, []).append(r)
        for (o, relay_to), batch in batches.items():
            request = ("pages", fs, batch) if relay_to is None else ("relay", relay_to, fs, batch)
            try:
                answers = self._client(slots[o]).call(request)
            except ChannelError as exc:
                self._warn(slots[o], exc)
                answers = [("gone", str(exc))] * len(batch)
            for r, answer in zip(batch, answers):
                out[r.key.digest] = answer
        return out

    def touch(self, slot: str, digests: List[str]) -> None:
        """Report pages mapped from ``slot`` to its worker (bookkeeping: errors ignored)."""
        try:
            self._client(slot).call(("touch", digests))
        except (ChannelError, OSError):
            pass

    def _warn(self, slot: str, exc: BaseException) -> None:
        if slot not in self._warned:
            self._warned.add(slot)
            log.warning("ray_cache: the cache worker of %s did not answer on its channel (%s); "
                        "reading its pages from the store", slot, exc)
