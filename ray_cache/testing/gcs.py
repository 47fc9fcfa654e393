"""A real Google Cloud Storage emulator (``gcp-storage-emulator``, from PyPI) on loopback.

Importing this module sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (unless already
set): otherwise gcsfs 2026.x probes each bucket's type over gRPC/TLS and stalls 60 s per
bucket against the emulator. Import it before gcsfs, and before starting Ray, so the
cache workers (started later, with this environment) see it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from typing import Any, Optional

from ray_cache.testing.s3server import OPENER, ManagedProcess, find_executable

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

__all__ = ["GCSServer"]


def _find_emulator() -> str:
    return find_executable("gcp-storage-emulator", "pip install gcp-storage-emulator")


class GCSServer(ManagedProcess):
    """``gcp-storage-emulator`` on ``127.0.0.1`` and a free port, data in memory.

    Examples
    --------
    >>> with GCSServer() as gcs:  # doctest: +SKIP
    ...     gcs.create_bucket("data")
    ...     fs = gcsfs.GCSFileSystem(**gcs.storage_options())
    """

    _probe_path = "/storage/v1/b"

    def __init__(self, port: Optional[int] = None, start_timeout: float = 60.0) -> None:
        super().__init__(port, start_timeout)

    def start(self) -> "GCSServer":
        """Start the emulator and wait until it answers HTTP."""
        if self._proc is not None:
            return self
        cmd = [_find_emulator(), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory"]
        proc = self._spawn(cmd, "gcs_emulator_", stdin=subprocess.DEVNULL)
        self._wait_until_up(proc, "gcp-storage-emulator", interval=0.1)
        return self

    def storage_options(self, endpoint_url: Optional[str] = None) -> dict[str, Any]:
        """gcsfs options for this server (or a proxy before it): anonymous, no credentials."""
        return {"endpoint_url": endpoint_url or self.endpoint_url, "token": "anon"}

    def create_bucket(self, name: str) -> None:
        """Create a bucket through the JSON API."""
        req = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with OPENER.open(req, timeout=30) as resp:
            resp.read()
