"""The ``ray-cache`` command from another process, and the Ray metrics the workers export."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import ray

import ray_cache
from conftest import data_gets, read_all, write_dataset

CLI = os.path.join(os.path.dirname(sys.executable), "ray-cache")


def _cli(*args, timeout=120):
    address = ray.get_runtime_context().gcs_address
    return subprocess.run([CLI, "--address", address, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_status_stats_and_steering_from_another_process(cache, s3_server, s3fs_direct, s3fs_proxied, proxy, prefix):
    write_dataset(s3fs_direct, prefix, files=2)
    opts = json.dumps(s3_server.storage_options(endpoint_url=proxy.url))
    out = _cli("load", f"s3://{prefix}/", "--storage-options", opts)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 entries" in out.stdout and "2 fetched" in out.stdout  # units (footers: planning)
    proxy.reset()
    read_all(ray_cache.read_parquet(f"s3://{prefix}/", filesystem=s3fs_proxied))
    assert data_gets(proxy) == []

    status = _cli("status")
    assert status.returncode == 0, status.stderr[-2000:]
    me = ray_cache.status().workers[0]
    assert me["node_id"][:8] in status.stdout and me["node_ip"] in status.stdout
    assert re.search(r"\d+\.\d (KiB|MiB) / 256\.0 MiB", status.stdout), status.stdout
    records = json.loads(_cli("--json", "status").stdout)
    assert records[0]["node_id"] == me["node_id"] and records[0]["entries"] == 4
    stats = json.loads(_cli("--json", "stats").stdout)
    assert stats["misses"] == 4 and stats["hits"] >= 2

    freed = _cli("--json", "free", f"s3://{prefix}/", "--storage-options", opts)
    assert json.loads(freed.stdout) == {"free": 4}
    assert ray_cache.status().workers[0]["entries"] == 0


def test_cli_says_clearly_when_there_is_no_cluster_or_cache(ray_session):
    out = subprocess.run([CLI, "--address", "127.0.0.1:9", "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no Ray cluster" in out.stderr
    ray_cache.shutdown()
    out = _cli("status")
    assert out.returncode == 1 and "no cache workers are running" in out.stdout


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _metric(body: str, name: str, node_id: str, pid: int):
    for line in body.splitlines():
        if line.startswith(name + "{") and f'node_id="{node_id}"' in line and f'worker_pid="{pid}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_report_a_known_sequence_of_reads(cache, s3fs_direct, s3fs_proxied, prefix):
    write_dataset(s3fs_direct, prefix, files=3)
    url = f"s3://{prefix}/"
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))  # 3 units + 3 footers: 6 misses
    read_all(ray_cache.read_parquet(url, filesystem=s3fs_proxied))  # 3 unit hits (footers parsed here)
    worker = ray_cache.status().workers[0]  # also pushes the metrics now
    node = next(n for n in ray.nodes() if n["NodeID"] == worker["node_id"])
    want = {"ray_cache_misses_total": 6.0, "ray_cache_hits_total": 3.0,
            "ray_cache_memory_bytes_capacity": float(256 << 20)}
    deadline = time.monotonic() + 60  # Ray's agent exports on its own period (~10 s)
    seen = {}
    while time.monotonic() < deadline:
        body = _scrape(node["MetricsExportPort"])
        seen = {name: _metric(body, name, worker["node_id"], worker["pid"]) for name in want}
        if seen == want:
            break
        time.sleep(1)  # polling an external exporter with a deadline
    assert seen == want, (worker["misses"], worker["hits"])
    assert _metric(body, "ray_cache_bytes_from_under_store_total", worker["node_id"], worker["pid"]) == worker["bytes_from_under_store"]


def test_every_subcommand_takes_address_and_json_after_it_as_ray_status_does():
    from ray_cache.cli import build_parser

    parser = build_parser()
    needs = {"load": ["s3://b/k"], "pin": ["s3://b/k"], "unpin": ["s3://b/k"],
             "free": ["s3://b/k"], "invalidate": ["s3://b/k"]}
    commands = parser._subparsers._group_actions[0].choices  # every subcommand the parser has
    assert set(commands) >= {"status", "stats", "start", "stop", *needs}
    for name in commands:
        rest = needs.get(name, [])
        after = parser.parse_args([name, *rest, "--address", "10.1.2.3:6379", "--json"])
        before = parser.parse_args(["--address", "10.1.2.3:6379", "--json", name, *rest])
        plain = parser.parse_args([name, *rest])
        assert (after.address, after.json) == (before.address, before.json) == ("10.1.2.3:6379", True), name
        assert (plain.address, plain.json) == ("auto", False), name


def test_cli_address_after_the_subcommand_reaches_the_cluster(cache):
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([CLI, "status", "--address", address, "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [w["node_id"] for w in json.loads(out.stdout)] == [w["node_id"] for w in ray_cache.status().workers]
