"""``select_columns`` and ``filter(expr=...)`` after ``ray_cache.read_parquet`` are pushed into
the read: only the selected columns' bytes and only the row groups whose statistics (or
partition values) allow the filter reach the store, counted at the proxy; rows equal Ray's
own ``read_parquet(...).select_columns(...)`` / ``.filter(expr=...)`` on the same files."""

from __future__ import annotations

import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.data.expressions import col, lit

import ray_cache
from conftest import data_gets, make_table, read_all, write_dataset


def _ray(url, fs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.read_parquet(url, filesystem=fs)


def _key(get):
    from urllib.parse import unquote

    return unquote(get["path"].split("?")[0])


def _chunk_bytes(fs, paths, columns, row_groups=None):
    """The compressed bytes of ``columns``' chunks in ``paths`` (every row group, or those named)."""
    total = 0
    for p in paths:
        meta = pq.ParquetFile(p, filesystem=fs).metadata
        for r in range(meta.num_row_groups) if row_groups is None else row_groups:
            for c in range(meta.num_columns):
                if meta.row_group(r).column(c).path_in_schema in columns:
                    total += meta.row_group(r).column(c).total_compressed_size
    return total


def test_selected_columns_alone_are_fetched_and_cached(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    import numpy as np

    # Unselected chunks bigger than the gap the reader would fetch across (parquet.MERGE_GAP).
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        n = 20_000
        table = pa.table({"id": np.arange(i * n, (i + 1) * n), "blob": [rng.bytes(40) for _ in range(n)],
                          "label": rng.integers(0, 10, n).astype(np.int32)})
        paths.append(f"{prefix}/part-{i}.parquet")
        with s3fs_direct.open(paths[-1], "wb") as f:
            pq.write_table(table, f, row_group_size=10_000, compression="none")
    url = f"s3://{prefix}/"
    want = read_all(_ray(url, s3fs_direct).select_columns(["label", "id"]))
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied)  # plans: footers fetched here
    proxy.reset()
    got = read_all(ds.select_columns(["label", "id"]))
    assert got.column_names == want.column_names == ["label", "id"] and got.equals(want)
    fetched = sum(g["response_body_bytes"] for g in data_gets(proxy))
    assert fetched == _chunk_bytes(s3fs_direct, paths, {"id", "label"}), "exactly the selected chunks"
    proxy.reset()
    again = read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied).select_columns(["label", "id"]))
    assert again.equals(want) and data_gets(proxy) == [], "the selected columns were cached"


def test_a_filter_fetches_only_the_row_groups_its_statistics_allow(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    paths = write_dataset(s3fs_direct, prefix, files=3, rows=20_000, rg_rows=5_000)
    url = f"s3://{prefix}/"
    pred = (col("id") >= 26_000) & (col("id") < 29_000)  # inside row group 1 of the second file
    want = read_all(_ray(url, s3fs_direct).filter(expr=pred))
    assert want.num_rows == 3_000
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied)  # plans: footers fetched here
    proxy.reset()
    got = read_all(ds.filter(expr=pred))
    assert got.equals(want)
    gets = data_gets(proxy)
    assert gets and {_key(g).rsplit("/", 1)[-1] for g in gets} == {"part-001.parquet"}
    fetched = sum(g["response_body_bytes"] for g in gets)
    assert fetched == _chunk_bytes(s3fs_direct, [paths[1]], set(make_table(1).column_names), [1]), \
        "row group 1 of the second file, nothing else"
    proxy.reset()
    assert read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied).filter(expr=pred)).equals(want)
    assert data_gets(proxy) == [], "the row group read is cached"


def test_a_filter_on_a_partition_column_reads_only_that_partition(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    for year in (2024, 2025):
        with s3fs_direct.open(f"{prefix}/year={year}/a.parquet", "wb") as f:
            pq.write_table(make_table(1_000, offset=year * 10_000), f)
    url = f"s3://{prefix}/"
    pred = col("year") == "2025"
    want = read_all(_ray(url, s3fs_direct).filter(expr=pred))
    ds = ray_cache.read_parquet(url, filesystem=s3fs_proxied)  # plans: footers fetched here
    proxy.reset()
    got = read_all(ds.filter(expr=pred))
    assert got.equals(want) and got.num_rows == 1_000
    assert {_key(g).split("/")[-2] for g in data_gets(proxy)} == {"year=2025"}


def test_filters_of_every_kind_give_rays_rows(cache, tmp_path):
    """Comparisons (a literal on either side), is_in, is_null, not, or, on numbers, strings, dates and nulls; a filter
    that excludes every row group; and a filter that is not pushed (a UDF) still filters."""
    import datetime

    root = tmp_path / "t"
    root.mkdir()
    t = make_table(4_000)
    t = t.append_column("day", pa.array([datetime.date(2025, 1, 1) + datetime.timedelta(days=i % 90)
                                          for i in range(4_000)], pa.date32()))
    t = t.append_column("maybe", pa.array([None if i % 7 == 0 else i for i in range(4_000)], pa.int64()))
    pq.write_table(t, root / "a.parquet", row_group_size=500)
    url = str(root)
    pred = (((col("id") > 3_500) | (col("name").is_in(["row-7", "row-1200"]))) & ~(col("maybe").is_null())) \
        | ((col("day") == datetime.date(2025, 2, 1)) & (col("label") <= 3)) | (col("x") < 0.001) \
        | (lit(3_990) < col("id"))
    want = read_all(_ray(url, None).filter(expr=pred))
    assert 0 < want.num_rows < t.num_rows
    for _ in ("cold", "warm"):
        assert read_all(ray_cache.read_parquet(url).filter(expr=pred)).equals(want)
    plain = read_all(ray_cache.read_parquet(url).filter(lambda r: r["id"] % 1000 == 0))
    assert plain["id"].to_pylist() == [0, 1000, 2000, 3000]
    assert read_all(ray_cache.read_parquet(url).filter(expr=col("id") < 0)).num_rows == 0
