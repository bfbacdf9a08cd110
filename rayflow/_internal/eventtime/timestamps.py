"""Event timestamps as float seconds since the epoch.

A user's timestamp function may return an ``int`` or ``float`` (seconds
since the epoch) or a ``datetime``; a naive ``datetime`` is taken as UTC (the
machine's local zone would make results depend on where a worker runs).
Everything downstream (windows, watermarks, timers) works on the float.
Timestamps must be finite: NaN would never fall in a window nor pass a
watermark, and its state would never expire.
"""

from __future__ import annotations

import math
import numbers
from datetime import datetime, timezone
from typing import Any


def to_seconds(value: Any, step: str, what: str = "the timestamp function returned") -> float:
    """``value`` as float seconds since the epoch, or a clear error naming ``step``.

    ``what`` says where the value came from, for the message. Hot loops call
    this only when the value is not already a finite float.
    """
    cls = value.__class__
    if cls is int:
        return float(value)
    if cls is float:
        seconds = value
    elif isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)  # numpy scalars, Decimal-like numbers, int subclasses
    else:
        raise TypeError(
            f"step {step!r}: {what} {_describe(value)}; a timestamp must be seconds "
            "since the epoch (an int or float) or a datetime (naive means UTC)"
        )
    if not math.isfinite(seconds):
        raise ValueError(
            f"step {step!r}: {what} {seconds!r}; a timestamp must be finite seconds since the epoch"
        )
    return seconds


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
