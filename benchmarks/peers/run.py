"""Run rayflow, Bytewax, PyFlink and a pure-Python ceiling on the same workloads.

    bash benchmarks/peers/setup_peers.sh        # once: the peers' virtual environments
    python benchmarks/peers/run.py              # everything, full size (hours: see below)
    python benchmarks/peers/run.py --systems rayflow bytewax --workloads keyed_sum startup
    python benchmarks/peers/run.py --scale 0.02 --repeat 1   # a quick trial (not published)
    python benchmarks/peers/run.py --workloads windows       # the event-time window count
    python benchmarks/peers/run.py --workloads kafka --systems rayflow bytewax

Every peer runs in its best documented configuration: PyFlink with
``python.execution-mode: thread`` (each run checks that its Python functions
really ran inside the JVM), Bytewax with one process per unit of parallelism
and one worker each (its Performance guide), rayflow with its defaults. All
systems get the same inputs (``--scale`` shrinks them for all alike).

Each run is a fresh process (tree) whose peak resident memory is sampled.
Throughput is records divided by the time from the first record at the
``stamp`` step to the end of the run call (see workloads.py); a cell shows
the median of ``--repeat`` runs and their range. The ``startup`` workload
times a tiny job from submitting the flow to the first record out at the
sink (for rayflow: on a running Ray, and including ``ray.init``). Every
repetition runs all systems in turn, so that a drift of the machine's speed
hits all of them alike.

The ``kafka`` workload (rayflow and Bytewax only, checkpoints on only; see
workloads.py for what is and is not equal) runs against one tansu broker
that run.py starts for the whole run (tests/support/kafka_broker.py, in
memory, on a free loopback port) and stops at the end. The input is
produced once into one topic, which every run reads from its earliest
offset; each run writes to a fresh output topic (passed to the peers as
``PEER_KAFKA``, ``PEER_KAFKA_IN``, ``PEER_KAFKA_OUT``), which is then read
back with ``isolation.level=read_committed`` and checked against the
reference: each key's final (highest) sum must be its count. That check is
robust to tansu 0.6.0 showing aborted transactions' records to
read_committed readers and to Bytewax's at-least-once duplicates; the
number of updates read back is reported as ``outputs``.

Every run's result is checked: all the runs of a cell (every system, every
repetition) must agree on it, and the ``windows`` workload's must equal the
reference computed here (its number of window results, a checksum over the
(key, window start, count) results, and the number of events counted). A
mismatch is printed at once, marked in the table, and makes run.py exit 1
(after saving the results).

Full-size results go to ``benchmarks/results/peers.json`` (a cell's new runs
replace its old ones) and the Markdown table with its summary to
``benchmarks/results/peers.md``, into the README between its ``peers-table``
markers, and to the terminal. A run at another ``--scale`` is a trial: it
goes to ``peers-trial.json``/``.md`` only (which a trial at another scale replaces).

Duration at full size on 2 cores: PyFlink does 10-50k records/s here, so
its runs take most of the time (about a minute each, 48 of them with
``--repeat 3``): about an hour and a half for everything.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")
WORKLOADS = [
    "keyed_sum", "wordcount", "sessions", "windows", "windows_combined", "kafka", "startup"
]  # fmt: skip
THROUGHPUT = ["keyed_sum", "wordcount", "sessions", "windows", "windows_combined", "kafka"]
#: rayflow's windows job with ``window(..., combine=True)``; the peers have no such
#: option, so their cells on its row are their ``windows`` runs (the same job and input).
RAYFLOW_ONLY = {"windows_combined": "windows"}


def peer_workload(system: str, workload: str) -> str:
    """The workload whose runs of ``system`` stand in ``workload``'s row."""
    return workload if system == "rayflow" else RAYFLOW_ONLY.get(workload, workload)


