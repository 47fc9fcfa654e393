"""ray_cache.read_parquet against a real S3 server: rows, warm reads, versions, tiers, restarts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from conftest import data_gets, make_table, read_all, write_dataset


def expected(fs, paths, columns=None, sort=True) -> pa.Table:
    table = pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths])
    return table.sort_by("id") if sort and "id" in table.column_names else table


def test_rows_and_schema_equal_pyarrow(cache, s3fs_direct, s3fs_proxied, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=3)
    got = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    want = expected(s3fs_direct, paths)
    assert got.schema == want.schema
    assert got.equals(want)


def test_order_is_kept_with_preserve_order(cache, s3fs_direct, s3fs_proxied, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=3, rows=6_000, rg_rows=1_000)
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        for zero_copy in (False, True):  # cold read tasks, then the warm zero-copy path
            ds = ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, zero_copy=zero_copy)
            assert read_all(ds, sort=False).equals(expected(s3fs_direct, paths, sort=False))
    finally:
        ctx.execution_options.preserve_order = old


@pytest.mark.parametrize("form", ["file", "list", "glob", "dir-no-slash"])
def test_path_forms(cache, s3fs_direct, s3fs_proxied, prefix, form):
    paths = write_dataset(s3fs_direct, prefix, files=3, rows=4_000, rg_rows=1_000)
    arg = {
        "file": f"s3://{paths[1]}",
        "list": [f"s3://{paths[2]}", f"s3://{paths[0]}"],
        "glob": f"s3://{prefix}/part-00[12].parquet",
        "dir-no-slash": f"s3://{prefix}",
    }[form]
    chosen = {"file": [paths[1]], "list": [paths[2], paths[0]], "glob": paths[1:], "dir-no-slash": paths}[form]
    got = read_all(ray_cache.read_parquet(arg, filesystem=s3fs_proxied))
    assert got.equals(expected(s3fs_direct, chosen))


def test_a_folder_written_with_a_slash_is_listed_in_one_request(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    """``s3://bucket/prefix/`` says what it is: one LIST (no HEAD of the prefix, no LIST to
    learn that it is a folder), counted at the server; without the slash it is asked first.
    A folder that holds nothing is still ``FileNotFoundError`` naming it."""
    paths = write_dataset(s3fs_direct, prefix, files=2, rows=2_000, rg_rows=1_000)
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))  # warm: no footer GETs

    def planning(arg):
        proxy.reset()
        ds = ray_cache.read_parquet(arg, filesystem=s3fs_proxied)
        reqs = [r for r in proxy.requests() if r["method"] == "HEAD" or "list-type" in r["path"]]
        assert read_all(ds).equals(expected(s3fs_direct, paths))
        return [r["method"] for r in reqs]

    assert planning(f"s3://{prefix}/") == ["GET"], "one LIST"
    assert len(planning(f"s3://{prefix}")) > 1, "without the slash the store is asked what it is"
    with pytest.raises(FileNotFoundError, match=f"{prefix}/nothing"):
        ray_cache.read_parquet(f"s3://{prefix}/nothing/", filesystem=s3fs_proxied)


def test_storage_options_instead_of_filesystem(cache, s3_server, s3fs_direct, proxy, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=1)
    ds = ray_cache.read_parquet(
        f"s3://{prefix}/", storage_options=s3_server.storage_options(endpoint_url=proxy.url)
    )
    assert read_all(ds).equals(expected(s3fs_direct, paths))


def test_columns_are_read_and_cached_alone(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=2, rows=100_000, rg_rows=50_000)
    proxy.reset()
    got = read_all(ray_cache.read_parquet(f"s3://{prefix}/", columns=["y", "id"], filesystem=s3fs_proxied))
    assert got.column_names == ["y", "id"]
    assert got.equals(expected(s3fs_direct, paths, columns=["y", "id"]).select(["y", "id"]))
    fetched = sum(r["response_body_bytes"] for r in data_gets(proxy))
    whole = sum(s3fs_direct.info(p)["size"] for p in paths)
    assert fetched < whole * 0.6, "only the selected column chunks should be fetched"


def test_local_paths_and_file_urls(cache, tmp_path):
    local = tmp_path / "data"
    local.mkdir()
    for i in range(2):
        pq.write_table(make_table(3_000, i, offset=i * 3_000), local / f"p{i}.parquet", row_group_size=1_000)
    want = pq.read_table(str(local)).sort_by("id")
    assert read_all(ray_cache.read_parquet(str(local))).equals(want)
    assert read_all(ray_cache.read_parquet(f"file://{local}")).equals(want)


@pytest.mark.parametrize("zero_copy", [True, False])
def test_warm_read_sends_no_data_request(cache, s3fs_direct, s3fs_proxied, proxy, prefix, zero_copy):
    write_dataset(s3fs_direct, prefix, files=3)
    url = f"s3://{prefix}/"
    proxy.reset()
    cold = read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied, zero_copy=zero_copy))
    assert len(data_gets(proxy)) > 0
    proxy.reset()
    warm = read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied, zero_copy=zero_copy))
    assert data_gets(proxy) == [], "a warm read must not GET object data"
    assert warm.equals(cold)
    s = ray_cache.stats()
    assert s["hits"] >= 3 and s["bytes_from_cache"] > 0


def test_overwritten_object_is_reread(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    path = f"{prefix}/one.parquet"
    with s3fs_direct.open(path, "wb") as f:
        pq.write_table(make_table(5_000, seed=1), f)
    first = read_all(ray_cache.read_parquet(f"s3://{path}", filesystem=s3fs_proxied))
    with s3fs_direct.open(path, "wb") as f:
        pq.write_table(make_table(5_000, seed=2, offset=100), f)
    proxy.reset()
    second = read_all(ray_cache.read_parquet(f"s3://{path}", filesystem=s3fs_proxied))
    assert len(data_gets(proxy)) > 0, "a changed object must be fetched again"
    assert second.equals(pq.read_table(path, filesystem=s3fs_direct).sort_by("id"))
    assert not second.equals(first)


def test_tiers_stay_within_capacity(ray_session, tmp_path, s3fs_direct, s3fs_proxied, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=6, rows=20_000, rg_rows=20_000)
    ray_cache.shutdown()
    try:
        unit = pq.read_table(paths[0], filesystem=s3fs_direct).nbytes
        ray_cache.start(memory_bytes=int(unit * 2.5), disk_bytes=int(unit * 3.5), disk_dir=str(tmp_path / "c"),
                        policy="lru")  # capacity under eviction pressure; policies: test_policy.py
        for _ in range(2):
            got = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
            assert got.equals(expected(s3fs_direct, paths))
            for ref in ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()]):
                pass
            for w in ray_cache.status().workers:
                assert 0 < w["memory_bytes_used"] <= w["memory_bytes_capacity"]
                assert 0 < w["disk_bytes_used"] <= w["disk_bytes_capacity"]
        assert ray_cache.stats()["evictions"] > 0
        files = [f for _, _, fs in os.walk(tmp_path / "c") for f in fs if f.endswith(".arrow")]
        disk_used = sum(w["disk_bytes_used"] for w in ray_cache.status().workers)
        assert sum(os.path.getsize(p) for p in _arrow_files(tmp_path / "c")) == disk_used
        assert len(files) <= 3
    finally:
        ray_cache.shutdown()


def _arrow_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".arrow")]


def test_disk_tier_survives_worker_restart(ray_session, tmp_path, s3fs_direct, s3fs_proxied, proxy, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=2)
    disk = str(tmp_path / "c")
    ray_cache.shutdown()
    try:
        ray_cache.start(memory_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=disk)
        read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
        ray_cache.shutdown()  # flushes pending disk writes, then kills the workers
        ray_cache.start(memory_bytes=256 << 20, disk_bytes=256 << 20, disk_dir=disk)
        assert ray_cache.status().workers[0]["disk_entries"] > 0
        proxy.reset()
        got = read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
        assert data_gets(proxy) == []
        assert got.equals(expected(s3fs_direct, paths))
        assert ray_cache.stats()["disk_hits"] > 0
    finally:
        ray_cache.shutdown()


def test_cache_files_are_owner_only(cache, s3fs_direct, s3fs_proxied, prefix):
    write_dataset(s3fs_direct, prefix, files=1)
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
    files = _arrow_files(cache)
    assert files
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(f)).st_mode) == 0o700


def test_credentials_never_reach_cache_names_or_files(cache, s3_server, s3fs_direct, proxy, prefix):
    import s3fs

    secret = "sEcReT-ray-cache-do-not-leak"
    fs = s3fs.S3FileSystem(
        key="AKIA-ray-cache-test", secret=secret,
        client_kwargs={"endpoint_url": proxy.url, "region_name": "us-east-1"},
        skip_instance_cache=True,
    )
    write_dataset(s3fs_direct, prefix, files=1)
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs))
    ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
    for root, dirs, files in os.walk(cache):
        for name in dirs + files:
            assert secret not in name and "AKIA-ray-cache-test" not in name
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    data = fh.read()
                assert secret.encode() not in data


def test_status_lists_each_worker(cache, s3fs_direct, s3fs_proxied, prefix):
    write_dataset(s3fs_direct, prefix, files=1)
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    st = ray_cache.status()
    assert len(st.workers) == len([n for n in ray.nodes() if n["Alive"]])
    for w in st.workers:
        for field in ("node_id", "memory_bytes_used", "memory_bytes_capacity", "disk_bytes_used",
                      "disk_bytes_capacity", "entries", "hits", "misses"):
            assert field in w
        assert w["entries"] >= 1 and w["misses"] >= 1
    assert "<table>" in st._repr_html_()
    assert st.workers[0]["node_id"][:8] in repr(st)


def test_second_driver_attaches_to_the_warm_cache(cache, s3_server, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=2)
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    pids = {w["pid"] for w in ray_cache.status().workers}
    proxy.reset()
    script = f"""
