"""Real servers on loopback for tests, demos and benchmarks."""

from __future__ import annotations

from typing import Any

__all__ = ["CountingProxy", "S3Server", "s3_data_gets"]

# Imported lazily so that ``python -m ray_cache.testing.proxy`` does not import
# the proxy module twice (runpy warns when the package already imported it).
_WHERE = {"CountingProxy": "proxy", "s3_data_gets": "proxy", "S3Server": "s3server"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
