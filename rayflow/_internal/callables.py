"""Looking at what users hand us, for build-time error messages."""

from __future__ import annotations

import inspect
from typing import Any


def describe(value: Any) -> str:
    """A value's type and a short repr (a class by its qualified name)."""
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def defined_at(fn: Any) -> str:
    """`` (defined at file:line)`` for a Python function, else nothing."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    return f" (defined at {code.co_filename}:{code.co_firstlineno})"


def arity_mismatch(fn: Any, arity: int) -> str | None:
    """Why ``fn`` cannot take ``arity`` positional arguments (``name(sig) does not``), or
    None when it can or its signature is unknown (builtins)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*range(arity))
    except TypeError:
        name = getattr(fn, "__qualname__", repr(fn))
        return f"{name}{sig} does not{defined_at(fn)}"
    return None
