"""The driver's log of a job's life: start, checkpoints (every Nth), recoveries, end.

Fed by the telemetry poll (events since the last poll), so logging costs the
job nothing beyond that one call. Failed checkpoints are always logged; so
are recoveries; completed checkpoints only every ``every`` (default 10), so
a job checkpointing every second does not flood its log.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

log = logging.getLogger("rayflow")

REMEMBERED_EVENTS = 4096


class JobJournal:
    def __init__(self, job: str, every: int = 10):
        self.job = job
        self.every = max(1, every)
        self._completed = 0
        self._status: str | None = None
        # Events come again (the job's final report repeats them; a new coordinator
        # numbers its own from 1): each is logged once, known by what it is.
        self._logged: set[tuple[Any, ...]] = set()
        self._order: deque[tuple[Any, ...]] = deque()
        self._lock = threading.Lock()

    def started(self, operators: int, restored: int | None) -> None:
        log.info(
            "job %s started: %d operator actor(s)%s",
            self.job,
            operators,
            f", restored from checkpoint {restored}" if restored is not None else "",
        )

    def update(self, data: dict[str, Any]) -> None:
        with self._lock:  # the poll thread and the job's end may both report
            self._update(data)

    def _update(self, data: dict[str, Any]) -> None:
        status = data.get("status")
        if status and status != self._status:
            if self._status is not None and status not in ("FINISHED", "STOPPED", "FAILED"):
                log.info("job %s: %s", self.job, status)
            self._status = status
        for event in data.get("events") or []:
            kind = event.get("type")
            identity = (kind, event.get("id"), event.get("kind"), event.get("started"))
            if identity in self._logged:
                continue
            self._logged.add(identity)
            self._order.append(identity)
            if len(self._order) > REMEMBERED_EVENTS:  # the coordinator keeps 1,000
                self._logged.discard(self._order.popleft())
            if kind == "checkpoint":
                self._checkpoint(event)
            elif kind == "recovery":
                replaced = event.get("replaced") or []
                log.info(
                    "job %s recovered from checkpoint %s in %.1f s after: %s (%d actor(s) "
                    "replaced, %s records replayed)",
                    self.job,
                    event.get("restored_checkpoint"),
                    event["ended"] - event["started"],
                    event.get("cause"),
                    len(replaced),
                    event.get("records_replayed"),
                )

    def _checkpoint(self, event: dict[str, Any]) -> None:
        if event.get("outcome") != "completed":
            log.warning(
                "job %s: %s %s failed: %s",
                self.job,
                event.get("kind", "checkpoint"),
                event.get("id"),
                event.get("reason"),
            )
            return
        self._completed += 1
        if (
            event.get("kind") != "checkpoint"
            or self._completed % self.every == 1
            or self.every == 1
        ):
            log.info(
                "job %s: %s %s completed in %.0f ms (%s bytes written)%s",
                self.job,
                event.get("kind"),
                event.get("id"),
                (event["ended"] - event["started"]) * 1000.0,
                f"{event.get('written_bytes') or 0:,}",
                f"; then every {self.every}th" if self._completed == 1 and self.every > 1 else "",
            )

    def ended(self, report: Any, duration_s: float) -> None:
        """The end, from the job's final report."""
        status = report.status.value
        if status == "FAILED":
            log.error(
                "job %s %s after %.1f s: %s",
                self.job,
                status,
                duration_s,
                "; ".join(f.describe().splitlines()[0] for f in report.failures),
            )
            return
        detail = ""
        if report.final_checkpoint is not None:
            detail += f", final checkpoint {report.final_checkpoint}"
        if report.savepoint:
            detail += f", savepoint at {report.savepoint}"
        if report.recoveries:
            detail += f", {len(report.recoveries)} recovery(ies)"
        log.info("job %s %s in %.1f s%s", self.job, status, duration_s, detail)


def default_log_handler() -> None:
    """Show rayflow's INFO lines on stderr unless the application set up logging.

    Like Ray's own logger: a handler of its own when the root logger has
    none; an application that configures logging gets rayflow's records
    through its handlers instead. ``RAYFLOW_LOG_LEVEL`` sets the level.
    """
    import os

    logger = logging.getLogger("rayflow")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s rayflow %(levelname)s: %(message)s", "%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("RAYFLOW_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
