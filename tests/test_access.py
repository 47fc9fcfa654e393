"""Other users' data: a store that enforces credentials, two drivers on one cache.

The S3 server here enforces IAM (moto's ``reset-auth``): ``alice`` may read the bucket,
``bob`` may not. Alice warms the cache; bob, in this driver and in a second driver on the
same cluster, must get ``PermissionError`` for the very objects the cache holds, and
nothing either of them did may leave a secret in a file under the cache directory or
Ray's session directory.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import ray_cache
from conftest import read_all
from ray_cache.files import pages
from ray_cache.files.fs import CacheFileSystem
from ray_cache.testing import S3Server
from ray_cache.testing.s3server import OPENER

BUCKET = "private-data"
# AWS authorizes HeadObject as s3:GetObject and ListObjectsV2 as s3:ListBucket; moto 5.2.6
# asks for actions named after the operations (s3:HeadObject, s3:ListObjectsV2), so each
# right is granted under both names (an action AWS does not know grants nothing there).
LIST = ["s3:ListBucket", "s3:ListObjectsV2"]
READ = ["s3:GetObject", "s3:HeadObject", *LIST]
#: The one object dave may not read (he may read and list everything else).
DENIED = "files/img-1.bin"


@pytest.fixture(scope="module")
def secured():
    """An S3 server whose users are alice (read), bob (nothing), carol (list only) and dave
    (read, but for one object); auth enforced after set-up."""
    import boto3
    import urllib.request

    with S3Server() as srv:
        root = dict(endpoint_url=srv.endpoint_url, region_name="us-east-1",
                    aws_access_key_id="testing", aws_secret_access_key="testing")
        s3, iam = boto3.client("s3", **root), boto3.client("iam", **root)
        s3.create_bucket(Bucket=BUCKET)
        rng = np.random.default_rng(5)
        for i in range(2):
            buf = io.BytesIO()
            pq.write_table(pa.table({"id": np.arange(i * 1000, (i + 1) * 1000), "x": rng.random(1000)}), buf,
                           row_group_size=500)
            s3.put_object(Bucket=BUCKET, Key=f"table/part-{i}.parquet", Body=buf.getvalue())
            s3.put_object(Bucket=BUCKET, Key=f"files/img-{i}.bin", Body=rng.bytes(200_000))
        users = {}
        for user, actions in (("alice", READ), ("bob", None), ("carol", LIST), ("dave", READ)):
            iam.create_user(UserName=user)
            if actions:
                statements = [{"Effect": "Allow", "Action": actions,
                               "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]
                if user == "dave":  # everything but one object
                    statements.append({"Effect": "Deny", "Action": ["s3:GetObject", "s3:HeadObject"],
                                       "Resource": [f"arn:aws:s3:::{BUCKET}/{DENIED}"]})
                iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps({
                    "Version": "2012-10-17", "Statement": statements}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                           "client_kwargs": {"endpoint_url": srv.endpoint_url, "region_name": "us-east-1"}}
        OPENER.open(urllib.request.Request(srv.endpoint_url + "/moto-api/reset-auth", data=b"0", method="POST",
                                           headers={"Content-Type": "text/plain"})).read()
        yield srv, users


def _fs(options):
    import s3fs

    return s3fs.S3FileSystem(**options, skip_instance_cache=True)


def _secrets_in_files(roots, secrets) -> list:
    found = []
    for root in roots:
        for d, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(d, name)
                if any(s in path for s in secrets):
                    found.append(path)
                    continue
                try:
                    with open(path, "rb") as fh:
                        data = fh.read()
                except OSError:
                    continue
                if any(s.encode() in data for s in secrets):
                    found.append(path)
    return found


BOB_SCRIPT = """
import json, sys, ray, ray_cache, s3fs
from ray_cache.files.fs import CacheFileSystem
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
fs = s3fs.S3FileSystem(**json.loads(sys.argv[1]), skip_instance_cache=True)
out = {}
for name, call in (
    ("read_parquet", lambda: ray_cache.read_parquet("s3://%(b)s/table/", filesystem=fs).count()),
    ("raycache", lambda: CacheFileSystem(fs=fs, skip_instance_cache=True).cat_file("%(b)s/files/img-0.bin")),
    ("load", lambda: ray_cache.load("s3://%(b)s/files/", filesystem=fs)),
):
    try:
        call()
        out[name] = "served"
    except PermissionError as exc:
        out[name] = "PermissionError: " + str(exc)
    except Exception as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
