"""Run rayflow, Bytewax, PyFlink and a pure-Python ceiling on the same workloads.

    bash benchmarks/peers/setup_peers.sh        # once: the peers' virtual environments
    python benchmarks/peers/run.py              # everything (takes a while)
    python benchmarks/peers/run.py --systems rayflow --repeat 5

Each run is a fresh process (tree) whose peak resident memory is sampled.
Throughput is records divided by the time from the first record at the
``stamp`` step to the end of the run call (see workloads.py), the median of
``--repeat`` runs. Results accumulate in ``benchmarks/results/peers.json``
(a system's new runs replace its old ones); the Markdown table is written
to ``benchmarks/results/peers.md``, into the README between its
``peers-table`` markers, and printed.
"""

from __future__ import annotations

import argparse
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
WORKLOADS = ["keyed_sum", "wordcount", "sessions"]
SYSTEMS = ["rayflow", "bytewax", "flink", "python"]
NAMES = {"rayflow": "rayflow", "bytewax": "Bytewax", "flink": "PyFlink", "python": "Python loop"}


def interpreter(system: str) -> str:
    if system in ("rayflow", "python"):
        return sys.executable
    path = os.path.join(HERE, f".venv-{system}", "bin", "python")
    if not os.path.exists(path):
        raise SystemExit(f"{system} is not installed: bash benchmarks/peers/setup_peers.sh")
    return path


def run_once(system: str, workload: str, parallelism: int, checkpoint: bool,
             scale: float, text_mb: int) -> dict[str, Any]:  # fmt: skip
    stamps = tempfile.mkdtemp(prefix="peer-stamps-")
    env = {**os.environ, "PEER_STAMPS": stamps, "PEER_SCALE": str(scale),
           "PEER_TEXT_MB": str(text_mb), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}  # fmt: skip
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
    if system == "python":
        first = data["first_record"]
    else:
        from workloads import first_stamp

        first = first_stamp(stamps)
    data["rate"] = data["records"] / (data["run_ended"] - first)
    data["e2e_rate"] = data["records"] / (data["run_ended"] - data["run_started"])
    data["peak_mb"] = peak / 2**20
    return data


def load() -> dict[str, Any]:
    path = os.path.join(RESULTS, "peers.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)  # type: ignore[no-any-return]
    return {"results": {}}


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


def table(data: dict[str, Any]) -> str:
    res = data["results"]

    def get(system: str, workload: str, p: int, cp: bool) -> dict[str, Any] | None:
        if system == "python":
            return res.get(key("python", workload, 1, False))
        return res.get(key(system, workload, p, cp))

    def rate(entry: dict[str, Any] | None) -> str:
        return f"{entry['rate']:,.0f}" if entry else "-"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
        return f"{a['rate'] / b['rate']:.2f}x" if a and b else "-"

    def mem(entry: dict[str, Any] | None) -> str:
        return f"{entry['peak_mb']:,.0f}" if entry else "-"

    lines = [
        "| workload | p | checkpoints | rayflow rec/s | Bytewax rec/s | PyFlink rec/s "
        "| Python loop rec/s | rayflow/Bytewax | rayflow/PyFlink | rayflow/loop "
        "| peak MB rayflow / Bytewax / PyFlink |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for workload in WORKLOADS:
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
    checks = []
    for workload in WORKLOADS:
        values = {s: get(s, workload, 1, False) for s in SYSTEMS}
        full = {s: v["check"] for s, v in values.items() if v and v.get("scale", 1) == 1}
        if len(set(full.values())) > 1:
            checks.append(f"- {workload}: the systems' results differ: {full}")
    notes = [
        "",
        f"Machine: {data.get('machine', machine())}. Measured {data.get('when', '?')} with "
        "`python benchmarks/peers/run.py`; median of the repeats; throughput counts from "
        "the first record to the end of the run (start-up excluded, the final drain "
        "included). Memory is the peak resident set of the whole process tree (for rayflow "
        "that includes the Ray processes it starts).",
        f"PyFlink ran at input scale {data.get('flink_scale', '?')} (its per-record cost "
        "makes full-size runs last an hour; its rate does not depend on the input size).",
        *checks,
    ]
    return "\n".join(lines + notes)


def record(
    data: dict[str, Any],
    system: str,
    workload: str,
    p: int,
    cp: bool,
    runs: list[dict[str, Any]],
    scale: float,
) -> None:
    """Keep the median run of one cell, print it and save the results so far."""
    rates = [r["rate"] for r in runs]
    entry = {
        **runs[rates.index(statistics.median_high(rates))],
        "runs": rates,
        "scale": scale,
        "peak_mb": max(r["peak_mb"] for r in runs),
    }
    data["results"][key(system, workload, p, cp)] = entry
    print(
        f"{NAMES[system]:11s} {workload:9s} p{p} {'cp' if cp else '  '} "
        f"{entry['rate']:12,.0f} rec/s (runs {', '.join(f'{x:,.0f}' for x in rates)})"
        f"  peak {entry['peak_mb']:,.0f} MB  outputs {entry['outputs']:,} "
        f"check {entry['check']}",
        flush=True,
    )
    save(data)


def save(data: dict[str, Any]) -> None:
    with open(os.path.join(RESULTS, "peers.json"), "w") as f:
        json.dump(data, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    parser.add_argument("--parallelism", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--checkpoints", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flink-repeat", type=int, default=1)
    parser.add_argument("--flink-scale", type=float, default=0.02)
    parser.add_argument("--text-mb", type=int, default=50)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    data = load()
    os.makedirs(RESULTS, exist_ok=True)
    # Interleaved: each repetition runs every system in turn, so that a drift of
    # the machine's speed during the run hits all of them alike.
    for workload in args.workloads:
        for p in args.parallelism:
            for cp in (c == "on" for c in args.checkpoints):
                systems = [
                    s
                    for s in args.systems
                    if s != "python" or (p == args.parallelism[0] and not cp)
                ]
                if not systems:
                    continue
                scales = {s: args.flink_scale if s == "flink" else 1.0 for s in systems}
                runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
                for rep in range(args.repeat):
                    for system in systems:
                        if system == "flink" and rep >= args.flink_repeat:
                            continue
                        runs[system].append(
                            run_once(system, workload, p, cp, scales[system], args.text_mb)
                        )
                for system in systems:
                    # The loop runs once per workload; its table key is p1 without checkpoints.
                    cell_p = 1 if system == "python" else p
                    record(data, system, workload, cell_p, cp, runs[system], scales[system])
    data["machine"] = machine()
    data["when"] = time.strftime("%Y-%m-%d", time.gmtime())
    data["flink_scale"] = args.flink_scale
    save(data)
    text = table(data)
    with open(os.path.join(RESULTS, "peers.md"), "w") as f:
        f.write(text + "\n")
    update_readme(text)
    print(text)


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
