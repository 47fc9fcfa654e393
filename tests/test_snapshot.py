"""A filesystem bound to one listing (``ray_cache.snapshot``), against the real S3 server.

Every request is counted at the proxy in front of the server: a snapshot costs LISTs once,
a cold small file one conditional GET, a warm one nothing. Each consistency case of
``ray_cache.files.snapshot``'s docstring has a test here.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

import ray_cache
from conftest import data_gets
from ray_cache.files import pages

MiB = 1 << 20


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def lists(proxy) -> list:
    return [r for r in proxy.requests() if r["method"] == "GET" and "list-type" in r["path"]]


def heads(proxy) -> list:
    return [r for r in proxy.requests() if r["method"] == "HEAD"]


@pytest.fixture()
def files(s3fs_direct, prefix):
    """24 small files in 3 folders, and one 3 MiB file."""
    out = {}
    for i in range(24):
        path = f"{prefix}/c{i % 3}/f{i:03d}.bin"
        out[path] = blob(1000 + 97 * i, seed=i)
        s3fs_direct.pipe_file(path, out[path])
    out[f"{prefix}/big.bin"] = blob(3 * MiB + 5, seed=99)
    s3fs_direct.pipe_file(f"{prefix}/big.bin", out[f"{prefix}/big.bin"])
    return out


def test_one_listing_answers_every_metadata_call_as_s3fs_does(cache, files, s3fs_proxied, s3fs_direct,
                                                              proxy, prefix):
    proxy.reset()
    snap = ray_cache.snapshot(f"s3://{prefix}/", filesystem=s3fs_proxied)
    assert len(lists(proxy)) == 1 and [r["method"] for r in proxy.requests()] == ["GET", "HEAD"], (
        "one LIST for 25 objects, and one HEAD proving the right to read")
    assert len(snap) == len(files)
    proxy.reset()
    s3fs_direct.invalidate_cache()
    assert snap.find(prefix) == s3fs_direct.find(prefix)
    assert snap.ls(f"{prefix}/c1", detail=False) == s3fs_direct.ls(f"{prefix}/c1", detail=False)
    assert snap.ls(prefix, detail=False) == s3fs_direct.ls(prefix, detail=False)
    assert sorted(snap.find(prefix, withdirs=True)) == sorted(s3fs_direct.find(prefix, withdirs=True))
    assert snap.find(prefix, maxdepth=1) == s3fs_direct.find(prefix, maxdepth=1)
    assert snap.glob(f"{prefix}/c2/*.bin") == s3fs_direct.glob(f"{prefix}/c2/*.bin")
    for path in (f"{prefix}/c0/f000.bin", f"{prefix}/big.bin"):
        assert snap.info(path)["size"] == s3fs_direct.info(path)["size"]
    assert snap.isdir(f"{prefix}/c0") and not snap.isfile(f"{prefix}/c0")
    assert snap.exists(f"{prefix}/c0/f003.bin") and not snap.exists(f"{prefix}/c0/nope.bin")
    assert proxy.requests() == [], "every answer came from the listing"


def test_cold_files_cost_one_conditional_get_and_warm_ones_nothing(cache, files, s3fs_proxied, proxy, prefix):
    snap = ray_cache.snapshot(prefix, filesystem=s3fs_proxied)
    small = sorted(p for p in files if "/c" in p)
    proxy.reset()
    for path in small:
        with snap.open(path) as f:
            assert f.read() == files[path]
    gets = data_gets(proxy)
    assert len(gets) == len(small), "one GET per small file"
    assert all(r["if_match"] for r in gets), "each carries the listed version"
    assert heads(proxy) == [] and lists(proxy) == [], "no HEAD before or after, no LIST"

    proxy.reset()
    pages.reader().clear()  # from the workers' tiers, not this process's buffers
    assert [snap.cat_file(p) for p in small] == [files[p] for p in small]
    assert snap.cat(f"{prefix}/c1/*") == {p: files[p] for p in small if "/c1/" in p}
    assert proxy.requests() == [], "a warm epoch sends no request at all"


def test_each_reader_proves_each_object_once_per_node(cache, files, s3_server, s3fs_proxied, proxy, prefix):
    """Cached bytes go to a snapshot's reader only once its credentials are proven to read that
    object: the cold GET that fetched it proves it for its reader (no HEAD); a reader with
    other credentials proves each object it is served warm with one HEAD, and a later
    snapshot, a pickled copy or a forked process with those credentials sends none."""
    import multiprocessing

    import s3fs

    small = sorted(p for p in files if "/c" in p)
    first = ray_cache.snapshot(prefix, filesystem=s3fs_proxied)
    proxy.reset()
    assert [first.cat_file(p) for p in small] == [files[p] for p in small]
    assert len(data_gets(proxy)) == len(small) and heads(proxy) == [], "cold: the GETs were the proofs"

    options = dict(s3_server.storage_options(endpoint_url=proxy.url), key="other-reader", secret="other-secret")
    other = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    snap = ray_cache.snapshot(prefix, filesystem=other)
    proxy.reset()
    pages.reader().clear()
    half = small[: len(small) // 2]
    assert snap.cat(half) == {p: files[p] for p in half}
    with snap.open(small[-1]) as f:
        assert f.read() == files[small[-1]]
    proved = sorted(r["path"].split("?")[0] for r in heads(proxy))
    assert proved == sorted(f"/{p}" for p in half + [small[-1]]), "one HEAD per object served warm"
    assert data_gets(proxy) == [], "served from the cache"

    proxy.reset()
    again = ray_cache.snapshot(prefix, filesystem=s3fs.S3FileSystem(**options, skip_instance_cache=True))
    copy = pickle.loads(pickle.dumps(again))
    assert [copy.cat_file(p) for p in half] == [files[p] for p in half]
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(1)
    try:
        got = pool.apply(_read_in_child, (again, half + [small[-1]]))
    finally:
        pool.close()
        pool.join()
    assert got == [files[p] for p in half + [small[-1]]]
    assert [r["method"] for r in proxy.requests()] == ["GET"], (
        "only the new snapshot's LIST: every object read was proven before")


def test_a_proof_needs_an_object_not_a_prefix(cache, files, s3fs_proxied, prefix):
    from ray_cache.store import access

    refused = access.refused_on_node(s3fs_proxied, [f"{prefix}/c0", f"{prefix}/c0/f000.bin"])
    assert list(refused) == [f"{prefix}/c0"] and isinstance(refused[f"{prefix}/c0"], FileNotFoundError)


def _read_in_child(snap, paths):
    out = []
    for p in paths:
        with snap.open(p) as f:
            out.append(f.read())
    return out


def test_a_rewrite_after_the_snapshot(cache, files, s3fs_proxied, s3fs_direct, proxy, prefix):
    snap = ray_cache.snapshot(prefix, filesystem=s3fs_proxied, page_size=MiB)
    cached, uncached = f"{prefix}/c0/f000.bin", f"{prefix}/c0/f003.bin"
    assert snap.cat_file(cached) == files[cached]
    new_cached, new_uncached = blob(777, seed=5), blob(555, seed=6)
    s3fs_direct.pipe_file(cached, new_cached)
    s3fs_direct.pipe_file(uncached, new_uncached)

    # pages of the listed version that are cached: that version, whole
    assert snap.cat_file(cached) == files[cached]
    # a page that must be fetched: the store no longer has the listed version; cat_file
    # looks again and reads the new one whole, and the snapshot records it
    assert snap.cat_file(uncached) == new_uncached
    assert snap.info(uncached)["size"] == len(new_uncached)
    # a refresh sees the rewrite: never the old version after it (the other one was
    # recorded already)
    assert snap.refresh() == {"added": 0, "changed": 1, "removed": 0, "files": len(files)}
    assert snap.cat_file(cached) == new_cached
    with snap.open(cached) as f:
        assert f.read() == new_cached


def test_a_file_open_at_the_listed_version_is_never_mixed_with_another(cache, files, s3fs_proxied,
                                                                       s3fs_direct, prefix):
    snap = ray_cache.snapshot(prefix, filesystem=s3fs_proxied, page_size=MiB)
    path = f"{prefix}/big.bin"
    old, new = files[path], blob(len(files[path]), seed=7)
    with snap.open(path) as f:
        assert f.read(100) == old[:100]  # page 0 of the listed version is cached now
        s3fs_direct.pipe_file(path, new)  # same size, another version
        f.seek(0)
        assert f.read(100) == old[:100], "cached pages: the listed version"
        with pytest.raises(ray_cache.ObjectChangedError):
            f.read()  # page 1 must be fetched: the listed version is gone
    # a whole read starting over is one version, the new one (page 0 of the old one is not used)
    assert snap.cat_file(path) == new


def test_deleted_and_added_objects(cache, files, s3fs_proxied, s3fs_direct, prefix):
    snap = ray_cache.snapshot(prefix, filesystem=s3fs_proxied)
    kept, gone = f"{prefix}/c1/f001.bin", f"{prefix}/c1/f004.bin"
    assert snap.cat_file(kept) == files[kept]
    s3fs_direct.rm_file(kept)
    s3fs_direct.rm_file(gone)
    added = f"{prefix}/c1/new.bin"
    s3fs_direct.pipe_file(added, b"new object")

    assert snap.cat_file(kept) == files[kept], "cached pages of the listed version"
    with pytest.raises(FileNotFoundError, match="f004"):
        snap.cat_file(gone)
    with pytest.raises(FileNotFoundError, match="refresh"):
        snap.cat_file(added)
    assert not snap.exists(added)

    assert snap.refresh() == {"added": 1, "changed": 0, "removed": 2, "files": len(files) - 1}
    assert snap.cat_file(added) == b"new object"
    with pytest.raises(FileNotFoundError):
        snap.cat_file(kept)


def test_refresh_every_lists_again_in_the_background(cache, files, s3fs_proxied, s3fs_direct, prefix):
    snap = ray_cache.snapshot(prefix, filesystem=s3fs_proxied, refresh_every=1e-6)
    added = f"{prefix}/c2/late.bin"
    s3fs_direct.pipe_file(added, b"late")
    taken = snap.taken_at
    snap.cat_file(f"{prefix}/c2/f002.bin")  # a read after refresh_every starts a refresh ...
    refreshing = snap._refreshing
    assert refreshing is not None
    refreshing.join(60)  # ... in the background; the read did not wait for it
    assert not refreshing.is_alive()
    assert snap.taken_at > taken and snap.cat_file(added) == b"late"


def test_snapshots_are_read_only_and_pickle_with_their_listing(cache, files, s3fs_proxied, proxy, prefix):
    snap = ray_cache.snapshot(prefix, filesystem=s3fs_proxied)
    path = f"{prefix}/c0/f000.bin"
    for write in (lambda: snap.pipe_file(path, b"x"), lambda: snap.open(path, "wb"),
                  lambda: snap.rm(path), lambda: snap.mv(path, path + ".2")):
        with pytest.raises(io.UnsupportedOperation, match="read-only"):
            write()
    proxy.reset()
    copy = pickle.loads(pickle.dumps(snap))
    assert copy.find(prefix) == snap.find(prefix) and copy.taken_at == snap.taken_at
    assert copy.cat_file(path) == files[path]
    assert lists(proxy) == [] and heads(proxy) == [], "the copy did not list again"
    assert copy == snap and copy != ray_cache.snapshot(prefix, filesystem=s3fs_proxied)


def test_bad_input(cache, files, s3fs_proxied, s3_server, prefix):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ray_cache.snapshot(f"{prefix}/nothing-here", filesystem=s3fs_proxied)
    with pytest.raises(ValueError, match="refresh_every"):
        ray_cache.snapshot(prefix, filesystem=s3fs_proxied, refresh_every=0)
    snap = ray_cache.snapshot(f"{prefix}/c0", filesystem=s3fs_proxied)
    with pytest.raises(FileNotFoundError, match="outside"):
        snap.cat_file(f"{prefix}/c1/f001.bin")
    with pytest.raises(IsADirectoryError):
        snap.cat_file(f"{prefix}/c0")
    assert "secret" not in repr(snap).lower() and s3_server.storage_options()["secret"] not in repr(snap)
