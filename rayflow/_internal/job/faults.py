"""Fault injection at named points of the checkpoint and recovery protocol.

The job's coordinator calls :meth:`FaultInjector.hit` at each point; a
fault armed for that point (by ``rf.testing.Faults`` at start, or by
``rf.testing.chaos`` while the job runs) kills what it names there and then
the protocol goes on, exactly as if the process had died at that moment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rayflow.testing import FAULT_ACTIONS, FAULT_POINTS, Fault

log = logging.getLogger("rayflow")


def check_fault(fault: Fault) -> None:
    if fault.point not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {fault.point!r}; points: {', '.join(FAULT_POINTS)}")
    if fault.action not in FAULT_ACTIONS:
        raise ValueError(
            f"unknown fault action {fault.action!r}; actions: {', '.join(FAULT_ACTIONS)}"
        )
    if fault.action == "kill_operator" and not fault.target:
        raise ValueError("a kill_operator fault needs target=<operator actor name>")


class FaultInjector:
    def __init__(
        self,
        job: str,
        *,
        driver_pid: int | None,
        kill_actor: Callable[[str], None],
        record: str | None = None,
    ):
        self.job = job
        self._record_path = record
        self.driver_pid = driver_pid
        self._kill_actor = kill_actor
        self._armed: dict[int, tuple[Fault, int]] = {}  # id -> (fault, times seen)
        self._next = 1
        self.fired: list[dict[str, Any]] = []

    def arm(self, fault: Fault) -> int:
        check_fault(fault)
        fault_id = self._next
        self._next += 1
        self._armed[fault_id] = (fault, 0)
        return fault_id

    def disarm(self, fault_id: int) -> bool:
        return self._armed.pop(fault_id, None) is not None

    def armed(self) -> list[int]:
        return sorted(self._armed)

    async def hit(self, point: str, checkpoint_id: int | None) -> None:
        for fault_id, (fault, seen) in list(self._armed.items()):
            if fault.point != point:
                continue
            if fault.checkpoint_id is not None and fault.checkpoint_id != checkpoint_id:
                continue
            seen += 1
            if seen < fault.nth:
                self._armed[fault_id] = (fault, seen)
                continue
            del self._armed[fault_id]
            self._fire(fault_id, fault, checkpoint_id)

    def _fire(self, fault_id: int, fault: Fault, checkpoint_id: int | None) -> None:
        record = {
            "id": fault_id,
            **asdict(fault),
            "checkpoint": checkpoint_id,
            "time": time.time(),
        }
        self.fired.append(record)
        if self._record_path:
            # Written through before the fault strikes: a kill_coordinator ends this process.
            with open(self._record_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        log.warning(
            "fault injection in job %s: %s at %s (checkpoint %s)%s",
            self.job,
            fault.action,
            fault.point,
            checkpoint_id,
            f" -> {fault.target}" if fault.target else "",
        )
        if fault.action == "kill_operator":
            assert fault.target is not None
            try:
                self._kill_actor(fault.target)
            except Exception as exc:  # already dead: nothing more to do
                log.warning("fault injection: %s was not killed: %s", fault.target, exc)
        elif fault.action == "kill_coordinator":
            os._exit(1)
        elif fault.action == "kill_driver" and self.driver_pid:
            os.kill(self.driver_pid, signal.SIGKILL)
