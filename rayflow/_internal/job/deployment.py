"""Every Ray call that concerns a job's operator actors, in one place.

The coordinator's logic talks to a :class:`Deployment` only, so the Ray
specifics (options, names, handles, futures) stay here. It is also the
checkpoint coordinator's gateway to the operators.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import ray

from rayflow._internal import naming
from rayflow._internal.checkpoint.restore import Assignment
from rayflow._internal.checkpoint.snapshot import BarrierInfo
from rayflow._internal.plan import Plan, encode_plan
from rayflow._internal.runtime.actor import OperatorActor
from rayflow.config import AT_LEAST_ONCE, Checkpointing, RuntimeConfig

log = logging.getLogger("rayflow")

# Control calls on a loop of their own: answered while user code runs (actor.py).
_RemoteOperator = ray.remote(concurrency_groups={"control": 16})(OperatorActor)  # type: ignore[call-overload]

ActorKey = tuple[str, int]  # (stage, partition)


def _wrap(ref: Any) -> asyncio.Future[Any]:
    return asyncio.wrap_future(ref.future())


class Deployment:
    def __init__(
        self,
        job: str,
        plan: Plan,
        config: RuntimeConfig,
        full_every: int | None = None,
        align: bool = True,
        *,
        run_id: str = "",
        final_checkpoint_id: int = 1,
        max_uncommitted: int | None = None,
        local_recovery: bool = False,
        instance: str = "",
    ):
        self.job = job
        self.plan = plan
        self.config = config
        self.full_every = full_every
        self.align = align
        self.run_id = run_id
        self.final_checkpoint_id = final_checkpoint_id
        self.max_uncommitted = max_uncommitted
        self.local_recovery = local_recovery
        #: Actors restarted alone (local recovery) since the last global restart, and their
        #: generation: their messages carry it, and their receivers expect it.
        self.gens: dict[ActorKey, int] = {}
        #: This start among those of the run (StartDecision.instance): channel positions
        #: in snapshots hold only within one, and one epoch of it.
        self.instance = instance
        self.epoch = 0
        self.handles: dict[ActorKey, Any] = {}
        #: The Ray node each actor runs on, as it said when it was first ready.
        self.nodes: dict[ActorKey, str] = {}
        self._plan_ref: Any = None

    @classmethod
    def for_job(
        cls,
        job: str,
        plan: Plan,
        config: RuntimeConfig,
        checkpointing: Checkpointing | None,
        run_id: str,
        first_checkpoint_id: int,
        instance: str = "",
    ) -> Deployment:
        """The deployment of a run: the same whether the driver or the coordinator creates it."""
        cp = checkpointing
        return cls(
            job,
            plan,
            config,
            cp.full_every if cp else None,
            align=not (cp and cp.mode == AT_LEAST_ONCE),
            run_id=run_id,
            final_checkpoint_id=first_checkpoint_id,
            max_uncommitted=cp.max_uncommitted_records if cp else None,
            local_recovery=bool(cp and cp.partial_recovery),
            instance=instance,
        )

    def keys(self) -> list[ActorKey]:
        return [(s.name, p) for s in self.plan.stages for p in range(s.parallelism)]

    def actor_keys(self) -> list[ActorKey]:
        return list(self.handles)

    def source_keys(self) -> list[ActorKey]:
        return [k for k in self.handles if not self.plan.stage(k[0]).inputs]

    def name(self, key: ActorKey) -> str:
        return naming.operator_actor(self.job, key[0], key[1])

    def create(self, keys: Iterable[ActorKey] | None = None) -> None:
        """Start the operator actors (all of them, or ``keys``)."""
        if self._plan_ref is None:
            self._plan_ref = ray.put(encode_plan(self.plan))
        for key in self.keys() if keys is None else keys:
            stage = self.plan.stage(key[0])
            self.handles[key] = _RemoteOperator.options(
                name=self.name(key),
                namespace=naming.NAMESPACE,
                max_restarts=0,
                max_concurrency=10_000,
                **stage.resources.ray_options(self.config.operator_cpus_value),
            ).remote(
                self._plan_ref,
                key[0],
                key[1],
                self.job,
                self.config,
                self.full_every,
                self.align,
                self.epoch,
                self.run_id,
                self.final_checkpoint_id,
                self.max_uncommitted,
                self.local_recovery,
                self.instance,
            )

    def adopt(self, handles: dict[ActorKey, Any]) -> None:
        """Take over the actors of the first epoch that the driver created (see launcher.py)."""
        missing = set(self.keys()) - set(handles)
        if missing:
            raise RuntimeError(f"the driver created no actor for {sorted(missing)}")
        self.handles.update(handles)

    async def replace(self, keys: Iterable[ActorKey], timeout_s: float = 10.0) -> None:
        """Create new actors for dead ones; the name frees up once Ray saw the death."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for key in keys:
            while True:
                try:
                    self.create([key])
                    break
                except ValueError as exc:  # ActorAlreadyExistsError: the old one is still dying
                    if loop.time() > deadline:
                        raise RuntimeError(f"cannot recreate {self.name(key)}: {exc}") from exc
                    await asyncio.sleep(0.05)

    async def unresponsive(self, timeout_s: float) -> set[ActorKey]:
        """Actors that do not answer a ping in time (dead, or lost with their node)."""
        keys = list(self.handles)
        results = await asyncio.gather(
            *(asyncio.wait_for(_wrap(self.handles[k].ready.remote()), timeout_s) for k in keys),
            return_exceptions=True,
        )
        return {k for k, r in zip(keys, results, strict=True) if isinstance(r, BaseException)}

    async def on_lost_nodes(self, keys: Iterable[ActorKey]) -> dict[ActorKey, str]:
        """Those of ``keys`` whose node Ray no longer counts among the living, and the node."""
        homes = {k: self.nodes[k] for k in keys if self.nodes.get(k)}
        if not homes:
            return {}
        nodes = await asyncio.to_thread(ray.nodes)
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        return {k: node for k, node in homes.items() if node not in alive}

    async def reset(
        self, keys: Iterable[ActorKey], restore_to: int | None, timeout_s: float = 30.0
    ) -> dict[ActorKey, int | BaseException]:
        """Reset living actors to a fresh task of the current epoch."""
        wanted = list(keys)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(
                    _wrap(self.handles[k].reset.remote(self.epoch, restore_to)), timeout_s
                )
                for k in wanted
            ),
            return_exceptions=True,
        )
        return dict(zip(wanted, results, strict=True))

    async def first_data_at(self, keys: Iterable[ActorKey] | None = None) -> list[float]:
        wanted = list(self.handles) if keys is None else [k for k in keys if k in self.handles]
        calls = [_wrap(self.handles[k].first_data_at.remote()) for k in wanted]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [r for r in results if isinstance(r, float)]

    async def wait_ready(self, timeout_s: float, keys: Iterable[ActorKey] | None = None) -> None:
        """Wait until every actor (or ``keys``) is up; explain what is missing if not."""
        wanted = list(self.handles) if keys is None else list(keys)
        if not wanted:
            return
        futures = {key: _wrap(self.handles[key].ready.remote()) for key in wanted}
        waited = 0.0
        step = 30.0
        while True:
            done, pending = await asyncio.wait(
                futures.values(), timeout=min(step, timeout_s - waited)
            )
            for fut in done:
                fut.result()  # raises if an actor failed to start
            if not pending:
                for key, fut in futures.items():
                    _, self.nodes[key] = fut.result()
                return
            waited += step
            missing = [self.name(k) for k, f in futures.items() if not f.done()]
            needs = {
                self.name(k): self.plan.stage(k[0]).resources.ray_options(
                    self.config.operator_cpus_value
                )
                for k in futures
            }
            message = (
                f"{len(missing)} operator actor(s) of job {self.job!r} are not running "
                f"after {waited:.0f} s: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; they ask for "
                f"{needs[missing[0]] if missing else {}} each and the cluster has "
                f"{ray.available_resources()} free. Lower the steps' num_cpus/memory/"
                "resources or add nodes."
            )
            if waited >= timeout_s:
                raise TimeoutError(message)
            log.warning(message)

    async def restore(self, assignments: dict[ActorKey, Assignment]) -> None:
        await asyncio.gather(
            *(
                _wrap(self.handles[k].restore.remote(a))
                for k, a in assignments.items()
                if k in self.handles
            )
        )

    async def connect(self, coordinator: Any, keys: Iterable[ActorKey] | None = None) -> None:
        """Connect every actor's output channels (or those of ``keys``)."""
        calls = []
        for key in list(self.handles) if keys is None else list(keys):
            handle = self.handles[key]
            # Names, not handles: see OperatorActor.connect.
            receivers = {(edge_id, q): self.name(r) for edge_id, q, r in self.receivers_of(key)}
            input_gens = {
                (edge_id, p): self.gens[s]
                for edge_id, p, s in self.senders_of(key)
                if self.gens.get(s)
            }
            calls.append(
                handle.connect.remote(receivers, coordinator, self.gens.get(key, 0), input_gens)
            )
        await asyncio.gather(*(_wrap(c) for c in calls))

    def receivers_of(self, key: ActorKey) -> list[tuple[int, int, ActorKey]]:
        """(edge, receiver partition, receiver) of every output channel of ``key``."""
        stage = self.plan.stage(key[0])
        out = []
        for edge_id in stage.outputs:
            edge = self.plan.edges[edge_id]
            for q in edge.receivers_of(key[1]):
                out.append((edge_id, q, (edge.dst_stage, q)))
        return out

    def senders_of(self, key: ActorKey) -> list[tuple[int, int, ActorKey]]:
        """(edge, sender partition, sender) of every input channel of ``key``."""
        return [
            (edge_id, p, (self.plan.edges[edge_id].src_stage, p))
            for edge_id, p in self.plan.input_channels(key[0], key[1])
        ]

    # -- local recovery --------------------------------------------------------

    async def abort_checkpoints(self, upto: int, keys: Iterable[ActorKey]) -> None:
        await asyncio.gather(*(_wrap(self.handles[k].abort_checkpoints.remote(upto)) for k in keys))

    async def reset_input(
        self, receiver: ActorKey, channels: list[tuple[int, int]], gen: int
    ) -> dict[Any, Any]:
        return await _wrap(self.handles[receiver].reset_input.remote(channels, gen))

    async def restore_one(
        self, key: ActorKey, assignment: Assignment | None, local: dict[str, Any]
    ) -> None:
        await _wrap(self.handles[key].restore.remote(assignment, local))

    async def reconnect(self, sender: ActorKey, edge: int, receiver: ActorKey, after: int) -> int:
        return await _wrap(self.handles[sender].reconnect.remote(edge, self.name(receiver), after))

    def run_one(self, key: ActorKey) -> asyncio.Future[Any]:
        return _wrap(self.handles[key].run.remote())

    def run_all(self) -> dict[ActorKey, asyncio.Future[Any]]:
        return {key: _wrap(h.run.remote()) for key, h in self.handles.items()}

    async def metrics(self, timeout_s: float = 10.0) -> dict[str, list[dict[str, Any]]]:
        """Metrics of every step partition; actors that do not answer are left out."""
        keys = list(self.handles)
        futures = [_wrap(self.handles[k].metrics.remote()) for k in keys]
        results = await asyncio.gather(
            *(asyncio.wait_for(f, timeout_s) for f in futures), return_exceptions=True
        )
        by_step: dict[str, list[dict[str, Any]]] = {}
        for result in results:
            if isinstance(result, BaseException):
                continue
            for entry in result:
                by_step.setdefault(entry["step"], []).append(entry)
        for entries in by_step.values():
            entries.sort(key=lambda e: e["partition"])
        return by_step

    async def _call_sources(self, method: str, *args: Any) -> None:
        calls = [getattr(self.handles[k], method).remote(*args) for k in self.source_keys()]
        await asyncio.gather(*(_wrap(c) for c in calls))

    async def stop_sources(self) -> None:
        await self._call_sources("request_stop")

    async def finish_sources(self) -> None:
        await self._call_sources("finish")

    # -- the checkpoint coordinator's gateway --------------------------------

    async def trigger_sources(self, barrier: BarrierInfo) -> None:
        await self._call_sources("trigger_checkpoint", barrier)

    async def notify_complete(self, checkpoint_id: int, *, wait: bool) -> None:
        """Sinks commit up to ``checkpoint_id``; tasks of another epoch ignore it."""
        calls = [h.notify_complete.remote(checkpoint_id, self.epoch) for h in self.handles.values()]
        if wait:
            await asyncio.gather(*(_wrap(c) for c in calls))

    def kill_by_name(self, name: str) -> None:
        """Kill one operator actor by its name (fault injection)."""
        for key, handle in self.handles.items():
            if self.name(key) == name:
                ray.kill(handle, no_restart=True)
                return
        raise KeyError(f"no operator actor named {name!r} in job {self.job!r}")

    def kill(self, keys: Iterable[ActorKey] | None = None) -> None:
        for key in list(self.handles) if keys is None else list(keys):
            handle = self.handles.pop(key, None)
            if handle is not None:
                try:
                    ray.kill(handle, no_restart=True)
                except Exception as exc:  # already gone
                    log.debug("kill %s: %s", self.name(key), exc)
