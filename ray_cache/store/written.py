"""Which version of an object holds the bytes we just wrote: proven, or not at all.

Write-through (:mod:`ray_cache.files.write`) keeps a written file's pages under the version
the store gave it. The version is asked of the store after the write is accepted (one
HEAD), and another writer may have replaced the object between our commit and that HEAD;
keeping our bytes under *their* version would serve wrong data. So the version is taken
only when the store's own content hash agrees with what we sent:

========  ==========================================================================
store     proof
========  ==========================================================================
S3        none needed: the store's answer to our own PUT (or multipart completion)
          carries the new object's ETag, so no HEAD is sent and no other writer's
          object can be mistaken for ours
GCS       one HEAD; its ``md5Hash`` against the MD5 of the bytes we sent
others    one HEAD and the size (Azure without ``Content-MD5``, local files): the window
          is the time between our commit and the HEAD, said in the docs
========  ==========================================================================

Where there is no proof the write still succeeds; its pages are simply not kept (counted,
logged at debug). Nothing here holds or logs credentials.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any, Dict, Optional

from ray_cache.store.underfs import bounded_call, refresh, version_of

log = logging.getLogger("ray_cache.store.written")


class WriteProof:
    """What a writer sent, kept to prove the version the store reports afterwards.

    Hashes only where a proof needs it (GCS). ``answer`` is the store's reply to the
    commit where the writer saw it (S3: ``put_object`` or ``complete_multipart_upload``).

    Examples
    --------
    >>> p = WriteProof("gcs")
    >>> p.update(b"abc"); p.nbytes
    3
    >>> p.matches({"md5Hash": "kAFQmDzST7DWlj99KOF/cg==", "size": 3})
    True
    >>> p.matches({"md5Hash": "AAAA", "size": 3})
    False
    """

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.nbytes = 0
        self._md5: Optional[Any] = hashlib.md5(usedforsecurity=False) if protocol == "gcs" else None
        self.answer: Optional[Dict[str, Any]] = None

    def update(self, data: Any) -> None:
        """Count ``data`` (bytes-like) as written."""
        view = memoryview(data).cast("B")
        self.nbytes += view.nbytes
        if self._md5 is not None:
            self._md5.update(view)

    def matches(self, info: Dict[str, Any]) -> bool:
        """Whether ``info`` (the store's record after the write) is what we wrote."""
        if info.get("size") != self.nbytes:
            return False
        if self.protocol == "s3":
            return False  # only the commit's own answer proves an S3 version
        if self.protocol == "gcs":
            stored = info.get("md5Hash")
            return (stored is not None and self._md5 is not None
                    and stored == base64.b64encode(self._md5.digest()).decode())
        return True


def proven_version(fs: Any, path: str, proof: WriteProof) -> Optional[Dict[str, Any]]:
    """The version of ``path`` that holds our bytes, as an ``info``-like record
    (``name``, ``size``, ``type`` and the version fields), or None.

    S3: from the commit's answer, no request. Elsewhere one metadata request, and None
    (logged at debug) when it does not match or the store cannot be asked:
    write-through is then skipped, never wrong.

    >>> p = WriteProof("s3"); p.update(b"abc"); p.answer = {"ETag": '"e1"'}
    >>> version_of(proven_version(None, "b/k", p))
    'etag:e1/3'
    """
    if proof.protocol == "s3":
        etag = (proof.answer or {}).get("ETag")
        return {"name": path, "size": proof.nbytes, "type": "file", "ETag": etag} if etag else None
    refresh(fs, path)
    try:
        info = bounded_call(fs, "info", path)
    except Exception as exc:  # noqa: BLE001 - the write itself succeeded; keep nothing
        log.debug("ray_cache: no version for %s after writing (%s)", path, type(exc).__name__)
        return None
    if info.get("type", "file") != "file" or not proof.matches(info):
        log.debug("ray_cache: %s after writing is not provably ours (%s); not cached",
                  path, version_of(info))
        return None
    return info


def abort_upload(fs: Any, bucket: str, key: str, upload_id: str) -> bool:
    """Abort an S3 multipart upload (its parts are deleted; no object appears).

    Returns False when there was nothing to abort (completed or already aborted).
    """
    try:
        bounded_call(fs, "call_s3", "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        return True
    except Exception as exc:  # noqa: BLE001 - NoSuchUpload: finished or gone already
        log.debug("ray_cache: upload to %s/%s not aborted (%s)", bucket, key, type(exc).__name__)
        return False
