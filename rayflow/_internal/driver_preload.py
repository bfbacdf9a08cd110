"""Import, in the background, what the driver's first job would import on its clock.

A driver's first ``rf.start`` imported what Ray's serializers load on a
process's first remote call (pyarrow, pydantic's v1 API: 0.18 s here) and
rayflow's coordinator and operator modules, between submitting the flow and
the first record out; every later job found them imported. Building a flow
announces a job, and the driver usually still has to connect to Ray then
(``ray.init`` takes seconds), so the first :class:`~rayflow.Dataflow`
starts these imports in a thread: the same modules Ray's workers preload
(``rayflow._internal.preload``). ``python benchmarks/startup.py --settle
--jobs 1 --parallelism 2`` (a driver's first job on a Ray whose workers
are ready): 0.23-0.25 s to the first record out, 0.40-0.42 s before this
(and before ``in_notebook`` stopped importing IPython).
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger("rayflow")

_started = threading.Lock()
_thread: threading.Thread | None = None


def start() -> None:
    """Start the imports once per process (a no-op afterwards)."""
    global _thread
    with _started:
        if _thread is not None:
            return
        _thread = threading.Thread(target=_load, name="rayflow-preload", daemon=True)
        _thread.start()


def _load() -> None:
    try:
        importlib.import_module("rayflow._internal.preload")
    except BaseException as exc:  # only ever a head start: the job imports what it needs
        log.debug("preloading the driver's modules failed: %r", exc)
