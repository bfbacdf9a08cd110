"""One partition of one stage: the loop that an operator actor runs.

The task owns the fused steps, the mailbox and the output channels. Its loop
takes a batch from the mailbox (or, in a source stage, reads one from the
source), runs it through the steps, and sends what is due. Between batches
it runs control actions: checkpoint triggers (sources), sink commits, and
the end of the stream.

Checkpoints: a source snapshots its offsets when triggered and sends the
barrier in-band. An operator with several input channels *aligns*: a
channel that delivered barrier *n* is held back until every open channel
has, then the operator snapshots (synchronously, so the snapshot matches the
barrier's position), forwards the barrier and lets the upload run in the
background while it goes on processing. The acknowledgement goes to the
coordinator once the object is written.

Barrier ids only grow, and the coordinator runs one checkpoint at a time,
so a barrier *m* > *n* arriving while *n* is being aligned means *n* was
given up: the task drops *n* (releasing its held channels) and aligns *m*.
A barrier older than the one being aligned, or than the last one taken, is
stale and ignored. In at-least-once mode nothing is held back, so a channel
may deliver *m* before another delivered *n*: the same rule keeps every
acknowledgement under the right id.

A savepoint stages nothing: sinks keep writing into what the next
checkpoint stages and commits, so a savepoint never changes the output a
recovery or a resume sees. Its snapshot lists only the committables staged
for earlier checkpoints and not yet committed.

It is plain asyncio with no Ray in it: the actor wrapper supplies the send
functions and the coordinator callbacks, so the logic runs in one process
in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from rayflow._internal import naming
from rayflow._internal.checkpoint import snapshot as snap
from rayflow._internal.checkpoint.manifest import (
    CHECKPOINT,
    ObjectInfo,
    OperatorSnapshot,
    encode_offset,
)
from rayflow._internal.checkpoint.restore import Assignment
from rayflow._internal.eventtime.combine import make_combiner
from rayflow._internal.keygroups import key_group_range, stable_hash
from rayflow._internal.plan import ChannelId, Edge, Partitioning, Plan
from rayflow._internal.runtime import nondeterminism, serde
from rayflow._internal.runtime.causal import CausalLog, CausalStore
from rayflow._internal.runtime.channels import (
    ChannelBroken,
    OutputChannel,
    Outputs,
    SendFn,
    UnroutableKey,
    forward_router,
    hash_router,
    keys_checked,
    rebalance_router,
)
from rayflow._internal.runtime.columns import exploding, rows_in
from rayflow._internal.runtime.event_time import EventTime
from rayflow._internal.runtime.inflight import InflightCapture
from rayflow._internal.runtime.mailbox import BARRIER, DATA, EOS, WATERMARK, Mailbox
from rayflow._internal.runtime.operators import (
    Feed,
    KeyedOp,
    Op,
    SinkOp,
    SourceOp,
    UserCodeError,
    build_op,
    short_repr,
)
from rayflow._internal.runtime.pacing import CostMeter, Debloater
from rayflow._internal.runtime.replay_log import ReplayLog
from rayflow._internal.runtime.timing import BACKPRESSURED, BUSY, IDLE, RateWindow, TimeAccount
from rayflow._internal.runtime.window_ops import WindowOp
from rayflow._internal.spec import LATE, StepKind, window_params
from rayflow._internal.storage import Storage, open_storage
from rayflow._internal.storage.base import create_once
from rayflow.config import RuntimeConfig
from rayflow.errors import Failure
from rayflow.sinks import TransientSinkError
from rayflow.sources import SourceReader

#: How long an idle source waits before polling an unbounded reader again.
SOURCE_POLL_S = 0.005
#: How long a caught-up source (its last reads were short) waits before reading
#: again: polling at once would spin a core that the operators need.
CAUGHT_UP_POLL_S = 0.0025
#: A commit that could not reach its destination is tried again after this, doubling.
COMMIT_RETRY_S = 0.2
COMMIT_RETRY_MAX_S = 10.0
#: Snapshots being written at once (one may outlive its checkpoint on a slow storage).
MAX_UPLOADS = 2

log = logging.getLogger("rayflow")

#: An envelope whose records were all consumed before (local recovery drops it).
_SKIPPED: Any = object()


class Coordination(Protocol):
    """How a task talks to its job's coordinator (fire and forget)."""

    def acknowledge(self, checkpoint_id: int, snapshot: OperatorSnapshot) -> None: ...

    def decline(self, checkpoint_id: int, reason: str) -> None: ...

    def source_done(self, epoch: int) -> None: ...


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
        full_every: int | None = None,
        align: bool = True,
        epoch: int = 0,
        coordination: Coordination | None = None,
        final_checkpoint_id: int = 1,
        run_id: str = "",
        max_uncommitted: int | None = None,
        local_recovery: bool = False,
        instance: str = "",
    ):
        """``full_every`` is set when the job checkpoints (it enables barriers).

        ``align=False`` is the at-least-once mode: a channel that delivered a
        barrier is not held back. ``epoch`` numbers the job's restarts; a batch
        sent in another epoch is dropped.
        """
        self.plan = plan
        self.stage = plan.stage(stage)
        self.partition = partition
        self.job = job
        self.config = config
        self.actor_name = naming.operator_actor(job, stage, partition)
        self.run_id = run_id
        self.clock = TimeAccount()
        self._rates = RateWindow()
        self._final_checkpoint_id = final_checkpoint_id
        self._process = psutil.Process(os.getpid())
        self.epoch = epoch
        self.checkpointing = full_every is not None
        self._align = align
        self._main: asyncio.Task[Any] | None = None
        self.first_data_at: float | None = None  # wall clock of the first batch processed
        self._emitted_at_barrier: dict[int, int] = {}  # sources: records out at each barrier
        self._coordination = coordination

        self.ops: dict[str, Op] = {}
        for step in self.stage.steps:
            built = self.ops[step] = build_op(plan.step(step), job, partition, run_id)
            if isinstance(built, WindowOp) and not any(
                e.dst_step == step and plan.combines(e) for e in plan.edges
            ):
                built.no_partials()
        for step in self.stage.steps:
            op = self.ops[step]
            op.downstream = []
            for c in plan.consumers_in_stage(step):
                consumer = plan.step(c)
                if consumer.kind is not StepKind.SIDE_OUTPUT:
                    feed: Callable[[list[Any]], None] = self._feed_of(c)
                    if plan.step(step).kind is StepKind.KEY_BY:
                        # A keyed step in this actor (plan.py): no router checks the keys.
                        feed = keys_checked(feed)
                    op.downstream.append(feed)
                elif consumer.port == LATE:
                    op.late_downstream.append(self.ops[c].feed)  # type: ignore[attr-defined]
                else:
                    op.dead_downstream.append(self.ops[c].feed)
        self._keyed: KeyedOp | None = next(
            (op for op in self.ops.values() if isinstance(op, KeyedOp)), None
        )
        self._tracker = snap.IncrementalTracker(full_every) if full_every else None
        self._sinks = [op for op in self.ops.values() if isinstance(op, SinkOp)]
        self._committables: dict[str, list[tuple[int, Any]]] = {s.name: [] for s in self._sinks}
        # Per sink: records taken in when each checkpoint staged (for uncommitted_records).
        self._staged_at: dict[str, dict[int, int]] = {s.name: {} for s in self._sinks}

        self.mailbox = Mailbox(
            plan.input_channels(stage, partition), config.mailbox_batches, config.mailbox_bytes
        )
        self.time = EventTime(plan, self.stage, self.ops, self.mailbox.channels)
        self._entry: dict[int, Feed] = {
            e: self._feed_of(plan.edges[e].dst_step) for e in self.stage.inputs
        }
        self.outputs: Outputs | None = None
        head = plan.step(self.stage.steps[0])
        self.is_source = head.kind is StepKind.SOURCE

        # Sources
        self._readers: dict[int, SourceReader] = {}
        self._offsets: dict[int, Any] = {}
        self._start_offsets: dict[int, Any] = {}
        self._stop_requested = False
        self._finish_requested = False
        self._ended = False
        self._finishing = False  # _finish() began: no snapshot can be taken any more
        # Control actions queued by actor calls, run by the loop between batches.
        self._control: deque[Callable[[], Awaitable[None]]] = deque()
        # Alignment
        self._open: set[ChannelId] = set(self.mailbox.channels)
        self._aligning: snap.BarrierInfo | None = None
        self._aligned: set[ChannelId] = set()
        self._last_barrier = 0  # the newest checkpoint id this task snapshotted
        # Unaligned: where barriers arrived (checkpoint id -> channel -> seq), the
        # snapshot waiting for a safe point, and the in-flight capture under way.
        self._barrier_seqs: dict[int, dict[ChannelId, int]] = {}
        self._priority: snap.BarrierInfo | None = None
        self._unsafe = 0  # > 0 while state is being changed off the event loop
        self._capture: InflightCapture | None = None
        self._capture_done: tuple[Any, ...] | None = None
        self._current: tuple[ChannelId | None, list[Any]] | None = None  # batch in progress
        self._current_done = 0
        self._routes: dict[int, Callable[[list[Any]], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the data plane's loop
        self._metrics_lock = threading.Lock()  # metrics are read from the control loop
        self._replay_in: list[tuple[int, list[Any]]] = []
        self._replay_out: list[tuple[int, list[Any]]] = []
        self.last_alignment_ms = 0.0
        self._align_started = 0.0
        # Uploads run in threads so that processing goes on meanwhile.
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rayflow-io")
        # Checkpoints whose snapshot is being written. While the storage is slow, an
        # upload can outlive its checkpoint; two at most hold their bytes in memory.
        self._uploading: set[int] = set()
        # Commits (sinks): the committer task works up to the newest notified checkpoint.
        self._commit_target = 0
        self._committed_to = 0
        self._committer: asyncio.Task[None] | None = None
        self._commit_wake = asyncio.Event()
        self._commit_done = asyncio.Event()
        # A failure found beside the loop (a commit, an unaligned snapshot): the loop raises it.
        self._deferred_failure: UserCodeError | None = None
        # Sources: records emitted when the last completed checkpoint was taken, and
        # the bound on what a restart would replay (Checkpointing.max_uncommitted_records).
        self._committed_emitted = 0
        self._max_uncommitted = max_uncommitted
        # User code runs in slices, long ones in this thread: the event loop stays
        # free to answer metrics, checkpoint triggers, stop and cancel meanwhile.
        self._user = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayflow-user")
        self._cost = CostMeter()
        self._slice_started: float | None = None  # monotonic start of a running slice
        self._taken = 0  # records taken from the mailbox
        self._batch_left = 0  # records of the batch in progress not run yet
        self._fanout = 1.0  # sources: output records per record read
        self._debloat = Debloater(
            config.target_inflight_s,
            len(self.mailbox.channels),
            self.mailbox.credit_batches,
            config.batch_size,
        )
        self._uploads: set[asyncio.Task[None]] = set()
        self._replays: set[asyncio.Task[None]] = set()
        self._commits: set[asyncio.Future[None]] = set()
        # Local recovery (docs/protocol.md, "Local recovery"): what this partition sent
        # since the last completed checkpoint, the records it consumed per input channel
        # (re-emitted ones are dropped by that count), the generation of each input
        # channel's sender, and the order it took its input in (several inputs).
        # Channel positions are counted from the start of one epoch of one deployment.
        self._positions_token = f"{run_id}/{instance}/{epoch}"
        self._log: ReplayLog | None = ReplayLog() if local_recovery else None
        if self._log is not None:
            self._log.start(0)
        self._in_records: dict[ChannelId, int] = dict.fromkeys(self.mailbox.channels, 0)
        # Checkpoints whose barrier a restarted sender sent before it had re-emitted what
        # this partition consumed from it: (channel, its records sent, records consumed).
        self._cut_behind: dict[int, tuple[ChannelId, int, int]] = {}
        self._in_gen: dict[ChannelId, int] = {}
        # Input order is logged only with several input channels (one is its own order);
        # ctx.now()/ctx.random() values always (nondeterminism.py).
        self._causal: CausalLog | None = CausalLog() if local_recovery else None
        self._multi_input = len(self.mailbox.channels) > 1
        self._causal_store = CausalStore()
        self._channel_index = {c: i for i, c in enumerate(self.mailbox.channels)}
        self._forced: deque[Any] = deque()  # the first run's causal log, to replay
        # A source partition with several readers logs (split, records) per read: the
        # readers race too (rule P1). The records of a replayed read so far (it may
        # come back short; it is emitted whole).
        self._replay_read: list[Any] = []
        nondeterminism.CURRENT.log = self._causal
        nondeterminism.CURRENT.replay = self._forced
        self._barrier_in_seq: dict[ChannelId, int] = {}  # the aligned barrier's seq per channel
        self._restored_sent: dict[tuple[int, str], int] = {}  # output records at the restore
        self._positions_at: dict[int, dict[str, Any]] = {}
        self.last_snapshot: dict[str, Any] = {}
        self._event_time_at: dict[int, dict[str, Any]] = {}  # checkpoint id -> watermarks

    # -- wiring ------------------------------------------------------------

    def connect(
        self,
        senders: dict[tuple[int, int], tuple[str, SendFn]],
        coordination: Coordination | None = None,
        gen: int = 0,
        input_gens: dict[ChannelId, int] | None = None,
    ) -> None:
        """Create the output channels; ``senders`` maps (edge, receiver partition) to a sender.

        ``gen``: this partition's generation (its messages carry it); ``input_gens``:
        those of its senders, where not 0 (local recovery)."""
        self._in_gen.update(input_gens or {})
        self._loop = asyncio.get_running_loop()
        self._coordination = coordination
        for op in self._sinks:
            op.open(None)  # no-op when restore() opened it
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
            if self._log is not None:
                for ch in channels:
                    ch.enable_log(self._log, gen, self._causal)
                    ch.records_sent = self._restored_sent.get(ch.key, 0)
            route: Callable[[list[Any]], None]
            if edge.partitioning is Partitioning.HASH:
                route = hash_router(channels, self.plan.flow.max_parallelism)
            elif edge.partitioning is Partitioning.REBALANCE:
                route = rebalance_router(channels, sum(ch.records_sent for ch in channels))
            else:
                route = forward_router(channels[0])
            # What was produced but not sent (an unaligned restore) goes out as it was.
            self._routes[edge_id] = route
            combine = self._combiner(edge)
            if combine is not None:
                route = _combined(combine, route)
            self.ops[edge.src_step].downstream.append(route)
        self.outputs = outputs

    def _combiner(self, edge: Edge) -> Callable[[list[Any]], list[Any]] | None:
        """The combine before the shuffle into a window with ``combine=True``."""
        if not self.plan.combines(edge):
            return None
        dst = self.plan.step(edge.dst_step)
        windower, aggregator, lateness, _ = window_params(dst)
        assert dst.ts_fn is not None
        return make_combiner(
            dst.name, windower, aggregator, lateness, dst.ts_fn, self.time.highest_sent
        )

    # -- data plane and control -------------------------------------------

    def offer(
        self,
        epoch: int,
        channel: tuple[int, int],
        seq: int,
        kind: int,
        payload: Any,
        records: int = 0,
        meta: Any = None,
    ) -> asyncio.Future[None] | None:
        if epoch != self.epoch:
            return None  # a batch from before a reset: drop it
        if meta is not None and meta[0] != self._in_gen.get(channel, 0):
            return None  # from a sender that was replaced since (local recovery)
        size = len(payload) if kind == DATA else 0
        done = self.mailbox.offer(channel, seq, kind, payload, size, records, meta)
        capture = self._capture
        if capture is not None:
            capture.offer(channel, seq, kind, payload)
            if kind == EOS:
                capture.close(channel, seq)
        if kind == BARRIER and self._align:
            self._barrier_arrived(channel, seq, payload)
        elif capture is not None:
            self._maybe_capture_done()
        return done

    def batch_hint(self) -> tuple[int, int]:
        """(records per batch, batches in flight) this partition wants from each sender."""
        if self.config.target_inflight_s <= 0:
            return self.config.batch_size, self.mailbox.credit_batches
        # No drain rate yet: the processing cost is the best first guess.
        return self._debloat.batch_hint(self._cost.per_record)

    async def _run_chain(
        self,
        feed: Feed,
        items: list[Any],
        *,
        sliced_control: bool,
        channel: ChannelId | None = None,
    ) -> None:
        """Run ``items`` through the chain, in slices of about ``SLICE_S`` of work.

        A slice that is long runs in the user-code thread, so the event loop
        answers calls meanwhile; between slices, what is due is sent and (for
        operators, ``sliced_control``) queued control actions such as sink
        commits run. Never a snapshot: state is consistent only between batches.
        """
        assert self.outputs is not None
        n = len(items)
        done = 0
        loop = asyncio.get_running_loop()
        cost = self._cost
        self._batch_left = n
        # Operators are consistent between slices (what is left of the batch is
        # in flight); a source only between batches (its offsets are per read).
        between_slices = channel is not None
        if between_slices:
            self._current = (channel, items)
            self._current_done = 0
        else:
            self._unsafe += 1
        try:
            while done < n:
                k = cost.slice_records(n - done)
                chunk = items if (done == 0 and k >= n) else items[done : done + k]
                started = time.perf_counter()
                self._slice_started = time.monotonic()
                if cost.inline(len(chunk)):
                    try:
                        feed(chunk)
                    finally:
                        self._slice_started = None
                else:
                    self._unsafe += 1
                    try:
                        await loop.run_in_executor(self._user, feed, chunk)
                    finally:
                        self._unsafe -= 1
                        self._slice_started = None
                cost.observe(len(chunk), time.perf_counter() - started)
                done += len(chunk)
                self._current_done = done
                self._batch_left = n - done
                if done < n:
                    # Yield to the loop: Ray hands every call to this actor (control
                    # ones too) through one dispatcher, which waits while this loop
                    # runs user code without ever yielding.
                    await asyncio.sleep(0)
                    if between_slices and self._priority is not None:
                        await self._take_priority()
                    await self.outputs.flush()
                    if sliced_control and self._control:
                        await self._run_control()
        finally:
            if between_slices:
                self._current = None
            else:
                self._unsafe -= 1
        if self._priority is not None:
            await self._take_priority()

    async def _replay(self) -> None:
        """Restored from an unaligned snapshot: first what it had in flight.

        The records it had produced but not sent go out first, then the input it
        had not processed is processed; no snapshot is taken until that is done.
        """
        assert self.outputs is not None
        if not (self._replay_out or self._replay_in):
            return
        self._unsafe += 1
        try:
            for edge_id, records in self._replay_out:
                self._routes[edge_id](records)
            self._replay_out = []
            await self.outputs.flush()
            replay, self._replay_in = self._replay_in, []
            for edge_id, records in replay:
                await self._run_chain(self._entry[edge_id], records, sliced_control=False)
                await self.outputs.flush()
        finally:
            self._unsafe -= 1
        if self._priority is not None:
            await self._take_priority()

    # -- entry points for the control loop (another thread) ---------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the data plane's loop (from the control loop's thread)."""
        loop = self._loop
        if loop is None:
            fn(*args)  # not running yet: nothing else touches the task
        else:
            loop.call_soon_threadsafe(fn, *args)

    async def on_data_loop(self, coro: Awaitable[Any]) -> Any:
        """Await ``coro`` on the data plane's loop, from the control loop."""
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))  # type: ignore[arg-type]

    def _enqueue(self, action: Callable[[], Awaitable[None]]) -> None:
        self._control.append(action)
        self.mailbox.poke()

    def request_stop(self) -> None:
        """Sources stop reading; without checkpoints they end their streams at once."""
        self._stop_requested = True
        self.mailbox.poke()

    def finish(self) -> None:
        """End the streams (sent by the coordinator after the final checkpoint)."""
        self._finish_requested = True
        self.mailbox.poke()

    def trigger_checkpoint(self, barrier: snap.BarrierInfo) -> None:
        """Sources: snapshot offsets and send the barrier, before the next batch.

        Unaligned, the barrier goes out at once, ahead of what waits for credits.
        """
        if barrier.unaligned:
            self._request_unaligned(barrier)
        else:
            self._enqueue(lambda: self._checkpoint(barrier))

    # -- local recovery (docs/protocol.md, "Local recovery") ---------------

    def abort_checkpoints(self, upto: int) -> None:
        """Checkpoints up to ``upto`` are given up (a partition is restarted alone): an
        alignment in progress ends, and their barriers are ignored from now on."""
        self._last_barrier = max(self._last_barrier, upto)
        if self._aligning is not None and self._aligning.checkpoint_id <= upto:
            self._aligning = None
            self.mailbox.unblock_all()
        for old in [c for c in self._barrier_seqs if c <= upto]:
            del self._barrier_seqs[old]

    def reset_input(self, channels: list[ChannelId], gen: int) -> dict[ChannelId, Any]:
        """The sender of ``channels`` is being replaced by one of generation ``gen``: drop
        what the old one sent and was not taken; return its causal log as consumed here."""
        found: dict[ChannelId, Any] = {}
        for channel in channels:
            self._in_gen[channel] = gen
            self.mailbox.reset_channel(channel, 0)
            found[channel] = self._causal_store.get(channel)
        return found

    async def reconnect_output(self, edge: int, receiver: str, send: SendFn, after: int) -> int:
        """``receiver`` was replaced: send to the new one, first what was sent to the old
        one after checkpoint ``after`` (from the log). Returns the records resent."""
        assert self.outputs is not None
        for ch in self.outputs.channels:
            if ch.key == (edge, receiver):
                entries = ch.reconnect(send, after)
                task = asyncio.get_running_loop().create_task(ch.replay(entries))
                self._replays.add(task)
                task.add_done_callback(self._replays.discard)
                return sum(meta[1] for _, kind, _, meta in entries if kind == DATA)
        raise ValueError(f"{self.actor_name} sends nothing to {receiver} on edge {edge}")

    def _restore_locally(self, checkpoint_id: int, local: dict[str, Any]) -> None:
        """Restarted alone from ``checkpoint_id``: the channels where its barrier left them
        (when it was taken in this epoch; else they started there), and the order in
        which the first run took its input after it."""
        positions = local.get("positions")
        if positions is not None and positions.get("token") == self._positions_token:
            for edge, p, seq, records in positions["in"]:
                channel = (int(edge), int(p))
                if channel in self._in_records:
                    self.mailbox.reset_channel(channel, int(seq))
                    self._in_records[channel] = int(records)
            for edge, receiver, records in positions["out"]:
                self._restored_sent[(int(edge), str(receiver))] = int(records)
        self._forced = deque(local.get("forced") or ())
        nondeterminism.CURRENT.replay = self._forced
        # Barriers of the checkpoints given up for this recovery may come in the replay.
        self._last_barrier = max(self._last_barrier, int(local.get("aborted_upto", 0)))
        if self._causal is not None:
            self._causal.restart(checkpoint_id)

    # -- unaligned checkpoints ---------------------------------------------

    def _barrier_arrived(self, channel: ChannelId, seq: int, barrier: snap.BarrierInfo) -> None:
        """A barrier arrived (not yet popped): unaligned, it is acted on now."""
        cid = barrier.checkpoint_id
        capture = self._capture
        if capture is not None and capture.checkpoint_id == cid:
            capture.close(channel, seq)  # this channel's in-flight data ends here
            self._maybe_capture_done()
            return
        if cid <= self._last_barrier:
            return
        for old in [k for k in self._barrier_seqs if k < cid]:
            del self._barrier_seqs[old]
        self._barrier_seqs.setdefault(cid, {})[channel] = seq
        if barrier.unaligned:
            self._request_unaligned(barrier)
        elif barrier.aligned_timeout_s is not None:
            late = time.time() - barrier.triggered_at - barrier.aligned_timeout_s
            if late >= 0:
                self._request_unaligned(barrier)
            elif len(self._barrier_seqs[cid]) == 1:
                asyncio.get_running_loop().call_later(-late, self._alignment_timed_out, barrier)

    def _alignment_timed_out(self, barrier: snap.BarrierInfo) -> None:
        if barrier.checkpoint_id > self._last_barrier:
            self._request_unaligned(barrier)

    def _request_unaligned(self, barrier: snap.BarrierInfo) -> None:
        """Take an unaligned snapshot as soon as state is consistent (now, or after a slice)."""
        barrier = dataclasses.replace(barrier, unaligned=True)
        if self._unsafe or self._main is None:
            current = self._priority
            if current is None or barrier.checkpoint_id > current.checkpoint_id:
                self._priority = barrier
            return

        async def take() -> None:
            if self._unsafe:  # a slice started meanwhile: after it, then
                self._request_unaligned(barrier)
                return
            try:
                await self._take_unaligned(barrier)
            except Exception as exc:
                self._background_failed(barrier.checkpoint_id, exc)

        task = asyncio.get_running_loop().create_task(take())
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    def _background_failed(self, checkpoint_id: int, exc: BaseException) -> None:
        """A snapshot taken beside the loop failed: never silently (R14).

        The checkpoint is declined at once (not left to expire), and a user
        error (a sink that cannot stage) fails the task like it would in line.
        """
        self._decline(checkpoint_id, f"taking the snapshot failed: {type(exc).__name__}: {exc}")
        if isinstance(exc, UserCodeError) and self._deferred_failure is None:
            self._deferred_failure = exc
            self.mailbox.poke()  # the main loop raises it

    async def _take_priority(self) -> None:
        """At a safe point: the unaligned snapshot asked for while state was changing."""
        if self._unsafe:
            return  # still not: the outer caller takes it
        barrier, self._priority = self._priority, None
        if barrier is not None:
            await self._take_unaligned(barrier)

    async def _take_unaligned(self, barrier: snap.BarrierInfo) -> None:
        """Snapshot state now, send the barrier ahead of the data, keep what it overtook."""
        assert self.outputs is not None
        cid = barrier.checkpoint_id
        if cid <= self._last_barrier:
            return
        self._last_barrier = cid
        if self._aligning is not None:  # an alignment in progress turns unaligned
            self._aligning = None
            self.mailbox.unblock_all()
        if self._capture is not None:  # an older capture never completed: given up
            self._capture = None
        taken = self._snapshot_or_decline(barrier, snap.dumps_value)
        if taken is None:
            self.outputs.send_priority(BARRIER, barrier)
            return
        state, mode, sources = taken
        outflight = self.outputs.unsent()
        capture = InflightCapture(cid, list(self.mailbox.channels))
        arrived = self._barrier_seqs.pop(cid, {})
        for channel in self.mailbox.channels:
            start = self.mailbox.next_unconsumed(channel)
            if channel not in self._open:
                capture.begin(channel, start, [], start)  # ended: nothing in flight
                continue
            capture.begin(channel, start, self.mailbox.unconsumed(channel), arrived.get(channel))
        if self._current is not None:
            current_channel, items = self._current
            if current_channel is not None:
                capture.partial[current_channel] = items[self._current_done :]
        self.outputs.send_priority(BARRIER, barrier)
        self._capture = capture
        self._capture_done = (barrier, state, mode, sources, outflight)
        self._maybe_capture_done()

    def _maybe_capture_done(self) -> None:
        capture = self._capture
        if capture is None or not capture.complete or self._capture_done is None:
            return
        barrier, state, mode, sources, outflight = self._capture_done
        self._capture = self._capture_done = None
        inflight = {"input": capture.data(), "output": outflight}
        data = snap.encode_with_inflight(state, inflight)
        task = asyncio.get_running_loop().create_task(
            self._upload(barrier, data, mode, sources, inflight=True)
        )
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    async def notify_complete(self, checkpoint_id: int, epoch: int | None = None) -> None:
        """Checkpoint ``checkpoint_id`` is committed: sinks publish what it covers.

        A notification of another epoch is dropped: it was sent before a
        restart, and the restore re-issues whatever it covered.
        """
        if self._ended or (epoch is not None and epoch != self.epoch):
            return
        if self._log is not None:
            self._log.trim(checkpoint_id)
            if self._causal is not None:
                self._causal.trim(checkpoint_id)
            for old in [c for c in self._positions_at if c < checkpoint_id]:
                del self._positions_at[old]
        if self.is_source:
            # What a restart would replay starts at this checkpoint now (R: bounded).
            emitted = self._emitted_at_barrier.get(checkpoint_id)
            if emitted is not None:
                self._committed_emitted = max(self._committed_emitted, emitted)
            for old in [c for c in self._emitted_at_barrier if c < checkpoint_id]:
                del self._emitted_at_barrier[old]
            self.mailbox.poke()  # a source paused on the bound may go on
        if not self._sinks:
            return
        # Commits run beside the processing (an outage must not stop it): the
        # committer publishes in order and retries what cannot be reached now.
        self._commit_target = max(self._commit_target, checkpoint_id)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_loop())
        self._commit_wake.set()
        while self._committed_to < checkpoint_id and not self._ended:
            if self._committer.done():
                self._committer.result()  # raises what stopped it
                return
            self._commit_done.clear()
            await self._commit_done.wait()

    async def _commit_loop(self) -> None:
        try:
            while not self._ended:
                target = self._commit_target
                await self._commit_up_to(target)
                self._committed_to = max(self._committed_to, target)
                for staged in self._staged_at.values():
                    for old in [c for c in staged if c < self._committed_to]:
                        del staged[old]
                self._commit_done.set()
                if self._commit_target == target:
                    self._commit_wake.clear()
                    await self._commit_wake.wait()
        except UserCodeError as exc:
            self._deferred_failure = exc
            self._commit_done.set()
            self.mailbox.poke()  # the main loop raises it
            raise

    async def _run_control(self) -> None:
        while self._control:
            await self._control.popleft()()

    # -- the loop ----------------------------------------------------------

    async def run(self) -> TaskOutcome:
        assert self.outputs is not None, "connect() first"
        self._main = asyncio.current_task()
        try:
            if self.is_source:
                # Before anything can take a snapshot (the replay ends with one if
                # asked for): a source's position is defined once its readers are open.
                self._open_readers()
            await self._replay()
            if self._priority is not None:
                # An unaligned trigger that came before the task ran (R11): now that its
                # position exists. Nothing else might take it: a source at its end reads
                # nothing more, an operator may get no more input.
                await self._take_priority()
            if self.time.enabled:
                await self._advance_time(force=True)  # a restored watermark goes out
            if self.is_source:
                await self._run_source()
            else:
                await self._run_operator()
            await self._finish()
        except UserCodeError as exc:
            return self._outcome(exc.failure(self.partition))
        except UnroutableKey as exc:
            return self._outcome(
                UserCodeError(self._key_step(), exc.record, exc.cause).failure(self.partition)
            )
        except asyncio.CancelledError:
            return self._outcome(
                Failure(
                    kind="reset",
                    message="reset for a restart",
                    step=self.stage.name,
                    partition=self.partition,
                )
            )
        except ChannelBroken as exc:
            return self._outcome(
                Failure(
                    kind="channel",
                    message=str(exc),
                    step=self.stage.name,
                    partition=self.partition,
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
        finally:
            # Not self._io: a partition whose input ended may still be asked for a
            # snapshot (a checkpoint triggered as it ended, the final one) and must
            # upload it; shutdown() ends the I/O pool when the task is replaced.
            self._user.shutdown(wait=False)
        return self._outcome(None)

    def _open_readers(self) -> None:
        """Open this partition's source readers at the restored offsets."""
        head = self.ops[self.stage.steps[0]]
        spec = self.plan.step(head.name)
        for sp in self.plan.source_partitions(self.stage.name, self.partition):
            offset = self._start_offsets.get(sp)
            try:
                self._readers[sp] = spec.connector.open(sp, offset)
            except Exception as exc:
                raise UserCodeError(
                    head.name, None, exc, what=f"opening source partition {sp} at {offset!r}"
                ) from exc
            self._offsets[sp] = self._readers[sp].offset()
        for gen in self.time.generators:
            gen.set_splits(list(self._readers))  # a watermark per source partition

    def _feed_of(self, step: str) -> Feed:
        """Where records for ``step`` go in: its ``feed``, behind ``exploding`` if the
        flow makes chunks of columns and the step takes records."""
        op = self.ops[step]
        plan = self.plan
        if not plan.columnar:
            return op.feed
        spec = plan.step(step)
        mixed = spec.kind is StepKind.UNION and step not in plan.chunk_steps
        if mixed or not op.takes_columns:
            return exploding(op.feed)  # records, or a union of chunks and records: rows
        return op.feed

    def _routed(self) -> int:
        """Records the chain handed to its output channels so far."""
        return sum(self.ops[self.plan.edges[e].src_step].records_out for e in self.stage.outputs)

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

    async def _idle(self, timeout: float | None) -> None:
        """Wait for input or control work (at most ``timeout`` s), counted as idle time."""
        self.clock.switch(IDLE)
        if self.is_source:
            # Sources never pop the mailbox (which clears its event), so clear it
            # here, before looking for work: a poke after this point wakes us.
            self.mailbox.clear_ready()
            if self._control or self._finish_requested:
                timeout = 0.0
        await self.mailbox.wait(timeout)
        self.clock.switch(BUSY)

    async def _run_operator(self) -> None:
        mailbox = self.mailbox
        outputs = self.outputs
        assert outputs is not None
        entry = self._entry
        event_time = self.time.enabled
        while self._open:
            if self._control:
                await self._run_control()
            if self._deferred_failure is not None:
                raise self._deferred_failure
            forced = self._forced
            if forced and self._multi_input:
                while forced and not isinstance(forced[0], int):
                    forced.popleft()  # a value the replay did not draw again
            if forced and isinstance(forced[0], int):
                # Restarted alone: the input in the order the first run took it.
                env = mailbox.pop_from(mailbox.channels[forced[0]])
                if env is None:
                    await asyncio.sleep(0.001)
                    continue
                forced.popleft()
            else:
                env = mailbox.pop()
            if env is not None and self._log is not None:
                env = self._took(env)
                if env is _SKIPPED:
                    continue
            if env is None:
                await outputs.flush()
                if event_time:
                    await self._advance_time()
                deadline = _earliest(outputs.next_deadline(), self.time.next_deadline(self._open))
                await self._idle(
                    None if deadline is None else max(0.0, deadline - time.monotonic())
                )
                continue
            if env.kind == DATA:
                if self.first_data_at is None:
                    self.first_data_at = time.time()
                items = serde.loads(env.payload)
                self._taken += len(items)
                await self._run_chain(
                    entry[env.channel[0]], items, sliced_control=True, channel=env.channel
                )
                await outputs.flush()
                if event_time:
                    await self._advance_time()
            elif env.kind == WATERMARK:
                watermark, idle = env.payload
                self.time.on_watermark(env.channel, watermark, idle)
                await self._advance_time()
            elif env.kind == BARRIER:
                await self._on_barrier(env.channel, env.payload, env.seq)
            elif env.kind == EOS:
                self._open.discard(env.channel)
                await self._maybe_aligned()
            # Let queued calls (pushes, metrics, control) in between batches.
            await asyncio.sleep(0)
            self._sample_rates()

    async def _run_source(self) -> None:
        outputs = self.outputs
        assert outputs is not None
        head = self.ops[self.stage.steps[0]]
        assert isinstance(head, SourceOp)
        active = list(self._readers)
        reported_done = False
        while True:
            if self._control:
                await self._run_control()
            if self._finish_requested:
                break
            if not active and self.time.enabled and not self.time.input_ended:
                # Every reader ended (not a stop): event time runs out, so every
                # window fires now, before the final checkpoint commits it.
                self.time.input_ended = True
                await self._advance_time(force=True)
            if not active or self._stop_requested:
                if not self.checkpointing:
                    break
                # With checkpoints the stream ends after a final checkpoint:
                # tell the coordinator, then keep serving barriers until told to finish.
                if not reported_done:
                    reported_done = True
                    await outputs.flush(force=True)
                    assert self._coordination is not None
                    self._coordination.source_done(self.epoch)
                await self._idle(None)
                continue
            if self._deferred_failure is not None:
                raise self._deferred_failure
            limit = self._max_uncommitted
            if limit is not None and head.records_out - self._committed_emitted >= limit:
                # Checkpoints are not completing (the storage is down?): what a restart
                # would replay, and what sinks stage, must not grow without bound.
                self.clock.switch(BACKPRESSURED)
                self.mailbox.clear_ready()
                await self.mailbox.wait(SOURCE_POLL_S * 20)
                self.clock.switch(BUSY)
                continue
            progressed = False
            caught_up = True  # every read returned less than it was asked for
            log_reads = self._causal is not None and len(self._readers) > 1
            # With one reader the log holds only ctx.now()/ctx.random() values.
            forced = self._forced if log_reads else None
            while forced and not isinstance(forced[0], tuple):
                forced.popleft()  # a value the replay did not draw again
            for sp in [forced[0][0]] if forced else list(active):
                reader = self._readers[sp]
                # Read about one slice of the chain's work (a checkpoint trigger, taken
                # between reads where the offsets match what was emitted, waits no
                # longer), and no more than the receivers asked for in one batch each:
                # what they cannot take yet stays unread, not buffered here.
                room = outputs.room()
                if room <= 0:
                    await outputs.flush()  # full batches wait for credits here
                    caught_up = False
                    continue
                wanted = min(self.config.batch_size, max(1, int(room / self._fanout)))
                if limit is not None:
                    # Never read past the bound: it holds exactly, not within a read.
                    budget = limit - (head.records_out - self._committed_emitted)
                    if budget <= 0:
                        break
                    wanted = min(wanted, budget)
                batch_size = self._cost.slice_records(wanted)
                if forced:
                    # Restarted alone: the reads of the first run, split by split, record
                    # for record (a read may come back short: collect the rest first).
                    batch_size = forced[0][1] - len(self._replay_read)
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
                    if forced:  # it ended sooner than in the first run: no more to follow
                        forced.clear()
                        self._replay_read = []
                    active.remove(sp)
                    for gen in self.time.generators:
                        gen.ended.add(sp)
                    continue
                if forced:
                    self._replay_read.extend(items)
                    if len(self._replay_read) < forced[0][1]:
                        continue  # its offset moves once the whole read is emitted
                    forced.popleft()
                    items, self._replay_read = self._replay_read, []
                if log_reads and items:
                    assert self._causal is not None
                    self._causal.entries.append((sp, len(items)))
                self._offsets[sp] = reader.offset()
                # A chunked read counts its rows (a reader of chunks returns whole
                # chunks while they are due: any chunk means it has not caught up).
                read = rows_in(items)
                if read >= batch_size or read > len(items):
                    caught_up = False
                if items:
                    progressed = True
                    if self.first_data_at is None:
                        self.first_data_at = time.time()
                    routed = self._routed()
                    for gen in self.time.generators:
                        gen.split = sp
                    await self._run_chain(head.emit, items, sliced_control=False)
                    # Output records per record read (a flat_map fans out): reads are
                    # sized in input records, the receivers' wishes in output records.
                    fanout = (self._routed() - routed) / read
                    self._fanout += 0.3 * (max(fanout, 0.01) - self._fanout)
                    await outputs.flush()
            if self.time.enabled:
                await self._advance_time()
            if active and (caught_up or not progressed):
                await outputs.flush()
                wait = CAUGHT_UP_POLL_S if progressed else SOURCE_POLL_S
                deadline = _earliest(outputs.next_deadline(), self.time.next_deadline(self._open))
                if deadline is not None:  # never hold a batch past its linger time
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                await self._idle(wait)
            else:
                await asyncio.sleep(0)
            self._sample_rates()
        for reader in self._readers.values():
            reader.close()

    async def _advance_time(self, *, force: bool = False) -> None:
        """Fire what the watermark allows, then send it on if it is due."""
        assert self.outputs is not None
        time_ = self.time
        if time_.timed:
            time_.advance(self._open)
            await self.outputs.flush()
        else:
            time_._update_input(self._open)
        now = time.monotonic()
        message = time_.due(self._open, now, force=force)
        if message is not None:
            await self.outputs.send_control(WATERMARK, message)
            time_.mark_sent(message, now)

    async def _finish(self) -> None:
        """End of input: flush, end every output stream, wait for it, close sinks."""
        assert self.outputs is not None
        self._finishing = True
        await self.outputs.send_control(EOS, None)
        await self.outputs.drain()
        for op in self._sinks:
            if not self.checkpointing:
                # Without checkpoints a sink commits once, at the end of its input.
                try:
                    committable = op.writer.prepare_commit(self._final_checkpoint_id)
                except Exception as exc:
                    raise _sink_error(op, exc) from exc
                self._committables[op.name].append((self._final_checkpoint_id, committable))
                await self._commit_up_to(self._final_checkpoint_id)
            try:
                op.writer.close()
            except Exception as exc:
                raise _sink_error(op, exc) from exc
        await self._run_control()
        self._ended = True
        # The committer waits for a next checkpoint there will not be: let it return
        # (left pending, asyncio warns "Task was destroyed but it is pending" at exit).
        self._commit_wake.set()

    # -- checkpoints -------------------------------------------------------

    def _took(self, env: Any) -> Any:
        """Local recovery's bookkeeping of a taken envelope; ``_SKIPPED`` if all of its
        records were consumed before (a restarted sender emits them again)."""
        channel = env.channel
        if self._causal is not None and self._multi_input:
            self._causal.entries.append(self._channel_index[channel])
        meta = env.meta
        if meta is None:
            return env
        if meta[2] is not None:
            self._causal_store.add(channel, meta[2])
        if env.kind != DATA:
            if env.kind == BARRIER and meta[1] < self._in_records[channel]:
                # A restarted sender's barrier before it re-emitted all this partition
                # consumed from it: its snapshot would be behind this one (rule P8).
                self._cut_behind[env.payload.checkpoint_id] = (
                    channel,
                    meta[1],
                    self._in_records[channel],
                )
            return env
        first = meta[1]
        had = self._in_records[channel]
        self._in_records[channel] = max(had, first + env.records)
        if first >= had:
            return env
        # A restarted sender emits again what this partition already consumed.
        skip = had - first
        if skip >= env.records:
            return _SKIPPED
        items = serde.loads(env.payload)[skip:]
        return dataclasses.replace(env, payload=serde.dumps(items), records=len(items))

    async def _on_barrier(
        self, channel: ChannelId, barrier: snap.BarrierInfo, seq: int = -1
    ) -> None:
        self._barrier_in_seq[channel] = seq
        cid = barrier.checkpoint_id
        current = self._aligning
        if cid <= self._last_barrier or (current is not None and cid < current.checkpoint_id):
            return  # stale: a checkpoint given up before this one started
        if current is not None and cid > current.checkpoint_id:
            # A newer barrier: the coordinator gave up the one being aligned.
            self._aligning = None
            self.mailbox.unblock_all()
        if self._aligning is None:
            self._aligning = barrier
            self._aligned = set()
            self._align_started = time.monotonic()
        self._aligned.add(channel)
        if self._align:  # exactly-once: hold this channel back until all have the barrier
            self.mailbox.block(channel)
        await self._maybe_aligned()

    async def _maybe_aligned(self) -> None:
        """Once every open channel delivered the barrier: checkpoint, then release them."""
        barrier = self._aligning
        if barrier is None or not self._aligned >= self._open:
            return
        self._aligning = None
        self.last_alignment_ms = (time.monotonic() - self._align_started) * 1000.0
        await self._checkpoint(barrier)
        self.mailbox.unblock_all()

    async def _checkpoint(self, barrier: snap.BarrierInfo) -> None:
        """Snapshot now, forward the barrier, upload and acknowledge in the background."""
        assert self.outputs is not None
        cid = barrier.checkpoint_id
        if self.is_source and cid <= self._last_barrier:
            return  # triggered before it was given up (a partial recovery aborted it)
        self._last_barrier = max(self._last_barrier, cid)
        # Step 1. Snapshot synchronously: the state matches the barrier's position.
        taken = self._snapshot_or_decline(barrier, snap.encode)
        if taken is None:
            await self.outputs.send_control(BARRIER, barrier)
            return
        data, mode, sources = taken
        # Step 2. Forward the barrier behind everything already emitted.
        await self.outputs.send_control(BARRIER, barrier)
        if self._log is not None:
            self._positions_at[cid] = self._positions()
            self._log.mark(cid)
            if self._causal is not None:
                self._causal.mark(cid)  # trimmed once the checkpoint completes (P10)
        # Step 3. Upload while processing goes on; acknowledge when written.
        task = asyncio.get_running_loop().create_task(self._upload(barrier, data, mode, sources))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)

    def _positions(self) -> dict[str, Any]:
        """Where every channel is at the barrier just sent (local recovery restores it)."""
        assert self.outputs is not None
        inputs = []
        for ch in self.mailbox.channels:
            seq = self._barrier_in_seq.get(ch) if ch in self._open else None
            after = seq + 1 if seq is not None and seq >= 0 else self.mailbox.next_unconsumed(ch)
            inputs.append([ch[0], ch[1], after, self._in_records[ch]])
        outputs = [[c.key[0], c.key[1], c.records_sent] for c in self.outputs.channels]
        return {"token": self._positions_token, "in": inputs, "out": outputs}

    def _snapshot_or_decline(
        self, barrier: snap.BarrierInfo, encode: Callable[[dict[str, Any]], bytes]
    ) -> tuple[bytes, str, dict[str, dict[str, dict[str, Any]]]] | None:
        """The encoded snapshot, or None after declining the checkpoint (the caller
        still forwards the barrier, so that the operators downstream are not held up)."""
        cid = barrier.checkpoint_id
        if self._finishing:
            # Its streams are ending and its sinks closed (R14): nothing to snapshot.
            self._decline(cid, f"partition {self.partition} has ended its streams")
            return None
        behind = self._cut_behind.get(cid)
        for old in [c for c in self._cut_behind if c <= cid]:
            del self._cut_behind[old]
        if behind is not None:
            channel, sent, consumed = behind
            self._decline(
                cid,
                f"partition {self.partition} had consumed {consumed} records on channel "
                f"{channel}, and the sender that restarted alone had sent only {sent} of "
                "them again when it took its snapshot: the checkpoint would count the "
                "others twice (rule P8); the next one is taken once it caught up",
            )
            return None
        if len(self._uploading) >= MAX_UPLOADS:
            # The storage is slow or down: a bounded number of snapshots in memory.
            self._decline(cid, self._still_uploading())
            return None
        try:
            doc, mode, sources = self._snapshot(barrier)
            return encode(doc), mode, sources
        except UserCodeError:
            raise
        except Exception as exc:
            self._decline(cid, f"taking the snapshot failed: {type(exc).__name__}: {exc}")
            return None

    def _snapshot(
        self, barrier: snap.BarrierInfo
    ) -> tuple[dict[str, Any], str, dict[str, dict[str, dict[str, Any]]]]:
        """The snapshot document (refers to live state: encode it before going on)."""
        cid = barrier.checkpoint_id
        doc: dict[str, Any] = {
            "stage": self.stage.name,
            "partition": self.partition,
            "checkpoint_id": cid,
            "sources": {},
            "keyed": None,
            "sinks": self._stage_sinks(barrier),
        }
        sources: dict[str, dict[str, dict[str, Any]]] = {}
        event_time = self.time.snapshot()
        if event_time is not None:
            doc["event_time"] = event_time
            self._event_time_at[cid] = event_time
        if self.is_source:
            head = self.stage.steps[0]
            owned = set(self.plan.source_partitions(self.stage.name, self.partition))
            if set(self._offsets) != owned:  # R11: no position, no snapshot
                raise RuntimeError(
                    f"source offsets of partitions {sorted(owned - set(self._offsets))} are "
                    "not known yet (the readers are not open)"
                )
            self._emitted_at_barrier[cid] = self.ops[head].records_out
            doc["sources"][head] = dict(self._offsets)
            sources[head] = {str(sp): encode_offset(o) for sp, o in self._offsets.items()}
        mode = "plain"
        if self._keyed is not None:
            assert self._tracker is not None
            values = self._keyed.state.values
            if barrier.kind == CHECKPOINT:
                keyed = self._tracker.take(
                    cid, barrier.last_completed, values, self._keyed.take_changes()
                )
                if not self._keyed.tracking and len(values) >= snap.INCREMENTAL_MIN_KEYS:
                    # Large enough for deltas to pay: track changes from now on
                    # (this snapshot, untracked, was a full one: the chain's base).
                    self._keyed.track_changes()
            else:  # a savepoint is full and self-contained, and leaves the chain alone
                keyed = {"mode": "full", "values": values, "deleted": []}
            doc["keyed"] = {"step": self._keyed.name, **keyed}
            mode = keyed["mode"]
        return doc, mode, sources

    def _stage_sinks(self, barrier: snap.BarrierInfo) -> dict[str, list[tuple[int, Any]]]:
        """Sinks stage what they got (first: a sink that cannot reach its destination
        declines the checkpoint before any state was touched)."""
        cid = barrier.checkpoint_id
        staged: dict[str, list[tuple[int, Any]]] = {}
        for op in self._sinks:
            if barrier.kind == CHECKPOINT:  # a savepoint stages nothing (see above)
                try:
                    committable = op.writer.prepare_commit(cid)
                except TransientSinkError:
                    raise  # declined; what it holds stays for the next checkpoint
                except Exception as exc:
                    raise _sink_error(op, exc) from exc
                self._committables[op.name].append((cid, committable))
                self._staged_at[op.name][cid] = op.records_in
            staged[op.name] = list(self._committables[op.name])
        return staged

    async def _upload(
        self,
        barrier: snap.BarrierInfo,
        data: bytes,
        mode: str,
        sources: dict[str, dict[str, dict[str, Any]]],
        *,
        inflight: bool = False,
    ) -> None:
        cid = barrier.checkpoint_id
        key = barrier.object_key(self.stage.name, self.partition)
        started = time.monotonic()
        self._uploading.add(cid)
        try:
            # Each call tried once: create_once asks again for a few seconds on its own,
            # then the checkpoint is declined. With the client's retries (~15 s of
            # backoff) an upload begun in an outage held back every checkpoint after
            # the storage was back ("still being written").
            storage = open_storage(barrier.storage).fail_fast()
            digest = await asyncio.get_running_loop().run_in_executor(
                self._io, _create_and_hash, storage, key, data
            )
        except Exception as exc:
            self._decline(cid, f"writing {key} to {barrier.storage} failed: {exc}")
            return
        finally:
            self._uploading.discard(cid)
        obj = ObjectInfo(key=key, size=len(data), sha256=digest, checkpoint_id=cid, mode=mode)
        chain: tuple[ObjectInfo, ...] = ()
        key_groups = None
        keyed_step = None
        if self._keyed is not None:
            assert self._tracker is not None
            keyed_step = self._keyed.name
            groups = key_group_range(
                self.partition, self.plan.flow.max_parallelism, self.stage.parallelism
            )
            key_groups = (groups.start, groups.stop)
            if barrier.kind == CHECKPOINT:
                chain = tuple(self._tracker.written(cid, obj))
            else:
                chain = (obj,)
        self.last_snapshot = {
            "checkpoint_id": cid,
            "bytes": len(data),
            "mode": mode,
            "unaligned": inflight,
            "upload_ms": (time.monotonic() - started) * 1000.0,
        }
        event_time = self._event_time_at.pop(cid, None)
        for old in [c for c in self._event_time_at if c < cid]:
            del self._event_time_at[old]
        if self._coordination is not None:
            self._coordination.acknowledge(
                cid,
                OperatorSnapshot(
                    stage=self.stage.name,
                    partition=self.partition,
                    object=obj,
                    keyed_step=keyed_step,
                    key_groups=key_groups,
                    chain=chain,
                    sources=sources,
                    inflight=inflight,
                    event_time=event_time,
                    positions=self._positions_at.pop(cid, None),
                ),
            )

    def _still_uploading(self) -> str:
        return (
            f"the snapshots of checkpoints {sorted(self._uploading)} are still being written "
            "(the storage is slow or unreachable); this one is skipped"
        )

    def _decline(self, checkpoint_id: int, reason: str) -> None:
        if self._coordination is not None:
            self._coordination.decline(checkpoint_id, reason)

    async def _commit(self, op: SinkOp, committable: Any) -> None:
        """Run one commit in a thread; a reset waits for it rather than abandoning it.

        A commit that cannot reach its destination now (``TransientSinkError``)
        is tried again with backoff (commits are idempotent) until it goes
        through or the task is reset; any other error fails the job.
        """
        pause = COMMIT_RETRY_S
        while True:
            future = asyncio.ensure_future(asyncio.to_thread(op.writer.commit, committable))
            self._commits.add(future)
            future.add_done_callback(self._commits.discard)
            try:
                await asyncio.shield(future)
                return
            except asyncio.CancelledError:
                raise
            except TransientSinkError as exc:
                log.warning(
                    "sink %s: commit deferred (%s); retrying in %.1f s", op.name, exc, pause
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, COMMIT_RETRY_MAX_S)
            except Exception as exc:
                raise _sink_error(op, exc) from exc

    async def _commit_up_to(self, checkpoint_id: int) -> None:
        """Publish every staged committable of checkpoints up to ``checkpoint_id``, in order."""
        for op in self._sinks:
            pending = self._committables[op.name]
            while pending and pending[0][0] <= checkpoint_id:
                await self._commit(op, pending[0][1])
                pending.pop(0)

    async def shutdown(self, restore_to: int | None) -> int:
        """Stop this task for a restart from checkpoint ``restore_to``.

        Returns how many records its sources emitted after that checkpoint,
        which they will emit again.

        The loop is cancelled, commits in flight are awaited (never two
        commits of a sink at once), senders waiting on the mailbox are
        released, and readers and writers are closed without committing.
        """
        main = self._main
        if main is not None and not main.done() and main is not asyncio.current_task():
            main.cancel()
            await asyncio.wait([main], timeout=10)
        if self._committer is not None and not self._committer.done():
            self._committer.cancel()
            await asyncio.wait([self._committer], timeout=5)
        if self._commits:
            await asyncio.wait(list(self._commits), timeout=60)
        self.mailbox.clear()
        self._ended = True
        for replay in list(self._replays):
            replay.cancel()
        if self._log is not None:
            self._log.close()
        for reader in self._readers.values():
            with contextlib.suppress(Exception):
                reader.close()
        for op in self._sinks:
            with contextlib.suppress(Exception):
                op.close()
        self._io.shutdown(wait=False)
        self._user.shutdown(wait=False)
        if not self.is_source:
            return 0
        emitted = self.ops[self.stage.steps[0]].records_out
        # A checkpoint whose barrier this task never saw is the one it started
        # from (or none): everything it emitted came after it.
        return emitted - self._emitted_at_barrier.get(restore_to or 0, 0)

    # -- restore -----------------------------------------------------------

    async def restore(
        self, assignment: Assignment | None, local: dict[str, Any] | None = None
    ) -> None:
        """Load this partition's share of a checkpoint before the task runs.

        ``local``: restarted alone (local recovery): channel positions and the
        logged input order (see :meth:`_restore_locally`); ``assignment`` is None
        when no checkpoint completed yet (the job's start is the point)."""
        if assignment is None:
            if local is not None:
                self._restore_locally(0, local)
            return
        if self._log is not None:
            self._log.start(assignment.checkpoint_id)
        if local is not None:
            self._restore_locally(assignment.checkpoint_id, local)
        elif self._causal is not None:
            self._causal.restart(assignment.checkpoint_id)
        storage = open_storage(assignment.storage)
        infos: dict[str, ObjectInfo] = {}
        for chain in assignment.keyed_chains:
            for info in chain:
                infos[info.key] = info
        for _, info in assignment.sink_objects:
            infos[info.key] = info
        for _, info in assignment.inflight:
            infos[info.key] = info
        loop = asyncio.get_running_loop()
        docs: dict[str, dict[str, Any]] = {}
        for key, info in infos.items():
            docs[key] = await loop.run_in_executor(self._io, _get_and_check, storage, info)

        self._start_offsets = dict(assignment.source_offsets)
        if self._keyed is not None:
            keep = None
            if assignment.key_filter is not None:
                start, stop, max_par = assignment.key_filter

                def keep(key: Any) -> bool:
                    return start <= stable_hash(key) % max_par < stop

            values: dict[Any, Any] = {}
            for chain in assignment.keyed_chains:
                values.update(snap.apply_chain([docs[i.key] for i in chain], keep))
            self._keyed.state.values = values
            if self._tracker is not None:
                chain_list = list(assignment.continue_chain) if assignment.continue_chain else None
                self._tracker.reset(chain_list)
                if len(values) >= snap.INCREMENTAL_MIN_KEYS:
                    self._keyed.track_changes()
        self.time.restore(assignment.event_time)
        if assignment.inflight:
            self._load_inflight(assignment, docs)
        sinks = {op.name: op for op in self._sinks}
        for sink in sinks.values():
            sink.open(assignment.checkpoint_id)
        # Re-issue the commits the checkpoint covers (commit is idempotent).
        restored: list[tuple[int, str, Any]] = []
        for step, info in assignment.sink_objects:
            for cid, committable in docs[info.key]["sinks"].get(step, []):
                restored.append((cid, step, committable))
        for _, step, committable in sorted(restored, key=lambda r: r[0]):
            await self._commit(sinks[step], committable)
        self._committed_to = assignment.checkpoint_id
        for name in self._staged_at:
            self._staged_at[name] = {assignment.checkpoint_id: 0}

    def _load_inflight(self, assignment: Assignment, docs: dict[str, dict[str, Any]]) -> None:
        """This partition's share of the in-flight data of unaligned snapshots.

        At the same parallelism it is its own; rescaled, input that came over a
        keyed shuffle goes by key group, and the rest (and unsent output) goes
        to partition ``old % new``.
        """
        new_par = self.stage.parallelism
        rescaled = assignment.old_parallelism != new_par
        max_par = self.plan.flow.max_parallelism
        mine_groups = key_group_range(self.partition, max_par, new_par)
        for old_p, info in sorted(assignment.inflight, key=lambda x: x[0]):
            inflight = docs[info.key].get("inflight") or {}
            mine = not rescaled or old_p % new_par == self.partition
            for channel in sorted(inflight.get("input", {})):
                part = inflight["input"][channel]
                edge = self.plan.edges[channel[0]]
                records = list(part["partial"])
                for payload in part["batches"]:
                    records.extend(serde.loads(payload))
                if rescaled and edge.partitioning is Partitioning.HASH:
                    records = [r for r in records if stable_hash(r[0]) % max_par in mine_groups]
                elif not mine:
                    continue
                if records:
                    self._replay_in.append((channel[0], records))
            if mine:
                for edge_id, records in sorted(inflight.get("output", {}).items()):
                    self._replay_out.append((edge_id, records))

    # -- observation -------------------------------------------------------

    def _counters(self) -> tuple[float, ...]:
        busy, idle, bp = self.clock.totals()
        per_op = [v for op in self.ops.values() for v in (op.records_in, op.records_out)]
        return (busy, idle, bp, *per_op)

    def _sample_rates(self) -> None:
        """Keep the rate window (and the drain rate) fed even when nobody asks for metrics."""
        if self._rates.due():
            counters = self._counters()
            with self._metrics_lock:
                self._rates.rates(counters)
            self._debloat.sample(counters[0] + counters[2], self._taken)

    def metrics(self) -> list[dict[str, Any]]:
        """Per step of the chain, its figures (called from the control loop's thread:
        it only reads, and copies what the data plane changes)."""
        with self._metrics_lock:
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
            if head:
                # In-flight data by time: what is queued here, in seconds of this
                # stage's work, and the batch size it asks its senders for.
                queued = self.mailbox.records + self._batch_left
                entry["inflight_records"] = queued
                entry["inflight_s"] = self._debloat.inflight_s(queued)
                entry["batch_hint"] = self.batch_hint()[0] if self.mailbox.channels else 0
                per_record = self._cost.per_record
                entry["ms_per_record"] = per_record * 1000.0 if per_record is not None else None
                started = self._slice_started
                entry["in_user_code_s"] = time.monotonic() - started if started else 0.0
            entry["records_failed"] = op.records_failed
            if head and self.time.enabled:
                entry.update(self.time.figures())
            if hasattr(op, "records_late"):
                entry["records_late"] = op.records_late
                wm = op.watermark  # type: ignore[attr-defined]
                entry["watermark"] = wm if math.isfinite(wm) else None
            partials = getattr(op, "partials_in", None)
            if partials is not None:  # a window with combine=True
                entry["partials_in"] = partials
            if op.state_size is not None:
                entry["state_keys"] = op.state_size
            if isinstance(op, KeyedOp):
                sampled, groups = op.key_groups_sample(self.plan.flow.max_parallelism)
                entry["sampled_records"] = sampled
                entry["hot_key_groups"] = groups
                entry["key_groups"] = len(
                    key_group_range(
                        self.partition, self.plan.flow.max_parallelism, self.stage.parallelism
                    )
                )
            if isinstance(op, SinkOp):
                # Taken in, not committed yet (staged, or still in the writer).
                staged = dict(self._staged_at[name])  # one C-level copy: the loop changes it
                committed = staged.get(self._committed_to)
                if committed is None:
                    done = [n for c, n in staged.items() if c <= self._committed_to]
                    committed = max(done) if done else 0
                entry["uncommitted_records"] = op.records_in - committed
                spilled = getattr(op._writer, "spilled_bytes", None)
                if spilled is not None:
                    entry["spilled_bytes"] = spilled
            if head and self.is_source:
                entry["uncommitted_records"] = op.records_out - self._committed_emitted
                backlogs = [_reader_backlog_of(r) for r in list(self._readers.values())]
                known = [b for b in backlogs if b is not None]
                entry["source_backlog"] = sum(known) if known else None
                # Kafka readers: records after their positions, in all and per topic partition.
                # (A Kafka reader's lag is its backlog: the sum is source_backlog.)
                kafka: list[Any] = [r for r in self._readers.values() if hasattr(r, "kafka_lag")]
                if kafka:
                    entry["kafka_lag"] = entry["source_backlog"]
                    lags = {r.kafka_partition: r.kafka_lag for r in kafka}
                    entry["kafka_lag_by_partition"] = lags
            if self.checkpointing and head:
                entry["alignment_ms"] = self.last_alignment_ms
                entry["last_snapshot"] = dict(self.last_snapshot)
            result.append(entry)
        return result


def _combined(
    combine: Callable[[list[Any]], list[Any]], route: Callable[[list[Any]], None]
) -> Callable[[list[Any]], None]:
    def routed(items: list[Any]) -> None:
        route(combine(items))

    return routed


def _create_and_hash(storage: Storage, key: str, data: bytes) -> str:
    """Create a snapshot object: never over another (a key names its run and checkpoint)."""
    digest = snap.sha256(data)
    if not create_once(storage, key, data, resolve_s=5.0):
        raise FileExistsError(f"{storage.describe(key)} exists and holds other data")
    return digest


def _get_and_check(storage: Storage, info: ObjectInfo) -> dict[str, Any]:
    return snap.decode(storage.get(info.key), info)


def _earliest(*deadlines: float | None) -> float | None:
    known = [d for d in deadlines if d is not None]
    return min(known) if known else None


def _sink_error(op: SinkOp, exc: BaseException) -> UserCodeError:
    return UserCodeError(op.name, None, exc, what="committing the sink's output")


def _reader_backlog_of(reader: SourceReader) -> int | None:
    try:
        return reader.backlog()
    except Exception:
        return None


def _safe_offset(reader: SourceReader) -> Any:
    try:
        return reader.offset()
    except Exception:
        return "?"
