"""A real S3-compatible server (moto's ``moto_server``) on loopback.

The server runs as a subprocess bound to ``127.0.0.1`` on a free port. Its
output goes to a temporary log file (never a pipe, which could fill up and
block the server); the tail of that log is included in error messages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "S3Server", "S3Endpoint", "ManagedProcess", "s3_data_gets", "free_port", "FAKE_KEY", "FAKE_SECRET", "REGION",
]

FAKE_KEY = "testing"
FAKE_SECRET = "testing"
REGION = "us-east-1"

# urllib must never go through an HTTP proxy from the environment for loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    Parameters
    ----------
    host : str
        Interface to probe.

    Returns
    -------
    int
        A port number the OS just handed out for an ephemeral bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_executable(name: str, hint: str) -> str:
    """Locate a server executable: next to the running interpreter first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} executable not found; {hint}")
    return found


def _find_moto_server() -> str:
    return find_executable("moto_server", "install moto[server]")


class ManagedProcess:
    """Base class for a server subprocess, logging to a temp file, stopped by pid.

    Subclasses implement :meth:`start` with :meth:`_spawn`; output goes to a
    temporary log file (never a pipe that could fill up and block the child),
    whose tail :meth:`_log_tail` returns for error messages. The server is up once
    ``endpoint_url + _probe_path`` gets any HTTP answer.
    """

    _proc: "subprocess.Popen[bytes] | None" = None
    log_path: str | None = None
    #: What :meth:`_answers_http` asks for.
    _probe_path = "/"

    def __init__(self, port: int | None, start_timeout: float) -> None:
        self.port: int = port if port is not None else free_port()
        self.endpoint_url: str = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout

    @property
    def pid(self) -> int | None:
        """Process id of the server, or ``None`` when not running."""
        return self._proc.pid if self._proc is not None else None

    def _spawn(self, cmd: list[str], prefix: str, stdout: Any = subprocess.STDOUT,
               **popen_kwargs: Any) -> "subprocess.Popen[bytes]":
        """Start ``cmd`` with stderr (and by default stdout) to a temp log file."""
        fd, self.log_path = tempfile.mkstemp(prefix=prefix, suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(
                cmd, stderr=log, stdout=log if stdout == subprocess.STDOUT else stdout,
                **popen_kwargs)
        return self._proc

    def _log_tail(self, limit: int = 4000) -> str:
        """Return the last ``limit`` characters of the log (best effort)."""
        try:
            with open(self.log_path or "", "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - limit))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_until_up(self, proc: "subprocess.Popen[bytes]", label: str,
                       interval: float = 0.05) -> None:
        """Poll ``_answers_http`` until it is true, or stop and raise with the log's tail."""
        deadline = time.monotonic() + self.start_timeout
        while not self._answers_http():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with code {proc.returncode}" if proc.poll() is not None
                       else f"did not answer within {self.start_timeout} s")
                tail = self._log_tail()
                self.stop()
                raise RuntimeError(f"{label} on {self.endpoint_url} {why}:\n{tail}")
            time.sleep(interval)  # polling interval, bounded by the deadline

    def _answers_http(self) -> bool:
        """Whether a request to the server gets any HTTP response."""
        try:
            with OPENER.open(self.endpoint_url + self._probe_path, timeout=1.0) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP status means the server is up
        except (OSError, ValueError):
            return False

    def start(self) -> Any:
        """Start the server; implemented by subclasses."""
        raise NotImplementedError

    def stop(self) -> None:
        """Terminate the process by its own pid; kill it after 5 s if still alive."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5.0)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        if self.log_path:
            Path(self.log_path).unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; normal code calls stop()
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()


class S3Endpoint:
    """Clients of an S3-compatible server at ``self.endpoint_url`` with its development
    credentials (``access_key``, ``secret_key``): what every S3 server of the bench offers."""

    endpoint_url: str
    access_key = FAKE_KEY
    secret_key = FAKE_SECRET

    def storage_options(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """Return s3fs storage options for this server (or a proxy before it).

        Parameters
        ----------
        endpoint_url : str, optional
            Endpoint to use instead of the server's own, e.g. a proxy's url.

        Returns
        -------
        dict
            ``{"key", "secret", "client_kwargs": {"endpoint_url", "region_name"}}``.
        """
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {
                "endpoint_url": endpoint_url or self.endpoint_url,
                "region_name": REGION,
            },
        }

    def boto3_client(self, endpoint_url: str | None = None) -> Any:
        """Return a boto3 S3 client with the fake credentials.

        Parameters
        ----------
        endpoint_url : str, optional
            Endpoint to use instead of the server's own.

        Returns
        -------
        botocore.client.S3
            A new client.
        """
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket with boto3 (s3fs ``mkdir`` does not work on moto).

        Parameters
        ----------
        name : str
            Bucket name.
        """
        self.boto3_client().create_bucket(Bucket=name)


class S3Server(S3Endpoint, ManagedProcess):
    """A moto S3 server subprocess on ``127.0.0.1`` and a free port.

    Parameters
    ----------
    port : int, optional
        Port to bind; a free one is chosen when omitted.
    start_timeout : float
        Seconds to wait for the server to answer HTTP in :meth:`start`.
    env : dict, optional
        Extra environment for the server, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}``
        to make moto enforce credentials.

    Attributes
    ----------
    port : int
        The TCP port the server listens on.
    endpoint_url : str
        ``"http://127.0.0.1:PORT"``.
    """

    def __init__(self, port: int | None = None, start_timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(port, start_timeout)
        self.env = env

    def start(self) -> "S3Server":
        """Start the server and wait until it answers HTTP.

        Returns
        -------
        S3Server
            ``self``, for chaining.

        Raises
        ------
        RuntimeError
            If the server exits early or does not answer within the timeout;
            the message carries the tail of its log.
        """
        if self._proc is not None:
            return self
        cmd = [_find_moto_server(), "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, **self.env} if self.env else None
        proc = self._spawn(cmd, "moto_server_", stdin=subprocess.DEVNULL, env=env)
        self._wait_until_up(proc, "moto_server")
        return self


def s3_data_gets(records: list[dict[str, Any]], bucket: str | None = None) -> list[dict[str, Any]]:
    """Select the records that are S3 object data reads (path-style addressing).

    Parameters
    ----------
    records : list of dict
        Records as returned by :meth:`ray_cache.testing.CountingProxy.requests`.
    bucket : str, optional
        Only count reads from this bucket.

    Returns
    -------
    list of dict
        GET requests on ``/bucket/key`` with a non-empty key (``?versionId=``,
        ``?partNumber=`` allowed), excluding bucket-level requests (listing,
        ``?location``...) and non-data object sub-resources (``?acl``,
        ``?tagging``, ``?uploadId=``...).
    """
    non_data = {"acl", "tagging", "attributes", "uploadId", "retention", "legal-hold",
                "torrent", "restore", "uploads"}
    out = []
    for rec in records:
        path, _, query = str(rec.get("path", "")).partition("?")
        if "://" in path:  # absolute-form request target
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        name, _, key = path.lstrip("/").partition("/")
        params = {p.partition("=")[0] for p in query.split("&") if p}
        if (rec.get("method") == "GET" and key and (bucket is None or name == bucket)
                and not params & non_data):
            out.append(rec)
    return out