KAFKA_SYSTEMS = ["rayflow", "bytewax"]  # the systems whose Kafka connectors are measured
SYSTEMS = ["rayflow", "bytewax", "flink", "python"]
NAMES = {"rayflow": "rayflow", "bytewax": "Bytewax", "flink": "PyFlink", "python": "Python loop"}
FORMAT = 2  # results of older formats (PyFlink in process mode at 2% of the input) are dropped


def interpreter(system: str) -> str:
    if system in ("rayflow", "python"):
        return sys.executable
    path = os.path.join(HERE, f".venv-{system}", "bin", "python")
    if not os.path.exists(path):
        raise SystemExit(f"{system} is not installed: bash benchmarks/peers/setup_peers.sh")
    return path


def version(system: str) -> str:
    package = {"rayflow": "ray", "bytewax": "bytewax", "flink": "apache-flink"}.get(system)
    if package is None:
        return platform.python_version()
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    out = subprocess.run([interpreter(system), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def run_once(system: str, workload: str, parallelism: int, checkpoint: bool,
             scale: float, text_mb: int,
             kafka: KafkaRuns | None = None) -> dict[str, Any]:  # fmt: skip
    stamps = tempfile.mkdtemp(prefix="peer-stamps-")
    env = {**os.environ, "PEER_STAMPS": stamps, "PEER_SCALE": str(scale),
           "PEER_TEXT_MB": str(text_mb), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    if workload == "kafka":
        assert kafka is not None
        env.update(kafka.topics())
    env.pop("RAY_ADDRESS", None)
    script = os.path.join(HERE, f"peer_{system}.py")
    args = (
        [workload]
        if system == "python"
        else [workload, str(parallelism), "1" if checkpoint else "0"]
    )
    proc = subprocess.Popen(
        [interpreter(system), script, *args],
        env=env,
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{system} {workload} p{parallelism} failed:\n{err[-3000:]}")
    data = json.loads(lines[-1])
    if system == "flink" and data.get("mode") == "thread" and data.get("python_ran_in") != "jvm":
        raise RuntimeError(
            f"PyFlink was asked for thread mode but its Python functions ran in "
            f"{data.get('python_ran_in')}: the setting did not take effect"
        )
    if workload != "startup":
        if system == "python":
            first = data["first_record"]
        else:
            from workloads import first_stamp

            first = first_stamp(stamps)
        data["rate"] = data["records"] / (data["run_ended"] - first)
        data["e2e_rate"] = data["records"] / (data["run_ended"] - data["run_started"])
    data["peak_mb"] = peak / 2**20
    if workload == "kafka":
        assert kafka is not None
        data.update(kafka.read_back(env["PEER_KAFKA_OUT"]))
    return data


class KafkaRuns:
    """The kafka workload's broker (one tansu for the whole run) and its input topic,
    produced once; every run gets a fresh output topic, read back to check it."""

    def __init__(self) -> None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository
        import workloads as w

        from tests.support.kafka_broker import KafkaBroker, tansu_binary

        self.w = w
        self.tansu = tansu_binary()
        self.broker = KafkaBroker(tempfile.mkdtemp(prefix="peer-kafka-")).start()
        try:
            self.input = self.broker.topic(w.KAFKA_PARTITIONS, "peer-in")
            started = time.perf_counter()
            self.produce()
        except BaseException:
            self.broker.stop()
            raise
        print(
            f"kafka: tansu at {self.broker.bootstrap}, {w.SUM_RECORDS:,} input records in "
            f"{w.KAFKA_PARTITIONS} partitions ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )

    def produce(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.broker.bootstrap, "linger.ms": 20})
        for i in range(self.w.SUM_RECORDS):
            while True:
                try:
                    producer.produce(self.input, b"1", self.w.kafka_key(i))
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(120):
            raise RuntimeError("the kafka workload's input was not all acknowledged")

    def topics(self) -> dict[str, str]:
        """The environment of one run: the broker, the input and a new output topic."""
        out = self.broker.topic(self.w.KAFKA_PARTITIONS, "peer-out")
        return {"PEER_KAFKA": self.broker.bootstrap, "PEER_KAFKA_IN": self.input,
                "PEER_KAFKA_OUT": out}  # fmt: skip

    def read_back(self, topic: str, idle_s: float = 2.0) -> dict[str, int]:
        """``outputs`` (updates read), ``keys`` and ``check`` (workloads.kafka_check of
        each key's highest sum) of an output topic, read with read_committed until
        every partition is at its end (or nothing came for ``idle_s``); then the topic
        is deleted (the broker keeps everything in memory)."""
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.broker.bootstrap,
                "group.id": "peer-check",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
        partitions = range(self.w.KAFKA_PARTITIONS)
        consumer.assign([TopicPartition(topic, p, -2) for p in partitions])  # from the start
        finals: dict[bytes, int] = {}
        outputs = 0
        at_end: set[int | None] = set()
        last = time.monotonic()
        while len(at_end) < len(partitions) and time.monotonic() - last < idle_s:
            for m in consumer.consume(10_000, timeout=0.2):
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition())
                    continue
                last = time.monotonic()
                at_end.discard(m.partition())
                key, total = m.key() or b"", int(m.value() or b"0")
                outputs += 1
                if total > finals.get(key, 0):
                    finals[key] = total
        consumer.close()
        subprocess.run(
            [self.tansu, "topic", "delete", "--broker", f"tcp://{self.broker.direct}", topic],
            capture_output=True,
            timeout=30,
        )
        return {"outputs": outputs, "keys": len(finals), "check": self.w.kafka_check(finals)}

    def stop(self) -> None:
        self.broker.stop()


@functools.cache
def reference(workload: str) -> dict[str, int] | None:
    """What every run of ``workload`` must produce, where a reference exists
    (workloads reads the scale from PEER_SCALE, which main sets)."""
    if workload == "kafka":
        from workloads import expected_kafka

        return expected_kafka()
    if workload not in ("windows", "windows_combined"):
        return None
    from workloads import expected_windows

    return expected_windows()


def mismatches(
    runs: dict[str, list[dict[str, Any]]], expected: dict[str, int] | None
) -> dict[str, list[str]]:
    """What is wrong with the results of one cell's runs, per system (empty: nothing)."""
    problems: dict[str, list[str]] = {s: [] for s in runs}
    checks = {s: sorted({r["check"] for r in rs}) for s, rs in runs.items()}
    differ = len({c for cs in checks.values() for c in cs}) > 1
    for system, system_runs in runs.items():
        if expected is not None:
            for i, run in enumerate(system_runs):
                wrong = {k: run.get(k) for k, v in expected.items() if run.get(k) != v}
                if wrong:
                    problems[system].append(
                        f"{NAMES[system]} run {i + 1} produced {wrong}, the reference {expected}"
                    )
        elif differ:
            problems[system].append(f"the runs' checks differ: {checks}")
    return {s: p for s, p in problems.items() if p}


def results_path(scale: float, suffix: str) -> str:
    name = "peers" if scale == 1 else "peers-trial"
    return os.path.join(RESULTS, f"{name}.{suffix}")


def load(scale: float) -> dict[str, Any]:
    path = results_path(scale, "json")
    if os.path.exists(path):
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
        # A trial at another scale starts afresh (its results are not comparable).
        if data.get("format") == FORMAT and data.get("scale", scale) == scale:
            return data
    return {"format": FORMAT, "results": {}}


def key(system: str, workload: str, parallelism: int, checkpoint: bool) -> str:
    return f"{system}|{workload}|p{parallelism}|{'cp' if checkpoint else 'nocp'}"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}"
    )


# -- the table -------------------------------------------------------------------


def _k(x: float) -> str:
    """A rate in thousands, 3 significant digits: 809k, 12.4k, 0.79k."""
    if x >= 100_000:
        return f"{x / 1000:,.0f}k"
    if x >= 10_000:
        return f"{x / 1000:.1f}k"
    return f"{x / 1000:.2f}k"


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def throughput_table(data: dict[str, Any]) -> list[str]:
    res = data["results"]

    def get(system: str, workload: str, p: int, cp: bool) -> dict[str, Any] | None:
        workload = peer_workload(system, workload)
        if system == "python":
            return res.get(key("python", workload, 1, False))
        return res.get(key(system, workload, p, cp))

    def rate(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        rates = entry["rates"]
        if len(rates) == 1:
            return _k(rates[0])
        return f"{_k(entry['rate'])} ({_k(min(rates))}-{_k(max(rates))})"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
        if not (a and b):
            return "-"
        if not same_host(a, b):
            return "(hosts differ)"
        r = a["rate"] / b["rate"]
        return f"{r:.2f}x" if r < 1 else f"{r:.1f}x"

    def mem(entry: dict[str, Any] | None) -> str:
        return f"{entry['peak_mb']:,.0f}" if entry else "-"

    lines = [
        "| workload | p | checkpoints | rayflow rec/s | Bytewax rec/s | PyFlink rec/s "
        "| Python loop rec/s | rayflow/Bytewax | rayflow/PyFlink | rayflow/loop "
        "| peak MB rayflow / Bytewax / PyFlink |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for workload in THROUGHPUT:
        for p in (1, 2):
            for cp in (False, True):
                r, b, f, loop = (get(s, workload, p, cp) for s in SYSTEMS)
                if not any((r, b, f)):
                    continue
                lines.append(
                    f"| {workload} | {p} | {'every 1 s' if cp else 'off'} | {rate(r)} | "
                    f"{rate(b)} | {rate(f)} | {rate(loop)} | {ratio(r, b)} | {ratio(r, f)} | "
                    f"{ratio(r, loop)} | {mem(r)} / {mem(b)} / {mem(f)} |"
                )
    return lines


def startup_figures(entry: dict[str, Any] | None) -> dict[str, list[float]]:
    """Start-up times of one system's ``startup`` runs: submit -> first record out
    (every job), the first job of each run including its runtime's start, and
    submit -> result."""
    figures: dict[str, list[float]] = {
        "first_out": [],
        "with_runtime": [],
        "result": [],
        "rested": [],
    }
    for run in (entry or {}).get("runs", []):
        for i, job in enumerate(run["startups"]):
            if job.get("first_out") is None:
                continue
            if job.get("rested"):  # rayflow: a job after a pause (peer_rayflow.py)
                figures["rested"].append(job["first_out"] - job["submitted"])
                continue
            figures["first_out"].append(job["first_out"] - job["submitted"])
            figures["result"].append(job["ended"] - job["submitted"])
            if i == 0:
                figures["with_runtime"].append(job["first_out"] - job["runtime_started"])
    return figures


STARTUP_HOW = {
    "rayflow": (
        "`rf.run` on a running Ray (`ray.init` before the clock); with `ray.init` (a new "
        "local Ray) for the first job"
    ),
    "bytewax": "its processes started (interpreter, import, flow) as `python -m bytewax.run` does",
    "flink": (
        "`env.execute()` (a local mini cluster per job); with launching the JVM gateway "
        "and building the flow"
    ),
}


def startup_table(data: dict[str, Any]) -> list[str]:
    res = data["results"]
    rows = []
    for system in ("rayflow", "bytewax", "flink"):
        entry = res.get(key(system, "startup", 1, False))
        if not entry:
            continue
        fig = startup_figures(entry)
        rows.append(
            f"| {NAMES[system]} | {STARTUP_HOW[system]} | {_seconds(fig['first_out'])} | "
            f"{_seconds(fig['rested'])} | {_seconds(fig['with_runtime'])} | "
            f"{_seconds(fig['result'])} |"
        )
    if not rows:
        return []
    return [
        "",
        "Start-up of a tiny job (the keyed sum over 100 records, p=1): median (min-max).",
        "",
        "| system | from submitting the flow | submit -> first record out "
        "| the same, runtime rested 1.5 s | with starting the runtime | submit -> result |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]


#: The workloads whose throughput is also shown with start-up included (issue 17).
WITH_STARTUP = ["keyed_sum", "wordcount", "windows", "windows_combined"]


def with_startup(entry: dict[str, Any] | None) -> list[float]:
    """Records per second from submitting the flow to the end of the run, per run, where
    that includes the whole start of the job: rayflow's runs on a Ray whose workers were
    ready (``warm_wait_s``, peer_rayflow.py), and runs of a system that has no runtime
    apart from the job (Bytewax: submitted when it started the job's processes)."""
    rates = []
    for run in (entry or {}).get("runs", []):
        starts = run.get("startups") or []
        own = bool(starts) and all(x["runtime_started"] == x["submitted"] for x in starts)
        if "warm_wait_s" in run or own:
            rates.append(run["records"] / (run["run_ended"] - run["run_started"]))
    return rates


def startup_included_table(data: dict[str, Any]) -> list[str]:
    res = data["results"]
    rows = []
    for workload in WITH_STARTUP:
        for p in (1, 2):
            for cp in (False, True):
                r = res.get(key("rayflow", workload, p, cp))
                b = res.get(key("bytewax", peer_workload("bytewax", workload), p, cp))
                rr, bb = with_startup(r), with_startup(b)
                if not (rr and bb and r and b and same_host(r, b)):
                    continue
                ratio = statistics.median(rr) / statistics.median(bb)
                rows.append(
                    f"| {workload} | {p} | {'every 1 s' if cp else 'off'} | "
                    f"{_k(statistics.median(rr))} ({_k(min(rr))}-{_k(max(rr))}) | "
                    f"{_k(statistics.median(bb))} ({_k(min(bb))}-{_k(max(bb))}) | "
                    f"{ratio:.2f}x |"
                )
    if not rows:
        return []
    return [
        "",
        "Throughput with start-up included: records over the time from submitting the flow "
        "to the end of the run (the same runs as above): rayflow's `rf.run` on a running "
        "Ray whose worker processes are ready (the first job of its driver; `ray.init` is "
        "timed apart), Bytewax from starting its processes.",
        "",
        "| workload | p | checkpoints | rayflow rec/s | Bytewax rec/s | rayflow/Bytewax |",
        "|---|---|---|---:|---:|---:|",
        *rows,
    ]


def summary(data: dict[str, Any]) -> list[str]:
    """The claims the README makes, computed from the table (so they cannot drift)."""
    res = data["results"]
    lines = []
    for peer in ("bytewax", "flink", "python"):
        ratios = []
        apart = 0
        for workload in THROUGHPUT:
            for p in (1, 2):
                for cp in (False, True):
                    r = res.get(key("rayflow", workload, p, cp))
                    cell = (1, False) if peer == "python" else (p, cp)
                    o = res.get(key(peer, peer_workload(peer, workload), *cell))
                    if r and o and same_host(r, o):
                        ratios.append(r["rate"] / o["rate"])
                    elif r and o:
                        apart += 1
        if ratios:
            left_out = f"; {apart} cells measured on different hosts left out" if apart else ""
            lines.append(
                f"- rayflow's throughput is {min(ratios):.2g}-{max(ratios):.2g}x "
                f"{NAMES[peer]}'s (median {statistics.median(ratios):.2g}x over {len(ratios)} "
                f"cells{left_out})."
            )
    for workload, what in (
        ("windows", "windows (tumbling event-time count)"),
        ("windows_combined", "the same with `combine=True`"),
    ):
        for peer in ("bytewax", "flink"):
            ratios = []
            for p in (1, 2):
                for cp in (False, True):
                    r = res.get(key("rayflow", workload, p, cp))
                    o = res.get(key(peer, "windows", p, cp))
                    if r and o and same_host(r, o):
                        ratios.append(r["rate"] / o["rate"])
            if ratios:
                lines.append(
                    f"- {what}: rayflow is {min(ratios):.2g}-{max(ratios):.2g}x "
                    f"{NAMES[peer]} (median {statistics.median(ratios):.2g}x over "
                    f"{len(ratios)} cells)."
                )
    figures = {s: startup_figures(res.get(key(s, "startup", 1, False))) for s in NAMES}
    rf_warm = figures["rayflow"]["first_out"]
    if rf_warm:
        parts = [f"rayflow {statistics.median(rf_warm):.2f} s on a running Ray"]
        if figures["rayflow"]["rested"]:
            parts.append(
                f"{statistics.median(figures['rayflow']['rested']):.2f} s on one that rested "
                "1.5 s (its worker processes ready)"
            )
        if figures["rayflow"]["with_runtime"]:
            parts.append(
                f"{statistics.median(figures['rayflow']['with_runtime']):.2f} s with `ray.init`"
            )
        for peer in ("bytewax", "flink"):
            if figures[peer]["first_out"]:
                parts.append(f"{NAMES[peer]} {statistics.median(figures[peer]['first_out']):.2f} s")
        lines.append(f"- Start-up to the first record out: {', '.join(parts)}.")
    return lines


#: The host of the cells measured before each cell kept its own stamp.
LEGACY_MACHINE = "2 cores (AMD EPYC), 24 GiB, Python 3.11.7, Linux 6.18.44-fc-v657"


def measured(data: dict[str, Any]) -> str:
    """When, on which machine and with which command each cell was measured (a run of
    some workloads or systems replaces only those cells, so one stamp would mislabel
    the rest)."""
    default = {
        "when": data.get("when", "?"),
        "command": data.get("command", "python benchmarks/peers/run.py"),
        "repeat": data.get("repeat", "?"),
    }
    stamps = data.get("measured", {})
    cells: dict[tuple[str, str, Any, str], dict[str, set[str]]] = {}
    for k, entry in data["results"].items():
        system, workload = k.split("|")[:2]
        stamp = entry.get("stamp") or stamps.get(workload, default)
        group = (stamp["when"], stamp["command"], stamp["repeat"], host_of(entry))
        cells.setdefault(group, {}).setdefault(workload, set()).add(system)
    everyone = {
        w: {k.split("|")[0] for k in data["results"] if k.split("|")[1] == w} for w in WORKLOADS
    }
    hosts = {host for (_, _, _, host) in cells}
    parts = []
    for (when, command, repeat, host), workloads in cells.items():
        names = [
            w if systems == everyone[w] else f"{w} ({', '.join(NAMES[s] for s in sorted(systems))})"
            for w, systems in sorted(workloads.items(), key=lambda x: WORKLOADS.index(x[0]))
        ]
        on = f" on the {_host(host)} host" if len(hosts) > 1 else ""
        parts.append(
            f"{', '.join(names)}: measured {when}{on} with `{command.strip()}` ({repeat} runs each)"
        )
    return "; ".join(parts)


def host_of(entry: dict[str, Any]) -> str:
    return str(entry.get("stamp", {}).get("machine") or LEGACY_MACHINE)


def same_host(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two cells ran on one machine: only then is their ratio a measurement."""
    return host_of(a) == host_of(b)


def machines(data: dict[str, Any]) -> str:
    found = sorted({host_of(e) for e in data["results"].values()})
    if len(found) == 1:
        return found[0]
    return (
        f"{len(found)} hosts, which differ in speed: "
        + "; ".join(f"{_host(m)}: {m}" for m in found)
        + " (which cells ran where is said next)"
    )


def _host(machine: str) -> str:
    """A short name of a machine description: its CPU model."""
    cpu = machine.split("(", 1)[1].rsplit("), ", 1)[0] if "(" in machine else machine
    return cpu.replace("(R)", "").replace(" Processor", "")


def table(data: dict[str, Any]) -> str:
    versions = data.get("versions", {})
    scale = data.get("scale", 1)
    notes = [
        "",
        f"Machine: {machines(data)}. {measured(data)}; each cell is the "
        f"median of its runs (min-max in parentheses); throughput "
        "counts from the first record to the end of the run (start-up excluded, the final "
        "drain included). Memory is the peak resident set of the whole process tree (for "
        "rayflow that includes the Ray processes it starts).",
        f"Configurations: rayflow with Ray {versions.get('rayflow', '?')}, defaults; Bytewax "
        f"{versions.get('bytewax', '?')} with one process of one worker per unit of "
        "parallelism (its Performance guide: processes, not `-w` threads, for Python work); "
        f"PyFlink {versions.get('flink', '?')} with `python.execution-mode: thread` (Python "
        "functions in the JVM's task threads; every run checked that they ran there). The "
        "same inputs for all"
        + (f" (trial at input scale {scale}: not the published figures)." if scale != 1 else "."),
    ]
    if any(k.split("|")[1] == "windows_combined" for k in data["results"]):
        notes.append(
            "windows_combined: rayflow's windows job with `window(..., combine=True)` (each "
            "batch counted per key and minute before the shuffle); the peers have no such "
            "option, and their cells on that row are their `windows` runs."
        )
    if any(k.split("|")[1] == "kafka" for k in data["results"]):
        notes.append(
            "kafka: Kafka -> keyed running sum -> Kafka on a local tansu broker (one process "
            "beside the system, its memory not counted), checkpoints on only; rayflow's sink "
            "is exactly-once (a Kafka transaction per checkpoint and sink partition), "
            "Bytewax's `KafkaSink` at-least-once (a plain producer, no transactions)."
        )
    checks = []
    res = data["results"]
    for workload in THROUGHPUT:
        values = {s: res.get(key(s, workload, 1, False)) for s in SYSTEMS}
        found = {s: v["check"] for s, v in values.items() if v}
        if len(set(found.values())) > 1:
            checks.append(f"- {workload}: the systems' results differ: {found}")
    for cell, entry in sorted(res.items()):
        for problem in entry.get("mismatch", []):
            checks.append(f"- WRONG RESULT in {cell}: {problem}")
    return "\n".join(
        throughput_table(data)
        + startup_table(data)
        + startup_included_table(data)
        + notes
        + ["", *summary(data), *checks]
    )


def record(
    data: dict[str, Any],
    system: str,
    workload: str,
    p: int,
    cp: bool,
    runs: list[dict[str, Any]],
    mismatch: list[str] | None = None,
) -> None:
    """Keep the runs of one cell (the median one in front), print it, save the results."""
    entry: dict[str, Any] = {"runs": runs, "peak_mb": max(r["peak_mb"] for r in runs)}
    if mismatch:
        entry["mismatch"] = mismatch
    if workload == "startup":
        fig = startup_figures(entry)
        print(
            f"{NAMES[system]:11s} startup   submit -> first record out {_seconds(fig['first_out'])}"
            f", rested {_seconds(fig['rested'])}, with the runtime {_seconds(fig['with_runtime'])}",
            flush=True,
        )
    else:
        rates = [r["rate"] for r in runs]
        median = runs[rates.index(statistics.median_high(rates))]
        entry.update(
            rate=median["rate"],
            rates=rates,
            check=median["check"],
            outputs=median["outputs"],
            records=median["records"],
        )
        print(
            f"{NAMES[system]:11s} {workload:9s} p{p} {'cp' if cp else '  '} "
            f"{entry['rate']:12,.0f} rec/s (runs {', '.join(f'{x:,.0f}' for x in rates)})"
            f"  peak {entry['peak_mb']:,.0f} MB  outputs {entry['outputs']:,} "
            f"check {entry['check']}",
            flush=True,
        )
    data["results"][key(system, workload, p, cp)] = entry


def save(data: dict[str, Any], scale: float) -> None:
    with open(results_path(scale, "json"), "w") as f:
        json.dump(data, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--parallelism", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--checkpoints", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="input size, for all alike")
    parser.add_argument("--text-mb", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    os.environ["PEER_SCALE"] = str(args.scale)  # for the references (workloads.py)
    os.makedirs(RESULTS, exist_ok=True)
    wrong: list[str] = []
    data = load(args.scale)
    data["versions"] = {**data.get("versions", {}), **{s: version(s) for s in args.systems}}
    kafka: KafkaRuns | None = None
    if "kafka" in args.workloads and "on" in args.checkpoints:
        if set(args.systems) - set(KAFKA_SYSTEMS):
            print("kafka: measured for rayflow and Bytewax only", flush=True)
        if set(args.systems) & set(KAFKA_SYSTEMS):
            kafka = KafkaRuns()
    try:
        for workload in args.workloads:
            cells = [(1, False)] if workload == "startup" else [
                (p, c == "on") for p in args.parallelism for c in args.checkpoints
                if workload != "kafka" or c == "on"  # its sinks commit at checkpoints
            ]  # fmt: skip
            for p, cp in cells:
                systems = [
                    s
                    for s in args.systems
                    if (s != "python" or (workload not in ("startup", "kafka")
                                          and p == args.parallelism[0] and not cp))
                    and (workload != "kafka" or s in KAFKA_SYSTEMS)
                    and (workload not in RAYFLOW_ONLY or s == "rayflow")
                ]  # fmt: skip
                if not systems:
                    continue
                runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
                for _ in range(args.repeat):
                    for system in systems:
                        runs[system].append(
                            run_once(system, workload, p, cp, args.scale, args.text_mb, kafka)
                        )
                problems = {} if workload == "startup" else mismatches(runs, reference(workload))
                for problem in sorted({m for ms in problems.values() for m in ms}):
                    message = f"{workload} p{p} {'cp' if cp else 'nocp'}: {problem}"
                    wrong.append(message)
                    print(f"\n!!! WRONG RESULT: {message}\n", file=sys.stderr, flush=True)
                stamp = {
                    "when": time.strftime("%Y-%m-%d", time.gmtime()),
                    "command": "python benchmarks/peers/run.py " + " ".join(sys.argv[1:]),
                    "repeat": args.repeat,
                    "machine": machine(),
                }
                for system in systems:
                    # The loop runs once per workload; its table key is p1 without checkpoints.
                    cell_p = 1 if system == "python" else p
                    record(data, system, workload, cell_p, cp, runs[system], problems.get(system))
                    data["results"][key(system, workload, cell_p, cp)]["stamp"] = stamp
                save(data, args.scale)
    finally:
        if kafka is not None:
            kafka.stop()
    # Workloads measured before stamps were per workload keep the stamp they had.
    before = {k: data[k] for k in ("when", "command", "repeat") if k in data}
    for workload in {k.split("|")[1] for k in data["results"]}:
        if before and workload not in data.setdefault("measured", {}):
            data["measured"][workload] = before
    data.pop("machine", None)  # each cell's stamp names its machine (host_of)
    data.update(
        when=time.strftime("%Y-%m-%d", time.gmtime()),
        repeat=args.repeat,
        scale=args.scale,
        command="python benchmarks/peers/run.py " + " ".join(sys.argv[1:]),
    )
    save(data, args.scale)
    text = table(data)
    with open(results_path(args.scale, "md"), "w") as f:
        f.write(text + "\n")
    if args.scale == 1:
        update_readme(text)
    print(text)
    if wrong:
        print("\n!!! WRONG RESULTS:\n" + "\n".join(f"  {m}" for m in wrong), file=sys.stderr)
        raise SystemExit(1)


def update_readme(text: str) -> None:
    """Put the table between the README's peers-table markers, so it shows the latest run."""
    path = os.path.join(os.path.dirname(os.path.dirname(HERE)), "README.md")
    start, end = (
        "<!-- peers-table: written from benchmarks/results/peers.md -->",
        "<!-- /peers-table -->",
    )
    with open(path) as f:
        readme = f.read()
    if start not in readme or end not in readme:
        return
    head, rest = readme.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
