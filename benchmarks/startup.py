"""How long a tiny job takes to start on a warm Ray, and where the time goes.

    python benchmarks/startup.py                       # 8 tiny jobs after one ray.init
    python benchmarks/startup.py --trace               # and where the time goes
    python benchmarks/startup.py --pause 3 --parallelism 2 --checkpoint
    python benchmarks/startup.py --settle --jobs 3 --pause 1.5 --parallelism 2

Ray is started once (``ray.init``, timed apart); then ``--jobs`` tiny jobs run
one after the other (``--pause`` seconds apart; a generator of ``--records``
records, a keyed sum, a sink), each a fresh ``rf.start`` of a new job. For
each it measures

- submit -> first record out: from calling ``rf.start`` to the first
  ``write`` of the sink (the sink stamps the wall clock in its actor; the
  machine is one, so the clocks agree);
- submit -> result: until ``handle.wait()`` returned the ``JobResult``;

and prints their median, min and max, and the first job's figures with
``ray.init`` included. ``--settle`` first waits until Ray's idle workers for a job are ready and
the machine is quiet, so that the first job is a driver's first on a
running Ray, not one started a moment ago. ``--trace`` also times each phase of the start (the
driver's launch steps, the Ray worker processes the actors wait for, the
coordinator's and the operators' steps; see TRACE_CODE) without changing
rayflow, and prints the median of each phase over the jobs.

Each job's actors (its coordinator and one per operator partition) need Ray
worker processes, 0.5-0.65 s of CPU each to start (benchmarks/worker_cost.py);
rayflow starts them ahead, while the previous job runs
(rayflow/_internal/job/warm.py). Back to back
on a small machine the next job still finds them starting; ``--pause 1.5``
shows a start on a Ray that had a moment to get them ready.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray
from _common import start_ray, wait_for_workers

import rayflow as rf


class FirstOut(rf.sinks.Sink):
    """Discards records; the first ``write`` of each partition stamps the time in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder

    def open(self, ctx: rf.sinks.SinkContext) -> rf.sinks.SinkWriter:
        return _FirstOutWriter(os.path.join(self.folder, f"first-{ctx.partition}"))


class _FirstOutWriter(rf.sinks.SinkWriter):
    def __init__(self, path: str):
        self.path = path
        self.stamped = False

    def write(self, items: list[Any]) -> None:
        if items and not self.stamped:
            self.stamped = True
            with open(self.path, "w") as f:
                f.write(repr(time.time()))

    def prepare_commit(self, checkpoint_id: int) -> Any:
        return None


def tiny_flow(name: str, parallelism: int, records: int, folder: str) -> rf.Dataflow:
    flow = rf.Dataflow(name, parallelism=parallelism)
    numbers = flow.source(
        "numbers",
        rf.sources.Generator(lambda p, i: (i % 10, 1), partitions=parallelism, limit=records),
    )
    sums = numbers.key_by("by_key", lambda r: r[0]).reduce(
        "sum", lambda acc, r: acc + r[1], initial=0
    )
    sums.sink("out", FirstOut(folder))
    return flow


# -- tracing -------------------------------------------------------------------

