"""Pickling user values (state, committables, offsets) so that they come back as they were.

Plain pickle first: it is fast, and it refuses (``PicklingError: ... not
the same object as ...``) exactly the classes that Ray rebuilt from the
driver by value: those defined in a notebook or script (``__main__``) or in
the user's own modules. Those go through Ray's cloudpickle, by value, with
the class tracker that Ray used for the plan, so that after a restore the
values are instances of the very classes the user's functions see.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

PROTOCOL = 5

_FALLBACK_ERRORS = (RecursionError, ValueError, pickle.PicklingError, TypeError, AttributeError)


def _cloudpickle() -> Any:
    """Ray's cloudpickle: the one whose class tracker knows the classes Ray rebuilt."""
    from ray import cloudpickle as ray_cloudpickle

    return ray_cloudpickle


def dumps_value(value: Any) -> bytes:
    """Pickle ``value``; by value for classes that live only in the driver's code."""
    try:
        return pickle.dumps(value, protocol=PROTOCOL)
    except _FALLBACK_ERRORS:
        data: bytes = _cloudpickle().dumps(value, protocol=PROTOCOL)
        return data


def dumps_fast(items: Any) -> bytes:
    """Like :func:`dumps_value`, without the memo (values, not object graphs): ~10x faster."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=PROTOCOL)
    pickler.fast = True  # no memo: records are values, shared references need not survive
    try:
        pickler.dump(items)
    except _FALLBACK_ERRORS:
        data: bytes = _cloudpickle().dumps(items, protocol=PROTOCOL)
        return data
    return buf.getvalue()
