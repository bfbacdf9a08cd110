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

The ``windows`` workload: a ``NumberSequenceSource`` of the event numbers
(Flink splits it into one contiguous range per subtask: subtask p reads
partition p's events), the events made by a map, timestamps and watermarks
from ``WatermarkStrategy.for_bounded_out_of_orderness`` with a
``TimestampAssigner``, then ``key_by`` -> ``window(TumblingEventTimeWindows.of(
Time.minutes(1)))`` -> ``aggregate`` with an incremental count
(``AggregateFunction``) and a ``ProcessWindowFunction`` that adds the window's
start.
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
from pyflink.common import Configuration, Duration, Types, WatermarkStrategy
from pyflink.common.time import Time
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import RuntimeExecutionMode, StreamExecutionEnvironment
from pyflink.datastream.connectors.file_system import FileSource, StreamFormat
from pyflink.datastream.connectors.number_seq import NumberSequenceSource
from pyflink.datastream.functions import (
    AggregateFunction,
    FlatMapFunction,
    KeyedProcessFunction,
    ProcessWindowFunction,
    RuntimeContext,
)
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.datastream.window import TumblingEventTimeWindows

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


class WindowStats(FlatMapFunction):
    """The windows workload's sink: tallies the (key, window start in ms, count) results."""

    def __init__(self, folder: str, stamps: str):
        self.folder = folder
        self.stamps = stamps

    def open(self, runtime_context: RuntimeContext) -> None:
        self.tally = w.WindowTally()

    def flat_map(self, value: Any) -> Any:
        if not self.tally.count:
            w.stamp_first_out(self.stamps)
        key, start_ms, count = value
        self.tally.add(key, start_ms // 1000, count)
        return iter(())

    def close(self) -> None:
        self.tally.dump(os.path.join(self.folder, f"{os.getpid()}-{time.time_ns()}.json"))


class EventTime(TimestampAssigner):
    def extract_timestamp(self, value: Any, record_timestamp: int) -> int:
        return round(value[1] * 1000)  # whole milliseconds (see workloads.window_event)


class CountAggregate(AggregateFunction):
    def create_accumulator(self) -> int:
        return 0

    def add(self, value: Any, accumulator: int) -> int:
        return accumulator + 1

    def get_result(self, accumulator: int) -> int:
        return accumulator

    def merge(self, a: int, b: int) -> int:
        return a + b


class WithWindowStart(ProcessWindowFunction):
    def process(self, key: str, context: Any, elements: Any) -> Any:
        for count in elements:
            yield key, context.window().start, count


def event_maker(parallelism: int) -> Any:
    """Number n of the sequence -> the event that Flink's subtask for n's split reads."""
    per = w.WINDOW_EVENTS // parallelism

    def event(n: int) -> tuple[str, float]:
        partition, offset = divmod(n, per)
        return w.window_event(offset * parallelism + partition)

    return event


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
    elif workload == "windows":
        records = w.WINDOW_EVENTS
        sequence = env.from_source(
            NumberSequenceSource(0, records - 1), WatermarkStrategy.no_watermarks(), "numbers"
        )
        event_type = Types.TUPLE([Types.STRING(), Types.DOUBLE()])
        events = sequence.map(event_maker(parallelism), output_type=event_type).map(
            w.stamp, output_type=event_type
        )
        timed = events.assign_timestamps_and_watermarks(
            WatermarkStrategy.for_bounded_out_of_orderness(
                Duration.of_millis(int(w.MAX_DELAY_S * 1000))
            ).with_timestamp_assigner(EventTime())
        )
        counts = (
            timed.key_by(lambda e: e[0], key_type=Types.STRING())
            .window(TumblingEventTimeWindows.of(Time.minutes(1)))
            .aggregate(
                CountAggregate(),
                window_function=WithWindowStart(),
                accumulator_type=Types.LONG(),
                output_type=Types.TUPLE([Types.STRING(), Types.LONG(), Types.LONG()]),
            )
        )
        counts.flat_map(WindowStats(out, stamps)).print()
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
