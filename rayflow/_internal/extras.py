"""Optional dependencies: the error that says which extra installs one.

rayflow's hard dependencies are only what a local job needs; S3, OpenTelemetry,
notebooks and clusters come with extras (``pip install 'rayflow[s3]'``). Code
that needs one imports it where it is used and, if it is missing, raises
:func:`missing_extra`'s error, so the user learns the one command that fixes it.
"""

from __future__ import annotations

import importlib.util

from rayflow.errors import ConfigError


def missing_extra(module: str, what: str, extra: str) -> ConfigError:
    """The error for ``what`` needing ``module``, which ``rayflow[extra]`` installs."""
    return ConfigError(
        f"{what} needs {module}, which is not installed: pip install 'rayflow[{extra}]'"
    )


def require_installed(module: str, what: str, extra: str) -> None:
    """Raise :func:`missing_extra`'s error now if ``module`` cannot be found.

    Only looks the module up (no import), so it is cheap enough for
    constructors that should fail before a job starts rather than inside it.
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken entry
        found = False
    if not found:
        raise missing_extra(module, what, extra)