# With --trace this becomes the ``sitecustomize`` of every Python process Ray
# starts (through PYTHONPATH, set before ``ray.init``), so that Ray's idle
# workers are traced too and reused as without tracing (a job-level
# ``worker_process_setup_hook`` would change the job's runtime environment,
# and Ray would then start a new process for every actor). It notes when the
# process started Python, when it had connected to Ray (ready to run an
# actor), how long ``import rayflow`` took, and times the start-up steps of the
# coordinator and the operators when their modules are imported.
TRACE_CODE = r"""
import functools, inspect, json, os, sys, time

_PATH = os.environ["RF_STARTUP_TRACE"]


def emit(what, start, end=None):
    line = json.dumps({"pid": os.getpid(), "what": what, "start": start, "end": end})
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def traced(fn, what):
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper_async(*args, **kwargs):
            start = time.time()
            try:
                return await fn(*args, **kwargs)
            finally:
                emit(what, start, time.time())

        return wrapper_async

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            emit(what, start, time.time())

    return wrapper


PATCHES = {
    "rayflow": [],
    "ray._private.worker": [(None, "connect", "ray.connect")],
    "rayflow._internal.job.coordinator": [
        ("JobCoordinator", "__init__", "coordinator.__init__"),
        ("JobCoordinator", "start", "coordinator.start"),
        ("JobCoordinator", "_claim_lease", "coordinator.claim_lease"),
    ],
    "rayflow._internal.job.deployment": [
        ("Deployment", "create", "deployment.create"),
        ("Deployment", "wait_ready", "deployment.wait_ready"),
        ("Deployment", "connect", "deployment.connect"),
        ("Deployment", "run_all", "deployment.run_all"),
    ],
    "rayflow._internal.job.failover": [("Failover", "run_from", "failover.run_from")],
    "rayflow._internal.runtime.task": [("StageTask", "__init__", "task.__init__")],
    "rayflow._internal.runtime.actor": [("OperatorActor", "__init__", "operator.__init__")],
}
# Modules whose import is timed: the package, and those that define the actors' classes.
IMPORTS = ("rayflow", "rayflow._internal.job.coordinator", "rayflow._internal.runtime.actor")


class _Loader:
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        start = time.time()
        self._loader.exec_module(module)
        if self._name in IMPORTS:
            emit("import " + self._name, start, time.time())
        for owner, attr, what in PATCHES[self._name]:
            target = getattr(module, owner) if owner else module
            setattr(target, attr, traced(getattr(target, attr), what))

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, name)
                return spec
        return None


emit("process", time.time(), time.time())
sys.meta_path.insert(0, _Finder())
"""


def start_traced_ray(trace: str) -> dict[str, Any]:
    """Start Ray with TRACE_CODE in every process it starts; the driver's launch
    steps are timed here. Returns the trace code's namespace."""
    folder = tempfile.mkdtemp(prefix="rf-startup-site-")
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(TRACE_CODE)
    os.environ["RF_STARTUP_TRACE"] = trace
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [folder, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    tracing: dict[str, Any] = {}
    exec(compile(TRACE_CODE.split('emit("process"')[0], "trace", "exec"), tracing)
    start_ray()
    import rayflow.job as job_module
    from rayflow._internal.job import launcher, warm

    traced = tracing["traced"]
    for name in (
        "check_picklable",
        "check_not_running",
        "collector_for",
        "create_coordinator",
        "create_operators",
    ):
        setattr(launcher, name, traced(getattr(launcher, name), f"driver.{name}"))
    warm.WarmPool.ensure = traced(warm.WarmPool.ensure, "driver.warm_workers")
    job_module.decide_start = traced(job_module.decide_start, "driver.decide_start")
    job_module.build_plan = traced(job_module.build_plan, "driver.build_plan")
    return tracing


# -- the runs ------------------------------------------------------------------


def run_job(i: int, args: argparse.Namespace) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="rf-startup-")
    flow = tiny_flow(f"startup-{os.getpid()}-{i}", args.parallelism, args.records, folder)
    checkpoint = (
        rf.Checkpointing(storage=tempfile.mkdtemp(prefix="rf-startup-cp-"), interval_s=10.0)
        if args.checkpoint
        else None
    )
    submitted = time.time()
    handle = rf.start(flow, checkpoint=checkpoint)
    start_returned = time.time()
    result = handle.wait()
    ended = time.time()
    firsts = [float(open(p).read()) for p in glob.glob(os.path.join(folder, "first-*"))]
    if not firsts:
        raise RuntimeError(f"job {i}: no record reached the sink")
    return {
        "submitted": submitted,
        "start_returned": start_returned,
        "coordinator_init": result.started_at,
        "running": result.running_at,
        "first_out": min(firsts),
        "result": ended,
    }


def stats(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):6.3f} s   min {min(values):6.3f}   "
        f"max {max(values):6.3f}"
    )


