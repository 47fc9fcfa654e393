"""fsspec's own conformance suite (``fsspec.tests.abstract``) run against ``raycache``.

The target is s3fs on the session's local S3 server, as s3fs runs the same suite against
its own (s3fs ``tests/derived/s3fs_fixtures.py``). Like s3fs, the fixture declares that
the store has no empty directories (S3 has prefixes, not directories); nothing is skipped.
"""

from __future__ import annotations

import uuid

import fsspec
import fsspec.tests.abstract as abstract
import pytest

import ray_cache
from conftest import BUCKET


@pytest.fixture(scope="module")
def module_cache(ray_session, tmp_path_factory):
    """One set of cache workers for the whole suite (restarting them per test costs seconds)."""
    ray_cache.shutdown()
    disk_dir = tmp_path_factory.mktemp("conformance-cache")
    ray_cache.start(memory_bytes=128 << 20, disk_bytes=128 << 20, disk_dir=str(disk_dir))
    yield disk_dir
    ray_cache.shutdown()


class RayCacheFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, module_cache, s3_server):
        return fsspec.filesystem(
            "raycache", target_protocol="s3", target_options=s3_server.storage_options(),
            skip_instance_cache=True,
        )

    @pytest.fixture
    def fs_path(self):
        return f"{BUCKET}/conformance-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def supports_empty_directories(self):
        return False


class TestRayCacheCopy(abstract.AbstractCopyTests, RayCacheFixtures):
    pass


class TestRayCacheGet(abstract.AbstractGetTests, RayCacheFixtures):
    pass


class TestRayCachePut(abstract.AbstractPutTests, RayCacheFixtures):
    pass


class TestRayCachePipe(abstract.AbstractPipeTests, RayCacheFixtures):
    pass


class TestRayCacheOpen(abstract.AbstractOpenTests, RayCacheFixtures):
    pass
