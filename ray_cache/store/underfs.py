"""Access to the under stores through fsspec: resolving, listing, versions, byte ranges.

This and :mod:`ray_cache.store.conditional` (reads that carry their own version check)
are the only modules that talk to S3, GCS, Azure or local files. Everything they raise
has passed through :func:`ray_cache.store.errors.translate`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

import fsspec
from fsspec.asyn import AsyncFileSystem, FSTimeoutError, sync
from fsspec.core import split_protocol

from ray_cache.store.errors import raise_translated, translate
from ray_cache.store.keys import StoreObject

PathLike = Union[str, os.PathLike]


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    """The filesystem's protocol (its first, where it has several)."""
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def resolve_filesystem(
    paths: Union[PathLike, Sequence[PathLike]],
    filesystem: Any = None,
    storage_options: Optional[Dict[str, Any]] = None,
) -> Tuple[fsspec.AbstractFileSystem, List[str]]:
    """Pick the fsspec filesystem for ``paths`` and strip their protocols.

    ``filesystem`` may be an fsspec filesystem or a pyarrow filesystem (wrapped with
    fsspec's ``ArrowFSWrapper``); otherwise it is inferred from the first path's protocol
    with ``storage_options``.

    Examples
    --------
    >>> fs, ps = resolve_filesystem(["/tmp/a.parquet"])
    >>> protocol_of(fs), ps
    ('file', ['/tmp/a.parquet'])
    """
    paths = _path_list(paths)
    if not paths:
        raise ValueError("paths must name at least one file, directory or glob")
    if filesystem is not None and storage_options:
        raise ValueError("pass either filesystem= or storage_options=, not both")
    if filesystem is None:
        protocol, _ = split_protocol(paths[0])
        protocol = protocol or "file"
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as exc:
            raise ValueError(f"unknown or unavailable protocol {protocol!r}: {exc}") from None
        options = storage_options or (s3_options_from_environment() if protocol in ("s3", "s3a") else {})
        filesystem = cls(**options)
    elif not isinstance(filesystem, fsspec.AbstractFileSystem):
        try:
            import pyarrow.fs as pafs
        except ImportError:  # pragma: no cover - pyarrow is a dependency
            pafs = None
        if pafs is not None and isinstance(filesystem, pafs.FileSystem):
            from fsspec.implementations.arrow import ArrowFSWrapper

            filesystem = ArrowFSWrapper(filesystem)
        else:
            raise ValueError(
                "filesystem must be an fsspec AbstractFileSystem or a pyarrow.fs.FileSystem, "
                f"got {type(filesystem).__name__}"
            )
    stripped = [filesystem._strip_protocol(p) for p in paths]
    return filesystem, stripped


def named_folders(paths: Union[PathLike, Sequence[PathLike]], fs: fsspec.AbstractFileSystem) -> FrozenSet[str]:
    """The stripped paths among ``paths`` written as folders (ending in ``/``): listed
    without first asking the store what they are (:func:`list_objects`' ``folders``).

    >>> import fsspec
    >>> sorted(named_folders(["/data/train/", "/data/x.parquet"], fsspec.filesystem("file")))
    ['/data/train']
    """
    return frozenset(fs._strip_protocol(p) for p in _path_list(paths) if p.endswith("/"))


