"""A picture of a dataflow: Mermaid text, an HTML view for notebooks, a plain-text list.

One node per step, labelled with its name, kind and parallelism (sources
are stadiums, stateful steps cylinders, sinks parallelograms), and one edge
per input, labelled with how records cross it as the planner decides
(``forward``, ``hash`` after a ``key_by``, ``rebalance`` where the
parallelism changes). Drawn from the flow's spec, not its plan, so that a
flow still being built (no sink yet) has a picture too.

The HTML view renders with Mermaid from its CDN (an ES module); the same
HTML carries the edges as plain text, shown until the diagram has rendered,
so the view reads the same offline or where outputs run no scripts.
"""

from __future__ import annotations

import html
import uuid

from rayflow._internal.plan import _edge_kind
from rayflow._internal.spec import FlowSpec, StepKind, StepSpec

#: Mermaid 11, as an ES module from jsDelivr (see mermaid.js.org, "Usage").
MERMAID_ESM = "https://cdn.jsdelivr.net/npm/mermaid@11/dist/mermaid.esm.min.mjs"

# Node shapes by kind: (opening, closing) around the quoted label.
_SHAPES = {
    StepKind.SOURCE: ("([", "])"),
    StepKind.REDUCE: ("[(", ")]"),
    StepKind.STATEFUL_MAP: ("[(", ")]"),
    StepKind.WINDOW: ("[(", ")]"),
    StepKind.PROCESS: ("[(", ")]"),
    StepKind.SINK: ("[/", "/]"),
}


def describe_step(step: StepSpec) -> str:
    """``name (kind xparallelism)``: how a step appears in the text form."""
    return f"{step.name} ({step.kind.value} x{step.parallelism})"


def edges(flow: FlowSpec) -> list[tuple[StepSpec, StepSpec, str]]:
    """Every (input step, step, partitioning) of the flow, in the order steps were added
    (a side output's edge says which output it is: ``late``, ``dead_letters``)."""
    by_name = {s.name: s for s in flow.steps}
    return [
        (by_name[name], step, step.port or _edge_kind(by_name[name], step).value)
        for step in flow.steps
        for name in step.inputs
    ]


def to_mermaid(flow: FlowSpec) -> str:
    """The flow as a Mermaid ``flowchart LR``."""
    ids = {s.name: f"s{i}" for i, s in enumerate(flow.steps)}
    lines = ["flowchart LR"]
    for step in flow.steps:
        opening, closing = _SHAPES.get(step.kind, ("[", "]"))
        label = f"{_label(step.name)}<br/>{step.kind.value} x{step.parallelism}"
        lines.append(f'    {ids[step.name]}{opening}"{label}"{closing}')
    for src, dst, kind in edges(flow):
        lines.append(f"    {ids[src.name]} -->|{kind}| {ids[dst.name]}")
    return "\n".join(lines) + "\n"


def to_text(flow: FlowSpec) -> str:
    """The flow as plain text: one line per edge (and per step that has none)."""
    lines = [f"flow {flow.name!r}: {len(flow.steps)} steps"]
    connected: set[str] = set()
    for src, dst, kind in edges(flow):
        lines.append(f"  {describe_step(src)} --{kind}--> {describe_step(dst)}")
        connected.update((src.name, dst.name))
    lines += [f"  {describe_step(s)}" for s in flow.steps if s.name not in connected]
    return "\n".join(lines) + "\n"


def to_html(flow: FlowSpec) -> str:
    """The flow for a notebook: a Mermaid diagram, and its edges as text until it renders."""
    anchor = f"rayflow-flow-{uuid.uuid4().hex[:12]}"
    return (
        "<div class='rayflow-flow'>"
        f"<div class='mermaid' id='{anchor}' style='display:none'>"
        f"{html.escape(to_mermaid(flow))}</div>"
        f"<pre id='{anchor}-text'>{html.escape(to_text(flow))}</pre>"
        "<script type='module'>\n"
        f'const diagram = document.getElementById("{anchor}");\n'
        "try {\n"
        f'  const {{ default: mermaid }} = await import("{MERMAID_ESM}");\n'
        "  mermaid.initialize({ startOnLoad: false });\n"
        '  diagram.style.display = "";\n'
        "  await mermaid.run({ nodes: [diagram] });\n"
        f'  document.getElementById("{anchor}-text").style.display = "none";\n'
        "} catch (error) {\n"
        '  diagram.style.display = "none";  // offline: the text stays\n'
        "}\n"
        "</script></div>"
    )


def _label(text: str) -> str:
    """Text safe inside a quoted Mermaid label (Mermaid's own entity codes)."""
    for char, code in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, code)
    return text
