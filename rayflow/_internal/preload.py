"""What a Ray worker imports before it takes work (Ray's ``preload_python_modules``).

An actor of a job runs in a worker that Ray started ahead of need; whatever
that worker still has to import when the actor is created is start-up time
of the job. Measured with ``python benchmarks/startup.py --trace`` and
py-spy on the idle workers: besides rayflow's own modules, the first
object a worker deserializes for a job builds Ray's serialization context,
which imports pyarrow (Ray's Arrow serializers) and pydantic's v1 API:
0.17-0.26 s of the 0.35-0.5 s between an idle worker getting an actor and
the actor's ``__init__``. All of it is imported here, once per worker,
before any job needs it.
"""

from __future__ import annotations

import contextlib
import importlib

import ray._common.pydantic_compat  # noqa: F401

# A job's coordinator actor and its operator actors.
import rayflow._internal.job.coordinator
import rayflow._internal.runtime.actor  # noqa: F401

#: Imported by Ray's serialization context where installed (ray.util.serialization_addons).
OPTIONAL = ("pyarrow", "pyarrow.json", "pydantic.v1", "starlette.datastructures")

for _name in OPTIONAL:
    with contextlib.suppress(ImportError):
        importlib.import_module(_name)
