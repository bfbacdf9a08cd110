"""How many CPUs an operator asks for when its step does not say: ``operator_cpus="fit"``.

Ray places actors by what they ask for. Asking for nothing (what rayflow
did) puts every operator on one node and never tells the autoscaler the job
needs more; asking for a whole CPU each does not run on a laptop. "fit"
asks for an equal share of half the CPUs the cluster can offer, at most one
each: the autoscaling maximum less what others hold when the cluster has an
autoscaler (so on a head with no CPUs the autoscaler adds workers), else what
is free now. Half, so that a second job fits and so that the actors of a lost
node can be recreated on the nodes left. The share is measured once, at the
start: jobs started at the same moment may each see the same free CPUs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from rayflow._internal.plan import Plan
from rayflow.config import RuntimeConfig

log = logging.getLogger("rayflow")

SHARE_OF_CLUSTER = 0.5
# A cluster with no CPUs at all (a head started with num-cpus 0, whose autoscaler
# does not publish its limits): workers must come from the autoscaler; half a CPU
# each lets it add what the job needs without asking for a node per operator.
NO_CPU_CLUSTER_SHARE = 0.5


def fit(
    *,
    defaulted_actors: int,
    explicit_cpus: float,
    free_cpus: float,
    total_cpus: float,
    autoscaling_max_cpus: float | None,
) -> float:
    """CPUs for each of ``defaulted_actors`` operators (rounded down to 1/100)."""
    if defaulted_actors == 0:
        return 0.0
    if autoscaling_max_cpus is None and total_cpus == 0:
        return NO_CPU_CLUSTER_SHARE
    if autoscaling_max_cpus is not None:
        # What the cluster may grow to, less what other jobs already hold.
        offer = max(0.0, autoscaling_max_cpus - (total_cpus - free_cpus))
    else:
        offer = free_cpus
    budget = max(0.0, offer * SHARE_OF_CLUSTER - explicit_cpus)
    return min(1.0, math.floor(budget / defaulted_actors * 100) / 100)


def resolve(config: RuntimeConfig, plan: Plan) -> RuntimeConfig:
    """``config`` with ``operator_cpus`` a number (``"fit"`` measured on the cluster now)."""
    if config.operator_cpus != "fit":
        return config
    import ray

    defaulted = sum(s.parallelism for s in plan.stages if s.resources.num_cpus is None)
    explicit = sum(
        s.parallelism * (s.resources.num_cpus or 0.0)
        for s in plan.stages
        if s.resources.num_cpus is not None
    )
    cpus = fit(
        defaulted_actors=defaulted,
        explicit_cpus=explicit,
        free_cpus=float(ray.available_resources().get("CPU", 0.0)),
        total_cpus=float(ray.cluster_resources().get("CPU", 0.0)),
        autoscaling_max_cpus=_autoscaling_max_cpus(),
    )
    log.debug("job %s: %d operator actor(s) ask for %.2f CPU each", plan.name, defaulted, cpus)
    return replace(config, operator_cpus=cpus)


def _autoscaling_max_cpus() -> float | None:
    """The CPUs the autoscaler may grow the cluster to, if it has one that can grow."""
    try:
        from ray._private.state import state

        config: Any = state.get_cluster_config()
        if not config or not any(
            g.max_count == -1 or g.max_count > g.min_count
            for g in config.node_group_configs
            if g.resources and g.max_count != 0
        ):
            return None
        limits = state.get_max_resources_from_cluster_config() or {}
        cpus = limits.get("CPU")
        return float(cpus) if cpus else None
    except Exception:  # a private API: without it, what is free now decides
        return None
