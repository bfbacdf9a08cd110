"""rayflow's version, read from the installed package's metadata.

pyproject.toml's ``version`` is the one place it is written; a source tree
that was never installed (``pip install -e .``) reports ``0+unknown``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

UNKNOWN = "0+unknown"


def package_version(distribution: str = "rayflow") -> str:
    """The installed version of ``distribution``, or ``0+unknown`` if it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return UNKNOWN
