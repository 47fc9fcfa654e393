"""The examples in the public docstrings run and print what they show.

Examples that need a running cluster or a store are marked ``# doctest: +SKIP`` where
they are written; every other example is executed here, in this process.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ray_cache

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(ray_cache.__path__, prefix="ray_cache.")
    if not m.name.startswith("ray_cache.testing.")  # server launchers: examples start processes
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
