"""A counting HTTP/1.1 reverse proxy that can emulate a far link.

Run it as its own process::

    python -m ray_cache.testing.proxy --upstream 127.0.0.1:PORT --port 0 \\
        [--rate-bytes-per-s N] [--latency-ms MS]

It prints ``LISTENING <port>`` on stdout once ready, forwards every request
byte for byte to the upstream server (Host header included) and records one
entry per request. ``GET /__proxy__/requests`` and ``POST /__proxy__/reset``
are answered by the proxy itself and are neither forwarded nor recorded.
``POST /__proxy__/faults`` with ``{"rules": [...]}`` injects faults (see :mod:`faults`):
answer ``503`` (S3's SlowDown) or ``500`` without forwarding, cut the connection
mid-reply, stall a reply, or truncate a body behind a consistent ``Content-Length``.
``Expect: 100-continue`` is answered by the proxy (``100 Continue``) and the
upstream's own ``100 Continue`` is dropped. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__:
    from ray_cache.testing.faults import S3_ERRORS, Fault, Sink, broken_reply, without_header
    from ray_cache.testing.s3server import ManagedProcess, s3_data_gets
    from ray_cache.testing.wire import (HEAD_LIMIT, _body_mode, _parse_head, _ProtocolError,
                                        _RateLimiter, _read_head, _relay, _tokens)
else:  # run as a script (as CountingProxy does): skip importing the heavy package
    from faults import S3_ERRORS, Fault, Sink, broken_reply, without_header  # type: ignore[no-redef]
    from s3server import ManagedProcess, s3_data_gets  # type: ignore[no-redef]
    from wire import (HEAD_LIMIT, _body_mode, _parse_head, _ProtocolError,  # type: ignore[no-redef]
                      _RateLimiter, _read_head, _relay, _tokens)

__all__ = ["CountingProxy", "s3_data_gets", "main"]

CONTROL = "/__proxy__/"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ERRORS = (OSError, ValueError, EOFError, asyncio.LimitOverrunError)
Headers = list[tuple[str, str]]


#: Longest a control call waits for requests in progress to be recorded (seconds).
SETTLE_S = 10.0


def _log(msg: str) -> None:
    print(f"proxy[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class _Proxy:
    """Proxy state inside the proxy process: upstream, records, link emulation, faults."""

    def __init__(self, host: str, port: int, rate: float | None, latency_ms: float) -> None:
        self.host, self.port = host, port
        self.records: list[dict[str, Any]] = []
        self.limiter = _RateLimiter(rate) if rate else None
        self.latency = latency_ms / 1000.0
        self.faults: list[Fault] = []
        # Requests being answered: a control call waits for them to be recorded, so a
        # client that has its answer never reads (or resets) the records before it is in.
        self.busy, self.idle = 0, asyncio.Event()
        self.idle.set()

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        """Serve one client connection (several requests when kept alive)."""
        up: list[Any] = [None, None]  # upstream (reader, writer), reused while open
        try:
            while (head := await _read_head(creader)) is not None:
                (method, target, version), headers = _parse_head(head)
                conn = _tokens(headers, "connection")
                keep = "close" not in conn and (version != "HTTP/1.0" or "keep-alive" in conn)
                if target.startswith(CONTROL):
                    await self._control(method, target, headers, creader, cwriter)
                elif not await self._forward(method, target, head, headers, creader, cwriter, up):
                    break
                if not keep:
                    break
        except _ERRORS as exc:
            _log(f"client connection dropped: {exc!r}")
        finally:
            for writer in (cwriter, up[1]):
                if writer is not None:
                    writer.close()

    async def _control(self, method: str, target: str, headers: Headers,
                       creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        mode, length = _body_mode(headers)
        if mode == "chunked":
            raise _ProtocolError("chunked body on a control request")
        raw = await creader.readexactly(length)
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=SETTLE_S)
        except asyncio.TimeoutError:
            pass  # a request still running (a capped link, a slow upstream): answer anyway
        status, body = "200 OK", b""
        if method == "GET" and target == CONTROL + "requests":
            body = json.dumps(self.records).encode()
        elif method == "POST" and target == CONTROL + "reset":
            body = json.dumps({"cleared": len(self.records)}).encode()
            self.records = []
        elif method == "POST" and target == CONTROL + "faults":
            rules = json.loads(raw or b"{}").get("rules", [])
            self.faults = [Fault(**r) for r in rules]
            body = json.dumps({"faults": len(self.faults)}).encode()
        elif method == "GET" and target == CONTROL + "faults":
            body = json.dumps([{"kind": f.kind, "seen": f.seen, "fired": f.fired} for f in self.faults]).encode()
        else:
            status, body = "404 Not Found", b'{"error": "unknown control endpoint"}'
        cwriter.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await cwriter.drain()

    async def _forward(self, method: str, target: str, head: bytes, headers: Headers,
                       creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                       up: list[Any]) -> bool:
        """Forward one request, relay its response, record it; return keep-alive."""
        rec: dict[str, Any] = {"method": method, "path": target, "status": None,
                               "request_bytes": len(head), "response_bytes": 0,
                               "request_body_bytes": 0, "response_body_bytes": 0,
                               "if_match": next((v for n, v in headers if n == "if-match"), None),
                               "range": next((v for n, v in headers if n == "range"), None),
                               "started": time.time(), "ended": None}
        mode, length = _body_mode(headers)
        mode = "none" if mode == "close" else mode  # a request body never runs to EOF
        expect = mode != "none" and "100-continue" in _tokens(headers, "expect")
        head_sent = False
        fault = next((f for f in self.faults if f.fires(method, target, headers)), None)
        if fault is not None:
            rec["fault"] = fault.kind
        waited_for = fault is None or fault.kind != "stall"  # a stall is meant to hang
        if waited_for:
            self.busy += 1
            self.idle.clear()
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if fault is not None and fault.kind in S3_ERRORS:
                if expect:
                    cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await _relay(creader, Sink(), mode, length)  # the request body, dropped
                status, code, message = S3_ERRORS[fault.kind]
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>").encode()
                cwriter.write(f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await cwriter.drain()
                rec["status"] = int(status.split()[0])
                return True
            if up[0] is None or up[0].at_eof():
                if up[1] is not None:
                    up[1].close()
                up[:] = await asyncio.open_connection(self.host, self.port, limit=HEAD_LIMIT)
            ureader, uwriter = up
            uwriter.write(head)
            if expect:
                cwriter.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                rec["response_bytes"] += 25
                await cwriter.drain()
            wire, rec["request_body_bytes"] = await _relay(creader, uwriter, mode, length)
            rec["request_bytes"] += wire
            while True:  # skip or relay interim (1xx) responses
                rhead = await _read_head(ureader)
                if rhead is None:
                    raise _ProtocolError("upstream closed without a response")
                (_, status, *_), rheaders = _parse_head(rhead)
                rec["status"] = int(status)
                if not 100 <= rec["status"] < 200 or rec["status"] == 101:
                    break
                if not (expect and rec["status"] == 100):
                    cwriter.write(rhead)
                    rec["response_bytes"] += len(rhead)
            rmode, rlength = _body_mode(rheaders)
            if method == "HEAD" or rec["status"] in (101, 204, 304):
                rmode = "none"
            if fault is not None and fault.kind == "no-etag":
                rhead = without_header(rhead, "etag")
            elif fault is not None and rmode == "length" and rlength > 1:
                return await broken_reply(fault, rhead, rlength, ureader, cwriter, up)
            if self.limiter is not None:
                await self.limiter.consume(len(rhead))
            cwriter.write(rhead)
            head_sent = True
            wire, rec["response_body_bytes"] = await _relay(ureader, cwriter, rmode, rlength,
                                                            self.limiter)
            rec["response_bytes"] += len(rhead) + wire
            conn = _tokens(rheaders, "connection")
            http10 = rhead.startswith(b"HTTP/1.0") and "keep-alive" not in conn
            return not (rmode == "close" or "close" in conn or http10 or rec["status"] == 101)
        except _ERRORS as exc:
            _log(f"{method} {target}: {exc!r}")
            if not head_sent and not cwriter.is_closing():
                msg = f"proxy error: {exc!r}".encode()
                cwriter.write(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg))
                rec["status"] = 502
            return False
        finally:
            rec["ended"] = time.time()
            self.records.append(rec)
            if waited_for:
                self.busy -= 1
                if not self.busy:
                    self.idle.set()


class CountingProxy(ManagedProcess):
    """The proxy as a subprocess in front of one upstream server.

    Parameters
    ----------
    upstream_url : str
        ``"http://HOST:PORT"`` or ``"HOST:PORT"`` of the upstream server.
    rate_bytes_per_s : float, optional
        Cap on the total response bytes per second sent to all clients.
    latency_ms : float
        Delay added before forwarding each request.
    start_timeout : float
        Seconds to wait for the ``LISTENING`` line.

    Attributes
    ----------
    url : str
        ``"http://127.0.0.1:PORT"`` once started.
    port : int
        The proxy's port once started.
    """

    def __init__(self, upstream_url: str, rate_bytes_per_s: float | None = None,
                 latency_ms: float = 0, start_timeout: float = 30.0) -> None:
        self.upstream = upstream_url.split("://", 1)[-1].rstrip("/")
        self.rate_bytes_per_s, self.latency_ms = rate_bytes_per_s, latency_ms
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.url: str | None = None

    def start(self) -> "CountingProxy":
        """Spawn the proxy process and wait for its ``LISTENING`` line.

        Returns
        -------
        CountingProxy
            ``self``.

        Raises
        ------
        RuntimeError
            If the process exits, prints something else, or stays silent
            past the timeout; the message carries its stderr tail.
        """
        if self._proc is not None:
            return self
        # Run this file as a script: starts fast, as it does not import ray_cache (and ray).
        cmd = [sys.executable, str(Path(__file__).resolve()), "--upstream", self.upstream,
               "--port", "0", "--exit-on-stdin-eof"]  # exits if this process dies
        if self.rate_bytes_per_s:
            cmd += ["--rate-bytes-per-s", str(self.rate_bytes_per_s)]
        if self.latency_ms:
            cmd += ["--latency-ms", str(self.latency_ms)]
        proc = self._spawn(cmd, "counting_proxy_", stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        assert proc.stdout is not None
        out, deadline = b"", time.monotonic() + self.start_timeout
        while b"\n" not in out:
            left = deadline - time.monotonic()
            ready = left > 0 and select.select([proc.stdout], [], [], left)[0]
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                tail = self._log_tail()
                self.stop()
                raise RuntimeError(f"proxy failed to start (stdout {out!r}):\n{tail}")
            out += chunk
        words = out.split(b"\n", 1)[0].decode("latin-1").split()
        if len(words) != 2 or words[0] != "LISTENING":
            self.stop()
            raise RuntimeError(f"unexpected proxy output: {out!r}")
        self.port = int(words[1])
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def requests(self) -> list[dict[str, Any]]:
        """Return the records of the requests forwarded since the last reset.

        Returns
        -------
        list of dict
            One ``{"method", "path", "status", "request_bytes",
            "response_bytes", "request_body_bytes", "response_body_bytes",
            "if_match", "range", "started", "ended"}`` per request, in completion
            order; byte counts are on the wire (heads and chunk framing included)
            except the ``*_body_bytes``; ``started`` and ``ended`` are wall-clock
            seconds (``time.time()``) when the proxy got the request and when it
            finished relaying the reply, so a benchmark can see when the link carried what.
        """
        with _OPENER.open(f"{self.url}{CONTROL}requests", timeout=30) as resp:
            return json.loads(resp.read())

    def inject(self, *rules: dict[str, Any]) -> None:
        """Replace the injected faults with ``rules`` (none: stop injecting).

        Each rule is ``{"kind": "503"|"500"|"cut"|"truncate"|"stall"|"no-etag", "method": "GET",
        "every": 1, "times": None, "path_contains": "", "ranged": False, "stall_s": 3600}``.
        Records of faulted requests carry ``"fault": kind``.
        """
        body = json.dumps({"rules": list(rules)}).encode()
        req = urllib.request.Request(f"{self.url}{CONTROL}faults", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with _OPENER.open(req, timeout=30) as resp:
            resp.read()

    def faults_fired(self) -> int:
        """How many injected faults have fired (a stalled reply counts as it stalls)."""
        with _OPENER.open(f"{self.url}{CONTROL}faults", timeout=30) as resp:
            return sum(f["fired"] for f in json.loads(resp.read()))

    def reset(self) -> None:
        """Clear the proxy's records."""
        req = urllib.request.Request(f"{self.url}{CONTROL}reset", data=b"", method="POST")
        with _OPENER.open(req, timeout=30) as resp:
            resp.read()


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.split("://", 1)[-1].rstrip("/").rpartition(":")
    proxy = _Proxy(host or "127.0.0.1", int(port), args.rate_bytes_per_s, args.latency_ms)
    server = await asyncio.start_server(proxy.handle, args.host, args.port, limit=HEAD_LIMIT)
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_on_stdin_eof:
        def on_stdin() -> None:
            if not os.read(0, 4096):
                loop.remove_reader(0)
                stop.set()
        loop.add_reader(0, on_stdin)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()  # open connections are cancelled by asyncio.run on return


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring.

    Parameters
    ----------
    argv : list of str, optional
        Arguments; ``sys.argv[1:]`` when omitted.
    """
    ap = argparse.ArgumentParser(description="Counting HTTP/1.1 reverse proxy.")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the upstream server")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    ap.add_argument("--rate-bytes-per-s", type=float, default=None,
                    help="cap on response bytes per second, shared by all clients")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay per request")
    ap.add_argument("--exit-on-stdin-eof", action="store_true",
                    help="exit when stdin closes (set by CountingProxy)")
    asyncio.run(_serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
