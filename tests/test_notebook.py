"""The walkthrough notebook runs headless, top to bottom, against a local S3 server."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)


def test_explore_notebook_runs(s3_server, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(HERE, "..", "notebooks", "explore.ipynb")
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("RAY_CACHE_NOTEBOOK_ENDPOINT", s3_server.endpoint_url)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ADDRESS", "local")  # its own Ray, not the test session's cluster
    s3_server.create_bucket("explore-demo")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("ray_cache status" in o["data"]["text/html"] for o in html), "status renders as an HTML table"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the cold/warm plot was drawn"