def _path_list(paths: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """One path or many, as a list of strings."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [os.fspath(p) for p in paths]


def s3_options_from_environment(env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """s3fs options naming what ``AWS_*`` variables of this process say (static keys, an
    endpoint, a region), or ``{}`` when they name no key.

    The filesystem travels (pickled, by its options) to the cache workers and read tasks,
    whose processes do not share this one's environment: keys found only here would be
    missing there. Keys from elsewhere (profiles, instance roles) are not copied: each
    node finds its own, and they may expire. Never logged.

    >>> s3_options_from_environment({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
    ...                              "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})["client_kwargs"]
    {'endpoint_url': 'http://127.0.0.1:9000'}
    >>> s3_options_from_environment({})
    {}
    """
    env = os.environ if env is None else env
    if not env.get("AWS_ACCESS_KEY_ID") or not env.get("AWS_SECRET_ACCESS_KEY"):
        return {}
    options: Dict[str, Any] = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"]}
    if env.get("AWS_SESSION_TOKEN"):
        options["token"] = env["AWS_SESSION_TOKEN"]
    client = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        options["client_kwargs"] = client
    return options


def version_of(info: Dict[str, Any]) -> str:
    """The version token of an object from its fsspec ``info`` record.

    S3 and Azure report an ETag, GCS a generation, local files an mtime; size is always
    part of it, so even a store with only modification times at second resolution
    distinguishes most rewrites.

    Examples
    --------
    >>> version_of({"ETag": '"abc"', "size": 3})
    'etag:abc/3'
    >>> version_of({"mtime": 1.5, "size": 3})
    'mtime:1.5/3'
    """
    size = info.get("size")
    for field, tag in (("generation", "gen"), ("ETag", "etag"), ("etag", "etag")):
        value = info.get(field)
        if value:
            return f"{tag}:{str(value).strip(chr(34))}/{size}"
    for field in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(field)
        if value:
            if hasattr(value, "timestamp"):
                value = value.timestamp()
            return f"mtime:{value}/{size}"
    return f"size:{size}"


def _is_file(info: Dict[str, Any]) -> bool:
    return info.get("type") == "file"


#: Longest a metadata call to the store may take before it raises ``TimeoutError``.
STORE_CALL_TIMEOUT_S = 120.0


def bounded_call(fs: fsspec.AbstractFileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
    """``getattr(fs, method)(*args, **kwargs)``, never waiting more than
    :data:`STORE_CALL_TIMEOUT_S` on an asynchronous filesystem's event loop (s3fs, gcsfs,
    adlfs): its own retries may otherwise add up, and a loop that cannot run (a process
    forked at the wrong moment) would never answer. ``TimeoutError`` names the path.

    Examples
    --------
    >>> import fsspec
    >>> bounded_call(fsspec.filesystem("memory"), "exists", "/nothing/here")
    False
    """
    coro = getattr(fs, "_" + method, None)
    if not isinstance(fs, AsyncFileSystem) or fs.asynchronous or coro is None:
        return getattr(fs, method)(*args, **kwargs)
    try:
        return sync(fs.loop, coro, *args, timeout=STORE_CALL_TIMEOUT_S, **kwargs)
    except FSTimeoutError:
        what = args[0] if args else "?"
        raise TimeoutError(f"{what}: no answer from the store to {method} in "
                           f"{STORE_CALL_TIMEOUT_S:g} s") from None


def refresh(fs: fsspec.AbstractFileSystem, path: Optional[str]) -> None:
    """Forget listings ``fs`` cached for ``path`` (all, if None): s3fs's dircache and the
    like would hide rewrites. Best effort: not every filesystem implements it."""
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - best effort: not every filesystem implements it
        pass


def list_objects(
    fs: fsspec.AbstractFileSystem, paths: Iterable[str], suffixes: Tuple[str, ...] = (),
    headed: Optional[List[str]] = None, missing_ok: bool = False, skip: FrozenSet[str] = frozenset(),
    folders: FrozenSet[str] = frozenset(),
) -> List[StoreObject]:
    """Expand files, directories (recursively) and globs into objects with versions.

    Results keep the order of ``paths``; files inside a directory are sorted by path.
    Hidden files (``_SUCCESS``, ``.crc``) under a directory are skipped, as
    ``ray.data.read_parquet`` does. A path that matches nothing raises
    ``FileNotFoundError`` naming it. A listing proves no right to read what it lists:
    readers go through :func:`ray_cache.store.access.list_readable`, which proves it;
    ``headed`` collects the paths that were HEADed here (a single file named), which are.
    Ray's ``ignore_missing_paths`` (``missing_ok``): a path that names nothing is left out;
    its ``skip_paths`` (``skip``, stripped paths): files equal to one, or under one, are left
    out, existing or not. ``folders`` (:func:`named_folders`): paths the caller wrote as
    folders, listed at once (for s3fs, one LIST instead of a HEAD and a LIST to learn what the
    path is, then the LIST of its contents).
    """
    protocol = protocol_of(fs)
    out: List[StoreObject] = []
    for path in paths:
        if path.rstrip("/") in skip:
            continue
        refresh(fs, path)
        try:
            if any(c in path for c in "*?["):
                infos = fs.glob(path, detail=True)
                found = [i for i in infos.values() if _is_file(i)]
            else:
                info = None if path in folders else fs.info(path)
                if info is not None and _is_file(info):
                    found = [info]
                    if headed is not None:
                        headed.append(fs._strip_protocol(info.get("name") or path))
                else:
                    found = [
                        i
                        for i in fs.find(path, detail=True, withdirs=False).values()
                        if _is_file(i) and not _hidden(i["name"], path)
                    ]
                    if suffixes:
                        found = [i for i in found if i["name"].endswith(suffixes)] or found
        except Exception as exc:  # noqa: BLE001 - translated below
            if missing_ok and isinstance(translate(exc, path), FileNotFoundError):
                continue
            raise_translated(exc, path)
        if skip:
            found = [i for i in found if not _skipped(fs._strip_protocol(i["name"]), skip)]
        if not found:
            if missing_ok or skip:
                continue
            raise FileNotFoundError(2, "No such file, directory or glob match", path)
        out.extend(object_of(fs, info, protocol) for info in sorted(found, key=lambda i: i["name"]))
    return out


def object_of(fs: fsspec.AbstractFileSystem, info: Dict[str, Any], protocol: Optional[str] = None,
              path: str = "") -> StoreObject:
    """The object an ``info`` dict of ``fs`` describes (``path`` where it names none)."""
    name = fs._strip_protocol(info.get("name") or path)
    return StoreObject(protocol or protocol_of(fs), name, int(info.get("size") or 0), version_of(info))


def _skipped(name: str, skip: FrozenSet[str]) -> bool:
    """Whether ``name`` is one of ``skip`` or lies under one of them."""
    return name in skip or any(name.startswith(p + "/") for p in skip)


def _hidden(name: str, root: str) -> bool:
    rel = name[len(root.rstrip("/")) :].lstrip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def current_version(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Ask the store for an object's version now (one metadata request, no data)."""
    refresh(fs, path)
    try:
        return version_of(fs.info(path))
    except Exception as exc:  # noqa: BLE001
        raise_translated(exc, path)
        raise  # pragma: no cover


def read_ranges(
    fs: fsspec.AbstractFileSystem, path: str, ranges: Sequence[Tuple[int, int]]
) -> List[bytes]:
    """Fetch byte ranges ``[start, end)`` of one object, concurrently where fsspec can."""
    if not ranges:
        return []
    try:
        if len(ranges) == 1:
            start, end = ranges[0]
            return [fs.cat_file(path, start=start, end=end)]
        parts = fs.cat_ranges(
            [path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges]
        )
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return parts
    except Exception as exc:  # noqa: BLE001
        raise_translated(exc, path)
        raise  # pragma: no cover