# Phases of one start, each (label, from, to), over named instants of the trace. The
# driver requests the coordinator and then the operators (a fresh start), so the
# coordinator's and the operators' phases run side by side until both are up.
PHASES = [
    ("driver: plan, checks, start decision, warm workers", "submitted", "coordinator_call"),
    ("driver: coordinator and operator actors requested", "coordinator_call", "created"),
    ("coordinator: waiting for a Ray worker process", "coordinator_call", "coordinator_proc"),
    (
        "coordinator: worker ready -> __init__ (import, load)",
        "coordinator_proc",
        "coordinator_init",
    ),
    ("coordinator: __init__ -> start() deploying", "coordinator_init", "coordinator_start"),
    ("  operators: waiting for Ray worker processes", "created", "operators_proc"),
    (
        "  operators: workers ready -> tasks built (import, load)",
        "operators_proc",
        "operators_init",
    ),
    ("both up -> every ready() answered", "both_up", "ready"),
    ("sinks set up, restore, connect, run", "ready", "running"),
    ("-> rf.start returned in the driver", "running", "start_returned"),
    ("-> first record out at the sink", "start_returned", "first_out"),
    ("first record out -> result (drain, end, clean-up)", "first_out", "result"),
]


def _window(job: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if job["submitted"] <= e["start"] <= job["result"]]


def _ready(events: list[dict[str, Any]]) -> dict[int, float]:
    """pid -> when that Ray worker process had connected to Ray (ready to run an actor)."""
    return {e["pid"]: e["end"] for e in events if e["what"] == "ray.connect" and e["end"]}


def _python(events: list[dict[str, Any]]) -> dict[int, float]:
    """pid -> when Python started in it (Ray's setup_worker.py, then the worker it execs)."""
    started: dict[int, float] = {}
    for e in events:
        if e["what"] == "process":
            started[e["pid"]] = min(started.get(e["pid"], e["start"]), e["start"])
    return started


def instants(job: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, float]:
    """The named instants of one job's start, from its trace events."""
    window = _window(job, events)
    connected = _ready(events)

    def first(what: str, field: str = "start") -> float | None:
        found = [e[field] for e in window if e["what"] == what]
        return min(found) if found else None

    def last(what: str, field: str = "end") -> float | None:
        found = [e[field] for e in window if e["what"] == what]
        return max(found) if found else None

    def ready(what: str, since: float | None) -> float | None:
        pids = {e["pid"] for e in window if e["what"] == what}
        times = [connected[p] for p in pids if p in connected]
        if not times or since is None:
            return None
        return max(since, max(times))

    call = first("driver.create_coordinator")
    # The driver requests a fresh start's operators; a restarted coordinator its own.
    created = last("driver.create_operators") or last("deployment.create")
    coordinator_start = first("coordinator.start")
    operators_init = last("task.__init__")
    at: dict[str, float | None] = {
        "submitted": job["submitted"],
        "coordinator_call": call,
        "coordinator_proc": ready("coordinator.__init__", call),
        "coordinator_init": first("coordinator.__init__"),
        "coordinator_start": coordinator_start,
        "created": created,
        "operators_proc": ready("task.__init__", created),
        "operators_init": operators_init,
        "both_up": max(coordinator_start, operators_init)
        if coordinator_start and operators_init
        else None,
        "ready": last("deployment.wait_ready"),
        "running": last("deployment.run_all"),
        "start_returned": job["start_returned"],
        "first_out": job["first_out"],
        "result": job["result"],
    }
    return {k: v for k, v in at.items() if v is not None}


def processes(job: dict[str, Any], events: list[dict[str, Any]]) -> tuple[int, int, list[float]]:
    """Actor processes of one job: (new, reused, seconds from submit to each new one's birth)."""
    window = _window(job, events)
    pids = {e["pid"] for e in window if e["what"] in ("coordinator.__init__", "task.__init__")}
    born = _python(events)
    new = sorted(born[p] - job["submitted"] for p in pids if born.get(p, 0) >= job["submitted"])
    return len(new), len(pids) - len(new), new


