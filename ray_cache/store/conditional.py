"""Ranged reads that carry their own version check: one request where a GET and a HEAD were.

Bytes fetched from a store belong to the planned version only if the store still holds
that version. The general way (:mod:`ray_cache.store.versions`) asks after the fetch (a
HEAD, shared between concurrent fetches). Where the store can say it in the data
response itself, one request does both:

- **S3 and S3-compatible stores** (s3fs): ``GET`` with ``Range`` and ``If-Match: <ETag>``.
  The store answers ``412 Precondition Failed`` if the object is another version now, and
  the response's own ``ETag`` and ``Content-Range`` (total size) are compared with the
  planned version too, so a server that ignored ``If-Match`` is still caught.

Other stores (GCS, Azure, local files) return None here and keep the check after the fetch.

Examples
--------
>>> etag_of("etag:781e5e245d69b566979b86e28d23f2c7/10"), etag_of("gen:17/10")
('781e5e245d69b566979b86e28d23f2c7', None)
"""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional, Sequence, Tuple

from ray_cache.store.errors import ObjectChangedError, raise_translated
from ray_cache.store.keys import StoreObject

#: Longest one conditional read may take, retries included.
READ_TIMEOUT_S = 300.0


def etag_of(version: str) -> Optional[str]:
    """The ETag inside a version token of the form ``etag:<tag>/<size>``, else None."""
    if not version.startswith("etag:"):
        return None
    tag = version[5:].rsplit("/", 1)[0]
    return tag or None


def _s3(fs: Any) -> bool:
    try:
        from s3fs import S3FileSystem
    except ImportError:  # pragma: no cover - s3fs is a dependency
        return False
    return isinstance(fs, S3FileSystem) and not fs.version_aware


def read_ranges_checked(fs: Any, obj: StoreObject,
                        ranges: Sequence[Tuple[int, int]]) -> Optional[List[bytes]]:
    """Bytes of each ``[start, end)`` of ``obj``, each read only from ``obj.version``.

    Returns None where the store cannot make the read conditional (the caller then checks
    the version after fetching). Raises :class:`ObjectChangedError` if the object is
    another version now, ``FileNotFoundError`` if it is gone.
    """
    etag = etag_of(obj.version)
    if etag is None or not ranges or not _s3(fs):
        return None
    from fsspec.asyn import FSTimeoutError, sync
    from s3fs.core import _error_wrapper

    bucket, key, _ = fs.split_path(obj.path)

    async def one(start: int, end: int) -> bytes:
        async def call() -> bytes:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, IfMatch=f'"{etag}"',
                                     Range=f"bytes={start}-{end - 1}", **fs.req_kw)
            try:
                got = str(resp.get("ETag", "")).strip('"')
                total = str(resp.get("ContentRange", "")).rsplit("/", 1)[-1]
                if got != etag or (total.isdigit() and int(total) != obj.size):
                    raise ObjectChangedError(f"{obj.url} changed in the store while it was read")
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        for attempt in range(TRANSFER_ATTEMPTS):
            try:
                return await _error_wrapper(call, retries=fs.retries)
            except Exception as exc:  # noqa: BLE001 - only damaged transfers are retried
                if not damaged_transfer(exc) or attempt == TRANSFER_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def every() -> List[bytes]:
        return list(await asyncio.gather(*(one(s, e) for s, e in ranges)))

    try:
        blobs = sync(fs.loop, every, timeout=READ_TIMEOUT_S)
    except ObjectChangedError:
        raise
    except FSTimeoutError:
        raise TimeoutError(f"{obj.url}: no answer from the store in {READ_TIMEOUT_S:g} s") from None
    except Exception as exc:  # noqa: BLE001 - one error table for every store
        if _precondition_failed(exc):
            raise ObjectChangedError(f"{obj.url} changed in the store since it was listed") from None
        raise_translated(exc, obj.url)
        raise  # pragma: no cover
    for (start, end), blob in zip(ranges, blobs):
        if len(blob) != end - start:
            raise ObjectChangedError(f"{obj.url}: expected {end - start} bytes at {start}, got {len(blob)}")
    return blobs


#: Tries of one range whose bytes arrived damaged (a body cut short or failing the
#: store's checksum) before the read fails with ``OSError``.
TRANSFER_ATTEMPTS = 3
_DAMAGED = {"FlexibleChecksumError", "ResponseStreamingError", "IncompleteReadError",
            "ClientPayloadError", "ContentLengthError", "IncompleteRead"}


def damaged_transfer(exc: BaseException) -> bool:
    """Whether ``exc`` says the reply's bytes arrived damaged (worth asking again)."""
    return any(cls.__name__ in _DAMAGED for err in (exc, exc.__cause__, exc.__context__)
               if err is not None for cls in type(err).__mro__)


def _precondition_failed(exc: BaseException) -> bool:
    for err in (exc, exc.__cause__, exc.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if error.get("Code") in ("PreconditionFailed", "412") or status == 412:
                return True
    return False
