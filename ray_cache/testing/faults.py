"""Faults the counting proxy injects (:mod:`ray_cache.testing.proxy`): S3 error replies,
connections cut mid-reply, bodies truncated behind a consistent length, stalled replies.

Kept apart from the proxy's relaying so each stays small; the proxy imports it as a
sibling module when it runs as a script.
"""

from __future__ import annotations

import asyncio
from typing import Any

Headers = list[tuple[str, str]]


class Fault:
    """One injected fault: ``kind`` on every ``every``-th request matching ``method`` (and
    ``path_contains``, and only ranged GETs if ``ranged``), at most ``times`` times.

    Kinds: ``"503"`` / ``"500"`` (an S3 error reply, not forwarded), ``"cut"`` (half the
    reply's body, then the connection closes), ``"truncate"`` (a complete-looking reply whose
    ``Content-Length`` and body are half the real one), ``"stall"`` (the head and half the
    body, then nothing for ``stall_s`` seconds, then the connection closes), ``"no-etag"``
    (the reply, forwarded without its ``ETag`` header: a store that does not say which
    version it made).
    """

    KINDS = ("503", "500", "cut", "truncate", "stall", "no-etag")

    def __init__(self, kind: str, method: str = "GET", every: int = 1, times: int | None = None,
                 path_contains: str = "", ranged: bool = False, stall_s: float = 3600.0) -> None:
        if kind not in self.KINDS or every < 1:
            raise ValueError(f"fault kind must be one of {self.KINDS} and every >= 1")
        self.kind, self.method, self.every, self.times = kind, method.upper(), every, times
        self.path_contains, self.ranged, self.stall_s = path_contains, ranged, stall_s
        self.seen = self.fired = 0

    def fires(self, method: str, target: str, headers: Headers) -> bool:
        if method != self.method or self.path_contains not in target:
            return False
        if self.ranged and not any(n == "range" for n, _ in headers):
            return False
        self.seen += 1
        if self.seen % self.every or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


S3_ERRORS = {"503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
              "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error.")}


async def broken_reply(fault: "Fault", rhead: bytes, length: int,
                        ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                        up: list[Any]) -> bool:
    """Send half of a reply's body the way ``fault`` says, then close both connections."""
    half = length // 2
    if fault.kind == "truncate":
        lines = rhead.decode("latin-1").split("\r\n")
        lines = [f"Content-Length: {half}" if ln.lower().startswith("content-length:") else ln
                 for ln in lines]
        rhead = "\r\n".join(lines).encode("latin-1")
    cwriter.write(rhead)
    cwriter.write(await ureader.readexactly(half))
    await cwriter.drain()
    if fault.kind == "stall":
        await asyncio.sleep(fault.stall_s)
    up[1].close()  # the rest of the upstream body is never read: drop that connection
    up[:] = [None, None]
    return False  # and the client's


def without_header(rhead: bytes, name: str) -> bytes:
    """A response head with every ``name`` header line left out.

    >>> without_header(b"HTTP/1.1 200 OK\\r\\nETag: x\\r\\nA: b\\r\\n\\r\\n", "etag")
    b'HTTP/1.1 200 OK\\r\\nA: b\\r\\n\\r\\n'
    """
    lines = rhead.decode("latin-1").split("\r\n")
    keep = [ln for ln in lines if not ln.lower().startswith(name.lower() + ":")]
    return "\r\n".join(keep).encode("latin-1")


class Sink:
    """A writer that drops what it is given (a request body answered without forwarding)."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass
