"""The picture of a flow (Mermaid, text, HTML) and the escaping of the notebook views."""

from __future__ import annotations

import re

import pytest

import rayflow as rf
from rayflow._internal import flowchart
from rayflow._internal.notebook import FINAL_COLUMNS, render
from rayflow._internal.spec import FlowSpec, StepKind, StepSpec


def _flow() -> rf.Dataflow:
    flow = rf.Dataflow("pictured", parallelism=2)
    clicks = flow.source("clicks", rf.testing.from_items([1, 2], partitions=2))
    views = flow.source("views", rf.testing.from_items([3], partitions=1), parallelism=1)
    merged = clicks.union("merged", views.map("tag", lambda v: v))
    counts = merged.key_by("by_user", lambda r: r).reduce(
        "count", lambda n, r: n + 1, initial=0, parallelism=3
    )
    counts.sink("out", rf.testing.Collect())
    return flow


def _nodes(text: str) -> dict[str, str]:
    """Mermaid node id -> its label, from lines like ``s0(["clicks<br/>source x2"])``."""
    return dict(re.findall(r'^\s+(s\d+)\W+"([^"]*)"', text, re.MULTILINE))


def _edges(text: str) -> set[tuple[str, str, str]]:
    """(from label's step, kind, to label's step) for every ``a -->|kind| b`` line."""
    names = {node: label.split("<br/>")[0] for node, label in _nodes(text).items()}
    return {
        (names[a], kind, names[b])
        for a, kind, b in re.findall(r"^\s+(s\d+) -->\|(\w+)\| (s\d+)$", text, re.MULTILINE)
    }


def test_mermaid_has_a_node_per_step_with_kind_and_parallelism() -> None:
    text = _flow().to_mermaid()
    assert text.startswith("flowchart LR\n")
    assert sorted(_nodes(text).values()) == sorted(
        [
            "clicks<br/>source x2",
            "views<br/>source x1",
            "tag<br/>map x2",
            "merged<br/>union x2",
            "by_user<br/>key_by x2",
            "count<br/>reduce x3",
            "out<br/>sink x2",
        ]
    )


def test_mermaid_edges_say_how_records_cross() -> None:
    assert _edges(_flow().to_mermaid()) == {
        ("views", "rebalance", "tag"),  # 1 partition into the flow's 2
        ("clicks", "forward", "merged"),
        ("tag", "forward", "merged"),
        ("merged", "forward", "by_user"),
        ("by_user", "hash", "count"),  # the shuffle by key
        ("count", "rebalance", "out"),  # 3 partitions into 2
    }


def test_text_form_lists_every_edge_and_lone_steps() -> None:
    flow = rf.Dataflow("lone")
    flow.source("only", rf.testing.from_items([1]))
    assert flowchart.to_text(flow.spec()) == "flow 'lone': 1 steps\n  only (source x1)\n"
    text = flowchart.to_text(_flow().spec())
    assert "  by_user (key_by x2) --hash--> count (reduce x3)\n" in text
    assert len(text.splitlines()) == 1 + 6


def test_html_embeds_mermaid_and_a_text_fallback() -> None:
    flow = _flow()
    page = flow._repr_html_()
    assert "<div class='mermaid'" in page
    assert flowchart.MERMAID_ESM in page and "<script type='module'>" in page
    fallback = re.search(r"<pre id='[^']+-text'>(.*?)</pre>", page, re.DOTALL)
    assert fallback is not None
    assert "count (reduce x3) --rebalance--&gt; out (sink x2)" in fallback.group(1)
    ids = re.findall(r"id='(rayflow-flow-\w+)'", page)
    assert ids and ids[0] != re.findall(r"id='(rayflow-flow-\w+)'", flow._repr_html_())[0]


def test_show_prints_the_mermaid_text_outside_a_notebook(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flow = _flow()
    assert flow.show() is None
    assert capsys.readouterr().out == flow.to_mermaid()


def test_step_names_are_escaped_in_the_picture() -> None:
    # Names the builder refuses, as a hand-made spec could still carry them.
    odd = 'a<b>&"c'
    spec = FlowSpec(
        "odd",
        128,
        (
            StepSpec(odd, StepKind.SOURCE, (), 1),
            StepSpec("<script>x</script>", StepKind.SINK, (odd,), 1),
        ),
    )
    text = flowchart.to_mermaid(spec)
    assert '"a#lt;b#gt;#amp;#quot;c<br/>source x1"' in text
    page = flowchart.to_html(spec)
    assert "<script>x</script>" not in page and "<b>" not in page
    assert "a&lt;b&gt;&amp;&quot;c (source x1)" in page


def test_job_views_escape_step_names_and_messages() -> None:
    entry = {
        "partition": 0,
        "records_in": 1200,
        "records_out": 1100,
        "records_out_per_s": 5.0,
        "busy_ms_per_s": 10.0,
        "backpressured_ms_per_s": 0.0,
        "mailbox_depth": 1,
    }
    data = {
        "status": "RUNNING",
        "metrics": {"<img src=x>": [entry]},
        "alerts": [{"kind": "stalled", "message": "<b>stuck</b>"}],
    }
    page = render("job<1>", data)
    assert "<img" not in page and "<b>stuck" not in page
    assert "&lt;img src=x&gt;" in page and "job&lt;1&gt;" in page
    assert ">1,200</td>" in page and ">1,100</td>" in page


def test_finished_view_shows_duration_restarts_final_checkpoint() -> None:
    data = {
        "status": "FINISHED",
        "duration_s": 12.34,
        "restarts": 0,
        "final_checkpoint": 7,
        "metrics": {"out": [{"partition": 0, "records_in": 3, "records_out": 0}]},
    }
    page = render("wc", data, FINAL_COLUMNS)
    assert "FINISHED" in page and "ran 12.3 s" in page and "restarts 0" in page
    assert "final checkpoint #7" in page
    assert "<th>records in</th><th>records out</th></tr>" in page  # no rates once it ended
