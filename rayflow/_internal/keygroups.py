"""Stable key hashing and key-group ranges.

Keys map to ``max_parallelism`` key groups with a hash that is the same in
every process and every run (Python's ``hash()`` is salted per process, so it
must never decide where state lives). Key groups map to partitions in
contiguous ranges, as in Flink, so that state written at one parallelism can
be restored at another by handing whole key groups to new owners.

Keys that compare equal in Python must hash equally here, because the
operator's state is a dict: ``1``, ``1.0`` and ``True`` are one key.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import struct
import uuid
import zlib
from typing import Any

_MASK = (1 << 64) - 1
_SEED_NONE = 0x6E6F6E65
_SEED_STR = 0x9E3779B97F4A7C15
_SEED_BYTES = 0xC2B2AE3D27D4EB4F
_SEED_TUPLE = 0x165667B19E3779F9
_SEED_FROZENSET = 0x27D4EB2F165667C5
_SEED_FLOAT = 0x85EBCA77C2B2AE63

SUPPORTED_KEY_TYPES = (
    "str, bytes, int, float, bool, None, decimal.Decimal, uuid.UUID, "
    "datetime/date/time, Enum members, and tuples or frozensets of these"
)


def _mix(z: int) -> int:
    """splitmix64 finalizer: spreads every input bit over the output."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _hash_bytes(data: bytes, seed: int) -> int:
    # Two independent 32-bit checksums make a 64-bit value; _mix breaks
    # crc32's linearity so that the low bits (used for key groups) are good.
    return _mix((zlib.crc32(data) << 32 | zlib.adler32(data)) ^ seed)


def _hash_int(value: int) -> int:
    if -(1 << 63) <= value < (1 << 64):
        return _mix(value & _MASK)
    length = (value.bit_length() + 8) // 8
    return _hash_bytes(value.to_bytes(length, "little", signed=True), 0)


def stable_hash(key: Any) -> int:
    """A 64-bit hash of ``key`` that is identical in every process.

    Raises ``TypeError`` for key types whose equality cannot be hashed
    stably (say, arbitrary objects).
    """
    # The order of checks matters: bool is an int, IntEnum is an int.
    tp = type(key)
    if tp is str:
        return _hash_bytes(key.encode("utf-8", "surrogatepass"), _SEED_STR)
    if tp is int or tp is bool:
        return _hash_int(int(key))
    if key is None:
        return _mix(_SEED_NONE)
    if tp is tuple:
        h = _SEED_TUPLE ^ len(key)
        for item in key:
            h = _mix((h * 31 + stable_hash(item)) & _MASK)
        return h
    if tp is bytes or tp is bytearray:
        return _hash_bytes(bytes(key), _SEED_BYTES)
    if tp is float:
        return _hash_float(key)
    # Subclasses of int, str and float (IntEnum, StrEnum, ...) compare equal
    # to their base values, so they must hash like them.
    if isinstance(key, int):
        return _hash_int(int(key))
    if isinstance(key, str):
        return stable_hash(str(key))
    if isinstance(key, float):
        return _hash_float(float(key))
    if isinstance(key, enum.Enum):
        cls = type(key)
        return _mix(
            _hash_bytes(f"{cls.__module__}.{cls.__qualname__}".encode(), _SEED_STR)
            ^ stable_hash(key.value)
        )
    if isinstance(key, decimal.Decimal):
        if key == key.to_integral_value():
            return _hash_int(int(key))
        return _hash_float(float(key)) if float(key) == key else stable_hash(str(key.normalize()))
    if isinstance(key, uuid.UUID):
        return _hash_bytes(key.bytes, _SEED_BYTES)
    if isinstance(key, _dt.datetime) and key.utcoffset() is not None:
        # Aware datetimes are equal when they name the same instant.
        key = key.astimezone(_dt.timezone.utc)
    if isinstance(key, (_dt.datetime, _dt.date, _dt.time)):
        return _hash_bytes(key.isoformat().encode(), _SEED_STR ^ 0x1)
    if isinstance(key, frozenset):
        h = _SEED_FROZENSET ^ len(key)
        acc = 0
        for item in key:  # order-independent: sets have no stable order
            acc = (acc + stable_hash(item)) & _MASK
        return _mix(h ^ acc)
    if isinstance(key, tuple):  # namedtuples compare as tuples
        return stable_hash(tuple(key))
    raise TypeError(
        f"cannot use a key of type {tp.__module__}.{tp.__qualname__} ({key!r:.80}); "
        f"keys must be {SUPPORTED_KEY_TYPES}. Return one of these from the key_by "
        "function, for example str(obj) or a tuple of its fields."
    )


def _hash_float(value: float) -> int:
    if value.is_integer():
        return _hash_int(int(value))
    return _hash_bytes(struct.pack("<d", value), _SEED_FLOAT)


def key_group(key: Any, max_parallelism: int) -> int:
    """The key group (0 .. max_parallelism-1) that owns ``key``."""
    return stable_hash(key) % max_parallelism


def partition_of_key_group(group: int, max_parallelism: int, parallelism: int) -> int:
    """The partition that owns key group ``group`` at ``parallelism``."""
    return group * parallelism // max_parallelism


def key_group_range(partition: int, max_parallelism: int, parallelism: int) -> range:
    """The contiguous key groups owned by ``partition`` (inverse of the above)."""
    start = (partition * max_parallelism + parallelism - 1) // parallelism
    end = ((partition + 1) * max_parallelism + parallelism - 1) // parallelism
    return range(start, end)


class KeyRouter:
    """Maps keys to partitions for one shuffle edge, caching the answer.

    Hashing a key costs about a microsecond; most streams reuse keys, so a
    bounded dict of recent keys makes routing a dict lookup.
    """

    __slots__ = ("_cache", "_cache_limit", "max_parallelism", "parallelism")

    def __init__(self, max_parallelism: int, parallelism: int, cache_limit: int = 200_000):
        self.max_parallelism = max_parallelism
        self.parallelism = parallelism
        self._cache: dict[Any, int] = {}
        self._cache_limit = cache_limit

    def partition(self, key: Any) -> int:
        try:
            return self._cache[key]
        except KeyError:
            pass
        except TypeError:
            raise TypeError(
                f"key {key!r:.80} of type {type(key).__qualname__} is not hashable; "
                f"keys must be {SUPPORTED_KEY_TYPES}"
            ) from None
        part = partition_of_key_group(
            stable_hash(key) % self.max_parallelism, self.max_parallelism, self.parallelism
        )
        if len(self._cache) >= self._cache_limit:
            self._cache.clear()
        self._cache[key] = part
        return part
