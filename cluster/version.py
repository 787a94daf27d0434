"""The installed pagedserve's version, for `pagedserve --version` and the HTTP API's /version."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def pagedserve_version() -> str:
    try:
        return version("pagedserve")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
