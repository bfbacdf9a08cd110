"""Vendor KubeRay's RayJob CRD schema for tests/unit/test_infra.py.

KubeRay's ``ray.io_rayjobs.yaml`` is 1.3 MB (two API versions, deeply
indented); the tests need only the ``v1`` version's ``openAPIV3Schema``, which
this writes unchanged as compact JSON, with where it came from::

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > crd.yaml
    python tests/data/kuberay/vendor.py crd.yaml v1.7.0 "$(git -C kuberay rev-parse v1.7.0)"
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
UPSTREAM = "https://github.com/ray-project/kuberay/blob/{tag}/ray-operator/config/crd/bases/ray.io_rayjobs.yaml"


def vendor(crd_file: Path, tag: str, commit: str) -> Path:
    """Write ``rayjobs-<tag>.v1.json`` beside this script; returns its path."""
    raw = crd_file.read_bytes()
    crd = yaml.safe_load(raw)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    out = {
        "source": UPSTREAM.format(tag=tag),
        "license": "Apache-2.0 (KubeRay)",
        "tag": tag,
        "commit": commit,
        "upstream_sha256": hashlib.sha256(raw).hexdigest(),
        "crd": crd["metadata"]["name"],
        "group": crd["spec"]["group"],
        "kind": crd["spec"]["names"]["kind"],
        "version": "v1",
        "note": "spec.versions[name=v1].schema.openAPIV3Schema of the file above, unchanged; "
        "regenerate with tests/data/kuberay/vendor.py",
        "openAPIV3Schema": v1["schema"]["openAPIV3Schema"],
    }
    path = HERE / f"rayjobs-{tag}.v1.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd_file", type=Path, help="ray.io_rayjobs.yaml of a KubeRay release")
    parser.add_argument("tag", help="the release tag, e.g. v1.7.0")
    parser.add_argument("commit", help="the commit that tag names")
    args = parser.parse_args()
    print(vendor(args.crd_file, args.tag, args.commit))


if __name__ == "__main__":
    main()
