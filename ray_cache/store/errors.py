"""One table from under-store failures to Python exceptions, and the errors we raise.

Every store library reports "not found" and "forbidden" its own way (botocore error
codes, HTTP statuses from gcsfs, azure-core exception classes). ``translate`` applies one
table so callers only ever see ``FileNotFoundError``, ``PermissionError`` or our own
errors, always with the path named and never with credentials.
"""

from __future__ import annotations

import errno
import re
from typing import Dict, Optional, Type


class CacheError(Exception):
    """Base class of ray_cache's own errors."""


class NotParquetError(CacheError, ValueError):
    """An object that should be Parquet is not (bad magic bytes or unreadable footer)."""


class ObjectChangedError(CacheError, OSError):
    """The object changed in the store while it was being read; nothing was cached."""


class WorkerUnavailableError(CacheError, RuntimeError):
    """A cache worker could not be reached in time (the caller falls back to the store)."""


class PinCapacityError(ValueError):
    """Pinning would need more room than a tier has beside what is already pinned."""


#: Error codes and exception class names from s3fs/botocore, gcsfs, adlfs/azure-core and
#: HTTP statuses, mapped to the Python exception a caller should see.
ERROR_TABLE: Dict[str, Type[OSError]] = {
    # S3 (botocore ``Error.Code``)
    "NoSuchKey": FileNotFoundError,
    "NoSuchBucket": FileNotFoundError,
    "NotFound": FileNotFoundError,
    "404": FileNotFoundError,
    "AccessDenied": PermissionError,
    "InvalidAccessKeyId": PermissionError,
    "SignatureDoesNotMatch": PermissionError,
    "AllAccessDisabled": PermissionError,
    "ExpiredToken": PermissionError,
    "InvalidToken": PermissionError,
    "403": PermissionError,
    "401": PermissionError,
    # Azure (azure-core exception class names, storage error codes)
    "ResourceNotFoundError": FileNotFoundError,
    "BlobNotFound": FileNotFoundError,
    "ContainerNotFound": FileNotFoundError,
    "ClientAuthenticationError": PermissionError,
    "AuthenticationFailed": PermissionError,
    "AuthorizationFailure": PermissionError,
    # GCS (gcsfs raises HttpError with a numeric code; class names as a fallback)
    "Forbidden": PermissionError,
    "Unauthorized": PermissionError,
    # A reply whose bytes arrived damaged (botocore's checksum check, a body cut short)
    "FlexibleChecksumError": OSError,
    "ResponseStreamingError": OSError,
    "IncompleteReadError": OSError,
    "ClientPayloadError": OSError,
}

_SECRET_RE = re.compile(
    r"(?i)(AccountKey|SharedAccessSignature|sig|secret|token|password|key)=([^;&\s]+)"
)


def redact(text: str) -> str:
    """Remove anything that looks like a credential from a message.

    Examples
    --------
    >>> redact("AccountKey=abc123;BlobEndpoint=x")
    'AccountKey=***;BlobEndpoint=x'
    """
    return _SECRET_RE.sub(lambda m: f"{m.group(1)}=***", text)


def _codes(exc: BaseException) -> list:
    """Candidate table keys for an exception: its codes, status and class names."""
    found = []
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {}) or {}
        found.append(str(err.get("Code", "")))
        meta = response.get("ResponseMetadata", {}) or {}
        found.append(str(meta.get("HTTPStatusCode", "")))
    for attr in ("code", "status_code", "error_code", "status"):
        value = getattr(exc, attr, None)
        if value is not None:
            found.append(str(value))
    found.extend(cls.__name__ for cls in type(exc).__mro__)
    return [c for c in found if c]


def translate(exc: BaseException, path: str) -> BaseException:
    """Map an under-store exception to the Python exception a user should see.

    Returns ``exc`` itself when it is already one of ours or nothing in the table matches.

    Examples
    --------
    >>> e = translate(KeyError("x"), "bucket/key")
    >>> type(e).__name__
    'KeyError'
    >>> type(translate(PermissionError("denied"), "b/k")).__name__
    'PermissionError'
    """
    if isinstance(exc, CacheError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(2, "No such file or object", path)
    if isinstance(exc, PermissionError):
        return PermissionError(13, f"Permission denied: {redact(str(exc))[:200]}", path)
    chosen: Optional[Type[OSError]] = None
    for code in _codes(exc):
        if code in ERROR_TABLE:
            chosen = ERROR_TABLE[code]
            break
    if chosen is FileNotFoundError:
        return FileNotFoundError(2, "No such file or object", path)
    if chosen is PermissionError:
        return PermissionError(13, f"Permission denied ({type(exc).__name__})", path)
    if chosen is OSError:
        return OSError(errno.EIO, f"the store's reply arrived damaged ({type(exc).__name__})", path)
    return exc


def raise_translated(exc: BaseException, path: str) -> None:
    """Raise ``translate(exc, path)`` chained to the original exception."""
    new = translate(exc, path)
    if new is exc:
        raise exc
    raise new from None
