"""Options of a job: how records are batched and how much a mailbox may hold."""

from __future__ import annotations

from dataclasses import dataclass, fields

from rayflow.errors import ConfigError

__all__ = ["RuntimeConfig"]


@dataclass(frozen=True)
class RuntimeConfig:
    """How records travel between actors.

    - ``batch_size``: at most this many records per batch.
    - ``batch_bytes``: batches are cut shorter so that they stay near this
      many bytes when serialized.
    - ``linger_s``: a partial batch is sent once its oldest record has waited
      this long (the latency a quiet stream pays for batching).
    - ``mailbox_batches`` / ``mailbox_bytes``: the bound of every operator's
      mailbox; they are shared among its input channels as credits.
    - ``metrics_interval_s``: how often the driver refreshes metrics for
      OpenTelemetry and live displays.
    """

    batch_size: int = 4096
    batch_bytes: int = 1 << 20
    linger_s: float = 0.02
    mailbox_batches: int = 8
    mailbox_bytes: int = 16 << 20
    metrics_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("linger_s", "metrics_interval_s"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
                need = "a number of seconds >= 0"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                need = "an int >= 1"
            if not ok:
                raise ConfigError(f"RuntimeConfig.{f.name} must be {need}; got {value!r}")
        if self.metrics_interval_s == 0:
            raise ConfigError("RuntimeConfig.metrics_interval_s must be > 0")
