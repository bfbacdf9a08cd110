"""Warm Ray worker processes for the actors of jobs (best effort, driver side).

Every actor of a job (its coordinator, each operator partition, a collector)
runs in a Ray worker process of its own, and starting one costs ~0.3 s of CPU
(Python, ``import ray``, connecting to Ray): most of a job's start-up. An
actor that finds an idle worker takes it at once (~0.1 s), but Ray starts
idle workers only with a node (as many as it has CPUs) and does not replace
those that actors took (an actor's process ends with the actor). So the
driver asks its node's raylet to start workers ahead of need (Ray's
``PrestartWorkers`` call):

- when a job starts, what the node's pool lacks for it, so that they start
  while the coordinator starts instead of after it;
- with ``RAYFLOW_WARM_DURING_S=t`` (off by default), also once the job has
  run t seconds, what it took, one worker starting at a time, so that a job
  started the moment this one ends finds them ready (the test suite runs
  this way: 7 back-to-back p=2 jobs of 6 s started in 0.86 s instead of
  1.61 s). Off by default: the starts compete with the job for CPU, and
  ``benchmarks/recovery.py --scopes-only --rate 2500`` (a kill 3.5 s into
  the job) measured a partial recovery of 1.66 s with t=1 against 0.66 s
  without;
- once the job ended, what it took (or what is still missing then).

Each time, what the pool lacks at that moment is a number of new worker
processes to see start (asked for over a few polls: the raylet starts only
as many at a time as it has start-up slots, and drops the rest of an ask).
Never a level kept up over time: the actors of the job being started, or
of the next one, drain it as they take workers, and topping it up again
started processes beside a running job (measured: each 1M-record p=2 job
after the first of a row ran at a third of the first one's rate).

The pool is the node's idle and starting Python workers, counted among the
raylet's child processes (Ray titles an idle one ``ray::IDLE``); a job needs
one for its coordinator (and collector), which run beside the driver, and
this node's share of the cluster's CPUs of its operators, which Ray may
place anywhere. Workers are started for no job in particular, as those Ray
starts with a node, so the next driver on this node (the next ``rayflow
run``) finds them too; they are started with the job's runtime environment,
as an actor only takes a worker started with its own. Each costs ~80 MB of
memory. A job asks for no more than it needs, at most
``RAYFLOW_WARM_WORKERS`` (default 8; 0 turns this off), and Ray's own
trimming of idle workers (down to the node's free CPUs) leaves them alone
for ``RAYFLOW_WARM_KEEP_S`` (default 300 s).

Anything failing here (no local raylet under Ray Client, another Ray
version) turns it off quietly: it can only make a start faster.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, TypeVar

log = logging.getLogger("rayflow")

#: What every Ray worker of a Ray that rayflow starts imports before it takes work
#: (Ray's ``preload_python_modules``; the module says what and why): an actor then
#: starts without importing rayflow, Ray's serializers and pyarrow first. Measured
#: (benchmarks/recovery.py): that import work, ~0.1 s on an idle machine, took
#: 0.3-0.9 s in a worker started while the rest of a job ran; ``recovery.py
#: --scopes-only --rate 10000``, same conditions: a partial recovery 0.89 s with it
#: preloaded, 1.36 s without; a global one 0.51 s and 0.63 s.
PRELOAD_MODULES = "rayflow._internal.preload"


def preload_in_new_ray() -> None:
    """Have the workers of a Ray this process starts import rayflow ahead of need.

    Only a Ray started from here reads it (the raylet takes it from the
    environment); a running cluster keeps its own setting: start it with
    ``RAY_preload_python_modules=`` this list (README, "Run it on a cluster").
    An explicit ``RAY_preload_python_modules`` is left alone.
    """
    os.environ.setdefault("RAY_preload_python_modules", PRELOAD_MODULES)


#: How long a request keeps topping the pool up (a slot frees as a worker registers).
FILL_FOR_S = 10.0
#: Pause between looks at the pool while topping it up.
POLL_S = 0.05
#: How long an ask may take to show as a starting process before it is asked again.
ASK_AGAIN_S = 0.5


_N = TypeVar("_N", int, float)


def _env(name: str, default: _N) -> _N:
    """The number in environment variable ``name``, of ``default``'s type (or ``default``)."""
    try:
        return type(default)(os.environ.get(name, default))
    except ValueError:
        return default


