"""What `pip install rayflow` gives: hard dependencies for a local job, the rest as extras.

These read the installed package's metadata: after editing pyproject.toml,
run `pip install -e '.[test]'` again so that it matches.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import importlib.resources
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import rayflow as rf
from rayflow._version import package_version

ROOT = Path(__file__).resolve().parents[2]

# What each extra exists for; the hard dependencies must need none of them.
OPTIONAL = {
    "s3": ["boto3", "botocore", "s3transfer"],
    "otel": ["opentelemetry"],
    "notebook": ["pandas", "matplotlib", "IPython", "ipykernel"],
    "kafka": ["confluent_kafka"],
    "parquet": ["pyarrow"],
}
# Modules of rayflow that exist only for an extra (imported lazily by the rest).
NEEDS_AN_EXTRA = {"rayflow._internal.storage.s3": "s3"}


def _requirements(dist: str, extras: frozenset[str]) -> list[Requirement]:
    """The requirements of ``dist`` that apply with ``extras`` on this interpreter."""
    wanted = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            wanted.append(req)
    return wanted


def _closure(dist: str, extras: frozenset[str]) -> set[str]:
    """Every distribution that `pip install dist[extras]` installs (canonical names)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(dist), extras)]
    while todo:
        name, ex = todo.pop()
        if (name, ex) in seen:
            continue
        seen.add((name, ex))
        try:
            requirements = _requirements(name, ex)
        except metadata.PackageNotFoundError:
            continue  # not installed here: listed, but its own requirements are unknown
        todo.extend((canonicalize_name(r.name), frozenset(r.extras)) for r in requirements)
    return {name for name, _ in seen}


def test_the_version_is_the_one_in_pyproject_read_from_the_package_metadata() -> None:
    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1]
    written = re.search(r'^version = "([^"]+)"', project, re.MULTILINE)
    assert written is not None, "pyproject.toml [project] has no version"
    assert metadata.version("rayflow") == written.group(1), (
        "the installed metadata is stale: run pip install -e '.[test]'"
    )
    assert rf.__version__ == written.group(1)
    assert package_version("rayflow-never-installed") == "0+unknown"


def test_boto3_and_the_otel_sdk_come_only_with_their_extras() -> None:
    hard = {canonicalize_name(r.name) for r in _requirements("rayflow", frozenset())}
    assert hard == {"ray", "cloudpickle", "click", "psutil"}
    assert "boto3" in _closure("rayflow", frozenset({"s3"}))
    assert "opentelemetry-sdk" in _closure("rayflow", frozenset({"otel"}))
    cluster = [r for r in _requirements("rayflow", frozenset({"cluster"})) if r.name == "ray"]
    assert any("default" in r.extras for r in cluster), "[cluster] must bring ray[default]"
    assert set(metadata.metadata("rayflow").get_all("Provides-Extra") or []) >= {
        "s3",
        "otel",
        "cluster",
        "kafka",
        "parquet",
        "notebook",
        "dev",
        "test",
    }


def test_the_test_extra_installs_everything_the_test_suite_imports() -> None:
    local = {p.stem for p in ROOT.rglob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    imported: dict[str, str] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    imported.setdefault(top, str(path.relative_to(ROOT)))
    installed = _closure("rayflow", frozenset({"test"}))
    providers = metadata.packages_distributions()
    missing = {
        module: where
        for module, where in imported.items()
        if not {canonicalize_name(d) for d in providers.get(module, [])} & installed
    }
    assert not missing, (
        f"the test suite imports modules that pip install -e '.[test]' does not install "
        f"(module: first test file importing it): {missing}; add them to the test extra"
    )


def test_the_package_ships_type_hints_and_the_apache_license() -> None:
    assert importlib.resources.files("rayflow").joinpath("py.typed").is_file()
    meta = metadata.metadata("rayflow")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty" in text


def test_a_missing_boto3_is_named_with_the_extra_that_installs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rayflow._internal.storage.base import open_storage

    for module in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, module, None)  # None: import raises ImportError
    monkeypatch.delitem(sys.modules, "rayflow._internal.storage.s3", raising=False)
    with pytest.raises(rf.ConfigError, match=re.escape("pip install 'rayflow[s3]'")) as sink:
        rf.sinks.S3JsonLines("s3://bucket/out")
    assert "S3JsonLines needs boto3" in str(sink.value)
    with pytest.raises(rf.ConfigError, match=re.escape("pip install 'rayflow[s3]'")) as storage:
        open_storage("s3://bucket/checkpoints-without-boto3")
    assert "s3:// storage" in str(storage.value) and "boto3" in str(storage.value)


def test_rayflow_and_the_wordcount_job_need_no_extra() -> None:
    """`pip install -e . && python jobs/wordcount.py` on a machine without any extra."""
    blocked = sorted({m for modules in OPTIONAL.values() for m in modules})
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, pkgutil, sys

        BLOCKED = {blocked!r}

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Absent())
        import rayflow
        failed = []
        for info in pkgutil.walk_packages(rayflow.__path__, "rayflow."):
            if info.name in {sorted(NEEDS_AN_EXTRA)!r} or info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except ImportError as exc:
                failed.append(f"{{info.name}}: {{exc}}")
        sys.path.insert(0, {str(ROOT / "jobs")!r})
        import wordcount
        wordcount.build("{ROOT}/jobs/data/*.txt", "/tmp/unused", 2)
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        print("FAILED", failed, "LOADED", loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("FAILED [] LOADED []"), (
        f"modules of rayflow import an optional dependency at import time "
        f"(import it where it is used, raising rayflow._internal.extras.missing_extra): "
        f"{done.stdout.strip()}"
    )
