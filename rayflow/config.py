"""Options of a job: how records are batched and how much a mailbox may hold."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from rayflow.errors import ConfigError

__all__ = ["Checkpointing", "RestartStrategy", "RuntimeConfig"]

EXACTLY_ONCE = "exactly_once"
AT_LEAST_ONCE = "at_least_once"


@dataclass(frozen=True)
class RuntimeConfig:
    """How records travel between actors.

    - ``batch_size``: at most this many records per batch.
    - ``batch_bytes``: batches are cut shorter so that they stay near this
      many bytes when serialized. The default keeps a batch under Ray's
      limit for arguments passed inline with the call (100 KiB,
      ``max_direct_call_object_size``); a bigger one goes through the object
      store: ``python benchmarks/windows.py --events 4000000 --repeat 4
      --batch-bytes 98304 1048576`` (8,192 of its records are 200 KB) ran at
      p=2 at 754k records/s with 96 KiB, 661k with 1 MiB (medians).
    - ``linger_s``: a partial batch is sent once its oldest record has waited
      this long (the latency a quiet stream pays for batching).
    - ``mailbox_batches`` / ``mailbox_bytes``: the bound of every operator's
      mailbox; they are shared among its input channels as credits.
    - ``metrics_interval_s``: how often the driver refreshes metrics for
      OpenTelemetry and live displays.
    - ``target_inflight_s``: each operator partition asks its senders for
      batches such that what is queued for it is about this many seconds of
      its own work (its measured drain rate times this; Flink's buffer
      debloating). Slow steps get small batches, fast ones keep
      ``batch_size``. 0 turns it off (batches of ``batch_size``).
    - ``stall_after_s``: a partition with input waiting that makes no
      progress for this long raises the ``stalled`` alert.
    - ``backlog_window_s``: a source backlog that grew over this long raises
      ``backlog_growing``.
    - ``hot_key_share``: a key group taking this share of a partition's
      records raises ``hot_key``.
    - ``operator_cpus``: the CPUs each operator actor asks Ray for when its
      step sets no ``num_cpus``. ``"fit"`` (the default): an equal share of
      half the CPUs the cluster can offer (its autoscaling maximum, else what
      is free now), at most 1 — so a job runs on a 2-core laptop, leaves room
      for a second job and for recovery after a node loss, and on an
      autoscaling cluster whose head has no CPUs the autoscaler adds workers
      for it. A number asks for exactly that (``1.0`` makes a job's demand
      grow the cluster as far as its size; ``0`` packs everything anywhere).
    """

    batch_size: int = 8192
    batch_bytes: int = 96 << 10
    linger_s: float = 0.005
    mailbox_batches: int = 8
    mailbox_bytes: int = 16 << 20
    metrics_interval_s: float = 1.0
    target_inflight_s: float = 1.0
    stall_after_s: float = 30.0
    backlog_window_s: float = 10.0
    hot_key_share: float = 0.5
    operator_cpus: float | str = "fit"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "operator_cpus":
                ok = value == "fit" or (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                )
                need = '"fit" or a number of CPUs >= 0'
            elif f.name in (
                "linger_s",
                "metrics_interval_s",
                "target_inflight_s",
                "stall_after_s",
                "backlog_window_s",
                "hot_key_share",
            ):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                need = "a number of seconds >= 0"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                need = "an int >= 1"
            if not ok:
                raise ConfigError(f"RuntimeConfig.{f.name} must be {need}; got {value!r}")
        for name in ("metrics_interval_s", "stall_after_s", "backlog_window_s", "hot_key_share"):
            if getattr(self, name) == 0:
                raise ConfigError(f"RuntimeConfig.{name} must be > 0")
        if self.hot_key_share > 1:
            raise ConfigError(
                f"RuntimeConfig.hot_key_share is a share of records, 0 < share <= 1; "
                f"got {self.hot_key_share!r}"
            )

    @property
    def operator_cpus_value(self) -> float:
        """The CPUs per operator once ``"fit"`` was resolved at start (0 before)."""
        return 0.0 if isinstance(self.operator_cpus, str) else float(self.operator_cpus)


@dataclass(frozen=True)
class Checkpointing:
    """When and where a job takes checkpoints.

    - ``storage``: a local folder (the default, ``./rayflow-checkpoints``;
      on a multi-node cluster it must be a shared file system) or
      ``s3://bucket/prefix`` (boto3's credential chain; ``AWS_ENDPOINT_URL``
      for an S3-compatible server).
    - ``interval_s``: time between the start of two checkpoints, or
      ``"auto"``: chosen from the measured checkpoint duration and the load,
      and changed as they drift (``checkpoint_stats()["interval_s"]`` is the
      one in force): at least the duration divided by ``max_overhead``, at
      most ``max_replay_s`` divided by the busiest step's busy share (about
      the time a replay after a failure would take).
    - ``timeout_s``: a checkpoint not complete by then is declined.
    - ``min_pause_s``: at least this long between the end of one checkpoint
      and the start of the next.
    - ``retain``: complete checkpoints to keep (older ones are deleted, but
      never an object a kept checkpoint still needs).
    - ``full_every``: every K-th snapshot of keyed state is full; those in
      between hold only the keys changed since the previous one.
    - ``max_checkpoint_gap_s``: the job fails when no checkpoint has
      completed for this long (storage down, declined snapshots...); None:
      never. Meanwhile processing goes on, and attempts back off
      exponentially (from ``interval_s`` up to ``max_backoff_s``).
    - ``max_consecutive_failures``: optionally, fail after this many failed
      checkpoints in a row as well (None, the default: only the gap counts;
      when both are set, whichever is reached first fails the job).
    - ``max_uncommitted_records``: while checkpoints cannot complete, the
      output that sinks staged and the input a restart would replay grow;
      a source pauses once it emitted this many records since the last
      completed checkpoint (None: never).
    - ``unaligned``: barriers overtake queued data; what they overtake is
      saved with the snapshot and replayed on restore. A checkpoint then
      takes about as long under backpressure as without it.
    - ``aligned_timeout_s``: checkpoints start aligned, and a barrier that has
      been under way this long (since the sources were triggered) continues
      unaligned. None (the default): never, unless ``unaligned``.
    - ``lease_s``: the job's lease in the storage (one run at a time may
      commit checkpoints) expires when its holder has not renewed it for
      this long; a second driver is refused while the lease is held, and may
      take over after it expired (then it first waits this long again).
    - ``mode``: ``"exactly_once"`` (the default) aligns barriers, so state
      and committed output are exactly-once after a failure;
      ``"at_least_once"`` does not align (an operator with several inputs
      never holds one back, which saves latency under skew), so a recovery
      may apply some records twice, but never loses one.
    - ``recovery``: ``"partial"`` (the default) restarts only the operator
      partitions whose actors died, from their own snapshots, while their
      senders resend what they logged since the checkpoint and everything
      else keeps running; it falls back to a global restart where it cannot
      be exact (an exception in a step, two neighbouring partitions lost
      together, a lost node, a second loss before a checkpoint completed,
      the job's end game, a ``map_batches`` step on records or a window
      on its own stage's ``with_event_time`` in the lost partition's stage;
      docs/protocol.md "Partial recovery").
      ``"global"`` resets every operator to the last checkpoint on any
      failure. Partial recovery needs
      aligned exactly-once checkpoints (otherwise it is global);
      ``handle.recoveries()`` says which (``scope``). Senders keep what they
      sent since the last completed checkpoint (in memory, spilled to local
      disk past 64 MiB).
    """

    storage: str = "rayflow-checkpoints"
    interval_s: float | str = 5.0
    timeout_s: float = 60.0
    min_pause_s: float = 0.0
    retain: int = 3
    full_every: int = 10
    max_consecutive_failures: int | None = None
    mode: str = EXACTLY_ONCE
    lease_s: float = 20.0
    unaligned: bool = False
    aligned_timeout_s: float | None = None
    max_replay_s: float = 30.0
    max_overhead: float = 0.05
    max_checkpoint_gap_s: float | None = 600.0
    max_backoff_s: float = 30.0
    max_uncommitted_records: int | None = 10_000_000
    recovery: str = "partial"

    def __post_init__(self) -> None:
        from rayflow._internal.storage.base import normalize_uri

        if self.mode not in (EXACTLY_ONCE, AT_LEAST_ONCE):
            raise ConfigError(
                f"Checkpointing.mode must be {EXACTLY_ONCE!r} or {AT_LEAST_ONCE!r}; "
                f"got {self.mode!r}"
            )
        if self.recovery not in ("partial", "global"):
            raise ConfigError(
                f'Checkpointing.recovery must be "partial" or "global"; got {self.recovery!r}'
            )
        if not isinstance(self.storage, (str, os.PathLike)) or not os.fspath(self.storage):
            raise ConfigError(
                f"Checkpointing.storage must be a folder path or s3://bucket/prefix; "
                f"got {self.storage!r}"
            )
        object.__setattr__(self, "storage", normalize_uri(self.storage))
        if self.interval_s != "auto":
            value = self.interval_s
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f'Checkpointing.interval_s must be > 0 seconds or "auto"; got {value!r}'
                )
        if not (isinstance(self.max_overhead, (int, float)) and 0 < self.max_overhead < 1):
            raise ConfigError(
                f"Checkpointing.max_overhead is a share of time, 0 < share < 1; "
                f"got {self.max_overhead!r}"
            )
        for name in ("timeout_s", "lease_s", "max_replay_s", "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Checkpointing.{name} must be > 0 seconds; got {value!r}")
        if not isinstance(self.min_pause_s, (int, float)) or self.min_pause_s < 0:
            raise ConfigError(
                f"Checkpointing.min_pause_s must be >= 0 seconds; got {self.min_pause_s!r}"
            )
        if not isinstance(self.unaligned, bool):
            raise ConfigError(
                f"Checkpointing.unaligned must be True or False; got {self.unaligned!r}"
            )
        timeout = self.aligned_timeout_s
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0
        ):
            raise ConfigError(
                f"Checkpointing.aligned_timeout_s must be None or >= 0 seconds; got {timeout!r}"
            )
        for name in ("max_checkpoint_gap_s",):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
            ):
                raise ConfigError(
                    f"Checkpointing.{name} must be None or > 0 seconds; got {value!r}"
                )
        for name in ("max_consecutive_failures", "max_uncommitted_records"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(
                    f"Checkpointing.{name} must be None or an int >= 1; got {value!r}"
                )
        for name in ("retain", "full_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Checkpointing.{name} must be an int >= 1; got {value!r}")

    @property
    def partial_recovery(self) -> bool:
        """Whether operators log what they send for partial recovery (aligned exactly-once
        checkpoints only: an unaligned snapshot's in-flight data is not replayable alone)."""
        return (
            self.recovery == "partial"
            and self.mode == EXACTLY_ONCE
            and not self.unaligned
            and self.aligned_timeout_s is None
        )


@dataclass(frozen=True)
class RestartStrategy:
    """When a failed job restarts from its last checkpoint, and when it gives up.

    A failure (an operator process lost, a node gone, an exception in a
    step) restarts the job from its last complete checkpoint after a delay
    that starts at ``backoff_s`` and doubles up to ``max_backoff_s`` (it
    starts over once a checkpoint completes again). More than
    ``max_failures`` failures within ``window_s`` seconds fail the job with
    every failure listed. Restarts need checkpointing; without it a failure
    fails the job.
    """

    max_failures: int = 10
    window_s: float = 300.0
    backoff_s: float = 0.1
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError(
                f"RestartStrategy.max_failures must be an int >= 0; got {self.max_failures!r}"
            )
        for name in ("window_s", "backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"RestartStrategy.{name} must be >= 0 seconds; got {value!r}")
