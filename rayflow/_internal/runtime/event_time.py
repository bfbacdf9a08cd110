"""A task's event time: watermarks in, watermarks made, watermarks out.

Watermarks travel in-band on the channels, like barriers, as
``WATERMARK`` messages ``(watermark, idle)``, behind the records sent
before them. A task's *input* watermark is the minimum over its open input
channels that are not idle (it only grows); a ``with_event_time`` step in
the task *generates* one (the highest timestamp it saw minus its
``max_delay_s``, per source partition it reads, the lowest of them).
Window and ``process`` steps fire on the watermark of
what feeds them: the generator before them in the task, or the input.

What goes out is the generated watermark if the task has a generator, the
input one otherwise. It is sent when it grew, at most every
``SEND_INTERVAL_S`` (each message is a Ray call and cuts a batch short),
and at once when it reaches +inf: a source whose readers all ended sends
+inf before it reports done, so every window fires before the final
checkpoint and its output is committed by it. A stop does not: the open
windows stay in the state, to go on after a resume.

A generator that saw no record for its ``idle_timeout_s`` marks its output
idle, and a task whose open inputs are all idle passes that on: an idle
channel does not hold back its receiver's minimum until it sends again.

The input watermark, each generator's highest timestamp, each timed
step's watermark and the highest watermark sent are part of the
snapshot. On restore at the same parallelism a partition takes its own;
rescaled, the input and timed watermarks take the maximum over the old
partitions (they all saw the same channels, so the highest one was reached
by all: a window that fired stays fired), and a generator's
per-source-partition timestamps go with their source partitions.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

from rayflow._internal.plan import ChannelId, Plan, Stage
from rayflow._internal.runtime.operators import EventTimeOp, Op, UserCodeError
from rayflow._internal.spec import StepKind

#: Seconds between two watermark messages on a channel (Flink's default is 0.2 s).
SEND_INTERVAL_S = 0.2

INF = math.inf


class TimedOp(Protocol):
    """A step that fires on the watermark (windows, ``process``)."""

    name: str
    watermark: float

    def advance(self, watermark: float) -> None: ...

    def restored(self) -> None: ...


class EventTime:
    def __init__(self, plan: Plan, stage: Stage, ops: dict[str, Op], channels: list[ChannelId]):
        self.enabled = any(s.kind is StepKind.EVENT_TIME for s in plan.flow.steps)
        self.generators = [op for op in ops.values() if isinstance(op, EventTimeOp)]
        self.timed: list[TimedOp] = [
            op  # type: ignore[misc]
            for op in ops.values()
            if plan.step(op.name).kind in (StepKind.WINDOW, StepKind.PROCESS)
        ]
        # Timed steps fed by a generator in this task fire on its watermark.
        self._fed_by: dict[str, EventTimeOp | None] = {
            op.name: _generator_before(plan, op.name, ops) for op in self.timed
        }
        self.channel_wm: dict[ChannelId, float] = dict.fromkeys(channels, -INF)
        self.idle_channels: set[ChannelId] = set()
        self.input = -INF
        self.input_ended = False  # a source task whose readers all ended
        self.sent = -INF
        self.sent_at = 0.0
        self.sent_idle = False
        self.sent_before = -INF  # the highest watermark sent before the restore

    # -- in -------------------------------------------------------------------

    def on_watermark(self, channel: ChannelId, watermark: float, idle: bool) -> None:
        if idle:
            self.idle_channels.add(channel)
            return
        self.idle_channels.discard(channel)
        if watermark > self.channel_wm.get(channel, -INF):
            self.channel_wm[channel] = watermark

    def _update_input(self, open_channels: set[ChannelId]) -> None:
        if self.input_ended:
            self.input = INF
            return
        active = [self.channel_wm[c] for c in open_channels if c not in self.idle_channels]
        if active:
            low = min(active)
            if low > self.input:
                self.input = low

    def _inputs_idle(self, open_channels: set[ChannelId]) -> bool:
        return bool(open_channels) and open_channels <= self.idle_channels

    # -- made -----------------------------------------------------------------

    def _generated(self, gen: EventTimeOp) -> float:
        if self.input == INF:
            return INF  # its input ended: nothing more comes, of any time
        return gen.watermark

    def output(self) -> float:
        if self.generators:
            return min(self._generated(g) for g in self.generators)
        return self.input

    def _idle(self, open_channels: set[ChannelId], now: float) -> bool:
        if self.generators:
            timeouts = [g.idle_timeout_s for g in self.generators]
            if any(t is None for t in timeouts):
                return False
            return all(now - g.last_record_at >= (g.idle_timeout_s or 0.0) for g in self.generators)
        return self._inputs_idle(open_channels)

    def highest_sent(self) -> float:
        """The highest watermark this partition sent, since its start or before its
        restore: ``T`` of combining before the shuffle (eventtime/combine.py). What it
        routes now reaches its receivers before any higher one it sends next."""
        return max(self.sent, self.sent_before)

    # -- fire -----------------------------------------------------------------

    def advance(self, open_channels: set[ChannelId]) -> None:
        """Bring the input up to date and let timed steps fire (runs user code)."""
        self._update_input(open_channels)
        for op in self.timed:
            gen = self._fed_by[op.name]
            wm = self.input if gen is None else self._generated(gen)
            if wm > op.watermark:
                _advance(op, wm)

    # -- out ------------------------------------------------------------------

    def due(
        self, open_channels: set[ChannelId], now: float, *, force: bool = False
    ) -> tuple[float, bool] | None:
        """The ``(watermark, idle)`` message to send now, if any."""
        if not self.enabled:
            return None
        if self._idle(open_channels, now):
            if self.sent_idle:
                return None
            return (self.sent, True)
        out = self.output()
        if out == -INF:
            return None
        if self.sent_idle:
            return (out, False)  # active again
        if out <= self.sent:
            return None
        if force or out == INF or now - self.sent_at >= SEND_INTERVAL_S:
            return (out, False)
        return None

    def mark_sent(self, message: tuple[float, bool], now: float) -> None:
        watermark, idle = message
        self.sent_idle = idle
        if not idle:
            self.sent = max(self.sent, watermark)
            self.sent_at = now

    def next_deadline(self, open_channels: set[ChannelId]) -> float | None:
        """When (monotonic) a watermark held back by the interval, or idleness, is due."""
        if not self.enabled:
            return None
        deadline = None
        if self.output() > self.sent and not self.sent_idle:
            deadline = self.sent_at + SEND_INTERVAL_S
        if self.generators and not self.sent_idle:
            if all(g.idle_timeout_s is not None for g in self.generators):
                idle_at = max(g.last_record_at + (g.idle_timeout_s or 0.0) for g in self.generators)
                deadline = idle_at if deadline is None else min(deadline, idle_at)
        return deadline

    # -- checkpoints ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        return {
            "input": _enc(self.input),
            "max_ts": {
                g.name: {str(sp): _enc(v) for sp, v in g.max_ts.items()} for g in self.generators
            },
            "ops": {op.name: _enc(op.watermark) for op in self.timed},
            "sent": _enc(self.highest_sent()),
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take the restored watermarks (see the module docstring), then re-index."""
        if state:
            self.input = max(self.input, _dec(state.get("input")))
            for g in self.generators:
                restored = state.get("max_ts", {}).get(g.name) or {}
                for sp, v in restored.items():
                    split = int(sp)  # source partitions (0 where not after a source)
                    g.max_ts[split] = max(g.max_ts.get(split, -INF), _dec(v))
                g.last_record_at = time.monotonic()
            for op in self.timed:
                op.watermark = max(op.watermark, _dec(state.get("ops", {}).get(op.name)))
            self.sent_before = max(self.sent_before, _dec(state.get("sent")))
        for op in self.timed:
            op.restored()

    def figures(self) -> dict[str, float | str | None]:
        """For metrics: the watermark in, and out (None for -inf, "inf" at the end)."""
        return {"watermark_in": _enc(self.input), "watermark_out": _enc(self.output())}


def _advance(op: TimedOp, watermark: float) -> None:
    """``op.advance``; a window or timer whose function fails is set aside like a bad
    record when the step says so (``on_error``), and the advance goes on."""
    while True:
        try:
            op.advance(watermark)
            return
        except UserCodeError as exc:
            if exc.step != op.name or getattr(op, "on_error", "fail") == "fail":
                raise
            op._set_aside(exc)  # type: ignore[attr-defined]


def merge_restored(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The event time of several old partitions, for one new one (a rescale)."""
    merged: dict[str, Any] = {"input": None, "max_ts": {}, "ops": {}}
    inputs = [_dec(s.get("input")) for s in states]
    merged["input"] = _enc(max(inputs, default=-INF))
    for s in states:
        for n, splits in s.get("max_ts", {}).items():
            into = merged["max_ts"].setdefault(n, {})
            for sp, v in splits.items():
                # A source partition was read by one old partition; else the lowest.
                into[sp] = v if sp not in into else _enc(min(_dec(into[sp]), _dec(v)))
    names = {n for s in states for n in s.get("ops", {})}
    for n in names:
        merged["ops"][n] = _enc(max(_dec(s.get("ops", {}).get(n)) for s in states))
    # What any old partition sent: every receiver's restored watermark is below it.
    merged["sent"] = _enc(max((_dec(s.get("sent")) for s in states), default=-INF))
    return merged


def _generator_before(plan: Plan, step: str, ops: dict[str, Op]) -> EventTimeOp | None:
    """The op of the nearest ``with_event_time`` step before ``step`` in this task."""
    name = plan.event_time_before(step)
    op = ops.get(name) if name is not None else None
    return op if isinstance(op, EventTimeOp) else None


def _enc(value: float) -> float | str | None:
    """JSON-safe: -inf is None, +inf the string "inf"."""
    if value == -INF:
        return None
    if value == INF:
        return "inf"
    return value


def _dec(value: Any) -> float:
    if value is None:
        return -INF
    if value == "inf":
        return INF
    return float(value)
