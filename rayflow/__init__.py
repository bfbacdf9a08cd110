"""rayflow: a fault-tolerant stream processor for Python on Ray.

Build a :class:`Dataflow`, then ``rf.run(flow)`` (blocking) or
``rf.start(flow)`` (returns a :class:`JobHandle`).
"""

from rayflow import errors, sinks, sources, testing, windows
from rayflow._version import package_version
from rayflow.config import Checkpointing, RestartStrategy, RuntimeConfig
from rayflow.dataflow import Dataflow, KeyedStream, Stream, WindowedStream
from rayflow.errors import BuildError, ConfigError, DeadLetter, JobFailedError, RayflowError
from rayflow.job import CheckpointError, JobHandle, JobResult, JobStatus, run, start

__version__ = package_version("rayflow")

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