""" % {"b": BUCKET}


def test_a_reader_without_rights_is_refused_warm_or_cold(cache, secured):
    srv, users = secured
    alice, bob = _fs(users["alice"]), _fs(users["bob"])
    want = pa.concat_tables([pq.read_table(f"{BUCKET}/table/part-{i}.parquet", filesystem=alice) for i in range(2)])
    img = alice.cat_file(f"{BUCKET}/files/img-0.bin")

    # bob, cold: nothing cached yet
    with pytest.raises(PermissionError):
        ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=bob)
    # alice warms the cache: Parquet units and file pages
    assert read_all(ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=alice)).equals(want.sort_by("id"))
    pages.reader().clear()
    assert CacheFileSystem(fs=alice, skip_instance_cache=True).cat_file(f"{BUCKET}/files/img-0.bin") == img
    assert ray_cache.stats()["misses"] > 0
    # bob, warm, in this driver
    with pytest.raises(PermissionError) as exc:
        ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=bob)
    assert users["bob"]["secret"] not in str(exc.value) and users["bob"]["key"] not in str(exc.value)
    with pytest.raises(PermissionError):
        CacheFileSystem(fs=bob, skip_instance_cache=True).cat_file(f"{BUCKET}/files/img-0.bin")
    with pytest.raises(PermissionError):
        ray_cache.load(f"s3://{BUCKET}/table/", filesystem=bob)
    with pytest.raises(PermissionError):
        ray_cache.read_parquet(f"s3://{BUCKET}/table/*.parquet", filesystem=bob)
    # bob, warm, in a second driver on the same cluster and cache
    run = subprocess.run([sys.executable, "-c", BOB_SCRIPT, json.dumps(users["bob"])],
                         capture_output=True, text=True, timeout=180,
                         env=dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address))
    assert run.returncode == 0, run.stderr[-3000:]
    verdicts = json.loads(run.stdout.strip().splitlines()[-1])
    for name, verdict in verdicts.items():
        assert verdict.startswith("PermissionError"), (name, verdict)
        assert users["bob"]["secret"] not in verdict and users["bob"]["key"] not in verdict
    # alice is still served from the cache
    hits = ray_cache.stats()["hits"]
    assert read_all(ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=alice)).equals(want.sort_by("id"))
    assert ray_cache.stats()["hits"] > hits
    # no secret of either user in any file we or Ray wrote
    ray.get([w.handle.flush.remote() for w in ray_cache.cluster.membership.live_workers()])
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    secrets = [users[u][f] for u in users for f in ("key", "secret")]
    rights = os.path.join(ray_cache.config.default_disk_dir(), "rights")  # proofs of rights
    assert os.listdir(rights), "the proofs this test made are there to be searched"
    assert _secrets_in_files([str(cache), session_dir, rights], secrets) == []



def test_a_right_to_list_is_not_a_right_to_read(cache, secured):
    """carol may list the bucket but not read it: objects she only lists are HEADed with her
    credentials before anything cached is served to her."""
    import fsspec

    srv, users = secured
    alice, carol = _fs(users["alice"]), _fs(users["carol"])
    assert sorted(carol.find(f"{BUCKET}/files/"))  # she can list ...
    with pytest.raises(PermissionError):
        carol.cat_file(f"{BUCKET}/files/img-0.bin")  # ... and not read
    read_all(ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=alice))
    pages.reader().clear()
    rc_alice = CacheFileSystem(fs=alice, skip_instance_cache=True)
    for p in rc_alice.find(f"{BUCKET}/files/"):
        rc_alice.cat_file(p)
    rc = CacheFileSystem(fs=carol, skip_instance_cache=True)
    refused = {
        "read_parquet of a glob": lambda: ray_cache.read_parquet(f"s3://{BUCKET}/table/*.parquet", filesystem=carol),
        "read_parquet of a folder": lambda: ray_cache.read_parquet(f"s3://{BUCKET}/table/", filesystem=carol),
        "load": lambda: ray_cache.load(f"s3://{BUCKET}/table/*.parquet", filesystem=carol),
        "raycache open after find": lambda: [rc.open(p).read() for p in rc.find(f"{BUCKET}/files/")],
        "fsspec.open_files": lambda: [f.open().read() for f in fsspec.open_files(
            f"raycache::s3://{BUCKET}/files/*", s3=users["carol"])],
        "a snapshot of the folder": lambda: ray_cache.snapshot(f"s3://{BUCKET}/files/", filesystem=carol).cat_file(
            f"{BUCKET}/files/img-0.bin"),
    }
    for name, call in refused.items():
        with pytest.raises(PermissionError):
            call()
            pytest.fail(f"{name}: served to a reader without the right to read")
    # alice's snapshot of the same folder is served (one HEAD proved her right)
    snap = ray_cache.snapshot(f"s3://{BUCKET}/files/", filesystem=alice)
    assert snap.cat_file(f"{BUCKET}/files/img-1.bin") == alice.cat_file(f"{BUCKET}/files/img-1.bin")


DAVE_CHILD = """
import json, pickle, sys
snap = pickle.loads(bytes.fromhex(sys.argv[1]))
out = {}
for path in json.loads(sys.argv[2]):
    try:
        with snap.open(path) as f:
            out[path] = len(f.read())
    except PermissionError:
        out[path] = "PermissionError"
