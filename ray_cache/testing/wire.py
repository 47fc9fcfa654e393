"""HTTP/1.1 message framing for the counting proxy: heads, bodies, a shared rate limit.

Kept apart from the proxy's relaying and faults so each module stays small; the proxy
imports it as a sibling module when it runs as a script.
"""

from __future__ import annotations

import asyncio
import time

CHUNK = 64 * 1024  # largest single write to a client
HEAD_LIMIT = 1 << 20  # largest message head accepted
Headers = list[tuple[str, str]]


class _ProtocolError(ValueError):
    """Malformed or truncated HTTP message."""


class _RateLimiter:
    """Token bucket shared by all connections, with a burst of one chunk."""

    def __init__(self, rate: float, burst: int = CHUNK) -> None:
        self.rate, self.burst, self._t = float(rate), burst, 0.0

    async def consume(self, n: int) -> None:
        now = time.monotonic()
        # Reserve n bytes on a virtual clock; no await before this, so atomic.
        self._t = max(self._t, now - self.burst / self.rate) + n / self.rate
        if self._t > now:
            await asyncio.sleep(self._t - now)


def _parse_head(raw: bytes) -> tuple[list[str], Headers]:
    lines = raw.decode("latin-1").split("\r\n")
    pairs = (ln.partition(":") for ln in lines[1:] if ln)
    return lines[0].split(" ", 2), [(n.strip().lower(), v.strip()) for n, _, v in pairs]


def _tokens(headers: Headers, name: str) -> set[str]:
    return {t.strip().lower() for n, v in headers if n == name for t in v.split(",")}


def _body_mode(headers: Headers) -> tuple[str, int]:
    """Framing of a body: ("chunked"|"length"|"none"|"close", length)."""
    if "chunked" in _tokens(headers, "transfer-encoding"):
        return "chunked", 0
    for name, value in headers:
        if name == "content-length":
            return ("length", int(value)) if int(value) > 0 else ("none", 0)
    return "close", 0


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Read one message head; ``None`` on a clean EOF before it."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise _ProtocolError("truncated message head") from exc
    except asyncio.LimitOverrunError as exc:
        raise _ProtocolError("message head too large") from exc


async def _relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter, mode: str,
                 length: int = 0, limiter: _RateLimiter | None = None) -> tuple[int, int]:
    """Copy one body unchanged from ``src`` to ``dst``; return (wire, payload) bytes."""
    wire = payload = 0

    async def send(data: bytes) -> None:
        nonlocal wire
        if limiter is not None:
            await limiter.consume(len(data))
        dst.write(data)
        wire += len(data)
        await dst.drain()

    async def copy(remaining: int, until_eof: bool = False) -> None:
        nonlocal payload
        while remaining or until_eof:
            data = await src.read(CHUNK if until_eof else min(CHUNK, remaining))
            if not data:
                if until_eof:
                    return
                raise _ProtocolError("body truncated")
            remaining -= len(data)
            payload += len(data)
            await send(data)

    if mode == "length":
        await copy(length)
    elif mode == "close":
        await copy(0, until_eof=True)
    elif mode == "chunked":
        while True:
            line = await src.readuntil(b"\r\n")
            await send(line)
            size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                break
            await copy(size)
            await send(await src.readexactly(2))  # CRLF after the chunk data
        while True:  # trailer fields, then the final empty line
            line = await src.readuntil(b"\r\n")
            await send(line)
            if line == b"\r\n":
                break
    return wire, payload
