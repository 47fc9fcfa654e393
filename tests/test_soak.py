"""The long run of ``benchmarks/soak.py``, shortened for CI: mixed readers against a cache
smaller than the data; its verdicts (worker memory flat after warm-up, usage within
capacity, no errors, no wrong reads) must all pass. The full run is 10 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_short_soak_passes_every_verdict(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--minutes", "1", "--sample-s", "8", "--warmup", "0.5",
         "--json", str(out)],
        capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    print(run.stdout)
    report = json.loads(out.read_text())
    assert report["error_count"] == 0, report["errors"]
    assert report["wrong_reads"] == 0
    assert report["samples_over_capacity"] == 0
    assert sum(report["ops"].values()) > 20 and all(report["ops"].values()), report["ops"]
    assert report["rss_growth_after_warmup"] <= 0.10, [s["worker_rss"] for s in report["samples"]]
    assert run.returncode == 0, run.stdout[-2000:]
