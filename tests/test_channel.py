"""The same-node channel a forked reader uses to reach its node's cache worker (no Ray), and the
bounds on waits for a stalled worker or store.

Real Unix sockets and real forked processes; the worker side is a ``ChannelServer`` with a
handler standing in for ``CacheWorker.channel_request`` (the Ray-backed handler is
exercised by the DataLoader tests in test_fs_readers.py and test_cluster.py).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import stat
import threading
import time

import pytest

from ray_cache.node.channel import ChannelClient, ChannelError, ChannelServer, channel_path


@pytest.fixture()
def slot(tmp_path):
    path = tmp_path / "slot-0"
    path.mkdir(mode=0o700)
    return str(path)


def test_pages_travel_out_of_band_and_come_back_equal(slot):
    page = os.urandom(4 << 20)

    def handle(request):
        op, n = request
        return [("ok", pickle.PickleBuffer(memoryview(page)[:n]))]

    server = ChannelServer(channel_path(slot), handle)
    try:
        client = ChannelClient(channel_path(slot))
        (status, value), = client.call(("pages", len(page)))
        assert status == "ok" and memoryview(value).nbytes == len(page) and bytes(value) == page
        (_s, small), = client.call(("pages", 10))  # the same connection, again
        assert bytes(small) == page[:10]
    finally:
        server.close()


def test_the_socket_is_its_owners_only(slot):
    server = ChannelServer(channel_path(slot), lambda r: r)
    try:
        mode = os.stat(channel_path(slot)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        server.close()
    assert not os.path.exists(channel_path(slot)), "closing removes the socket"


def test_a_slot_path_too_long_for_a_socket_listens_in_a_private_directory(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "slot-3"
    deep.mkdir(parents=True)
    path = channel_path(str(deep))
    assert len(os.fsencode(path)) <= 100 and path == channel_path(str(deep))
    server = ChannelServer(path, lambda r: ("seen", r))
    try:
        assert ChannelClient(path).call(1) == ("seen", 1)
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        server.close()


def test_errors_of_the_worker_are_raised_in_the_reader(slot):
    def handle(request):
        raise FileNotFoundError(2, "No such file", "bucket/missing")

    server = ChannelServer(channel_path(slot), handle)
    try:
        with pytest.raises(FileNotFoundError, match="bucket/missing"):
            ChannelClient(channel_path(slot)).call(("pages",))
    finally:
        server.close()


def test_a_stalled_worker_is_an_error_within_the_bound(slot):
    release = threading.Event()

    def handle(request):
        release.wait(60)  # a worker that does not answer
        return "late"

    server = ChannelServer(channel_path(slot), handle)
    try:
        client = ChannelClient(channel_path(slot), timeout_s=0.5)
        began = time.monotonic()
        with pytest.raises(ChannelError, match="timed out"):
            client.call(("pages",))
        took = time.monotonic() - began
        assert 0.4 < took < 5, took
    finally:
        release.set()
        server.close()


def test_no_worker_is_an_error_at_once(slot):
    began = time.monotonic()
    with pytest.raises(ChannelError):
        ChannelClient(channel_path(slot), timeout_s=30).call(("pages",))
    assert time.monotonic() - began < 5


_INHERITED = []  # the parent's connected client, reached by the children through fork


def _calls_in_child(n):
    client = _INHERITED[0]
    return [client.call(("echo", os.getpid(), i)) for i in range(n)]


def test_a_forked_child_opens_its_own_connection(slot):
    server = ChannelServer(channel_path(slot), lambda r: r)
    try:
        client = ChannelClient(channel_path(slot))
        assert client.call(("echo", os.getpid(), -1)) == ("echo", os.getpid(), -1)  # connected here
        _INHERITED[:] = [client]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            children = [pool.apply_async(_calls_in_child, (200,)) for _ in range(2)]
            mine = [client.call(("echo", os.getpid(), i)) for i in range(200)]
            theirs = [c.get(timeout=60) for c in children]
        assert mine == [("echo", os.getpid(), i) for i in range(200)]
        for answers in theirs:  # each child got its own answers, never another process's
            pid = answers[0][1]
            assert pid != os.getpid() and answers == [("echo", pid, i) for i in range(200)]
    finally:
        server.close()


def test_a_stalled_store_metadata_call_is_an_error_within_the_bound(monkeypatch):
    # A real fsspec async filesystem whose store never answers (the event loop runs; the
    # request does not come back): the raycache metadata path gives up at its bound.
    import asyncio

    from fsspec.asyn import AsyncFileSystem

    from ray_cache.store import underfs

    class Stalled(AsyncFileSystem):
        async def _info(self, path, **kwargs):
            await asyncio.sleep(60)

    monkeypatch.setattr(underfs, "STORE_CALL_TIMEOUT_S", 1.0)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="bucket/key"):
        underfs.bounded_call(Stalled(skip_instance_cache=True), "info", "bucket/key")
    assert time.monotonic() - began < 10
