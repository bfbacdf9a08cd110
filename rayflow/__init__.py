"""rayflow: a fault-tolerant stream processor for Python on Ray.

Build a :class:`Dataflow`, then ``rf.run(flow)`` (blocking) or
``rf.start(flow)`` (returns a :class:`JobHandle`).

The names below are imported when first used (PEP 562): a Ray worker that
unpickles an operator imports ``rayflow`` as the package of its modules, and
should not pay for the driver's side (jobs, handles, notebooks, telemetry)
each time a job starts one. ``import rayflow as rf; rf.run(...)`` works as
before; add a public name to ``_EXPORTS``, ``__all__`` and the
``TYPE_CHECKING`` block (for type checkers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayflow import errors, sinks, sources, testing, windows
    from rayflow.config import Checkpointing, RestartStrategy, RuntimeConfig
    from rayflow.dataflow import Dataflow, KeyedStream, Stream, WindowedStream
    from rayflow.errors import BuildError, ConfigError, DeadLetter, JobFailedError, RayflowError
    from rayflow.job import CheckpointError, JobHandle, JobResult, JobStatus, run, start

    __version__: str

# public name -> the module that defines it (a module itself if the name is the module's)
_EXPORTS = {
    "errors": "rayflow.errors",
    "sinks": "rayflow.sinks",
    "sources": "rayflow.sources",
    "testing": "rayflow.testing",
    "windows": "rayflow.windows",
    "Checkpointing": "rayflow.config",
    "RestartStrategy": "rayflow.config",
    "RuntimeConfig": "rayflow.config",
    "Dataflow": "rayflow.dataflow",
    "KeyedStream": "rayflow.dataflow",
    "Stream": "rayflow.dataflow",
    "WindowedStream": "rayflow.dataflow",
    "BuildError": "rayflow.errors",
    "ConfigError": "rayflow.errors",
    "DeadLetter": "rayflow.errors",
    "JobFailedError": "rayflow.errors",
    "RayflowError": "rayflow.errors",
    "CheckpointError": "rayflow.job",
    "JobHandle": "rayflow.job",
    "JobResult": "rayflow.job",
    "JobStatus": "rayflow.job",
    "run": "rayflow.job",
    "start": "rayflow.job",
}

__all__ = [
    "BuildError",
    "CheckpointError",
    "Checkpointing",
    "ConfigError",
    "Dataflow",
    "DeadLetter",
    "JobFailedError",
    "JobHandle",
    "JobResult",
    "JobStatus",
    "KeyedStream",
    "RayflowError",
    "RestartStrategy",
    "RuntimeConfig",
    "Stream",
    "WindowedStream",
    "__version__",
    "errors",
    "run",
    "sinks",
    "sources",
    "start",
    "testing",
    "windows",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from rayflow._version import package_version

        value: Any = package_version("rayflow")
    elif name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
