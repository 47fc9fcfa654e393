"""A same-node channel to a cache worker, for processes that cannot use Ray.

A process forked from one running Ray (a PyTorch ``DataLoader`` worker with the default
``fork`` context on Linux, a ``multiprocessing`` pool) inherits a Ray core worker whose
threads did not survive the fork: any Ray call there hangs. Such a process still reads
through the cache: it talks to a cache worker **on its own node** through this channel,
a Unix domain socket in the worker's disk-tier slot (``slot-N/channel.sock``). Nothing
listens on a network port.

- **Who may connect**: the socket is ``0600`` inside the slot directory (``0700``), and
  the worker closes any connection whose peer runs as another user (``SO_PEERCRED``); a
  reader, likewise, takes nothing from a socket served by another user.
  Requests are pickled, so the channel trusts exactly whom Ray already trusts: processes
  of the same user on the same node.
- **What it carries**: a request is a tuple (see :meth:`ray_cache.node.worker.CacheWorker.channel_request`);
  pages come back as out-of-band pickle buffers (protocol 5), read straight into their
  final ``bytearray``: one copy on each side, no pickling of the bytes.
- **Bounds**: every send and receive of a client has a timeout (``timeout_s``, default
  :data:`ray_cache.config.WORKER_TIMEOUT_S`); a stalled or dead worker raises
  :class:`ChannelError` (a ``ConnectionError``), and the reader falls back to the store.
- **Forks of forks**: a client remembers the process it connected in; a child of it
  opens its own connection (two processes never share one socket's stream).

Examples
--------
>>> import os, tempfile
>>> slot = tempfile.mkdtemp()
>>> server = ChannelServer(channel_path(slot), lambda req: ("echo", req))
>>> ChannelClient(channel_path(slot)).call(("ping",))
('echo', ('ping',))
>>> oct(os.stat(channel_path(slot)).st_mode & 0o777)
'0o600'
>>> server.close()
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import struct
import tempfile
import threading
from typing import Any, Callable, List, Optional

from ray_cache.config import WORKER_TIMEOUT_S

log = logging.getLogger("ray_cache.channel")

#: The socket's name inside a worker's slot directory.
CHANNEL_NAME = "channel.sock"
_MAX_PATH = 100  # sun_path holds 108 bytes on Linux
_HEAD = struct.Struct("!QI")  # pickle bytes, number of out-of-band buffers
_SIZE = struct.Struct("!Q")
_CRED = struct.Struct("3i")  # pid, uid, gid (SO_PEERCRED)


class ChannelError(ConnectionError):
    """The node's cache worker could not be reached through its channel (in time)."""


def channel_path(slot: str) -> str:
    """Where the worker owning disk-tier ``slot`` listens (the same in every process).

    Inside the slot when the path fits a Unix socket address; else in a private directory
    under the system's temporary directory, named by a digest of the slot's path.
    """
    path = os.path.join(slot, CHANNEL_NAME)
    if len(os.fsencode(path)) <= _MAX_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(os.path.abspath(slot))).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), f"ray_cache-{os.getuid()}", f"{digest}.sock")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory only its owner can use")


# -- framing -----------------------------------------------------------------------------
def send(sock: socket.socket, obj: Any) -> None:
    """Send one message: pickled with protocol 5, large buffers out of band."""
    bufs: List[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    sock.sendall(_HEAD.pack(len(head), len(raws)) + b"".join(_SIZE.pack(r.nbytes) for r in raws) + head)
    for raw in raws:
        sock.sendall(raw)


def recv(sock: socket.socket) -> Any:
    """Receive one message sent by :func:`send` (each buffer read into its own bytearray)."""
    n, count = _HEAD.unpack(_read(sock, _HEAD.size))
    sizes = [_SIZE.unpack_from(_read(sock, _SIZE.size))[0] for _ in range(count)]
    head = _read(sock, n)
    return pickle.loads(head, buffers=[_read(sock, s) for s in sizes])


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the cache worker closed the channel")
        got += k
    return buf


# -- the worker's side -----------------------------------------------------------------------
class ChannelServer:
    """Answers requests on a Unix socket at ``path``, one thread per connection.

    ``handle(request)`` returns the reply; an exception it raises is sent back and raised
    in the client.
    """

    def __init__(self, path: str, handle: Callable[[Any], Any]) -> None:
        self.path, self._handle = path, handle
        parent = os.path.dirname(path)
        if os.path.basename(path) != CHANNEL_NAME:
            _private_dir(parent)
        try:
            os.unlink(path)  # a socket left by this slot's previous worker
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(128)
        self._closed = False
        threading.Thread(target=self._accept, name="ray-cache-channel", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            _pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if uid != os.getuid():
                log.warning("ray_cache: refused a channel connection from uid %d", uid)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="ray-cache-channel-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = recv(conn)
                except (OSError, EOFError, pickle.UnpicklingError):
                    return  # the reader went away (or sent garbage): nothing to answer
                try:
                    reply: Any = ("ok", self._handle(request))
                except Exception as exc:  # noqa: BLE001 - raised in the reader
                    reply = ("err", exc)
                try:
                    send(conn, reply)
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    send(conn, ("err", OSError(f"{type(exc).__name__}: {exc}")))
                except OSError:
                    return

    def close(self) -> None:
        """Stop listening and remove the socket (connections being served finish)."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# -- the reader's side -----------------------------------------------------------------------
class ChannelClient:
    """One connection to a worker's channel, opened on first use, per process (thread-safe)."""

    def __init__(self, path: str, timeout_s: float = WORKER_TIMEOUT_S) -> None:
        self.path, self.timeout_s = path, timeout_s
        self._sock: Optional[socket.socket] = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __reduce__(self) -> Any:  # a copy in another process connects on its own
        return ChannelClient, (self.path, self.timeout_s)

    def call(self, request: Any) -> Any:
        """Send ``request`` and return the reply, raising what the worker raised, or
        :class:`ChannelError` if the worker cannot be reached or does not answer in
        ``timeout_s`` (a broken connection is reopened once; a timeout is not retried)."""
        if self._pid != os.getpid():  # inherited through fork: the stream is the parent's
            self._sock, self._pid, self._lock = None, os.getpid(), threading.Lock()
        with self._lock:
            for attempt in (0, 1):
                try:
                    sock = self._sock or self._connect()
                    send(sock, request)
                    status, value = recv(sock)
                    break
                except (OSError, EOFError) as exc:
                    self._close()
                    if attempt or isinstance(exc, socket.timeout):
                        raise ChannelError(f"cache worker channel {self.path}: {exc}") from exc
        if status == "err":
            raise value
        return value

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.path)
            _pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        except OSError:
            sock.close()
            raise
        if uid != os.getuid():  # someone else's socket at our path: never take pages from it
            sock.close()
            raise ChannelError(f"cache worker channel {self.path} is served by uid {uid}, not ours")
        self._sock = sock
        return sock

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()
