"""PyFlink's side of the peer comparison (run in .venv-flink; Java 17 on PATH).

``python peer_flink.py WORKLOAD P CHECKPOINT`` prints one JSON line like the
other peers. The Python DataStream API in a local mini cluster, in its
fastest documented configuration: ``python.execution-mode: thread``, in
which Python functions run inside the JVM's task threads (through PEMJA)
instead of in separate Python worker processes fed over gRPC (the default,
``process``; ``PEER_FLINK_MODE=process`` runs that for comparison). The
JSON line says where the Python functions actually ran (``python_ran_in``:
the JVM, or Python worker processes), so a setting that did not take
effect shows. Checkpoints every second into a local folder when asked.
"""

from __future__ import annotations

import json
import os
import site
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil
import workloads as w
from pyflink.common import Configuration, Types, WatermarkStrategy
from pyflink.datastream import RuntimeExecutionMode, StreamExecutionEnvironment
from pyflink.datastream.connectors.file_system import FileSource, StreamFormat
from pyflink.datastream.connectors.number_seq import NumberSequenceSource
from pyflink.datastream.functions import (
    FlatMapFunction,
    KeyedProcessFunction,
    RuntimeContext,
)
from pyflink.datastream.state import ValueStateDescriptor

MODE = os.environ.get("PEER_FLINK_MODE", "thread")


class Stats(FlatMapFunction):
    """The sink: counts updates, keeps the latest value per key, writes both at close."""

    def __init__(self, folder: str, stamps: str):
        self.folder = folder
        self.stamps = stamps

    def open(self, runtime_context: RuntimeContext) -> None:
        self.latest: dict[Any, Any] = {}
        self.count = 0

    def flat_map(self, value: Any) -> Any:
        if not self.count:
            w.stamp_first_out(self.stamps)
        self.count += 1
        self.latest[value[0]] = value[1]
        return iter(())

    def close(self) -> None:
        path = os.path.join(self.folder, f"{os.getpid()}-{time.time_ns()}.json")
        with open(path, "w") as f:
            json.dump({"count": self.count, "total": sum(self.latest.values())}, f)


class Sessionize(KeyedProcessFunction):
    def open(self, runtime_context: RuntimeContext) -> None:
        self.state = runtime_context.get_state(
            ValueStateDescriptor("session", Types.PICKLED_BYTE_ARRAY())
        )

    def process_element(self, value: Any, ctx: Any) -> Any:
        new, out = w.session_step(self.state.value(), value)
        if new is None:
            self.state.clear()
        else:
            self.state.update(new)
        for session in out:
            yield session["user"] + str(session["start"]), session["clicks"]


def files(env: Any, folder: str) -> Any:
    source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), folder).build()
    return env.from_source(source, WatermarkStrategy.no_watermarks(), "files")


def python_ran_in(stamps: str) -> str:
    """Where the stamp step and the sink ran: in the JVM (this process's java child)
    or in Python worker processes (process mode)."""
    jvms = {p.pid for p in psutil.Process().children(recursive=True) if p.name().startswith("java")}
    pids = w.stamp_pids(stamps)
    if pids and pids <= jvms:
        return "jvm"
    return "python worker processes" if pids else "unknown"


def main() -> None:
    workload, parallelism, checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    out = tempfile.mkdtemp(prefix="peer-out-")
    stamps = os.environ["PEER_STAMPS"]
    runtime_started = time.time()
    config = Configuration()
    config.set_string("python.execution-mode", MODE)
    # Thread mode embeds the interpreter of python.executable in the JVM, which
    # does not read this venv's pyvenv.cfg: give it the venv's packages (pemja,
    # pyflink) and this folder (workloads.py) explicitly.
    paths = [*site.getsitepackages(), os.path.dirname(os.path.abspath(__file__))]
    config.set_string("python.pythonpath", os.pathsep.join(paths))
    if checkpoint:
        # Flink 2's keys for where checkpoints go (the old setters are gone).
        config.set_string("execution.checkpointing.storage", "filesystem")
        config.set_string(
            "execution.checkpointing.dir", "file://" + tempfile.mkdtemp(prefix="peer-flink-cp-")
        )
    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_runtime_mode(RuntimeExecutionMode.STREAMING)
    env.set_python_executable(sys.executable)  # the workers need this venv's pyflink
    env.set_parallelism(parallelism)
    if checkpoint:
        env.enable_checkpointing(1000)
    pair = Types.TUPLE([Types.INT(), Types.INT()])
    if workload in ("keyed_sum", "startup"):
        records = w.SUM_RECORDS if workload == "keyed_sum" else w.STARTUP_RECORDS
        sequence = env.from_source(
            NumberSequenceSource(0, records - 1), WatermarkStrategy.no_watermarks(), "numbers"
        )
        nums = sequence.map(lambda i: (i % w.KEYS, i % 7 + 1), output_type=pair).map(
            w.stamp, output_type=pair
        )
        sums = nums.key_by(lambda r: r[0], key_type=Types.INT()).reduce(
            lambda a, b: (a[0], a[1] + b[1])
        )
        sums.flat_map(Stats(out, stamps)).print()
    elif workload == "wordcount":
        folder = w.make_text(w.text_megabytes())
        records = w.count_words(folder)
        word = Types.TUPLE([Types.STRING(), Types.INT()])
        lines = files(env, folder).map(w.stamp, output_type=Types.STRING())
        ones = lines.flat_map(lambda line: ((x, 1) for x in line.split()), output_type=word)
        counts = ones.key_by(lambda p: p[0], key_type=Types.STRING()).reduce(
            lambda a, b: (a[0], a[1] + b[1])
        )
        counts.flat_map(Stats(out, stamps)).print()
    else:
        folder = w.make_events()
        records = w.SESSION_EVENTS
        events = files(env, folder).map(w.stamp, output_type=Types.STRING()).map(json.loads)
        sessions = events.key_by(lambda e: e["user"], key_type=Types.STRING()).process(Sessionize())
        sessions.flat_map(Stats(out, stamps)).print()
    started = time.time()
    env.execute(f"peer-{workload}")
    ended = time.time()
    w.report(
        records,
        started,
        ended,
        out,
        mode=MODE,
        python_ran_in=python_ran_in(stamps),
        startups=[
            {
                "runtime_started": runtime_started,
                "submitted": started,
                "first_out": w.first_out(stamps),
                "ended": ended,
            }
        ],
    )


if __name__ == "__main__":
    main()
