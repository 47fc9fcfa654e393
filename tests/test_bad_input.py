"""Bad input gets a clear exception naming what is wrong, and leaves the cache intact."""

from __future__ import annotations

import os

import pytest

import ray_cache
from conftest import data_gets, read_all, write_dataset
from ray_cache.testing import S3Server


def _warm(prefix, fs):
    return read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=fs))


def test_missing_path_raises_file_not_found_naming_it(cache, s3fs_proxied, prefix):
    with pytest.raises(FileNotFoundError) as err:
        ray_cache.read_parquet(f"s3://{prefix}/nothing-here.parquet", filesystem=s3fs_proxied)
    assert f"{prefix}/nothing-here.parquet" in str(err.value)


def test_missing_local_path(cache, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ray_cache.read_parquet(str(tmp_path / "absent"))
    assert "absent" in str(err.value)


def test_not_parquet_names_the_object_and_keeps_cache(cache, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=1)
    before = _warm(prefix, s3fs_proxied)
    entries = ray_cache.status().workers[0]["entries"]
    s3fs_direct.pipe(f"{prefix}-bad/notes.parquet", b"this is plainly not parquet at all\n" * 10)
    with pytest.raises(ray_cache.NotParquetError) as err:
        ray_cache.read_parquet(f"s3://{prefix}-bad/notes.parquet", filesystem=s3fs_proxied)
    assert "notes.parquet" in str(err.value)
    assert ray_cache.status().workers[0]["entries"] == entries
    proxy.reset()
    assert _warm(prefix, s3fs_proxied).equals(before)
    assert data_gets(proxy) == []


def test_unreadable_credentials_raise_permission_error(cache):
    import s3fs

    with S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as locked:
        fs = s3fs.S3FileSystem(
            key="nobody", secret="wrong", skip_instance_cache=True,
            client_kwargs={"endpoint_url": locked.endpoint_url, "region_name": "us-east-1"},
        )
        with pytest.raises(PermissionError) as err:
            ray_cache.read_parquet("s3://locked-bucket/data.parquet", filesystem=fs)
        assert "locked-bucket/data.parquet" in str(err.value)
        assert "wrong" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{"memory_bytes": 0}, {"memory_bytes": -5}, {"disk_bytes": 0}, {"disk_bytes": "big"}])
def test_bad_capacities_raise_value_error(ray_session, kwargs):
    with pytest.raises(ValueError) as err:
        ray_cache.start(**kwargs)
    assert next(iter(kwargs)) in str(err.value)


def test_unwritable_disk_dir_raises_value_error(ray_session, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError) as err:
        ray_cache.start(disk_dir=str(blocker / "sub"))
    assert "disk_dir" in str(err.value)
    if os.geteuid() != 0:  # root can write anywhere, so a read-only dir proves nothing there
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError):
            ray_cache.start(disk_dir=str(ro / "cache"))


def test_bad_columns(cache, s3fs_direct, s3fs_proxied, prefix):
    write_dataset(s3fs_direct, prefix, files=1)
    with pytest.raises(ValueError) as err:
        ray_cache.read_parquet(f"s3://{prefix}/", columns=["nope"], filesystem=s3fs_proxied)
    assert "nope" in str(err.value)
    with pytest.raises(ValueError):
        ray_cache.read_parquet(f"s3://{prefix}/", columns="id", filesystem=s3fs_proxied)


def test_unknown_protocol(ray_session):
    with pytest.raises(ValueError) as err:
        ray_cache.read_parquet("nosuchproto://bucket/x.parquet")
    assert "nosuchproto" in str(err.value)


def test_read_parquet_refuses_what_it_does_not_apply_and_never_ignores_it(tmp_path):
    # Checked before any listing or worker: the path need not even exist.
    import inspect

    import ray.data

    from ray_cache.readers.arguments import NOT_YET, PASSED_ON

    missing = str(tmp_path / "nowhere")
    import pyarrow.dataset as pds

    with pytest.raises(ValueError) as rays:  # Ray 2.60's own answer to filter=
        ray.data.read_parquet(missing, filter=pds.field("x") > 3)
    with pytest.raises(ValueError) as ours:
        ray_cache.read_parquet(missing, filter=pds.field("x") > 3)
    assert str(ours.value) == str(rays.value)
    with pytest.raises(TypeError, match="'colums'"):
        ray_cache.read_parquet(missing, colums=["x"])
    with pytest.raises(ValueError, match="meta_provider=.*allowed: meta_provider=None"):
        ray_cache.read_parquet(missing, meta_provider=object())
    with pytest.raises(ValueError, match="include_row_hash must be True or False"):
        ray_cache.read_parquet(missing, include_row_hash="yes")
    with pytest.raises(ValueError, match="file_extensions must be a list"):
        ray_cache.read_parquet(missing, file_extensions="parquet")
    with pytest.raises(ValueError, match="Invalid value for 'shuffle'"):  # Ray's own check
        ray_cache.read_parquet(missing, shuffle="rows")
    with pytest.raises(ValueError, match="zero_copy must be"):
        ray_cache.read_parquet(missing, zero_copy="yes")
    # The values that mean what ray_cache does pass the check (then the path is missing).
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ray_cache.read_parquet(missing, include_paths=False, partitioning=None, num_cpus=0.5)
    # Every named argument of Ray's own read_parquet is accounted for: honoured here or
    # passed on to Ray.
    ours = set(inspect.signature(ray_cache.read_parquet).parameters) - {"kwargs"}
    ray_args = set(inspect.signature(ray.data.read_parquet).parameters) - {"arrow_parquet_args"}
    assert ray_args - ours - set(PASSED_ON) == set(), "every one of Ray's arguments is ours or passed on"
    assert not set(NOT_YET) & ray_args, "none of Ray 2.60's own arguments is refused any more"
