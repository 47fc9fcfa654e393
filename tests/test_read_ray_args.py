"""The rest of Ray 2.60's ``read_parquet`` arguments, and rich column types, against Ray's own
output on the same files, local and on the S3 server, cold and warm: typed and directory
partitioning, ``include_row_hash``, ``skip_paths``, ``ignore_missing_paths``,
``tensor_column_schema``, ``catalog``, ``parallelism``; timestamps with zones, decimals,
lists, structs, dictionaries, dates and nulls in every case."""

from __future__ import annotations

import datetime
import decimal
import warnings

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache

SHAPE = (2, 3)


def _rich(offset: int, n: int) -> pa.Table:
    ids = np.arange(offset, offset + n)
    base = datetime.datetime(2025, 3, 9, 1, 30)
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "ts": pa.array([base + datetime.timedelta(hours=int(i)) for i in ids], pa.timestamp("us", tz="America/New_York")),
        "naive": pa.array([base + datetime.timedelta(minutes=int(i)) for i in ids], pa.timestamp("ms")),
        "day": pa.array([datetime.date(2025, 1, 1) + datetime.timedelta(days=int(i)) for i in ids], pa.date32()),
        "price": pa.array([decimal.Decimal(int(i) * 1001) / 1000 for i in ids], pa.decimal128(12, 3)),
        "tags": pa.array([[int(i)] * (int(i) % 3) for i in ids], pa.list_(pa.int32())),
        "point": pa.array([{"a": int(i), "b": f"p{i}"} for i in ids], pa.struct([("a", pa.int64()), ("b", pa.string())])),
        "kind": pa.array([f"k{i % 4}" for i in ids]).dictionary_encode(),
        "maybe": pa.array([None if i % 5 == 0 else float(i) for i in ids], pa.float64()),
        "t": pa.array([np.full(SHAPE, i, np.float32).tobytes() for i in ids], pa.binary()),
    })


def _write(fs, root):
    n = 0
    for year in (2024, 2025):
        for month in (1, 2):
            fs.makedirs(f"{root}/year={year}/month={month}", exist_ok=True)
            with fs.open(f"{root}/year={year}/month={month}/a.parquet", "wb") as f:
                pq.write_table(_rich(n, 30), f, row_group_size=10)
            n += 30


@pytest.fixture()
def trees(s3fs_direct, tmp_path, prefix):
    """The same tree locally and on the S3 server: (root, ours' filesystem, Ray's)."""
    local = str(tmp_path / "tree")
    _write(fsspec.filesystem("file"), local)
    _write(s3fs_direct, prefix)
    return {"local": (local, None, None), "s3": (prefix, "proxied", "direct")}


def _arrow(ds) -> pa.Table:
    """Every row, ``id`` order; dictionaries decoded (their chunking is not part of the answer)."""
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    cols = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in table.columns]
    return pa.Table.from_arrays(cols, names=table.column_names).sort_by("id").combine_chunks()


class _Catalog:
    """A catalog in Ray's sense: a table name resolved to where it lies."""

    def __init__(self, path, fs):
        self.path, self.fs = path, fs

    def resolve(self, table, *, reader, mode=None):
        from ray.data.catalog import ResolvedSource

        assert table == "sales.rich"
        return ResolvedSource(path=self.path, filesystem=self.fs)


def _cases(root, fs):
    """Each case's keywords for a reader whose filesystem is ``fs``."""
    from ray.data.datasource import Partitioning

    tensors = {"t": (np.float32, SHAPE)}
    # Arguments that do not touch each other share a read (Ray's reads cost seconds each).
    return {
        "rich types, defaults": dict(),
        "typed partitions, include_row_hash, tensor_column_schema, parallelism": dict(
            partitioning=Partitioning("hive", field_types={"year": int, "month": int}),
            include_row_hash=True, tensor_column_schema=tensors, parallelism=2),
        "directory partitioning, skip_paths (a file and a folder)": dict(
            partitioning=Partitioning("dir", field_names=["yy", "mm"], base_dir=root, filesystem=fs),
            skip_paths=[f"{root}/year=2024/month=1/a.parquet", f"{root}/year=2025"]),
        "include_row_hash with columns, ignore_missing_paths": dict(
            include_row_hash=True, columns=["id", "ts"],
            paths=[f"{root}/year=2024", f"{root}/none-here", f"{root}/year=2025/month=2"],
            ignore_missing_paths=True),
        "catalog": dict(paths="sales.rich", catalog=_Catalog(root, fs)),
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_arguments_and_rich_types_equal_rays(cache, s3fs_direct, s3fs_proxied, trees, where):
    root, ours_fs, ray_fs = trees[where]
    fss = {"proxied": s3fs_proxied, "direct": s3fs_direct, None: None}
    url = f"s3://{root}" if where == "s3" else root
    theirs_cases, ours_cases = _cases(url, fss[ray_fs]), _cases(url, fss[ours_fs])
    for name in theirs_cases:
        theirs_kw, ours_kw = dict(theirs_cases[name]), dict(ours_cases[name])
        paths = theirs_kw.pop("paths", url)
        ours_kw.pop("paths", None)
        if "catalog" not in theirs_kw:
            theirs_kw["filesystem"], ours_kw["filesystem"] = fss[ray_fs], fss[ours_fs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            theirs = ray.data.read_parquet(paths, **theirs_kw)
            want = _arrow(theirs)
        for state in ("cold", "warm"):
            got = ray_cache.read_parquet(paths, **ours_kw)
            assert got.schema().names == theirs.schema().names, (name, state)
            assert got.schema().types == theirs.schema().types, (name, state)
            table = _arrow(got)
            assert table.schema == want.schema, (name, state)
            assert table.equals(want), (name, state)
        ray_cache.free(url)


def test_rays_errors_for_bad_values_of_the_new_arguments(cache, tmp_path):
    root = str(tmp_path / "tree")
    _write(fsspec.filesystem("file"), root)
    with pytest.raises(FileNotFoundError, match="none-here"):
        ray_cache.read_parquet([root, f"{root}/none-here"])
    with pytest.raises(ValueError, match="skip_paths"):
        ray_cache.read_parquet(root, skip_paths=3)
    with pytest.raises(ValueError, match="tensor_column_schema"):
        ray_cache.read_parquet(root, tensor_column_schema={"t": np.float32})
    with pytest.raises(ValueError, match="multiple table identifiers"):
        ray_cache.read_parquet([root], catalog=_Catalog(root, None))
    with pytest.raises(ValueError, match="include_row_hash"):
        ray_cache.read_parquet(root, include_row_hash="yes")
    with pytest.raises(ValueError, match="no files found"):  # every path skipped: Ray's error too
        ray_cache.read_parquet(root, skip_paths=[root])
