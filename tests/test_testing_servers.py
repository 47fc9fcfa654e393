"""Real moto S3 server + counting proxy on loopback, used through s3fs and boto3."""

from __future__ import annotations

import http.client
import http.server
import io
import threading
import time
from collections.abc import Iterator

import pytest
import s3fs

from ray_cache.testing import CountingProxy, S3Server, s3_data_gets

BUCKET = "test-bucket"
SIZE = 3 * 1024 * 1024
DATA = bytes(range(256)) * (SIZE // 256)
# moto answers unsigned GETs with 403 (anonymous access); it does not check signatures.
FAKE_AUTH = {
    "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host, Signature=00"
}


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with S3Server() as srv:
        srv.create_bucket(BUCKET)
        srv.boto3_client().put_object(Bucket=BUCKET, Key="seed/big", Body=DATA)
        yield srv


@pytest.fixture(scope="module")
def proxy(server: S3Server) -> Iterator[CountingProxy]:
    with CountingProxy(server.endpoint_url) as px:
        yield px


def make_fs(server: S3Server, url: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options(url))


def test_s3fs_roundtrip_through_proxy(server: S3Server, proxy: CountingProxy) -> None:
    fs = make_fs(server, proxy.url)
    fs.pipe(f"{BUCKET}/obj", DATA)  # 3 MB PUT with Expect: 100-continue
    assert fs.cat(f"{BUCKET}/obj") == DATA
    assert fs.cat_file(f"{BUCKET}/obj", start=1000, end=5000) == DATA[1000:5000]
    assert f"{BUCKET}/obj" in fs.ls(BUCKET)
    puts = [r for r in proxy.requests() if r["method"] == "PUT" and r["path"] == f"/{BUCKET}/obj"]
    assert puts and puts[-1]["status"] == 200
    assert puts[-1]["request_body_bytes"] == SIZE


def test_counts_exactly_the_data_reads(server: S3Server, proxy: CountingProxy) -> None:
    fs = make_fs(server, proxy.url)
    proxy.reset()
    assert proxy.requests() == []  # control calls are not recorded
    assert fs.cat_file(f"{BUCKET}/seed/big", start=10, end=110) == DATA[10:110]
    gets = s3_data_gets(proxy.requests(), BUCKET)
    assert len(gets) == 1 and gets[0]["status"] == 206
    assert gets[0]["response_body_bytes"] == 100
    proxy.reset()
    fs.ls(BUCKET)
    fs.ls(f"{BUCKET}/seed")
    records = proxy.requests()
    assert records and s3_data_gets(records) == []
    proxy.reset()
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{BUCKET}/missing", start=0, end=10)  # no HEAD first
    assert [r["status"] for r in s3_data_gets(proxy.requests())] == [404]
    assert s3_data_gets(proxy.requests(), bucket="other-bucket") == []


def test_boto3_uploads_through_proxy(server: S3Server, proxy: CountingProxy) -> None:
    client = server.boto3_client(proxy.url)
    client.put_object(Bucket=BUCKET, Key="boto/one", Body=DATA)
    client.upload_fileobj(io.BytesIO(DATA * 3), BUCKET, "boto/multi")  # multipart
    assert client.get_object(Bucket=BUCKET, Key="boto/multi")["Body"].read() == DATA * 3
    head = client.head_object(Bucket=BUCKET, Key="boto/one")
    assert head["ContentLength"] == SIZE


def test_chunked_request_body(server: S3Server, proxy: CountingProxy) -> None:
    assert proxy.port is not None
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    body = iter([DATA[:100_000], DATA[100_000:]])
    conn.request("PUT", f"/{BUCKET}/chunked", body=body, headers=FAKE_AUTH, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.request("GET", f"/{BUCKET}/chunked", headers=FAKE_AUTH)  # same keep-alive connection
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == DATA
    conn.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        else:  # no length: body ends when the connection closes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until close")
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_chunked_and_close_delimited_responses() -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        with CountingProxy(f"127.0.0.1:{upstream.server_address[1]}") as px:
            conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=30)
            for _ in range(2):  # keep-alive across chunked responses
                conn.request("GET", "/chunked")
                assert conn.getresponse().read() == b"hello chunked world"
            conn.request("GET", "/close")
            assert conn.getresponse().read() == b"until close"
            conn.close()
            records = px.requests()
            assert [r["status"] for r in records] == [200, 200, 200]
            assert [r["response_body_bytes"] for r in records] == [19, 19, 11]
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_rate_cap_holds(server: S3Server) -> None:
    rate = 2_000_000
    with CountingProxy(server.endpoint_url, rate_bytes_per_s=rate) as px:
        fs = make_fs(server, px.url)
        t0 = time.monotonic()
        assert fs.cat_file(f"{BUCKET}/seed/big") == DATA
        elapsed = time.monotonic() - t0
    assert elapsed >= 1.2, elapsed  # 3 MiB at 2 MB/s is ~1.57 s


def test_latency_per_request(server: S3Server) -> None:
    latency_ms = 150
    with CountingProxy(server.endpoint_url, latency_ms=latency_ms) as px:
        fs = make_fs(server, px.url)
        fs.cat_file(f"{BUCKET}/seed/big", start=0, end=10)  # warm up the client
        px.reset()
        t0 = time.monotonic()
        for i in range(3):
            assert fs.cat_file(f"{BUCKET}/seed/big", start=i, end=i + 10) == DATA[i : i + 10]
        elapsed = time.monotonic() - t0
        n = len(px.requests())
    assert n >= 3
    assert elapsed >= n * latency_ms / 1000 * 0.95, (elapsed, n)


def test_s3_data_gets_filter() -> None:
    def rec(method: str, path: str) -> dict[str, object]:
        return {"method": method, "path": path, "status": 200}

    records = [
        rec("GET", "/bkt/a/b.bin"),
        rec("GET", "/bkt/key?versionId=3"),
        rec("GET", "/bkt?list-type=2&prefix=a"),
        rec("GET", "/bkt/?location"),
        rec("GET", "/bkt"),
        rec("GET", "/bkt/key?acl"),
        rec("GET", "/bkt/key?uploadId=x"),
        rec("HEAD", "/bkt/key"),
        rec("PUT", "/bkt/key"),
        rec("GET", "/other/key"),
    ]
    paths = [r["path"] for r in s3_data_gets(records, bucket="bkt")]
    assert paths == ["/bkt/a/b.bin", "/bkt/key?versionId=3"]
    assert len(s3_data_gets(records)) == 3


def test_s3rver_serves_ranges_with_their_version_and_stops_by_pid() -> None:
    """The benchmarks' second S3 server: ranges as asked, each answered with the object's
    ETag (ray_cache's conditional reads rely on it there, as s3rver ignores If-Match)."""
    import os

    import boto3

    from ray_cache.testing.s3rver import S3rverServer

    with S3rverServer() as srv:
        srv.create_bucket("bench")
        fs = s3fs.S3FileSystem(**srv.storage_options(), skip_instance_cache=True)
        data = os.urandom(3 << 20)
        fs.pipe_file("bench/x.bin", data)
        assert fs.cat_file("bench/x.bin", start=1 << 20, end=(2 << 20) + 7) == data[1 << 20:(2 << 20) + 7]
        client = boto3.client("s3", endpoint_url=srv.endpoint_url, region_name="us-east-1",
                              aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER")
        etag = fs.info("bench/x.bin")["ETag"]
        part = client.get_object(Bucket="bench", Key="x.bin", Range="bytes=10-19")
        assert part["ETag"] == etag and part["ContentRange"] == f"bytes 10-19/{len(data)}"
        pid = srv.pid
    with pytest.raises(OSError):
        os.kill(pid, 0)
