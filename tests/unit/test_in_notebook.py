"""Notebook detection: right in a kernel, and free in a plain script."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from rayflow._internal.notebook import in_notebook


def test_a_plain_script_is_no_notebook_and_does_not_import_ipython() -> None:
    # In a fresh interpreter: the test session may have imported IPython itself.
    code = (
        "import sys\n"
        "from rayflow._internal.notebook import in_notebook\n"
        "print(in_notebook(), 'IPython' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_kernel_is_a_notebook_and_a_terminal_shell_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = types.ModuleType("IPython")
    shell: object = types.SimpleNamespace(kernel=object())
    fake.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert in_notebook()
    shell = types.SimpleNamespace()  # IPython in a terminal: no kernel
    assert not in_notebook()
    shell = None  # IPython imported, no shell running
    assert not in_notebook()
