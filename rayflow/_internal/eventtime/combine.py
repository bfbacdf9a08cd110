"""Combining before the shuffle: ``window(..., combine=True)`` (Flink's local-global aggregation).

A sender whose output goes through a ``key_by`` into a combining window
step aggregates each slice of ``(key, record)`` items per (key, window)
before routing them, and sends one *partial* per cell instead of its
records: the item ``(key, start, acc, n)``, ``n`` the records folded into
``acc``. Four fields, where a record's item has two, tell them apart: a
marker object would cost a lookup per item to unpickle, since batches are
pickled without a memo. The window step merges a partial into the window's
accumulator as a session merges (``Kernel.merge``). Fewer items cross
the shuffle: in the benchmark's 1-minute count over 1,000 keys, 0.12 per
record (``python benchmarks/windows.py --combine``).

Which records may be combined: late records must still reach ``.late`` one
by one, and only the window step knows its watermark ``W``. The sender
combines a record only if its window cannot be closed at the receiver when
the partial arrives: ``start + size + lateness > T``, ``T`` the highest
watermark the sender has sent (``EventTime.highest_sent``). A receiver's
watermark is the minimum over its input channels of what came on them, and
a watermark goes out behind the records routed before it (``send_control``
flushes them first), so ``W <= T`` when the partial arrives; the other
records go on as they are and the window step decides.
Two things would break ``W <= T``, and are excluded:

- an idle sender (``idle_timeout_s``): its receivers stop waiting for it and
  their ``W`` may pass its watermark. ``combine=True`` is refused when a
  ``with_event_time`` feeding the window has ``idle_timeout_s``.
- a restore: receivers restore their ``W`` while a restored sender has
  sent nothing yet. The watermark sent is in the snapshot and ``T`` never
  goes below it (on a rescale, the highest of the old partitions': every
  receiver's restored ``W`` is at most each one's). Partials in flight in
  an unaligned checkpoint are restored only at the window's parallelism
  (``restore._check_partials_stay``).

A count per slice depends on where the partition's input was cut into
slices, so a partition that combines is recovered with its whole job, never
alone (docs/protocol.md, P6; ``failover.cut_dependent``).

Only ``Tumbling`` windows with ``Count`` or ``Sum`` combine: their merge is
addition and cannot fail on the values the sender could add. A record whose
timestamp or ``Sum`` function fails at the sender goes on as it is: the
window step then fails on it, or sets it aside, as its ``on_error`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rayflow._internal.eventtime.timestamps import to_seconds
from rayflow._internal.runtime.columns import has_columns
from rayflow.windows import Aggregator, Count, Sum, Tumbling, Windower

Items = list[Any]


class CombineBroken(RuntimeError):
    """A partial that cannot be merged: it stands for several records, so ``on_error``
    cannot set it aside, and the task fails with this message."""


def unsupported(windower: Windower, aggregator: Aggregator) -> str | None:
    """Why ``combine=True`` cannot work with these, or None if it can."""
    if not isinstance(windower, Tumbling):
        return (
            f"combine=True works with rf.windows.Tumbling windows; got {type(windower).__name__} "
            "(a record of a sliding window would be counted once per window it is in, and "
            "sessions merge by time)"
        )
    if not isinstance(aggregator, (Count, Sum)):
        return (
            f"combine=True works with rf.windows.Count() and Sum(fn); got "
            f"{type(aggregator).__name__} (its partial results could not be merged)"
        )
    return None


def make_combiner(
    step: str,
    windower: Tumbling,
    aggregator: Count | Sum,
    lateness: float,
    ts_fn: Callable[[Any], Any],
    floor: Callable[[], float],
) -> Callable[[Items], Items]:
    """The sender's combine for window step ``step``: items in, partials and the
    records it may not combine out (those keep their order). ``floor()`` is ``T``."""
    size, offset = windower.size_s, windower.offset_s
    close = size + lateness
    value_fn = aggregator.fn if isinstance(aggregator, Sum) else None
    counting = isinstance(aggregator, Count)

    def combine(items: Items) -> Items:
        if not items or has_columns(items):
            return items
        threshold = floor()
        cells: dict[tuple[Any, float], list[Any]] = {}
        get = cells.get
        passed: Items = []
        for kv in items:  # the key_by's (key, record) items (a replay skips this)
            key, record = kv
            try:
                t = ts_fn(record)
                if t.__class__ is not float or t - t:
                    t = to_seconds(t, step)
                start = (t - offset) // size * size + offset
                if start + close <= threshold:
                    passed.append(kv)  # may be late at the receiver: it decides
                    continue
                cell = get((key, start))
                if counting:
                    if cell is None:
                        cells[key, start] = [1]
                    else:
                        cell[0] += 1
                    continue
                value = record if value_fn is None else value_fn(record)
                if cell is None:
                    cells[key, start] = [value, 1]
                else:
                    total = cell[0] + value
                    cell[0] = total
                    cell[1] += 1
            except Exception:
                passed.append(kv)  # the window step fails on it, or sets it aside
        if counting:
            out = [(key, start, c[0], c[0]) for (key, start), c in cells.items()]
        else:
            out = [(key, start, c[0], c[1]) for (key, start), c in cells.items()]
        if passed:
            out.extend(passed)
        return out

    return combine
