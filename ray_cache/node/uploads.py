"""Multipart uploads of writers on this node, aborted if their writer dies before finishing.

A writer killed mid-write (SIGKILL, OOM, a preempted node's process) cannot abort its own
S3 multipart upload, and an upload left open keeps its parts (billed, invisible) until a
lifecycle rule removes them. A ``raycache`` writer therefore tells the cache worker on its
own node about each multipart upload the moment the store opens it, and again when it
ends (completed or aborted). The worker looks at the writers it was told of every
:data:`WATCH_EVERY_S` seconds; a writer whose process is gone (its pid no longer runs, or
runs another program started later) has its upload aborted. Only this node's processes
can be watched this way (a pid means nothing elsewhere): a writer on a node without a
cache worker is not watched, as said in the docs.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ray_cache.store.written import abort_upload

log = logging.getLogger("ray_cache.node.uploads")

#: Seconds between looks at the watched writers.
WATCH_EVERY_S = 1.0


def start_time(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot), or None if it is not running.

    Tells a writer from a later process given the same pid. Linux reads ``/proc``; other
    systems only check the pid.

    >>> start_time(os.getpid()) is not None
    True
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[19].decode()  # field 22, after the name
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return "?"
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"


@dataclass
class _Upload:
    fs: Any
    bucket: str
    key: str
    pid: int
    started: Optional[str]


class UploadWatch:
    """The open multipart uploads of this node's writers (thread-safe).

    ``count`` is called with ``uploads_aborted=1`` for each upload aborted.
    """

    def __init__(self, count: Callable[..., None], every_s: float = WATCH_EVERY_S) -> None:
        self._uploads: Dict[str, _Upload] = {}
        self._lock = threading.Lock()
        self._count = count
        self._stop = threading.Event()
        self._every_s = every_s
        self._thread: Optional[threading.Thread] = None

    def watch(self, fs: Any, bucket: str, key: str, upload_id: str, pid: int, started: Optional[str]) -> None:
        with self._lock:
            self._uploads[upload_id] = _Upload(fs, bucket, key, pid, started)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ray-cache-uploads", daemon=True)
                self._thread.start()

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(upload_id, None)

    def __len__(self) -> int:
        return len(self._uploads)

    def sweep(self) -> int:
        """Abort the uploads whose writer is gone; returns how many."""
        with self._lock:
            dead = {u: w for u, w in self._uploads.items() if start_time(w.pid) not in (w.started, "?")}
            for u in dead:
                del self._uploads[u]
        for upload_id, w in dead.items():
            if abort_upload(w.fs, w.bucket, w.key, upload_id):
                log.warning("ray_cache: writer %d died writing s3://%s/%s; its upload was aborted",
                            w.pid, w.bucket, w.key)
                self._count(uploads_aborted=1)
        return len(dead)

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the watch must never take the worker down
                log.debug("ray_cache: upload sweep failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
