"""The Ray actor that runs one partition of one stage.

A thin shell around :class:`StageTask`: it turns actor handles into send
functions, and the coordinator's handle into the task's coordination
callbacks, and exposes the task's methods as actor methods. Every ``push``
call stays open until its batch leaves the mailbox; that return is the
credit the sender waits for.

Control never waits for user code: the calls of the ``control`` concurrency
group (metrics, checkpoint triggers, stop, commits, pings) run on an event
loop of their own, in their own thread, so they are answered while the data
plane's loop is inside a user function (a GIL switch, 5 ms at most, away).
They touch the task only through its thread-safe entry points. (Ray hands
every call, whatever its group, through one dispatcher thread that waits
until the target loop takes the call: the data plane's loop therefore yields
between slices of user code, or control would wait behind queued pushes.)
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import ray

from rayflow._internal.checkpoint.manifest import OperatorSnapshot
from rayflow._internal.checkpoint.restore import Assignment
from rayflow._internal.checkpoint.snapshot import BarrierInfo
from rayflow._internal.naming import NAMESPACE
from rayflow._internal.plan import decode_plan
from rayflow._internal.runtime.channels import SendFn
from rayflow._internal.runtime.task import StageTask, TaskOutcome
from rayflow.config import RuntimeConfig


class _CoordinatorLink:
    """Fire-and-forget calls from an operator to its coordinator."""

    def __init__(self, handle: Any, key: tuple[str, int]):
        self._handle = handle
        self._key = key

    def acknowledge(self, checkpoint_id: int, snapshot: OperatorSnapshot) -> None:
        self._handle.acknowledge.remote(checkpoint_id, self._key, snapshot)

    def decline(self, checkpoint_id: int, reason: str) -> None:
        self._handle.decline.remote(checkpoint_id, self._key, reason)

    def source_done(self, epoch: int) -> None:
        self._handle.source_done.remote(self._key, epoch)


class OperatorActor:
    def __init__(
        self,
        plan_blob: bytes,
        stage: str,
        partition: int,
        job: str,
        config: RuntimeConfig,
        full_every: int | None,
        align: bool = True,
        epoch: int = 0,
        run_id: str = "",
        final_checkpoint_id: int = 1,
        max_uncommitted: int | None = None,
        local_recovery: bool = False,
        instance: str = "",
    ) -> None:
        # Streams allocate many short-lived tuples; the default gen-0 threshold
        # (700) makes the collector run thousands of times per second.
        gc.set_threshold(50_000, 20, 100)
        plan = decode_plan(plan_blob)

        def make(epoch: int) -> StageTask:
            return StageTask(
                plan,
                stage,
                partition,
                job=job,
                config=config,
                full_every=full_every,
                align=align,
                epoch=epoch,
                run_id=run_id,
                final_checkpoint_id=final_checkpoint_id,
                max_uncommitted=max_uncommitted,
                local_recovery=local_recovery,
                instance=instance,
            )

        self._make = make
        self.task = make(epoch)
        self._node_id = ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    async def ready(self) -> tuple[str, str]:
        """This partition's actor name and the node it runs on (a ping)."""
        return self.task.actor_name, self._node_id

    async def reset(self, epoch: int, restore_to: int | None) -> int:
        """Drop everything for a restart in ``epoch``: a fresh task, same process.

        Returns the records this partition's sources emitted after checkpoint
        ``restore_to`` (they will be emitted again).
        """
        replayed = await self.task.shutdown(restore_to)
        self.task = self._make(epoch)
        return replayed

    @ray.method(concurrency_group="control")
    async def first_data_at(self) -> float | None:
        return self.task.first_data_at

    @ray.method(concurrency_group="control")
    async def where(self) -> dict[str, Any]:
        """The node and process this partition runs in (for people and tests)."""
        import os

        return {"node_id": self._node_id, "pid": os.getpid()}

    async def restore(
        self, assignment: Assignment | None, local: dict[str, Any] | None = None
    ) -> None:
        await self.task.restore(assignment, local)

    async def connect(
        self,
        receivers: dict[tuple[int, int], str],
        coordinator: Any,
        gen: int = 0,
        input_gens: dict[tuple[int, int], int] | None = None,
    ) -> None:
        """``receivers`` maps (edge id, receiver partition) to the receiver's actor name.

        Receivers are found by name, not sent as handles: the actors of a
        fresh start belong to the driver, which leaves them to the
        coordinator's handles so that they die with it, and a handle the
        coordinator passed on would keep one alive after the coordinator
        died, while one from ``ray.get_actor`` does not.
        """
        names = sorted(set(receivers.values()))
        handles = await asyncio.to_thread(
            lambda: {name: ray.get_actor(name, namespace=NAMESPACE) for name in names}
        )
        senders: dict[tuple[int, int], tuple[str, SendFn]] = {}
        for (edge_id, q), name in receivers.items():
            channel = (edge_id, self.task.partition)
            senders[(edge_id, q)] = (name, self._sender(handles[name], channel))
        key = (self.task.stage.name, self.task.partition)
        self.task.connect(senders, _CoordinatorLink(coordinator, key), gen, input_gens)

    def _sender(self, handle: Any, channel: tuple[int, int]) -> SendFn:
        task = self.task
        push = handle.push

        def send(seq: int, kind: int, payload: Any, records: int = 0, meta: Any = None) -> Any:
            if meta is None:
                return push.remote(task.epoch, channel, seq, kind, payload, records).future()
            return push.remote(task.epoch, channel, seq, kind, payload, records, meta).future()

        return send

    # -- local recovery ------------------------------------------------------

    @ray.method(concurrency_group="control")
    async def abort_checkpoints(self, upto: int) -> None:
        await self.task.on_data_loop(_call(self.task.abort_checkpoints, upto))

    @ray.method(concurrency_group="control")
    async def reset_input(self, channels: list[tuple[int, int]], gen: int) -> dict[Any, Any]:
        return await self.task.on_data_loop(_call(self.task.reset_input, channels, gen))

    @ray.method(concurrency_group="control")
    async def reconnect(self, edge: int, receiver: str, after: int) -> int:
        """``receiver`` (an actor name) was replaced: resend what it lost, then go on."""
        handle = await asyncio.to_thread(ray.get_actor, receiver, namespace=NAMESPACE)
        channel = (edge, self.task.partition)
        send = self._sender(handle, channel)
        return await self.task.on_data_loop(self.task.reconnect_output(edge, receiver, send, after))

    async def run(self) -> TaskOutcome:
        return await self.task.run()

    async def push(
        self,
        epoch: int,
        channel: tuple[int, int],
        seq: int,
        kind: int,
        payload: Any,
        records: int = 0,
        meta: Any = None,
    ) -> tuple[int, int]:
        """Take a batch; return once it left the mailbox, with the records per batch
        this partition wants from its senders (credits by time)."""
        done = self.task.offer(epoch, channel, seq, kind, payload, records, meta)
        if done is not None:
            await done
        return self.task.batch_hint()

    @ray.method(concurrency_group="control")
    async def metrics(self) -> list[dict[str, Any]]:
        return self.task.metrics()

    @ray.method(concurrency_group="control")
    async def request_stop(self) -> None:
        self.task.call_soon(self.task.request_stop)

    @ray.method(concurrency_group="control")
    async def finish(self) -> None:
        self.task.call_soon(self.task.finish)

    @ray.method(concurrency_group="control")
    async def trigger_checkpoint(self, barrier: BarrierInfo) -> None:
        self.task.call_soon(self.task.trigger_checkpoint, barrier)

    @ray.method(concurrency_group="control")
    async def notify_complete(self, checkpoint_id: int, epoch: int) -> None:
        await self.task.on_data_loop(self.task.notify_complete(checkpoint_id, epoch))


async def _call(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` as a coroutine (to run a plain method on the data plane's loop)."""
    return fn(*args)
