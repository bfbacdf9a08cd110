"""One partition of one stage: the loop that an operator actor runs.

The task owns the fused steps, the mailbox and the output channels. Its loop
takes a batch from the mailbox (or, in a source stage, reads one from the
source), runs it through the steps, and sends what is due. It is plain
asyncio with no Ray in it: the actor wrapper supplies the send functions, so
the logic can be tested in one process.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from rayflow._internal import naming
from rayflow._internal.plan import Partitioning, Plan
from rayflow._internal.runtime import serde
from rayflow._internal.runtime.channels import (
    ChannelBroken,
    OutputChannel,
    Outputs,
    SendFn,
    UnroutableKey,
    forward_router,
    hash_router,
    rebalance_router,
)
from rayflow._internal.runtime.mailbox import DATA, EOS, Mailbox
from rayflow._internal.runtime.operators import (
    Feed,
    Op,
    SinkOp,
    SourceOp,
    UserCodeError,
    build_op,
    short_repr,
)
from rayflow._internal.runtime.timing import BUSY, IDLE, RateWindow, TimeAccount
from rayflow._internal.spec import StepKind
from rayflow.config import RuntimeConfig
from rayflow.errors import Failure
from rayflow.sources import SourceReader

#: How long an idle source waits before polling an unbounded reader again.
SOURCE_POLL_S = 0.005


@dataclass
class TaskOutcome:
    """What ``run`` returns: success, or the failure that stopped the task."""

    ok: bool
    failure: Failure | None = None
    records_in: dict[str, int] = field(default_factory=dict)
    records_out: dict[str, int] = field(default_factory=dict)


class StageTask:
    def __init__(
        self,
        plan: Plan,
        stage: str,
        partition: int,
        *,
        job: str,
        config: RuntimeConfig,
        final_checkpoint_id: int = 1,
    ):
        self.plan = plan
        self.stage = plan.stage(stage)
        self.partition = partition
        self.job = job
        self.config = config
        self.actor_name = naming.operator_actor(job, stage, partition)
        self.clock = TimeAccount()
        self._rates = RateWindow()
        self._final_checkpoint_id = final_checkpoint_id
        self._stop_requested = False
        self._process = psutil.Process(os.getpid())
        self.epoch = 0

        self.ops: dict[str, Op] = {}
        for step in self.stage.steps:
            self.ops[step] = build_op(plan.step(step), job, partition)
        for step in self.stage.steps:
            op = self.ops[step]
            op.downstream = [self.ops[c].feed for c in plan.consumers_in_stage(step)]

        self.mailbox = Mailbox(
            plan.input_channels(stage, partition), config.mailbox_batches, config.mailbox_bytes
        )
        self._entry: dict[int, Feed] = {
            e: self.ops[plan.edges[e].dst_step].feed for e in self.stage.inputs
        }
        self.outputs: Outputs | None = None
        head = plan.step(self.stage.steps[0])
        self.is_source = head.kind is StepKind.SOURCE
        self._readers: dict[int, SourceReader] = {}

    # -- wiring ------------------------------------------------------------

    def connect(self, senders: dict[tuple[int, int], tuple[str, SendFn]]) -> None:
        """Create the output channels; ``senders`` maps (edge, receiver partition) to a sender."""
        cfg = self.config
        outputs = Outputs(
            batch_size=cfg.batch_size,
            batch_bytes=cfg.batch_bytes,
            linger_s=cfg.linger_s,
            clock=self.clock,
        )
        for edge_id in self.stage.outputs:
            edge = self.plan.edges[edge_id]
            # The receiver splits its mailbox evenly over its input channels.
            n_in = len(self.plan.input_channels(edge.dst_stage, 0))
            channels = []
            for q in edge.receivers_of(self.partition):
                receiver, send = senders[(edge_id, q)]
                channels.append(
                    outputs.add(
                        OutputChannel(
                            (edge_id, self.partition),
                            receiver,
                            send,
                            credit_batches=max(1, cfg.mailbox_batches // n_in),
                            credit_bytes=max(1, cfg.mailbox_bytes // n_in),
                            batch_size=cfg.batch_size,
                        )
                    )
                )
            route: Callable[[list[Any]], None]
            if edge.partitioning is Partitioning.HASH:
                route = hash_router(channels, self.plan.flow.max_parallelism)
            elif edge.partitioning is Partitioning.REBALANCE:
                route = rebalance_router(channels)
            else:
                route = forward_router(channels[0])
            self.ops[edge.src_step].downstream.append(route)
        self.outputs = outputs

    # -- data plane --------------------------------------------------------

    def offer(
        self, epoch: int, channel: tuple[int, int], seq: int, kind: int, payload: Any
    ) -> asyncio.Future[None] | None:
        if epoch != self.epoch:
            return None  # a batch from before a reset: drop it
        size = len(payload) if kind == DATA else 0
        return self.mailbox.offer(channel, seq, kind, payload, size)

    def request_stop(self) -> None:
        """Sources stop reading and end their streams; the rest drains."""
        self._stop_requested = True

    # -- the loop ----------------------------------------------------------

    async def run(self) -> TaskOutcome:
        assert self.outputs is not None, "connect() first"
        try:
            if self.is_source:
                await self._run_source()
            else:
                await self._run_operator()
            await self._finish()
        except UserCodeError as exc:
            return self._outcome(exc.failure(self.partition))
        except UnroutableKey as exc:
            key_step = self._key_step()
            return self._outcome(
                UserCodeError(key_step, exc.record, exc.cause).failure(self.partition)
            )
        except ChannelBroken as exc:
            return self._outcome(
                Failure(
                    kind="channel", message=str(exc), step=self.stage.name, partition=self.partition
                )
            )
        except Exception as exc:
            return self._outcome(
                Failure(
                    kind="system",
                    message=f"{type(exc).__name__}: {exc}",
                    step=self.stage.name,
                    partition=self.partition,
                    error_type=type(exc).__qualname__,
                    traceback="".join(traceback.format_exception(exc)),
                )
            )
        return self._outcome(None)

    def _key_step(self) -> str:
        for step in self.stage.steps:
            if self.plan.step(step).kind is StepKind.KEY_BY:
                return step
        return self.stage.name

    def _outcome(self, failure: Failure | None) -> TaskOutcome:
        return TaskOutcome(
            ok=failure is None,
            failure=failure,
            records_in={n: op.records_in for n, op in self.ops.items()},
            records_out={n: op.records_out for n, op in self.ops.items()},
        )

    async def _run_operator(self) -> None:
        mailbox = self.mailbox
        outputs = self.outputs
        assert outputs is not None
        clock = self.clock
        entry = self._entry
        open_channels = len(mailbox.channels)
        while open_channels:
            env = mailbox.pop()
            if env is None:
                await outputs.flush()
                deadline = outputs.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                clock.switch(IDLE)
                await mailbox.wait(timeout)
                clock.switch(BUSY)
                continue
            if env.kind == DATA:
                entry[env.channel[0]](serde.loads(env.payload))
                await outputs.flush()
            elif env.kind == EOS:
                open_channels -= 1
            # Let queued calls (pushes, metrics, control) in between batches.
            await asyncio.sleep(0)
            self._sample_rates()

    async def _run_source(self) -> None:
        outputs = self.outputs
        assert outputs is not None
        head = self.ops[self.stage.steps[0]]
        assert isinstance(head, SourceOp)
        spec = self.plan.step(head.name)
        for sp in self.plan.source_partitions(self.stage.name, self.partition):
            self._readers[sp] = spec.connector.open(sp, None)
        active = list(self._readers)
        batch_size = self.config.batch_size
        clock = self.clock
        while active and not self._stop_requested:
            progressed = False
            for sp in list(active):
                reader = self._readers[sp]
                try:
                    items = reader.read(batch_size)
                except Exception as exc:
                    raise UserCodeError(
                        head.name,
                        None,
                        exc,
                        what=f"reading source partition {sp} at offset "
                        f"{short_repr(_safe_offset(reader))}",
                    ) from exc
                if items is None:
                    active.remove(sp)
                    reader.close()
                    continue
                if items:
                    progressed = True
                    head.emit(items)
                    await outputs.flush()
            if not progressed and active:
                await outputs.flush()
                clock.switch(IDLE)
                await asyncio.sleep(SOURCE_POLL_S)
                clock.switch(BUSY)
            else:
                await asyncio.sleep(0)
            self._sample_rates()
        for reader in self._readers.values():
            reader.close()

    async def _finish(self) -> None:
        """End of input: flush, end every output stream, wait for it, commit sinks."""
        assert self.outputs is not None
        await self.outputs.send_control(EOS, None)
        await self.outputs.drain()
        for op in self.ops.values():
            if isinstance(op, SinkOp):
                await self._commit_final(op)

    async def _commit_final(self, op: SinkOp) -> None:
        writer = op.writer
        try:
            committable = writer.prepare_commit(self._final_checkpoint_id)
            await asyncio.to_thread(writer.commit, committable)
            writer.close()
        except Exception as exc:
            raise UserCodeError(op.name, None, exc, what="committing the sink's output") from exc

    # -- observation -------------------------------------------------------

    def _counters(self) -> tuple[float, ...]:
        busy, idle, bp = self.clock.totals()
        per_op = [v for op in self.ops.values() for v in (op.records_in, op.records_out)]
        return (busy, idle, bp, *per_op)

    def _sample_rates(self) -> None:
        """Keep the rate window fed even when nobody asks for metrics."""
        if self._rates.due():
            self._rates.rates(self._counters())

    def metrics(self) -> list[dict[str, Any]]:
        rates = self._rates.rates(self._counters())
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            rss = 0
        outputs = self.outputs
        result = []
        for i, (name, op) in enumerate(self.ops.items()):
            head = i == 0
            entry: dict[str, Any] = {
                "step": name,
                "partition": self.partition,
                "stage": self.stage.name,
                "actor": self.actor_name,
                "records_in": op.records_in,
                "records_out": op.records_out,
                "records_in_per_s": rates[3 + 2 * i],
                "records_out_per_s": rates[4 + 2 * i],
                # The mailbox belongs to the chain's first step.
                "mailbox_depth": self.mailbox.depth if head else 0,
                "mailbox_bytes": self.mailbox.bytes if head else 0,
                "mailbox_peak_depth": self.mailbox.peak_depth if head else 0,
                "mailbox_peak_bytes": self.mailbox.peak_bytes if head else 0,
                "mailbox_capacity_batches": self.mailbox.capacity_batches if head else 0,
                "mailbox_capacity_bytes": self.mailbox.capacity_bytes if head else 0,
                # Fused steps share the actor's time, as chained operators do in Flink.
                "busy_ms_per_s": rates[0] * 1000.0,
                "idle_ms_per_s": rates[1] * 1000.0,
                "backpressured_ms_per_s": rates[2] * 1000.0,
                "output_buffered": outputs.buffered if outputs else 0,
                "output_in_flight": outputs.in_flight if outputs else 0,
                "rss_bytes": rss,
            }
            if op.state_size is not None:
                entry["state_keys"] = op.state_size
            result.append(entry)
        return result


def _safe_offset(reader: SourceReader) -> Any:
    try:
        return reader.offset()
    except Exception:
        return "?"
