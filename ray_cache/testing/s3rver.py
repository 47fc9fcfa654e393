"""A second S3-compatible server (s3rver, from npm) on loopback, for benchmarks.

moto answers any ranged GET of an object by copying the whole object first (~200 ms for a
256 MB object here, whatever the range) and barely overlaps concurrent requests, which no
real store does: a benchmark of parallel ranged reads against moto measures moto. s3rver
streams each range from a file on disk (cost proportional to the range) and serves
requests concurrently, closer to how S3, GCS or a Ceph gateway behave. It ignores
``If-Match`` (ray_cache's conditional reads still compare each response's ETag). Installed
with ``npm install s3rver@3.7.1`` on first use (a few seconds) into ``$RAY_CACHE_S3RVER_DIR``
or ``<repository>/.cache/s3rver``.
"""

from __future__ import annotations

from typing import List

from ray_cache.testing.npm import NodeServer
from ray_cache.testing.s3server import S3Endpoint

__all__ = ["S3rverServer", "S3RVER_VERSION"]

S3RVER_VERSION = "3.7.1"


class S3rverServer(S3Endpoint, NodeServer):
    """s3rver on ``127.0.0.1`` and a free port, objects in a temporary directory.

    Examples
    --------
    >>> with S3rverServer() as srv:  # doctest: +SKIP
    ...     srv.create_bucket("data")
    ...     fs = s3fs.S3FileSystem(**srv.storage_options())
    """

    npm = ("s3rver", S3RVER_VERSION, "s3rver", "RAY_CACHE_S3RVER_DIR")
    # s3rver's fixed development credentials (documented by the package; not a secret).
    access_key = secret_key = "S3RVER"

    def _command(self, exe: str, location: str) -> List[str]:
        return [exe, "-d", location, "-a", "127.0.0.1", "-p", str(self.port), "--silent"]
