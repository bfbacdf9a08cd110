"""The protocol's rules in one process, no Ray (docs/protocol.md, R1-R10)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import rayflow as rf
from rayflow._internal import naming
from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.catalog import describe
from rayflow._internal.checkpoint.coordinator import CheckpointCoordinator, CheckpointFailed
from rayflow._internal.checkpoint.manifest import (
    CorruptManifest,
    Manifest,
    ObjectInfo,
    OperatorSnapshot,
    encode_offset,
    manifest_key,
)
from rayflow._internal.checkpoint.pending import Phase
from rayflow._internal.checkpoint.snapshot import BarrierInfo
from rayflow._internal.checkpoint.start import decide_start
from rayflow._internal.plan import build_plan
from rayflow._internal.runtime.channels import OutputChannel, UnroutableKey, hash_router
from rayflow._internal.runtime.mailbox import BARRIER, DATA, EOS
from rayflow._internal.runtime.operators import UserCodeError
from rayflow._internal.runtime.task import StageTask
from rayflow._internal.storage import StorageError, open_storage
from rayflow._internal.storage.base import Storage, create_once
from rayflow._internal.storage.local import LocalStorage
from rayflow.errors import JobAlreadyRunningError


class Gateway:
    """Every operator acknowledges at once."""

    def __init__(self) -> None:
        self.coordinator: Any = None
        self.notified: list[int] = []

    def actor_keys(self) -> list[tuple[str, int]]:
        return [("src", 0)]

    async def trigger_sources(self, barrier: BarrierInfo) -> None:
        info = ObjectInfo(f"x/{barrier.checkpoint_id}", 1, "0", barrier.checkpoint_id, "plain")
        self.coordinator.acknowledge(
            barrier.checkpoint_id, ("src", 0), OperatorSnapshot("src", 0, info)
        )

    async def notify_complete(self, checkpoint_id: int, *, wait: bool) -> None:
        self.notified.append(checkpoint_id)


class GatedStorage(LocalStorage):
    """A local storage whose manifest writes wait for a gate (a slow or hung PUT)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.writing.set()
        self.gate.wait(10)
        return super().put_if_absent(key, data)


def test_r1_a_recovery_waits_for_a_manifest_being_written_and_restores_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        gateway = Gateway()
        config = rf.Checkpointing(storage=str(tmp_path), interval_s=3600)
        coordinator = CheckpointCoordinator("j", {"steps": []}, config, gateway)
        gateway.coordinator = coordinator
        storage = GatedStorage(str(tmp_path))
        coordinator.storage = coordinator.store.storage = storage
        loop = asyncio.create_task(coordinator.run(lambda reasons: None))
        trigger = asyncio.create_task(coordinator.trigger())
        await asyncio.to_thread(storage.writing.wait, 5)
        assert coordinator.pending is not None and coordinator.pending.phase is Phase.COMMITTING
        # A failure now: the recovery point must not be read before the write resolves.
        quiesce = asyncio.create_task(coordinator.quiesce())
        await asyncio.sleep(0.2)
        assert not quiesce.done()
        storage.gate.set()
        restored = await quiesce
        assert restored is not None and restored.checkpoint_id == 1
        assert (await trigger).checkpoint_id == 1
        # Sinks were told about the checkpoint, and the recovery restores it.
        assert gateway.notified == [1]
        coordinator.close()
        await loop

    asyncio.run(scenario())


def test_r1_a_checkpoint_still_collecting_acknowledgements_is_abandoned(tmp_path: Path) -> None:
    class Silent(Gateway):
        async def trigger_sources(self, barrier: BarrierInfo) -> None:
            pass  # nobody acknowledges

    async def scenario() -> None:
        gateway = Silent()
        config = rf.Checkpointing(storage=str(tmp_path), interval_s=3600)
        coordinator = CheckpointCoordinator("j", {"steps": []}, config, gateway)
        loop = asyncio.create_task(coordinator.run(lambda reasons: None))
        trigger = asyncio.create_task(coordinator.trigger())
        await asyncio.sleep(0.1)
        assert await asyncio.wait_for(coordinator.quiesce(), 2) is None
        with pytest.raises(CheckpointFailed, match="restarting"):
            await trigger
        assert not open_storage(tmp_path).exists(manifest_key("j", 1))
        coordinator.close()
        await loop

    asyncio.run(scenario())