import ray, ray_cache, s3fs
ray.init(address="auto", logging_level="ERROR")
fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
    client_kwargs={{"endpoint_url": "{proxy.url}", "region_name": "us-east-1"}})
print("ROWS", ray_cache.read_parquet("s3://{prefix}/", filesystem=fs).count())
print("PIDS", sorted(w["pid"] for w in ray_cache.status().workers))
"""
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ROWS 40000" in out.stdout
    assert f"PIDS {sorted(pids)}" in out.stdout, "the second driver must use the same workers"
    assert data_gets(proxy) == []


def _evolved(fs, prefix):
    """Two files, the second adding a column in the middle (a later writer's schema)."""
    import pyarrow as pa

    first = pa.table({"id": pa.array([1, 2], pa.int64()), "x": [1.0, 2.0]})
    second = pa.table({"id": pa.array([3, 4], pa.int64()), "label": ["p", None], "x": [3.0, 4.0]})
    for name, table in (("a", first), ("b", second)):
        with fs.open(f"{prefix}/{name}.parquet", "wb") as f:
            pq.write_table(table, f)


def test_schemas_that_differ_by_an_added_column_read_as_ray_reads_them(cache, s3fs_direct, s3fs_proxied, tmp_path, prefix):
    import fsspec

    _evolved(s3fs_direct, prefix)
    local = tmp_path / "evolved"
    local.mkdir()
    _evolved(fsspec.filesystem("file"), str(local))
    for url, fs in ((str(local), None), (f"s3://{prefix}/", s3fs_proxied)):
        want = ray.data.read_parquet(url, filesystem=fs)
        for zero_copy in ("auto", False):
            got = ray_cache.read_parquet(url, filesystem=fs, zero_copy=zero_copy)
            assert got.schema().names == want.schema().names == ["id", "x", "label"]
            assert got.schema().types == want.schema().types
            key = lambda r: r["id"]  # noqa: E731
            assert sorted(got.take_all(), key=key) == sorted(want.take_all(), key=key)


def test_incompatible_schemas_name_both_files(cache, s3fs_direct, s3fs_proxied, prefix):
    import pyarrow as pa

    for name, x in (("a", pa.array([1.0])), ("b", pa.array(["one"]))):
        with s3fs_direct.open(f"{prefix}/{name}.parquet", "wb") as f:
            pq.write_table(pa.table({"x": x}), f)
    with pytest.raises(ValueError, match=r"b\.parquet and .*a\.parquet have incompatible schemas"):
        ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied)
