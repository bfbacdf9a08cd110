"""What a notebook user looks at: handle.history(), handle.plot() and the result's HTML."""

from __future__ import annotations

import html
import time

import pytest
from matplotlib.figure import Figure

import rayflow as rf


def _flow() -> rf.Dataflow:
    flow = rf.Dataflow("notebook-surface", parallelism=2)
    numbers = flow.source("numbers", rf.sources.Generator(lambda p, i: i, partitions=2, rate=2_000))
    doubled = numbers.map("double", lambda n: 2 * n)
    counts = doubled.key_by("by_rest", lambda n: n % 7).reduce(
        "count", lambda acc, n: acc + 1, initial=0
    )
    counts.sink("out", rf.testing.Discard())
    return flow


def test_history_plot_and_result_view() -> None:
    flow = _flow()
    steps = [s.name for s in flow.spec().steps]
    handle = rf.start(flow)
    try:
        time.sleep(2.5)
        live = handle.history()
    finally:
        result = handle.stop(timeout=60)

    # While the job ran, the handle kept polling on its own.
    assert live["time"].nunique() >= 2, live
    assert set(live["step"]) == set(steps)

    history = handle.history()
    assert len(history) > len(live)  # more polls and the final metrics came in after
    assert result.history().equals(history)
    assert set(history["step"]) == set(steps)
    assert dict(zip(history["step"], history["kind"], strict=True))["count"] == "reduce"
    for (step, partition), rows in history.groupby(["step", "partition"], sort=False):
        rows = rows.sort_values("time")
        out = rows["records_out"].tolist()
        assert out == sorted(out), (step, partition, out)  # counters only grow
        final = {e["partition"]: e for e in result.metrics[step]}[partition]
        assert out[-1] == final["records_out"], (step, partition)
        assert rows["records_in"].iloc[-1] == final["records_in"], (step, partition)
    assert history.groupby("step")["records_out"].max()["numbers"] > 0
    assert history["elapsed_s"].is_monotonic_increasing
    assert history["status"].iloc[-1] == "STOPPED"
    stateful = history[history["step"] == "count"]
    assert stateful["state_keys"].iloc[-1] > 0  # a keyed step reports its keys

    figure = handle.plot()
    assert isinstance(figure, Figure)
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert len(labels) == 3, labels
    assert labels[0].startswith("records/s") and "busy" in labels[1]
    assert "back-pressured" in labels[2]
    for ax in figure.axes:
        assert sorted(line.get_label() for line in ax.get_lines()) == sorted(steps)
    throughput = {line.get_label(): line.get_ydata() for line in figure.axes[0].get_lines()}
    assert max(throughput["numbers"]) > 0 and max(throughput["out"]) > 0  # a sink: in/s
    assert figure._repr_png_().startswith(b"\x89PNG")  # how a notebook shows it

    page = result._repr_html_()
    for step in steps:
        assert f">{step}</td>" in page
    assert "STOPPED" in page and "ran " in page and "restarts 0" in page
    assert handle._repr_html_() == page


def test_a_failed_job_renders_its_failure() -> None:
    def explode(n: int) -> int:
        if n >= 50:
            raise ValueError(f"cannot take {n}")
        return n

    flow = rf.Dataflow("notebook-failure")
    numbers = flow.source("numbers", rf.sources.Generator(lambda p, i: i, partitions=1))
    numbers.map("explode", explode).sink("out", rf.testing.Discard())
    handle = rf.start(flow)
    with pytest.raises(rf.JobFailedError) as failed:
        handle.wait(timeout=60)

    page = handle._repr_html_()
    assert "FAILED" in page
    first_line = html.escape(str(failed.value).strip().splitlines()[0])
    assert "explode" in first_line and first_line in page
    assert handle.history()["status"].iloc[-1] == "FAILED"
