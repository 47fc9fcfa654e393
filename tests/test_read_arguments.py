"""Ray's ``read_parquet`` arguments that choose files or add columns, against Ray's own output
on the same files (local and on the S3 server, cold and warm): ``include_paths``,
``file_extensions``, ``partition_filter``; and Ray's errors where Ray raises one."""

from __future__ import annotations

import warnings

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache


def _write(fs, root):
    """Hive folders with Parquet files, one without an extension, and a CSV beside them."""
    n = 0
    for year in (2024, 2025):
        fs.makedirs(f"{root}/year={year}", exist_ok=True)
        for name in ("a.parquet", "b.PARQUET", "c"):
            with fs.open(f"{root}/year={year}/{name}", "wb") as f:
                pq.write_table(pa.table({"id": pa.array([n, n + 1], pa.int64()), "v": [0.5, 1.5]}), f)
            n += 2
    with fs.open(f"{root}/year=2025/notes.csv", "wb") as f:
        f.write(b"id,v\n1,2\n")


def _ray(url, fs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.read_parquet(url, filesystem=fs, **kw)


def _rows(ds):
    return sorted(ds.take_all(), key=lambda r: (r["id"], r.get("path", "")))


def _year_2025(paths):
    return [p for p in paths if "year=2025" in p]


# Arguments that do not touch each other share a case: each of Ray's reads costs seconds.
CASES = {
    "include_paths, file_extensions=['.PARQUET']": {"include_paths": True, "file_extensions": [".PARQUET"]},
    "include_paths+columns, partition_filter": {"include_paths": True, "columns": ["id"],
                                                "file_extensions": ["parquet"], "partition_filter": "2025"},
    "file_extensions=['parquet', ''] reads every file": {"file_extensions": ["parquet", ""]},
    "file_extensions=None reads Parquet by name, as Ray 2.60": {"file_extensions": None},
    "defaults (file_extensions=['parquet'])": {},
}


@pytest.fixture()
def trees(s3fs_direct, tmp_path, prefix):
    _write(s3fs_direct, prefix)
    s3fs_direct.rm(f"{prefix}/year=2025/notes.csv")  # every case below reads only Parquet files
    local = str(tmp_path / "tree")
    _write(fsspec.filesystem("file"), local)
    fsspec.filesystem("file").rm(f"{local}/year=2025/notes.csv")
    return [(local, None, None), (f"s3://{prefix}/", "proxied", "direct")]


@pytest.mark.parametrize("case", list(CASES))
def test_file_choice_and_path_columns_equal_rays(cache, s3fs_direct, s3fs_proxied, trees, case):
    from ray.data.datasource.partitioning import PathPartitionFilter

    fss = {"proxied": s3fs_proxied, "direct": s3fs_direct, None: None}
    for url, ours_fs, anchor_fs in trees:
        kw = dict(CASES[case])
        if kw.get("partition_filter") == "2025":
            kw["partition_filter"] = PathPartitionFilter.of(lambda d: d.get("year") == "2025")
        want = _ray(url, fss[anchor_fs], **kw).materialize()
        for _ in ("cold", "warm"):
            got = ray_cache.read_parquet(url, filesystem=fss[ours_fs], **kw)
            assert got.schema().names == want.schema().names
            assert got.schema().types == want.schema().types
            assert _rows(got) == _rows(want)


def test_file_extensions_that_match_nothing_raise_rays_error(cache, s3fs_direct, s3fs_proxied, trees):
    for url, ours_fs, anchor_fs in trees:
        fs = {"proxied": s3fs_proxied, "direct": s3fs_direct, None: None}
        with pytest.raises(ValueError) as ray_error:
            _ray(url, fs[anchor_fs], file_extensions=["json"]).materialize()
        with pytest.raises(ValueError) as ours:
            ray_cache.read_parquet(url, filesystem=fs[ours_fs], file_extensions=["json"])
        assert "no files found under" in str(ray_error.value) and "no files found under" in str(ours.value)


def _file_runs(rows, key="id"):
    """The files in the order their rows came (each file's rows are consecutive ids)."""
    order = []
    for r in rows:
        f = r[key] // 100
        if not order or order[-1] != f:
            order.append(f)
    return order


@pytest.fixture()
def many_files(s3fs_direct, prefix):
    for i in range(8):
        with s3fs_direct.open(f"{prefix}/part-{i}.parquet", "wb") as f:
            pq.write_table(pa.table({"id": pa.array(range(i * 100, i * 100 + 100), pa.int64())}), f)
    return f"s3://{prefix}/"


@pytest.mark.parametrize("shuffle", ["files", "seeded", "seeded-fixed"])
def test_shuffled_files_are_whole_files_in_a_new_order_as_ray_reads_them(
        cache, s3fs_direct, s3fs_proxied, many_files, shuffle):
    from ray.data import FileShuffleConfig

    arg = {"files": "files", "seeded": FileShuffleConfig(seed=3),
           "seeded-fixed": FileShuffleConfig(seed=3, reseed_after_execution=False)}[shuffle]
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        want = sorted(r["id"] for r in _ray(many_files, s3fs_direct, shuffle=arg).take_all())
        ds = ray_cache.read_parquet(many_files, filesystem=s3fs_proxied, shuffle=arg)
        orders = []
        for _ in range(3):  # three executions of one dataset (epochs)
            rows = ds.take_all()
            assert sorted(r["id"] for r in rows) == want  # every row once, as Ray reads them
            order = _file_runs(rows)
            assert sorted(order) == list(range(8)), "files stay whole"
            orders.append(order)
        if shuffle == "seeded-fixed":
            assert orders[0] == orders[1] == orders[2]
        else:
            assert len({tuple(o) for o in orders}) > 1, "a new order per execution"
        assert any(o != list(range(8)) for o in orders)
        again = ray_cache.read_parquet(many_files, filesystem=s3fs_proxied, shuffle=arg).take_all()
        if shuffle != "files":  # a seed gives the same orders to a new dataset
            assert _file_runs(again) == orders[0]
    finally:
        ctx.execution_options.preserve_order = old


SCHEMAS = {
    "cast": [("id", pa.int32()), ("v", pa.float64())],
    "a column no file has": [("id", pa.int64()), ("v", pa.float64()), ("z", pa.string())],
    "fewer columns": [("v", pa.float64())],
    "reordered": [("v", pa.float64()), ("id", pa.int64())],
    "int to string": [("id", pa.string()), ("v", pa.float32())],
    "with the partition key": [("year", pa.string()), ("id", pa.int64())],
}


@pytest.mark.parametrize("case", list(SCHEMAS))
def test_a_given_schema_reads_as_rays(cache, s3fs_direct, s3fs_proxied, trees, case):
    schema = pa.schema(SCHEMAS[case])
    fss = {"proxied": s3fs_proxied, "direct": s3fs_direct, None: None}
    # Schema handling does not depend on the store: local files are read for one case only.
    for url, ours_fs, anchor_fs in (trees if case == "cast" else trees[1:]):
        want = _ray(url, fss[anchor_fs], schema=schema).materialize()
        for _ in ("cold", "warm"):
            got = ray_cache.read_parquet(url, filesystem=fss[ours_fs], schema=schema)
            assert got.schema().names == want.schema().names
            assert got.schema().types == want.schema().types
            key = lambda r: tuple(str(r[k]) for k in sorted(r))  # noqa: E731
            assert sorted(got.take_all(), key=key) == sorted(want.take_all(), key=key)
