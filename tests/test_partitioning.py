"""Hive-partitioned folders read as Ray Data reads them (``partitioning`` defaults to hive):
``key=value`` folders become string columns after the file's own, on local files and on the
S3 server, cold and warm, compared with ``ray.data.read_parquet`` on the same files."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from conftest import data_gets

CASES = [{}, {"columns": ["id", "year"]}, {"columns": ["id"]}, {"partitioning": None}]


def _write_tree(fs, root):
    """year=2024|2025 / city=New York|Oslo (URL-encoded as pyarrow writes it), 2 rows each."""
    n = 0
    for year in (2024, 2025):
        for city in ("New%20York", "Oslo"):
            fs.makedirs(f"{root}/year={year}/city={city}", exist_ok=True)
            with fs.open(f"{root}/year={year}/city={city}/part-0.parquet", "wb") as f:
                pq.write_table(pa.table({"id": pa.array([n, n + 1], pa.int64()), "v": [0.5, 1.5]}), f)
            n += 2


def _rows(ds):
    return sorted(ds.take_all(), key=lambda r: r["id"])


def _ray(url, fs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray 2.60 deprecates columns=
        return ray.data.read_parquet(url, filesystem=fs, **kw)


@pytest.mark.parametrize("kw", CASES, ids=["default", "columns-with-key", "columns-without", "none"])
def test_partition_columns_equal_rays_on_s3_and_local_cold_and_warm(
        cache, s3fs_direct, s3fs_proxied, proxy, tmp_path, prefix, kw):
    import fsspec

    _write_tree(s3fs_direct, prefix)
    local = tmp_path / "tree"
    _write_tree(fsspec.filesystem("file"), str(local))
    for url, fs, anchor_fs in ((str(local), None, None), (f"s3://{prefix}/", s3fs_proxied, s3fs_direct)):
        want = _ray(url, anchor_fs, **kw).materialize()
        want_rows = _rows(want)
        for _ in ("cold", "warm"):
            proxy.reset()
            got = ray_cache.read_parquet(url, filesystem=fs, **kw)
            assert got.schema().names == want.schema().names
            assert got.schema().types == want.schema().types
            assert _rows(got) == want_rows
        assert fs is None or data_gets(proxy) == [], "the warm read comes from the cache"


def test_a_single_partitioned_file_gets_its_folders_columns_as_ray_gives_them(cache, s3fs_direct, s3fs_proxied, prefix):
    _write_tree(s3fs_direct, prefix)
    path = f"s3://{prefix}/year=2025/city=Oslo/part-0.parquet"
    want = _ray(path, s3fs_direct)
    got = ray_cache.read_parquet(path, filesystem=s3fs_proxied)
    assert got.schema().names == want.schema().names == ["id", "v", "year", "city"]
    assert _rows(got) == _rows(want)


def test_a_partitioning_that_does_not_fit_the_paths_raises_rays_error(cache, s3fs_direct, s3fs_proxied, prefix):
    from ray.data.datasource import Partitioning

    _write_tree(s3fs_direct, prefix)
    wrong = Partitioning("dir", field_names=["year", "city"])  # no base_dir: the bucket's folders count
    with pytest.raises(ValueError) as rays:
        ray.data.read_parquet(f"s3://{prefix}/", filesystem=s3fs_direct, partitioning=wrong).materialize()
    with pytest.raises(ValueError) as ours:
        ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, partitioning=wrong)
    assert str(ours.value) == str(rays.value)
    with pytest.raises(ValueError, match="partitioning must be a ray.data.datasource.Partitioning"):
        ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, partitioning="dir")
    ds = ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied, partitioning=Partitioning("hive"))
    assert ds.schema().names == ["id", "v", "year", "city"]