def breakdown(jobs: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    per_job = [instants(j, events) for j in jobs]
    print("\nwhere the time goes (median over the jobs, in seconds; min, max):")
    for label, a, b in PHASES:
        spans = [at[b] - at[a] for at in per_job if a in at and b in at]
        if spans:
            print(
                f"  {label:58s} {statistics.median(spans):6.3f}  "
                f"({min(spans):.3f}, {max(spans):.3f})"
            )
    print("\nworker processes of the job's actors (the coordinator and the operators):")
    for i, job in enumerate(jobs):
        new, reused, births = processes(job, events)
        when = ", ".join(f"+{b:.2f}" for b in births)
        print(
            f"  job {i + 1}: {new} started for it (at {when or '-'} s after submit), "
            f"{reused} started before it"
        )
    actors = {e["pid"] for e in events if e["what"] in ("coordinator.__init__", "task.__init__")}
    born, connected = _python(events), _ready(events)

    def spent(what: str) -> list[float]:
        return [e["end"] - e["start"] for e in events if e["what"] == what and e["end"]]

    spans = {
        "Python started -> connected to Ray": [
            connected[p] - born[p] for p in actors if p in connected and p in born
        ],
        "import rayflow (the package)": spent("import rayflow"),
        "import the coordinator's module": spent("import rayflow._internal.job.coordinator"),
        "import the operators' module": spent("import rayflow._internal.runtime.actor"),
        "an operator's __init__ (plan, task)": spent("operator.__init__"),
    }
    for label, values in spans.items():
        if values:
            print(
                f"  a worker process: {label:46s} {statistics.median(values):6.3f}  "
                f"({min(values):.3f}, {max(values):.3f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--checkpoint", action="store_true", help="jobs with checkpointing")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between jobs")
    parser.add_argument("--trace", action="store_true", help="time every phase (see above)")
    parser.add_argument(
        "--settle",
        action="store_true",
        help="before the first job: wait for Ray's idle workers and a quiet machine",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    trace = None
    if args.trace:
        trace = os.path.join(tempfile.mkdtemp(prefix="rf-startup-trace-"), "trace.jsonl")
    init_started = time.time()
    if trace is not None:
        start_traced_ray(trace)
    else:
        start_ray()
    init_s = time.time() - init_started
    if args.settle:
        # A driver on a running Ray, its flow built: the first job of the driver, not Ray's start.
        wait_for_workers(tiny_flow("startup-settle", args.parallelism, args.records, ""))
    jobs = []
    for i in range(args.jobs):
        if i and args.pause:
            time.sleep(args.pause)
        job = run_job(i, args)
        jobs.append(job)
        print(
            f"job {i + 1}: submit -> first record out {job['first_out'] - job['submitted']:.3f} s, "
            f"-> result {job['result'] - job['submitted']:.3f} s",
            flush=True,
        )
    first_out = [j["first_out"] - j["submitted"] for j in jobs]
    result = [j["result"] - j["submitted"] for j in jobs]
    print(
        f"\n{args.jobs} tiny jobs (p={args.parallelism}, {args.records} records"
        f"{', checkpoints' if args.checkpoint else ''}"
        f"{f', {args.pause:g} s apart' if args.pause else ', back to back'}) on a warm Ray "
        f"(ray.init took {init_s:.2f} s, before the clock):"
    )
    print(f"  submit -> first record out   {stats(first_out)}")
    print(f"  submit -> result             {stats(result)}")
    print(
        f"  with ray.init (the first job) {init_s + first_out[0]:.3f} s to the first record out, "
        f"{init_s + result[0]:.3f} s to the result"
    )
    events: list[dict[str, Any]] = []
    if trace is not None:
        with open(trace) as f:
            events = [json.loads(line) for line in f]
        breakdown(jobs, events)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ray_init_s": init_s, "jobs": jobs}, f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
