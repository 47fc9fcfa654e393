"""``ray_cache.read_parquet``'s keyword arguments checked against Ray 2.60's ``read_parquet``.

A user changes ``ray.data.read_parquet`` to ``ray_cache.read_parquet`` and nothing else,
so every argument of Ray's is either honoured with Ray's meaning or refused at the call:
never silently ignored (a dropped ``filter=`` returns every row). Three kinds:

- :data:`PASSED_ON`: scheduling and resource arguments, handed to
  ``ray.data.read_datasource``, which gives them Ray's meaning;
- :data:`NOT_YET`: arguments ray_cache does not implement yet; the one value that means
  what ray_cache does is accepted, any other raises ``ValueError`` saying so;
- ``filter=``: Ray 2.60's own ``ValueError`` (use ``Dataset.filter(expr=...)``);
- anything else (other pyarrow options, typos): ``TypeError`` naming it.

Examples
--------
>>> check_read_args({"num_cpus": 0.5, "meta_provider": None})
{'num_cpus': 0.5}
>>> check_read_args({"colums": ["x"]})
Traceback (most recent call last):
...
TypeError: ray_cache.read_parquet() got an unexpected keyword argument 'colums' (it is not applied by the cache, so it is refused rather than ignored)
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Sequence

#: Passed to ``ray.data.read_datasource`` as they are.
PASSED_ON = ("num_cpus", "num_gpus", "memory", "concurrency", "label_selector", "fallback_strategy",
             "max_calls", "resources", "accelerator_type", "runtime_env", "ray_remote_args")

#: Ray's arguments not implemented here yet -> the value that means what ray_cache does.
NOT_YET: Dict[str, Any] = {
    "meta_provider": None,  # gone from Ray 2.60's signature; still refused by name
}


def check_partitioning(value: Any) -> Any:
    """``"hive"`` (Ray's default ``Partitioning("hive")``: string columns, read by our own
    parser), None (no partition columns), or any other ``ray.data.datasource.Partitioning``
    (``field_types``, ``base_dir``, ``field_names``, the ``"dir"`` style: parsed by Ray's
    own ``PathPartitionParser``); anything else raises ``ValueError`` saying what is allowed.

    >>> check_partitioning(None) is None, check_partitioning("hive")
    (True, 'hive')
    >>> from ray.data.datasource import Partitioning
    >>> check_partitioning(Partitioning("hive"))
    'hive'
    >>> check_partitioning(Partitioning("hive", field_types={"year": int})).field_types
    {'year': <class 'int'>}
    """
    if value is None or value == "hive":
        return value
    from ray.data.datasource import Partitioning

    if not isinstance(value, Partitioning):
        raise ValueError(f"partitioning must be a ray.data.datasource.Partitioning, 'hive' or None, "
                         f"not {value!r}")
    style = getattr(value.style, "value", value.style)
    if style == "hive" and not value.base_dir and not value.field_names and not value.field_types:
        return "hive"
    return value


def check_extensions(value: Optional[Sequence[str]]) -> List[str]:
    """Ray's ``file_extensions`` as a list (None or empty: ``["parquet"]``, as Ray 2.60), or
    ``ValueError`` saying what is allowed.

    >>> check_extensions(None), check_extensions([".PARQUET", "parq"])
    (['parquet'], ['.PARQUET', 'parq'])
    """
    if isinstance(value, str) or (value is not None and not all(isinstance(e, str) for e in value)):
        raise ValueError(f"file_extensions must be a list of extensions like ['parquet'], got {value!r}")
    return list(value or ("parquet",))


def has_extension(path: str, extensions: Sequence[str]) -> bool:
    """Ray's ``file_extensions`` test: ``path`` ends with one of ``extensions`` (with or
    without the dot, any case).

    >>> has_extension("a/b.PARQUET", ["parquet"]), has_extension("a/b.csv", [".parquet"])
    (True, False)
    """
    ends = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    return path.lower().endswith(ends)


def select_files(paths: List[str], partition_filter: Any, file_extensions: Sequence[str],
                 asked: Any = None) -> List[str]:
    """The paths Ray's ``read_parquet`` reads after ``partition_filter`` and
    ``file_extensions``; Ray 2.60's ``ValueError`` (naming ``asked``) when none are left."""
    if partition_filter is not None:
        if not callable(partition_filter):
            raise ValueError(f"partition_filter must be a PathPartitionFilter, got {partition_filter!r}")
        kept = set(partition_filter(list(paths)))
        paths = [p for p in paths if p in kept]
    paths = [p for p in paths if has_extension(p, file_extensions)]
    if not paths:
        raise ValueError(f"no files found under {asked!r}. Check the path and any configured "
                         "`partition_filter` or `file_extensions` filters.")
    return paths