class _Raylet:
    """The local raylet: its process (to count workers) and its PrestartWorkers call."""

    def __init__(self) -> None:
        import psutil
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

        common: Any = common_pb2  # generated code: no stubs
        messages: Any = node_manager_pb2

        worker: Any = ray._private.worker.global_worker
        node = worker.node
        if node is None:
            raise RuntimeError("no local Ray node (Ray Client?)")
        port = node.node_manager_port
        self.key = (node.node_ip_address, port)
        flag = f"--node_id={ray.get_runtime_context().get_node_id()}"
        self.pid = 0
        self.concurrency = 1
        self.cpus = 0.0  # this node's
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and os.path.basename(cmd[0]) == "raylet" and flag in cmd:
                self.pid = proc.pid
                for arg in cmd:
                    name, _, value = arg.partition("=")
                    if name == "--maximum_startup_concurrency":
                        self.concurrency = max(1, int(value))
                    elif name == "--static_resource_list":  # name,amount,name,amount...
                        pairs = value.split(",")
                        amounts = dict(zip(pairs[::2], pairs[1::2], strict=False))
                        self.cpus = float(amounts.get("CPU", 0.0))
                break
        if not self.pid:
            raise RuntimeError(f"no raylet process with {flag} on this machine")
        self._process = psutil.Process(self.pid)
        self._psutil_error = psutil.Error
        job_config = worker.core_worker.get_job_config()
        runtime_env = job_config.runtime_env_info.SerializeToString()
        address = f"{node.node_ip_address}:{port}"
        keep_s = _env("RAYFLOW_WARM_KEEP_S", 300)

        def prestart(count: int) -> None:
            request = messages.PrestartWorkersRequest(
                language=common.PYTHON, keep_alive_duration_secs=keep_s, num_workers=count
            )
            request.runtime_env_info.ParseFromString(runtime_env)  # the job's
            # A channel per call (a few per job): none is left open when Ray goes away.
            channel = init_grpc_channel(address)
            try:
                stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
                stub.PrestartWorkers(request, timeout=5)
            finally:
                channel.close()

        self.prestart = prestart

    def count(self) -> tuple[int, int]:
        """(idle, starting) Python workers of this raylet."""
        idle, starting, _ = self.workers()
        return idle, starting

    def workers(self) -> tuple[int, int, set[int]]:
        """(idle, starting, the pids of every Python worker) of this raylet."""
        idle = starting = 0
        pids: set[int] = set()
        for child in self._process.children():
            try:
                cmd = child.cmdline()
            except self._psutil_error:
                continue
            if not cmd:
                continue
            if cmd[0].startswith("ray::"):
                idle += cmd[0].split()[0] == "ray::IDLE"
                pids.add(child.pid)
            elif any(part.endswith(("default_worker.py", "setup_worker.py")) for part in cmd[:4]):
                if "--worker-type=" not in " ".join(cmd):  # not a spill/restore worker
                    starting += 1
                    pids.add(child.pid)
        return idle, starting, pids


