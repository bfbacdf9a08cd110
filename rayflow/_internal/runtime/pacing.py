"""How fast a stage's work is, and what follows from it: slices and credits by time.

Fixed record counts make every latency proportional to the slowest
function: 8,192 records at 2 ms each are 16 s of work in one batch. So a
stage measures the cost of its own chain per record and

- runs a batch in *slices* of about ``SLICE_S`` of work, off the event loop
  when a slice is long, so that control calls are answered in between;
- sizes source reads the same way, so a checkpoint trigger waits one slice;
- grants its senders *credits by time* (Flink's buffer debloating): it asks
  for batches such that what is queued for it is about ``target_inflight_s``
  of its work. Its drain rate counts busy and back-pressured time (the
  time it spends on a record, including waiting for its own consumers),
  not idle time.
"""

from __future__ import annotations

#: The work one slice of a batch should take, in seconds.
SLICE_S = 0.02
#: Slices expected to take no longer than this run on the data plane's event
#: loop: a thread hop per batch costs fast steps 10-30% (GIL hand-offs, measured
#: with keyed_sum and wordcount). Control calls do not wait for them either
#: way (they run on an event loop of their own, ``actor.py``); a longer slice
#: (one record over 20 ms, or a cost not measured yet) runs in the user-code
#: thread, so that batches and barriers keep arriving meanwhile.
INLINE_S = SLICE_S
#: Records in the first slice of a stage whose cost is not known yet.
FIRST_SLICE = 4
#: A sender's batch size (and one batch in flight) until its receiver has told
#: it what it wants: a slow receiver must not get thousands of records of work
#: before it could say so; a fast one says so within a round trip.
INITIAL_BATCH = 4


class CostMeter:
    """Seconds per record of one stage's chain (an exponential average)."""

    __slots__ = ("alpha", "per_record")

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.per_record: float | None = None

    def observe(self, records: int, seconds: float) -> None:
        if records <= 0 or seconds < 0:
            return
        sample = seconds / records
        if self.per_record is None:
            self.per_record = sample
        else:
            # Big samples count more: one record of a batch says less than 8,192.
            weight = min(1.0, self.alpha * max(1.0, records / 64))
            self.per_record += weight * (sample - self.per_record)

    def slice_records(self, remaining: int, slice_s: float = SLICE_S) -> int:
        """How many of ``remaining`` records to run before looking up again."""
        if self.per_record is None:
            return min(remaining, FIRST_SLICE)
        if self.per_record <= 0:
            return remaining
        return max(1, min(remaining, int(slice_s / self.per_record)))

    def inline(self, records: int) -> bool:
        """Whether ``records`` are short enough work to run on the event loop."""
        return self.per_record is not None and self.per_record * records <= INLINE_S


class Debloater:
    """What a receiver asks of its senders: records per batch, from its drain rate."""

    __slots__ = ("_last", "batch_size", "channels", "credit_batches", "drain", "target_s")

    def __init__(self, target_s: float, channels: int, credit_batches: int, batch_size: int):
        self.target_s = target_s
        self.channels = max(1, channels)
        self.credit_batches = max(1, credit_batches)
        self.batch_size = batch_size
        self.drain = CostMeter()  # seconds per record, busy and back-pressured
        self._last: tuple[float, int] | None = None

    def sample(self, working_s: float, records: int) -> None:
        """Cumulative working seconds and records taken in, sampled now and then."""
        if self._last is not None:
            dt, dn = working_s - self._last[0], records - self._last[1]
            if dn > 0 and dt >= 0:
                self.drain.observe(dn, dt)
        self._last = (working_s, records)

    def batch_hint(self, first_guess: float | None = None) -> tuple[int, int]:
        """(records per batch, batches in flight) each sender should use; (0, 0): no opinion.

        Below one record per batch, fewer batches: a step that takes seconds per
        record gets one record at a time, one batch queued. Until the drain rate
        is measured, ``first_guess`` (the processing cost) stands in for it.
        """
        per_record = self.drain.per_record
        if per_record is None:
            per_record = first_guess
        if per_record is None:
            return 0, 0
        if per_record <= 0:
            return self.batch_size, self.credit_batches
        per_channel = self.target_s / per_record / self.channels
        if per_channel < self.credit_batches:
            return 1, max(1, int(per_channel))
        wanted = per_channel / self.credit_batches
        return max(1, min(self.batch_size, int(wanted))), self.credit_batches

    def inflight_s(self, queued_records: int) -> float:
        """Seconds of work ``queued_records`` stand for."""
        return queued_records * (self.drain.per_record or 0.0)
