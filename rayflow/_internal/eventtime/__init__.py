"""Event time without Ray: timestamps, windows and timers over keyed state.

Everything here is plain Python driven by the operators in
``rayflow/_internal/runtime/window_ops.py``: ``timestamps`` turns what a
user's timestamp function returns into float seconds, ``windowing`` assigns
records to windows, aggregates them incrementally and fires them when the
watermark passes, and ``timers`` runs event-time timers for
``KeyedStream.process``. Per-key state lives in the operator's
``values`` dict (plain picklable data, snapshotted per key); every index
these modules keep beside it is derived and rebuilt after a restore.
"""

from __future__ import annotations

from typing import Any


class UserFunctionError(Exception):
    """A user function (timestamp, aggregator, on_record, on_timer) raised.

    Raised by this package with the record (or key) being handled, so that the
    operator can wrap it in the runtime's ``UserCodeError`` with its step name;
    ``what`` describes the failing action when there is no single record.
    When a batch of records was being handled, ``index`` is the failing
    record's position in it and ``partial`` what the records before it
    produced (late items, or outputs), so that a step that sets bad records
    aside can go on from there: their effect on the state is already done.
    """

    def __init__(
        self,
        record: Any,
        cause: BaseException,
        what: str = "",
        *,
        index: int | None = None,
        partial: list[Any] | None = None,
    ):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.record = record
        self.cause = cause
        self.what = what
        self.index = index
        self.partial = partial if partial is not None else []

    @classmethod
    def in_batch(
        cls, items: list[Any], record: Any, cause: BaseException, partial: list[Any]
    ) -> UserFunctionError:
        """The error for ``record`` of ``items``, found by identity (no counter in
        the hot loops; a batch holding the very same object twice, where the
        second one fails, would be misplaced, as with the runtime's fallback)."""
        index = next((i for i, x in enumerate(items) if x is record), None)
        return cls(record, cause, index=index, partial=partial)