class WarmPool:
    """Asks this node's raylet to start the idle Ray workers that jobs here lack."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raylet: _Raylet | None = None
        self._failed: Any = None  # the Ray node on which it failed (then: off there)
        # What the last request is for: new worker processes to see start (``goal``),
        # those seen (``born``) among the workers that were not there (``known``), and
        # what was asked for until when (an ask the raylet dropped is asked again).
        self._goal = 0
        self._known: set[int] = set()
        self._born: set[int] = set()
        self._asked = 0
        self._asked_at = 0.0
        self._slots = 1
        self._until = 0.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure(self, here: int, anywhere: int = 0, *, gently: bool = False) -> None:
        """Have workers idle or starting on this node for ``here`` actors that run on
        it and this node's share (of the cluster's CPUs) of ``anywhere`` others, up
        to the cap.

        Asks for what fits the raylet's start-up slots now (a few ms), and
        leaves the rest to a background thread that asks as slots free up.
        ``gently``: one worker starting at a time (beside a running job, which
        keeps the other cores).
        """
        cap = _env("RAYFLOW_WARM_WORKERS", 8)
        if cap <= 0:
            return
        try:
            with self._lock:
                raylet = self._link()
                if raylet is None:
                    return
                workers = here
                if anywhere:
                    import ray

                    cluster = float(ray.cluster_resources().get("CPU", 0.0))
                    share = min(1.0, raylet.cpus / cluster) if cluster > 0 else 0.0
                    workers += math.ceil(anywhere * share)
                # What the pool lacks now, once (module docstring): not a level that
                # the actors of this job, or of the next, would drain as it runs.
                idle, starting, self._known = raylet.workers()
                self._goal = max(0, min(workers, cap) - idle - starting)
                self._born = set()
                self._asked = 0
                self._slots = 1 if gently else raylet.concurrency
                self._until = time.monotonic() + (FILL_FOR_S * 3 if gently else FILL_FOR_S)
                self._top_up(raylet)
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="rayflow-warm-workers", daemon=True
                    )
                    self._thread.start()
            self._wake.set()
        except Exception as exc:
            self._off(exc)

    def after(self, done: threading.Event, here: int, anywhere: int = 0) -> None:
        """:meth:`ensure` once ``done`` is set (the job ended, and its actors with
        it), and with ``RAYFLOW_WARM_DURING_S`` once the job has run that long.

        Not while the job runs by default: starting processes takes CPU from
        it (~0.3 s each), enough to halve what a new job does in its first
        second on a small machine, and to slow a recovery in its first
        seconds (see the module docstring).
        """
        delay = _env("RAYFLOW_WARM_DURING_S", -1.0)

        def then() -> None:
            if delay >= 0 and not done.wait(delay):
                self.ensure(here, anywhere, gently=True)
            done.wait()
            self.ensure(here, anywhere)

        threading.Thread(target=then, name="rayflow-warm-after", daemon=True).start()

    def _link(self) -> _Raylet | None:
        import ray

        node = ray._private.worker.global_worker.node
        key = None if node is None else (node.node_ip_address, node.node_manager_port)
        if key is None or key == self._failed:
            return None
        if self._raylet is None or self._raylet.key != key:
            self._raylet = None
            try:
                self._raylet = _Raylet()
            except Exception as exc:
                self._failed = key
                log.debug("warm workers: off on this node: %s", exc)
                return None
        return self._raylet

    def _top_up(self, raylet: _Raylet) -> bool:
        """Ask for what is still to start and fits in the free start-up slots; True once
        the goal's processes started.

        Progress is counted in worker processes seen to start (any new one:
        it serves the same need), not in asks: the raylet drops an ask beyond
        its free slots, and an ask not seen to start within ``ASK_AGAIN_S`` is
        asked again."""
        if len(self._born) >= self._goal:
            return True
        _, starting, pids = raylet.workers()
        self._born |= pids - self._known
        missing = self._goal - len(self._born)
        if missing <= 0:
            return True
        if self._asked > len(self._born) and time.monotonic() - self._asked_at < ASK_AGAIN_S:
            return False  # asked, not started yet
        free = min(raylet.concurrency, self._slots) - starting
        if free > 0:
            count = min(missing, free)
            raylet.prestart(count)
            self._asked = len(self._born) + count
            self._asked_at = time.monotonic()
        return False

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                time.sleep(POLL_S)
                try:
                    with self._lock:
                        raylet = self._raylet
                        if raylet is None or time.monotonic() > self._until:
                            break
                        if self._top_up(raylet):
                            break
                except Exception as exc:
                    self._off(exc)
                    break

    def _off(self, exc: BaseException) -> None:
        with self._lock:
            if self._raylet is not None:
                self._failed = self._raylet.key
            self._raylet = None
        log.debug("warm workers: off on this node: %s", exc)


POOL = WarmPool()
