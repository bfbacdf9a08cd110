"""Driver-side Ray calls: connect to Ray, create the job's actors, find them again."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import site
import sys
import sysconfig
import uuid
from typing import Any

import ray
from ray import cloudpickle as ray_cloudpickle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayflow._internal import naming
from rayflow._internal.checkpoint import lease as leases
from rayflow._internal.checkpoint.start import StartDecision
from rayflow._internal.job.collector import Collector
from rayflow._internal.job.coordinator import JobCoordinator
from rayflow._internal.job.deployment import ActorKey, Deployment
from rayflow._internal.job.warm import preload_in_new_ray
from rayflow._internal.plan import Plan, encode_plan
from rayflow._internal.spec import StepKind, StepSpec
from rayflow.config import Checkpointing, RestartStrategy, RuntimeConfig
from rayflow.errors import BuildError, JobAlreadyRunningError
from rayflow.testing import Collect, Fault

log = logging.getLogger("rayflow")

_RemoteCoordinator = ray.remote(JobCoordinator)
_RemoteCollector = ray.remote(Collector)


def ensure_ray() -> None:
    """Use the Ray this process is connected to; else join RAY_ADDRESS or start one."""
    if not ray.is_initialized():
        preload_in_new_ray()
        ray.init()


def _library_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update([*site.getsitepackages(), site.getusersitepackages()])
    return [os.path.realpath(r) + os.sep for r in roots if r]


def ship_user_modules_by_value() -> None:
    """Let Ray workers run functions from the user's own modules.

    cloudpickle pickles functions of importable modules by reference, and a
    worker cannot import a script's sibling module or a test file that only
    the driver's ``sys.path`` reaches. Modules outside the installed
    libraries are therefore pickled by value, as ``__main__`` already is.
    """
    roots = _library_roots()
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top in ("rayflow", "__main__") or top in sys.stdlib_module_names or "." in name:
            continue
        path = getattr(module, "__file__", None)
        if not path:
            continue
        real = os.path.realpath(path)
        if any(real.startswith(root) for root in roots):
            continue
        try:
            ray_cloudpickle.register_pickle_by_value(module)
        except ValueError:
            continue


def check_picklable(plan: Plan) -> None:
    """Every function and connector must travel to Ray workers; say which cannot."""
    ship_user_modules_by_value()
    for step in plan.flow.steps:
        for what, value in (("function", step.fn), ("connector", step.connector)):
            if value is None:
                continue
            try:
                ray_cloudpickle.dumps(value)
            except Exception as exc:
                raise BuildError(
                    f"step {step.name!r}: its {what} cannot be sent to Ray workers: "
                    f"{type(exc).__name__}: {exc}. It must be picklable: do not capture "
                    "locks, open files, sockets or clients; create those inside the function."
                ) from None


def check_not_running(job: str) -> None:
    try:
        ray.get_actor(naming.coordinator_actor(job), namespace=naming.NAMESPACE)
    except ValueError:
        return
    raise JobAlreadyRunningError(
        f"a job named {job!r} is already running on this Ray cluster "
        f"(actor {naming.coordinator_actor(job)!r}); stop it first, or give this one "
        "another name with job_name=..."
    )


def collect_sinks(plan: Plan) -> list[str]:
    """Names of the steps that sink into ``rf.testing.Collect``."""
    return [
        s.name
        for s in plan.flow.steps
        if s.kind is StepKind.SINK and isinstance(s.connector, Collect)
    ]


def actors_of(plan: Plan) -> tuple[int, int]:
    """The actors (each a Ray worker process) a job starts with: those beside the
    driver (the coordinator, the driver's collector if it has none yet) and the
    operators, which go anywhere."""
    beside = 1 + (1 if collect_sinks(plan) and not _collector_alive() else 0)
    return beside, sum(s.parallelism for s in plan.stages)


def _beside_the_driver() -> Any:
    """Keep the job's control actors on the driver's node.

    They fate-share with the driver anyway; on another node they would add
    that node's loss to the ways the whole job can be interrupted.
    """
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _collector_alive() -> bool:
    try:
        ray.get_actor(_collector_name(), namespace=naming.NAMESPACE)
    except ValueError:
        return False
    return True


def _collector_name() -> str:
    return naming.collector_actor(ray.get_runtime_context().get_job_id())


def collector_for(job: str, plan: Plan) -> tuple[Plan, tuple[Any, str] | None]:
    """The driver's Collect actor (created by its first job that collects) and the key
    this start of ``job`` commits under (None without a Collect sink), with the plan to
    ship: its Collect sinks are copies that name the actor and the key.

    Copies, not the user's objects: one ``Collect()`` in two jobs at once, or a
    coordinator restarted from this plan later, must each keep their own key.
    """
    names = set(collect_sinks(plan))
    if not names:
        return plan, None
    name = _collector_name()
    handle = _RemoteCollector.options(
        name=name,
        namespace=naming.NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        scheduling_strategy=_beside_the_driver(),
    ).remote()
    key = f"{job}/{uuid.uuid4().hex[:12]}"

    def stamped(step: StepSpec) -> StepSpec:
        if step.name not in names:
            return step
        sink = copy.copy(step.connector)
        sink._into = (name, key)
        return dataclasses.replace(step, connector=sink)

    flow = dataclasses.replace(plan.flow, steps=tuple(stamped(s) for s in plan.flow.steps))
    return dataclasses.replace(plan, flow=flow), (handle, key)


def forget_collected(collector: tuple[Any, str] | None) -> None:
    """Drop a job start's collected output from the driver's collector (best effort)."""
    if collector is None:
        return
    handle, key = collector
    try:
        ray.get(handle.forget.remote(key), timeout=10)
    except Exception:
        pass


def create_operators(
    job: str,
    plan: Plan,
    config: RuntimeConfig,
    checkpointing: Checkpointing | None,
    start: StartDecision,
) -> dict[ActorKey, Any] | None:
    """Start a fresh run's operator actors from the driver, beside its coordinator.

    Each actor waits for a Ray worker process and loads rayflow: done
    here, that overlaps the coordinator's own start instead of following
    it. The coordinator adopts them (``coordinator.start.remote(operators)``)
    and the driver must then drop every reference it holds
    (:func:`hand_over`): an actor lives while a handle to it does, so the
    coordinator's is then the only one, and the operators die with it, as
    those it creates itself. Until then the driver kills them if the start
    fails. None if they could not be created here (e.g. a name still held
    by an ending run of the job): then the coordinator creates them, and
    reports what fails as a failed start.
    """
    deployment = Deployment.for_job(
        job, plan, config, checkpointing, start.run_id, start.first_checkpoint_id, start.instance
    )
    try:
        deployment.create()
    except Exception as exc:
        log.debug("job %s: the coordinator creates the operators: %s", job, exc)
        deployment.kill()
        return None
    return deployment.handles


def hand_over(operators: dict[ActorKey, Any] | None, *, kill: bool) -> None:
    """Forget (and with ``kill``, end) the operators created by :func:`create_operators`."""
    if operators is None:
        return
    if kill:
        for handle in operators.values():
            kill_quietly(handle)
    operators.clear()


def create_coordinator(
    job: str,
    plan: Plan,
    config: RuntimeConfig,
    checkpointing: Checkpointing | None,
    start: StartDecision,
    *,
    restart: RestartStrategy | None = None,
    faults: tuple[Fault, ...] = (),
    fault_record: str | None = None,
) -> Any:
    blob = encode_plan(plan)
    return _RemoteCoordinator.options(
        name=naming.coordinator_actor(job),
        namespace=naming.NAMESPACE,
        scheduling_strategy=_beside_the_driver(),
        num_cpus=0,
        max_concurrency=1000,
        max_restarts=0,
    ).remote(
        job,
        blob,
        config,
        checkpointing,
        start,
        restart,
        faults,
        os.getpid(),
        fault_record=fault_record,
    )


def lease_holder() -> dict[str, Any]:
    """Who takes a lease from this process: host, pid and Ray cluster."""
    return leases.holder_info(ray.get_runtime_context().gcs_address)


def lease_holder_alive(lease: leases.Lease) -> bool | None:
    """Is the holder of ``lease`` alive? Known only on the same Ray cluster."""
    holder = lease.holder
    if holder.get("ray_cluster") != ray.get_runtime_context().gcs_address:
        return None  # another cluster: only the lease's expiry can tell
    recorded = holder.get("coordinator_actor_id")
    if not recorded:
        return None  # its coordinator was not running yet
    try:
        handle = ray.get_actor(naming.coordinator_actor(lease.job), namespace=naming.NAMESPACE)
    except ValueError:
        return False
    return bool(handle._actor_id.hex() == recorded)


def kill_quietly(handle: Any) -> None:
    if handle is None:
        return
    try:
        ray.kill(handle, no_restart=True)
    except Exception as exc:
        log.debug("kill: %s", exc)
