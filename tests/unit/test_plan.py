from __future__ import annotations

import pytest

import rayflow as rf
from rayflow._internal.plan import Partitioning, build_plan


def _wordcount(par_source: int = 2, par_count: int = 2) -> rf.Dataflow:
    flow = rf.Dataflow("wc", parallelism=2)
    lines = flow.source(
        "lines", rf.testing.from_items(["a b"], partitions=3), parallelism=par_source
    )
    words = lines.flat_map("split", str.split)
    counts = words.key_by("by_word", lambda w: w).reduce(
        "count", lambda acc, w: acc + 1, initial=0, parallelism=par_count
    )
    counts.sink("out", rf.testing.Collect(), parallelism=par_count)
    return flow


def test_stateless_chains_fuse_and_key_by_is_a_shuffle() -> None:
    plan = build_plan(_wordcount().spec())
    assert [(s.name, s.steps, s.parallelism) for s in plan.stages] == [
        ("lines", ("lines", "split", "by_word"), 2),
        ("count", ("count", "out"), 2),
    ]
    (edge,) = plan.edges
    assert (edge.src_step, edge.dst_step, edge.partitioning) == (
        "by_word",
        "count",
        Partitioning.HASH,
    )
    # Every receiver partition hears from every sender partition.
    assert plan.input_channels("count", 1) == [(0, 0), (0, 1)]
    assert plan.input_channels("lines", 0) == []


def test_source_partitions_are_spread_round_robin_over_actors() -> None:
    plan = build_plan(_wordcount().spec())
    assert plan.source_partitions("lines", 0) == [0, 2]
    assert plan.source_partitions("lines", 1) == [1]


def test_parallelism_change_is_a_rebalance_edge() -> None:
    flow = rf.Dataflow("f")
    s = flow.source("src", rf.testing.from_items([1]), parallelism=1)
    s.map("double", lambda x: x * 2, parallelism=3).sink("out", rf.testing.Collect(), parallelism=3)
    plan = build_plan(flow.spec())
    assert [s.steps for s in plan.stages] == [("src",), ("double", "out")]
    assert plan.edges[0].partitioning is Partitioning.REBALANCE
    assert plan.edges[0].receivers_of(0) == [0, 1, 2]


def test_union_of_two_stages_gets_forward_edges_and_fan_out_stays_fused() -> None:
    flow = rf.Dataflow("u", parallelism=2)
    a = flow.source("a", rf.testing.from_items([1]))
    b = flow.source("b", rf.testing.from_items([2]))
    a1 = a.map("a1", str)
    a2 = a.map("a2", repr)  # a second consumer of a: fan-out inside one actor
    merged = a1.union("merged", b, a2)
    merged.sink("out", rf.testing.Collect())
    plan = build_plan(flow.spec())
    stages = {s.name: s.steps for s in plan.stages}
    assert stages == {"a": ("a", "a1", "a2"), "b": ("b",), "merged": ("merged", "out")}
    assert sorted((e.src_step, e.partitioning) for e in plan.edges) == [
        ("a1", Partitioning.FORWARD),
        ("a2", Partitioning.FORWARD),
        ("b", Partitioning.FORWARD),
    ]
    # Forward edges are pointwise: partition 1 hears only from partitions 1.
    assert sorted(plan.input_channels("merged", 1)) == sorted((e.id, 1) for e in plan.edges)


def test_union_within_one_stage_fuses() -> None:
    flow = rf.Dataflow("u")
    a = flow.source("a", rf.testing.from_items([1]))
    a.map("x", str).union("both", a.map("y", repr)).sink("out", rf.testing.Collect())
    plan = build_plan(flow.spec())
    assert [s.steps for s in plan.stages] == [("a", "x", "y", "both", "out")]
    assert plan.edges == ()


def test_different_resources_break_fusion() -> None:
    flow = rf.Dataflow("r")
    s = flow.source("src", rf.testing.from_items([1]))
    s.map("heavy", str, num_cpus=1).map("light", str).sink("out", rf.testing.Collect())
    plan = build_plan(flow.spec())
    assert [s.steps for s in plan.stages] == [("src",), ("heavy",), ("light", "out")]
    assert plan.stage("heavy").resources.ray_options() == {"num_cpus": 1.0}


def test_a_flow_without_sink_is_refused() -> None:
    flow = rf.Dataflow("nosink")
    flow.source("src", rf.testing.from_items([1])).map("m", str)
    with pytest.raises(rf.BuildError, match=r"no sink.*stream.sink\(name, sink\)"):
        build_plan(flow.spec())


def test_describe_names_stages_and_edges() -> None:
    text = build_plan(_wordcount().spec()).describe()
    assert "stage 'lines' x2: lines -> split -> by_word" in text
    assert "'by_word'[2] --hash--> 'count'[2]" in text


def test_a_key_by_between_steps_of_parallelism_1_moves_nothing_and_fuses() -> None:
    flow = rf.Dataflow("wc", parallelism=1)
    words = flow.source("lines", rf.testing.from_items(["a b"])).flat_map("split", str.split)
    words.key_by("by_word", lambda w: w).reduce("count", lambda acc, w: acc + 1, initial=0).sink(
        "out", rf.testing.Collect()
    )
    plan = build_plan(flow.spec())
    assert [(s.name, s.steps) for s in plan.stages] == [
        ("lines", ("lines", "split", "by_word", "count", "out")),
    ]
    assert plan.edges == ()
    # A second keyed step stays apart: an actor snapshots one keyed state.
    flow = rf.Dataflow("two", parallelism=1)
    counts = (
        flow.source("s", rf.testing.from_items([1]))
        .key_by("k1", str)
        .reduce("first", lambda a, x: a + 1, initial=0)
    )
    counts.key_by("k2", lambda kv: kv[1]).reduce("second", lambda a, x: a + 1, initial=0).sink(
        "out", rf.testing.Collect()
    )
    two = build_plan(flow.spec())
    assert [s.steps for s in two.stages] == [
        ("s", "k1", "first", "k2"),
        ("second", "out"),
    ]
    # Only at parallelism 1 on both sides: elsewhere the key decides the partition.
    assert [s.name for s in build_plan(_wordcount(2, 2).spec()).stages] == ["lines", "count"]
