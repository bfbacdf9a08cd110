"""The notebooks run top to bottom (small sizes) on the session's Ray; they ship unexecuted."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import ray
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "backpressure.ipynb"])
def test_notebook_runs_top_to_bottom(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in source.cells if c.cell_type == "code")
    # The kernel joins this session's Ray instead of starting its own.
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    client = NotebookClient(
        source, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    executed = client.execute()
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(
        str(o.get("text", ""))
        + str(o.get("data", {}).get("text/plain", ""))
        + str(o.get("data", {}).get("text/html", ""))
        for o in outputs
    )
    if name == "quickstart.ipynb":
        assert "rayflow job quickstart</b>" in text  # the live display and _repr_html_
        assert "'recovered_in_s'" in text and "STOPPED" in text
        assert "Result(start=0.0, end=60.0, value=" in text  # the event-time window
    else:
        assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots
        assert "the source runs at the sink's pace" in text
