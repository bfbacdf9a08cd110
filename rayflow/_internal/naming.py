"""Names of rayflow's Ray actors: the contract people and tests find them by."""

from __future__ import annotations

import re

NAMESPACE = "rayflow"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def is_valid_name(name: object) -> bool:
    """Step and job names: letters, digits, ``_ . -``; they appear in actor names and paths."""
    # fullmatch, not match: "$" would accept a trailing newline.
    return isinstance(name, str) and len(name) <= 100 and bool(_NAME.fullmatch(name))


def operator_actor(job: str, stage: str, partition: int) -> str:
    return f"rayflow/{job}/{stage}/{partition}"


def coordinator_actor(job: str) -> str:
    return f"rayflow/{job}/coordinator"


def collector_actor(driver: str) -> str:
    """The Collect actor of one driver (its Ray job id), shared by the jobs it starts."""
    return f"rayflow/collect/{driver}"