class LostAnswers(LocalStorage):
    """The first create is applied, then its answer is lost (a timeout)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.calls = 0

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.calls += 1
        created = super().put_if_absent(key, data)
        if self.calls == 1:
            raise StorageError("read timeout")
        return created


def test_r6_a_create_whose_answer_was_lost_is_read_back(tmp_path: Path) -> None:
    storage = LostAnswers(str(tmp_path))
    assert create_once(storage, "m.json", b"ours") is True  # the retry finds our bytes
    assert storage.calls == 2
    assert create_once(LocalStorage(str(tmp_path)), "m.json", b"someone else's") is False
    assert storage.get("m.json") == b"ours"


def test_r6_an_outcome_that_cannot_be_learned_raises(tmp_path: Path) -> None:
    class Down(LocalStorage):
        def put_if_absent(self, key: str, data: bytes) -> bool:
            raise StorageError("connection refused")

    started = time.monotonic()
    with pytest.raises(StorageError, match="refused"):
        create_once(Down(str(tmp_path)), "m.json", b"x", resolve_s=0.5)
    assert time.monotonic() - started < 3


def _lease(storage: Storage, ttl: float = 0.6, alive: Any = None) -> leases.Lease:
    return leases.acquire(
        storage,
        "j",
        ttl_s=ttl,
        holder={"host": "h", "pid": 1},
        alive=alive or (lambda lease: None),
    )


def test_r5_a_held_lease_refuses_a_second_run_and_expiry_hands_it_over(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    first = _lease(storage)
    assert first.generation == 1 and first.run_id.startswith("r000001")
    with pytest.raises(JobAlreadyRunningError, match="held by another run: run r000001"):
        _lease(storage)
    leases.check_can_commit(first)
    time.sleep(0.7)  # not renewed: expired
    with pytest.raises(leases.LeaseExpired):
        leases.check_can_commit(first)
    second = _lease(storage)
    assert second.generation == 2
    # Rule 3: an expired holder might still be alive somewhere: wait one ttl first.
    assert second.commit_after >= second.acquired_at + first.ttl_s - 0.01
    with pytest.raises(leases.LeaseExpired, match="took over an expired lease"):
        leases.check_can_commit(second)
    # The old holder notices at its next renewal and stops.
    with pytest.raises(leases.LeaseLost, match="lost its lease"):
        leases.renew(storage, first)


def test_r5_released_or_known_dead_holders_are_taken_over_at_once(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    first = _lease(storage, ttl=60)
    leases.release(storage, first)
    second = _lease(storage, ttl=60)
    assert second.commit_after == second.acquired_at
    third = _lease(storage, ttl=60, alive=lambda lease: False)  # its coordinator is gone
    assert third.generation == 3 and third.commit_after == third.acquired_at
    with pytest.raises(JobAlreadyRunningError):
        _lease(storage, ttl=60, alive=lambda lease: True)
    leases.renew(storage, third)
    leases.check_can_commit(third)


def test_r4_checkpoint_ids_start_above_everything_in_the_storage(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    storage.put("j/checkpoints/0000000007/src-0-r000001aaaaaa.snapshot", b"x")  # no manifest
    config = rf.Checkpointing(storage=str(tmp_path))
    decision = decide_start("j", config)
    assert decision.first_checkpoint_id == 8 and decision.lease is not None
    assert decision.run_id == decision.lease.run_id
    with pytest.raises(JobAlreadyRunningError):
        decide_start("j", config)
    leases.release(storage, decision.lease)
    assert decide_start("j", config).lease.generation == 2  # type: ignore[union-attr]


def _manifest(offset: Any) -> Manifest:
    info = ObjectInfo("j/checkpoints/0000000001/src-0-r.snapshot", 1, "0", 1, "plain")
    op = OperatorSnapshot("src", 0, info, sources={"src": {"0": encode_offset(offset)}})
    return Manifest("j", 1, "checkpoint", 0.0, 1.0, {"steps": []}, (op,), run_id="r1")


class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("never pickled at all")


class Exploding:
    """Pickles fine; unpickling it would run code."""

    def __reduce__(self) -> Any:
        return (_explode, ())

    def __repr__(self) -> str:
        return "Exploding()"


def _explode() -> None:
    raise AssertionError("a tool unpickled an offset")


def test_manifests_are_checksummed_and_tools_never_unpickle_offsets(tmp_path: Path) -> None:
    data = _manifest(Exploding()).to_json()
    storage = open_storage(tmp_path / "sp")
    storage.put("manifest.json", data)
    info = describe(str(tmp_path / "sp"))
    assert info["offsets"] == [{"step": "src", "partition": 0, "offset": "Exploding()"}]
    tampered = data.replace(b'"kind": "checkpoint"', b'"kind": "savepoint"')
    with pytest.raises(CorruptManifest, match="does not match its checksum"):
        Manifest.from_json(tampered)
    assert Manifest.from_json(_manifest(("file.txt", 42)).to_json()).sources == {
        "src": {0: ("file.txt", 42)}  # a tuple comes back a tuple
    }


def test_user_code_errors_survive_pickling_even_with_unpicklable_parts() -> None:
    error = UserCodeError("parse", Unpicklable(), ValueError("bad record"), what="")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.step == "parse" and isinstance(copy.cause, ValueError)
    assert "Unpicklable" in copy.record  # its repr, since it cannot travel
    assert copy.failure(3).describe().startswith("step 'parse' (partition 3): ValueError")


def test_names_with_a_trailing_newline_are_refused() -> None:
    assert naming.is_valid_name("job-1")
    assert not naming.is_valid_name("job-1\n")
    with pytest.raises(rf.BuildError, match="not valid"):
        rf.Dataflow("ok").source("src\n", rf.testing.from_items([1]))


def test_keys_are_checked_at_parallelism_1_too() -> None:
    async def scenario() -> None:
        sent: list[Any] = []

        def send(seq: int, kind: int, payload: Any, records: int = 0) -> Any:
            sent.append(payload)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        channel = OutputChannel(
            (0, 0), "r", send, credit_batches=4, credit_bytes=10**6, batch_size=100
        )
        route = hash_router([channel], 128)
        route([("a", 1), ("b", 2), ("a", 3)])
        assert channel.buffer == [("a", 1), ("b", 2), ("a", 3)]
        with pytest.raises(UnroutableKey, match="complex"):
            route([("a", 4), (1j, "the record")])
        with pytest.raises(UnroutableKey, match="list"):
            route([(["unhashable"], "x")])

    asyncio.run(scenario())


def test_two_sinks_may_not_share_an_output_folder(tmp_path: Path) -> None:
    flow = rf.Dataflow("j")
    src = flow.source("src", rf.testing.from_items([1]))
    src.sink("a", rf.sinks.JsonLines(tmp_path / "out"))
    with pytest.raises(rf.BuildError, match=r"step 'b'.*step 'a' already writes"):
        src.sink("b", rf.sinks.JsonLines(tmp_path / "out"))
    with pytest.raises(rf.BuildError, match=r"folder \(or prefix\) of its own"):
        src.sink("c", rf.sinks.JsonLines(tmp_path / "out" / "inner"))
    src.sink("d", rf.sinks.JsonLines(tmp_path / "out2"))  # a sibling is fine


class Coordination:
    def __init__(self) -> None:
        self.acks: list[int] = []

    def acknowledge(self, checkpoint_id: int, snapshot: Any) -> None:
        self.acks.append(checkpoint_id)

    def decline(self, checkpoint_id: int, reason: str) -> None:
        raise AssertionError(f"declined {checkpoint_id}: {reason}")

    def source_done(self, epoch: int) -> None:
        pass


@pytest.mark.parametrize("align", [True, False], ids=["exactly_once", "at_least_once"])
def test_r8_a_newer_barrier_supersedes_the_one_being_aligned(tmp_path: Path, align: bool) -> None:
    """Barrier 1 reached only one input (its trigger was given up); 2 reaches both."""
    flow = rf.Dataflow("j")
    src = flow.source("src", rf.testing.from_items(range(10), partitions=2), parallelism=2)
    src.key_by("k", lambda x: x % 3, parallelism=2).reduce(
        "sum", lambda a, b: a + b, initial=0
    ).sink("out", rf.testing.Discard())
    plan = build_plan(flow.spec())

    def barrier(cid: int) -> BarrierInfo:
        return BarrierInfo(
            cid, "checkpoint", str(tmp_path), cid - 1, f"j/checkpoints/{cid:010d}/", "r1"
        )

    async def scenario() -> list[int]:
        coordination = Coordination()
        task = StageTask(
            plan, "sum", 0, job="j", config=rf.RuntimeConfig(), full_every=10, align=align
        )
        task.connect({}, coordination)
        a, b = task.mailbox.channels
        run = asyncio.create_task(task.run())
        from rayflow._internal.runtime import serde

        task.offer(0, a, 0, BARRIER, barrier(1))
        task.offer(0, a, 1, DATA, serde.dumps([(1, 1)]))
        task.offer(0, b, 0, DATA, serde.dumps([(2, 2)]))
        task.offer(0, b, 1, BARRIER, barrier(2))  # b never got barrier 1
        task.offer(0, a, 2, BARRIER, barrier(2))
        task.offer(0, b, 2, BARRIER, barrier(1))  # stale: ignored
        task.offer(0, a, 3, EOS, None)
        task.offer(0, b, 3, EOS, None)
        outcome = await asyncio.wait_for(run, 10)
        assert outcome.ok, outcome.failure
        await asyncio.sleep(0.3)  # the upload of checkpoint 2 acknowledges in the background
        assert task.ops["sum"].records_in == 2
        return coordination.acks

    assert asyncio.run(scenario()) == [2]


def test_r11_a_source_restored_with_in_flight_data_snapshots_only_once_its_readers_are_open(
    tmp_path: Path,
) -> None:
    """An unaligned trigger that arrives while a restored source replays its unsent
    output must not snapshot before the readers are open (no offsets: restart at 0)."""
    flow = rf.Dataflow("j", parallelism=2)
    src = flow.source("src", rf.testing.from_items(range(100), partitions=1), parallelism=1)
    src.key_by("k", lambda x: x % 5).reduce("sum", lambda a, b: a + b, initial=0).sink(
        "out", rf.testing.Discard()
    )
    plan = build_plan(flow.spec())
    acks: list[Any] = []

    class Acks(Coordination):
        def acknowledge(self, checkpoint_id: int, snapshot: Any) -> None:
            acks.append(snapshot)

    async def scenario() -> None:
        task = StageTask(plan, "src", 0, job="j", config=rf.RuntimeConfig(), full_every=10)
        task._start_offsets = {0: 40}  # restored at offset 40 ...

        def send(seq: int, kind: int, payload: Any, records: int = 0) -> Any:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result((8192, 8))
            return fut

        edge = plan.stage("src").outputs[0]
        task.connect({(edge, q): (f"sum/{q}", send) for q in range(2)}, Acks())
        task._replay_out = [(edge, [(1, 1), (2, 2)])]  # ... with unsent output to replay
        barrier = BarrierInfo(7, "checkpoint", str(tmp_path), 0, "j/checkpoints/7/", "r1")
        task.trigger_checkpoint(dataclasses.replace(barrier, unaligned=True))
        run = asyncio.create_task(task.run())
        for _ in range(100):
            if acks:
                break
            await asyncio.sleep(0.05)
        task.finish()  # the end of the stream, as after a final checkpoint
        outcome = await asyncio.wait_for(run, 10)
        assert outcome.ok, outcome.failure

    import dataclasses

    asyncio.run(scenario())
    assert len(acks) == 1
    offsets = acks[0].sources["src"]["0"]
    assert offsets == {"json": 40}  # where it was restored, not unknown (then 0)
    assert acks[0].inflight


def test_r14_no_checkpoint_starts_once_the_final_one_was_asked_for(tmp_path: Path) -> None:
    """A user's checkpoint() queued behind the final checkpoint is refused, not run
    against operators whose sinks are closing (it expired and the job never ended)."""

    async def scenario() -> None:
        gateway = Gateway()
        config = rf.Checkpointing(storage=str(tmp_path), interval_s=3600)
        coordinator = CheckpointCoordinator("j", {"steps": []}, config, gateway)
        gateway.coordinator = coordinator
        loop = asyncio.create_task(coordinator.run(lambda reasons: None))
        final = asyncio.create_task(coordinator.trigger(final=True))
        await asyncio.sleep(0)
        with pytest.raises(CheckpointFailed, match="the job is ending"):
            await coordinator.trigger()
        assert (await final).checkpoint_id == 1
        coordinator.resume(None)  # a restart: the sources run again, checkpoints too
        assert (await coordinator.trigger()).checkpoint_id == 2
        coordinator.close()
        with pytest.raises(CheckpointFailed, match="the job is ending"):
            await coordinator.trigger()
        await loop
        assert gateway.notified == [1, 2]

    asyncio.run(scenario())


def test_r14_a_partition_that_ended_declines_an_unaligned_barrier(tmp_path: Path) -> None:
    """A barrier that reaches a partition after its sinks closed is declined at once."""
    flow = rf.Dataflow("j", parallelism=2)  # (at 1, the keyed step shares the source's actor)
    src = flow.source("src", rf.testing.from_items(range(10), partitions=1), parallelism=1)
    src.key_by("k", lambda x: x % 3).reduce("sum", lambda a, b: a + b, initial=0).sink(
        "out", rf.sinks.JsonLines(tmp_path / "out")
    )
    plan = build_plan(flow.spec())
    declined: list[tuple[int, str]] = []

    class Declines(Coordination):
        def decline(self, checkpoint_id: int, reason: str) -> None:
            declined.append((checkpoint_id, reason))

    async def scenario() -> None:
        task = StageTask(plan, "sum", 0, job="j", config=rf.RuntimeConfig(), full_every=10)
        task.connect({}, Declines())
        (channel,) = task.mailbox.channels
        run = asyncio.create_task(task.run())
        task.offer(0, channel, 0, EOS, None)
        outcome = await asyncio.wait_for(run, 10)
        assert outcome.ok, outcome.failure
        barrier = BarrierInfo(3, "checkpoint", str(tmp_path), 0, "j/checkpoints/3/", "r1")
        task.trigger_checkpoint(dataclasses.replace(barrier, unaligned=True))
        for _ in range(50):
            if declined:
                break
            await asyncio.sleep(0.02)

    import dataclasses

    asyncio.run(scenario())
    assert declined and declined[0][0] == 3, declined
    assert "ended its streams" in declined[0][1]


def test_r11_an_unaligned_trigger_before_the_task_runs_is_taken_once_it_can_be(
    tmp_path: Path,
) -> None:
    """A source restored at its end reads nothing more: a trigger that came before it
    ran must still be answered (it waited for a next batch that never came)."""
    flow = rf.Dataflow("j", parallelism=2)  # (at 1, the keyed step shares the source's actor)
    src = flow.source("src", rf.testing.from_items(range(10), partitions=1), parallelism=1)
    src.key_by("k", lambda x: x % 5).reduce("sum", lambda a, b: a + b, initial=0).sink(
        "out", rf.testing.Discard()
    )
    plan = build_plan(flow.spec())
    acks: list[Any] = []

    class Acks(Coordination):
        def acknowledge(self, checkpoint_id: int, snapshot: Any) -> None:
            acks.append(checkpoint_id)

    async def scenario() -> None:
        task = StageTask(plan, "src", 0, job="j", config=rf.RuntimeConfig(), full_every=10)
        task._start_offsets = {0: 10}  # restored at the end of its input

        def send(seq: int, kind: int, payload: Any, records: int = 0) -> Any:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result((8192, 8))
            return fut

        edge = plan.stage("src").outputs[0]
        task.connect({(edge, q): (f"sum/{q}", send) for q in (0, 1)}, Acks())
        barrier = BarrierInfo(9, "checkpoint", str(tmp_path), 0, "j/checkpoints/9/", "r1")
        task.trigger_checkpoint(dataclasses.replace(barrier, unaligned=True))
        run = asyncio.create_task(task.run())
        for _ in range(100):
            if acks:
                break
            await asyncio.sleep(0.05)
        task.finish()
        outcome = await asyncio.wait_for(run, 10)
        assert outcome.ok, outcome.failure

    import dataclasses

    asyncio.run(scenario())
    assert acks == [9]