def check_skip_paths(fs: Any, value: Any) -> FrozenSet[str]:
    """Ray's ``skip_paths`` (a path or a list of them) as the filesystem names them, or
    ``ValueError`` saying what is allowed.

    >>> import fsspec
    >>> sorted(check_skip_paths(fsspec.filesystem("file"), ["/d/a.parquet", "file:///d/b/"]))
    ['/d/a.parquet', '/d/b']
    """
    if value is None:
        return frozenset()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in items):
        raise ValueError(f"skip_paths must be a path or a list of paths, got {value!r}")
    return frozenset(fs._strip_protocol(p).rstrip("/") for p in items)


def check_shuffle(value: Any) -> Any:
    """None, ``"files"`` or a ``ray.data.FileShuffleConfig``, with Ray's error otherwise.

    >>> check_shuffle("files")
    'files'
    """
    from ray.data.datasource.file_based_datasource import _validate_shuffle_arg

    _validate_shuffle_arg(value)
    return value


def file_order(num_files: int, shuffle: Any, execution: int) -> List[int]:
    """The order in which to read ``num_files`` files for one execution of a dataset, as
    Ray's ``shuffle`` asks: ``"files"`` or a config without a seed, a new random order
    each time; a seed, the same order each time unless ``reseed_after_execution`` (Ray's
    default), then one per execution. (The permutation is ours: Ray's own is not part of
    its contract, and parallel reads do not keep it anyway.)

    >>> file_order(4, None, 0)
    [0, 1, 2, 3]
    >>> from ray.data import FileShuffleConfig
    >>> cfg = FileShuffleConfig(seed=7, reseed_after_execution=False)
    >>> file_order(6, cfg, 0) == file_order(6, cfg, 1)
    True
    """
    import numpy as np

    if shuffle is None:
        return list(range(num_files))
    seed = getattr(shuffle, "seed", None)
    if seed is not None and getattr(shuffle, "reseed_after_execution", True):
        seed = (seed, execution)
    return [int(i) for i in np.random.default_rng(seed).permutation(num_files)]


def check_read_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments to pass on to ``read_datasource``; raises for the others (see above)."""
    out: Dict[str, Any] = {}
    for name, value in kwargs.items():
        if name == "filter":  # Ray 2.60 refuses it too, with this error
            raise ValueError("`filter=` on `read_parquet` is not supported. "
                             "Use `ray.data.read_parquet(path).filter(expr=expr)` instead.")
        if name in PASSED_ON:
            out[name] = value
        elif name in NOT_YET:
            if value is not NOT_YET[name] and value != NOT_YET[name]:
                raise ValueError(
                    f"ray_cache.read_parquet does not support {name}={value!r} yet "
                    f"(Ray's read_parquet does); allowed: {name}={NOT_YET[name]!r} or leave it out")
        else:
            raise TypeError(
                f"ray_cache.read_parquet() got an unexpected keyword argument {name!r} (it is "
                "not applied by the cache, so it is refused rather than ignored)")
    return out
