from __future__ import annotations

import datetime as dt
import enum
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from decimal import Decimal

import pytest

from rayflow._internal.keygroups import (
    KeyRouter,
    key_group,
    key_group_range,
    partition_of_key_group,
    stable_hash,
)

SAMPLE_KEYS = [
    "word",
    "",
    "ünïcødé",
    0,
    1,
    -1,
    2**63,
    -(2**70),
    3.5,
    None,
    b"bytes",
    ("a", 1),
    ("a", (2, "b")),
    True,
    dt.date(2024, 1, 2),
    uuid.UUID(int=7),
]

_PRINT_HASHES = (
    "import json, datetime as dt, uuid\n"
    "from rayflow._internal.keygroups import stable_hash\n"
    "keys = %s\n"
    "print(json.dumps([stable_hash(k) for k in keys]))\n"
)


def _hashes_in_subprocess(seed: str) -> list[int]:
    code = _PRINT_HASHES % repr(SAMPLE_KEYS).replace("datetime.date", "dt.date").replace(
        "UUID(", "uuid.UUID("
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_hash_is_the_same_in_processes_with_other_hash_seeds() -> None:
    here = [stable_hash(k) for k in SAMPLE_KEYS]
    assert _hashes_in_subprocess("1") == here
    assert _hashes_in_subprocess("4242") == here
    # Python's own hash differs between those processes; ours must not rely on it.
    assert len(set(here)) == len(set(SAMPLE_KEYS))  # 1 and True are one key


def test_keys_that_are_equal_in_python_hash_equally() -> None:
    class Color(enum.IntEnum):
        RED = 1

    assert stable_hash(1) == stable_hash(1.0) == stable_hash(True) == stable_hash(Color.RED)
    assert stable_hash(Decimal("2")) == stable_hash(2)
    assert stable_hash(Decimal("2.5")) == stable_hash(2.5)
    aware = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    shifted = aware.astimezone(dt.timezone(dt.timedelta(hours=5)))
    assert aware == shifted and stable_hash(aware) == stable_hash(shifted)
    assert stable_hash(frozenset({1, 2, 3})) == stable_hash(frozenset({3, 2, 1}))


def test_unsupported_key_type_error_says_what_to_do() -> None:
    class Thing:
        pass

    with pytest.raises(TypeError, match=r"keys must be str, bytes, int.*str\(obj\)"):
        stable_hash(Thing())


def test_key_groups_spread_evenly() -> None:
    counts = Counter(key_group(f"user-{i}", 128) for i in range(128_000))
    assert len(counts) == 128
    assert max(counts.values()) < 1.2 * 1000 and min(counts.values()) > 0.8 * 1000
    int_counts = Counter(key_group(i, 128) for i in range(128_000))
    assert max(int_counts.values()) < 1.2 * 1000


@pytest.mark.parametrize("max_par", [1, 7, 128, 1000])
def test_key_group_ranges_partition_the_groups_consistently(max_par: int) -> None:
    for par in sorted({p for p in (1, 2, 3, 5, max_par // 2 or 1, max_par) if p <= max_par}):
        seen = []
        for p in range(par):
            groups = key_group_range(p, max_par, par)
            assert len(groups) > 0
            for g in groups:
                assert partition_of_key_group(g, max_par, par) == p
            seen.extend(groups)
        assert seen == list(range(max_par))


def test_router_caches_and_agrees_with_key_groups() -> None:
    router = KeyRouter(128, 4, cache_limit=10)
    for i in range(100):  # more keys than the cache holds
        key = f"k{i}"
        expected = partition_of_key_group(key_group(key, 128), 128, 4)
        assert router.partition(key) == expected
        assert router.partition(key) == expected
    assert len(router._cache) <= 10
    with pytest.raises(TypeError, match="not hashable"):
        router.partition(["a", "list"])