print(json.dumps(out))
"""


def test_a_deny_on_one_object_is_seen_by_a_snapshot_warm_or_cold(cache, secured):
    """dave may read the folder but one object: his snapshot is served every other object
    from the cache, and that one never, warm or cold, in this process or another, however
    it is read; alice's snapshot is served all of them."""
    import pickle

    srv, users = secured
    alice, dave = _fs(users["alice"]), _fs(users["dave"])
    denied, allowed = f"{BUCKET}/{DENIED}", f"{BUCKET}/files/img-0.bin"
    with pytest.raises(PermissionError):
        dave.cat_file(denied)  # the store's own verdict
    want = {p: alice.cat_file(p) for p in (allowed, denied)}

    snap = ray_cache.snapshot(f"s3://{BUCKET}/files/", filesystem=dave)
    reads = {
        "cat_file": lambda p: snap.cat_file(p),
        "open().read()": lambda p: snap.open(p).read(),
        "cat": lambda p: snap.cat([p])[p],
        "cat_ranges": lambda p: snap.cat_ranges([p], [0], [100], on_error="raise")[0],
    }
    for state in ("cold", "warm"):
        if state == "warm":  # alice fetches both, so both are cached
            assert ray_cache.snapshot(f"s3://{BUCKET}/files/", filesystem=alice).cat_file(denied) == want[denied]
            pages.reader().clear()
        for name, read in reads.items():
            with pytest.raises(PermissionError):
                read(denied)
                pytest.fail(f"{state} {name}: served an object dave may not read")
            assert want[allowed].startswith(read(allowed)), (state, name)
    both = snap.cat_ranges([allowed, denied], [0, 0], [10, 10])
    assert both[0] == want[allowed][:10] and isinstance(both[1], PermissionError)
    # another process with dave's snapshot (spawned: its own proofs and buffers)
    run = subprocess.run([sys.executable, "-c", DAVE_CHILD, pickle.dumps(snap).hex(),
                          json.dumps([allowed, denied])], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {allowed: len(want[allowed]), denied: "PermissionError"}
    assert users["dave"]["secret"] not in run.stdout + run.stderr
