"""What the command line prints: tables, JSON, and one-line errors with exit codes.

Exit codes are a contract for scripts (documented in ``rayflow --help``).
Errors from the Python API mention its parameters (``restore_from=``); on
the command line they are reworded to the flags a user types.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 the job or the checkpoint asked for failed; 2 bad usage or "
    "input; 3 not found (job, file, checkpoint); 4 cannot reach Ray or the storage "
    "(address, credentials); 130 interrupted."
)


class CliError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE, *, hard_exit: bool = False):
        super().__init__(message)
        self.code = code
        # Leave without running exit handlers: a Ray connection attempt is still stuck.
        self.hard_exit = hard_exit


# API words -> the flags a command-line user types (most specific first).
_CLI_WORDS = [
    (r"either resume=True or restore_from=\.\.\.", "either --resume or --restore-from"),
    (
        r"resume=True needs checkpoint=rf\.Checkpointing\(storage=\.\.\.\)",
        "--resume needs --checkpoint URI",
    ),
    (r"checkpoint=rf\.Checkpointing\([^)]*\)", "--checkpoint URI"),
    (r"checkpoint=\.\.\.", "--checkpoint URI"),
    (r"restore_from=", "--restore-from "),
    (r"resume=True", "--resume"),
    (r"job_name", "--job-name"),
]


def cli_words(message: str) -> str:
    """``message`` with Python API parameters replaced by the matching CLI flags."""
    for pattern, flag in _CLI_WORDS:
        message = re.sub(pattern, flag, message)
    return message


def emit(as_json: bool, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if as_json else text, flush=True)


def emit_error(as_json: bool, message: str, code: int) -> None:
    """One line on stderr (and a JSON object on stdout with ``--json``)."""
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}), flush=True)
    print(f"rayflow: {message}", file=sys.stderr, flush=True)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table with a header; numbers right-aligned."""
    if not rows:
        return "(none)"
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    for row in cells:
        lines.append(
            "  ".join(
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(row, widths, numeric, strict=True)
            ).rstrip()
        )
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def compact(n: float) -> str:
    """1234567 -> '1.2M': for a progress line that must stay short."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
