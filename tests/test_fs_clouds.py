"""Reading through ``raycache`` from three clouds' stores, each a real local server.

S3 (moto), Azure Blob (Azurite, installed with npm on first use) and GCS
(gcp-storage-emulator), each behind its own counting proxy: a warm read must send no
data request to any of them, and a rewrite must be seen through each store's version
(ETag or generation).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import ray_cache.testing.gcs as gcs_testing  # sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs loads

import fsspec
import ray_cache
import numpy as np
import pytest

from conftest import BUCKET, data_gets
from ray_cache.files import pages
from ray_cache.testing import CountingProxy
from ray_cache.testing.azurite import ACCOUNT, AzuriteServer

MiB = 1 << 20
CONTAINER = "ray-cache-tests"


@dataclass
class Cloud:
    protocol: str
    writer: Any  # writes test data straight to the server (uncounted)
    options: Dict[str, Any]  # reader options: through the counting proxy
    root: str
    proxy: CountingProxy
    data_gets: Callable[[CountingProxy], List[dict]]
    options_via: Callable[[str], Dict[str, Any]] = dict  # reader options through another proxy
    upstream: str = ""  # the server's own URL


def _azure_gets(proxy: CountingProxy) -> List[dict]:
    return [r for r in proxy.requests() if r["method"] == "GET"
            and r["path"].startswith(f"/{ACCOUNT}/{CONTAINER}/") and "comp=" not in r["path"]]


def _gcs_gets(proxy: CountingProxy) -> List[dict]:
    return [r for r in proxy.requests() if r["method"] == "GET" and r["path"].startswith("/download/")]


@pytest.fixture(scope="module")
def azure():
    import adlfs

    with AzuriteServer() as server, CountingProxy(server.endpoint_url) as proxy:
        server.create_container(CONTAINER)
        writer = adlfs.AzureBlobFileSystem(**server.storage_options(), skip_instance_cache=True)
        yield Cloud("abfs", writer, server.storage_options(proxy.url), CONTAINER, proxy, _azure_gets,
                    server.storage_options, server.endpoint_url)


@pytest.fixture(scope="module")
def gcs():
    import gcsfs

    with gcs_testing.GCSServer() as server, CountingProxy(server.endpoint_url) as proxy:
        server.create_bucket(BUCKET)
        writer = gcsfs.GCSFileSystem(**server.storage_options(), skip_instance_cache=True)
        yield Cloud("gcs", writer, server.storage_options(proxy.url), BUCKET, proxy, _gcs_gets)


@pytest.fixture(params=["s3", "azure", "gcs"])
def cloud(request, s3_server, proxy, s3fs_direct):
    if request.param == "s3":
        return Cloud("s3", s3fs_direct, s3_server.storage_options(endpoint_url=proxy.url), BUCKET,
                     proxy, data_gets)
    return request.getfixturevalue(request.param)


def test_reads_come_through_the_cache_and_see_rewrites(cache, cloud):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 5 * MiB + 17, dtype=np.uint8).tobytes()
    path = f"{cloud.root}/t-{uuid.uuid4().hex[:8]}/x.bin"
    cloud.writer.pipe(path, data)
    pages.reader().clear()
    fs = fsspec.filesystem("raycache", target_protocol=cloud.protocol, target_options=cloud.options,
                           skip_instance_cache=True)
    cloud.proxy.reset()
    assert fs.cat_file(path, start=4 * MiB - 10, end=4 * MiB + 10) == data[4 * MiB - 10 : 4 * MiB + 10]
    assert len(cloud.data_gets(cloud.proxy)) == 1, "two consecutive pages, one ranged GET"
    assert fs.info(path)["size"] == len(data) and fs.find(path.rsplit("/", 1)[0]) == [path]

    cloud.proxy.reset()
    pages.reader().clear()  # served by the worker, not this process's buffers
    assert fs.cat_file(path) == data
    with fsspec.open(f"raycache::{cloud.protocol}://{path}", "rb", **{cloud.protocol: cloud.options}) as f:
        f.seek(5 * MiB)
        assert f.read() == data[5 * MiB :]
    assert cloud.data_gets(cloud.proxy) == [], "a warm read sends no data request"

    cloud.writer.pipe(path, data[::-1])
    fs.invalidate_cache(path)
    assert fs.cat_file(path, start=0, end=100) == data[::-1][:100]


def test_a_file_written_through_is_read_back_warm_from_every_cloud(cache, cloud):
    """S3 proves the version by its answer to the PUT, GCS by its MD5, Azure by size."""
    data = np.random.default_rng(2).integers(0, 256, 5 * MiB + 3, dtype=np.uint8).tobytes()
    path = f"{cloud.root}/t-{uuid.uuid4().hex[:8]}/w.bin"
    fs = fsspec.filesystem("raycache", target_protocol=cloud.protocol, target_options=cloud.options,
                           skip_instance_cache=True)
    with fs.open(path, "wb") as f:
        f.write(data)
    assert cloud.writer.cat_file(path) == data
    pages.reader().clear()
    cloud.proxy.reset()
    assert fs.cat_file(path) == data
    assert cloud.data_gets(cloud.proxy) == [], "written through: no data request"


def test_parallel_page_fetches_share_their_version_checks(cache, azure):
    # Azure's reads here are not conditional, so each fetched page is followed by a version
    # check; concurrent checks share metadata requests (ray_cache.store.versions).
    data = np.random.default_rng(2).integers(0, 256, 18 * MiB, dtype=np.uint8).tobytes()
    path = f"{azure.root}/t-{uuid.uuid4().hex[:8]}/shared-checks.bin"
    azure.writer.pipe(path, data)
    starts = [2 * i * MiB for i in range(9)]  # every other page: 9 pages, no two consecutive
    with CountingProxy(azure.upstream, latency_ms=300) as slow:
        fs = fsspec.filesystem("raycache", target_protocol="abfs", target_options=azure.options_via(slow.url),
                               page_size=MiB, skip_instance_cache=True)
        got = fs.cat_ranges([path] * 9, starts, [s + 100 for s in starts])
        assert got == [data[s:s + 100] for s in starts]
        blob_path = f"/{ACCOUNT}/{path}"
        reqs = [r for r in slow.requests() if r["path"].split("?")[0] == blob_path]
    gets = [r for r in reqs if r["method"] == "GET"]
    heads = [r for r in reqs if r["method"] == "HEAD"]
    assert len(gets) == 9, "one ranged GET per 1 MiB page"
    # One HEAD for info() when planning, then version checks: each answered only by a HEAD
    # begun after its GET ended, so at least one; shared, so far fewer than one per page.
    assert 2 <= len(heads) <= 4, [r["method"] for r in reqs]


def test_a_snapshot_reads_every_cloud_with_the_versions_of_its_listing(cache, cloud):
    root = f"{cloud.root}/t-{uuid.uuid4().hex[:8]}"
    files = {f"{root}/c{i % 2}/f{i}.bin": bytes([i]) * (1000 + i) for i in range(6)}
    for path, data in files.items():
        cloud.writer.pipe(path, data)
    snap = ray_cache.snapshot(f"{cloud.protocol}://{root}", storage_options=cloud.options)
    assert snap.find(root) == sorted(files)
    cloud.proxy.reset()
    assert {p: snap.cat_file(p) for p in files} == files, "listed versions match what the store checks"
    assert len(cloud.data_gets(cloud.proxy)) == len(files), "one GET per cold file"
    cloud.proxy.reset()
    pages.reader().clear()
    assert {p: snap.cat_file(p) for p in files} == files
    assert cloud.data_gets(cloud.proxy) == [], "warm: no data request"
    path = sorted(files)[0]
    cloud.writer.pipe(path, b"rewritten")
    assert snap.refresh()["changed"] == 1 and snap.cat_file(path) == b"rewritten"
