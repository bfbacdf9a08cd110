"""The ``rayflow`` command: run flows, watch and stop jobs, inspect checkpoints.

Exit codes (stable, for scripts):

- 0: done (a job finished or was stopped; a command succeeded)
- 1: the job failed, or the checkpoint/savepoint asked for failed
- 2: bad usage or bad input (no flow in the file, an unknown URI scheme, ...)
- 3: not found (no running job of that name, no checkpoint at that URI)

Every command takes ``--json`` for machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except CliError as exc:
        _emit_error(args, str(exc), exc.code)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayflow",
        description="Run rayflow dataflows on Ray, watch and stop running jobs, and inspect "
        "checkpoints.",
        epilog="Exit codes: 0 done, 1 job or checkpoint failed, 2 bad usage or input, "
        "3 not found. Add --json to any command for machine-readable output.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, ray_address: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if ray_address:
            p.add_argument(
                "--address",
                default=None,
                help="Ray cluster to use (default: RAY_ADDRESS, else the local "
                "one, else start one)",
            )

    run = sub.add_parser(
        "run",
        help="run the flow defined in a Python file",
        description="Run a flow defined in FILE: a module-level Dataflow (or a function "
        "named 'flow' that returns one). Blocks until the job ends.",
    )
    run.add_argument("file")
    _run_options(run)
    common(run)
    run.set_defaults(handler=_cmd_run)

    resume = sub.add_parser(
        "resume",
        help="continue a job from the latest checkpoint in a storage",
        description="Run the flow in FILE from the latest complete checkpoint of its job "
        "in the checkpoint storage URI (the job's name is the flow's, or --job-name).",
    )
    resume.add_argument("uri", help="checkpoint storage: a folder or s3://bucket/prefix")
    resume.add_argument("file")
    _run_options(resume, storage=False)
    common(resume)
    resume.set_defaults(handler=_cmd_resume)

    status = sub.add_parser("status", help="show a running job's status and metrics")
    status.add_argument("job")
    common(status)
    status.set_defaults(handler=_cmd_status)

    stop = sub.add_parser(
        "stop", help="stop a running job (drain, final checkpoint) and wait for its end"
    )
    stop.add_argument("job")
    stop.add_argument("--savepoint", default=None, help="end with a savepoint at this URI")
    stop.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    common(stop)
    stop.set_defaults(handler=_cmd_stop)

    savepoint = sub.add_parser("savepoint", help="write a savepoint of a running job")
    savepoint.add_argument("job")
    savepoint.add_argument("uri", help="where: a folder or s3://bucket/prefix")
    common(savepoint)
    savepoint.set_defaults(handler=_cmd_savepoint)

    checkpoints = sub.add_parser("checkpoints", help="list, show or delete checkpoints")
    cp_sub = checkpoints.add_subparsers(dest="action", required=True, metavar="ACTION")
    cp_list = cp_sub.add_parser(
        "list",
        help="the complete checkpoints in a storage",
        description="List the complete checkpoints (those with a manifest) of every job in "
        "the checkpoint storage URI, or of --job only.",
    )
    cp_list.add_argument("uri")
    cp_list.add_argument("--job", default=None)
    common(cp_list, ray_address=False)
    cp_list.set_defaults(handler=_cmd_cp_list)
    cp_show = cp_sub.add_parser(
        "show",
        help="one checkpoint's manifest",
        description="Show a checkpoint (URI = <storage>/<job>/checkpoints/<id>) or a "
        "savepoint folder: steps, parallelism, source offsets and objects.",
    )
    cp_show.add_argument("uri")
    common(cp_show, ray_address=False)
    cp_show.set_defaults(handler=_cmd_cp_show)
    cp_delete = cp_sub.add_parser(
        "delete",
        help="delete a checkpoint or a savepoint",
        description="Delete a savepoint folder, or one checkpoint (its manifest and the "
        "objects no other checkpoint of the job needs).",
    )
    cp_delete.add_argument("uri")
    common(cp_delete, ray_address=False)
    cp_delete.set_defaults(handler=_cmd_cp_delete)
    return parser


def _run_options(p: argparse.ArgumentParser, storage: bool = True) -> None:
    p.add_argument("--job-name", default=None, help="job name (default: the flow's name)")
    if storage:
        p.add_argument(
            "--checkpoint",
            default=None,
            metavar="URI",
            help="take checkpoints into this folder or s3://bucket/prefix",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue from the latest checkpoint in --checkpoint",
        )
        p.add_argument(
            "--restore-from", default=None, metavar="URI", help="start from this savepoint"
        )
    p.add_argument("--interval", type=float, default=5.0, help="checkpoint interval, s")


# -- output ------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print(text)


def _emit_error(args: argparse.Namespace, message: str, code: int) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    print(f"rayflow: {message}", file=sys.stderr)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table with a header; numbers right-aligned."""
    if not rows:
        return "(none)"
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
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


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- running flows -------------------------------------------------------------


def load_flow(path: str) -> Any:
    """The Dataflow that ``path`` defines (a module-level one, or ``flow()``)."""
    import rayflow as rf

    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}", EXIT_NOT_FOUND)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        namespace = runpy.run_path(path, run_name="__rayflow__")
    except Exception as exc:
        raise CliError(f"{path} failed while loading: {type(exc).__name__}: {exc}") from None
    flows = [v for v in namespace.values() if isinstance(v, rf.Dataflow)]
    if not flows and callable(namespace.get("flow")):
        made = namespace["flow"]()
        flows = [made] if isinstance(made, rf.Dataflow) else []
    if len(flows) != 1:
        found = "no Dataflow" if not flows else f"{len(flows)} Dataflows"
        raise CliError(
            f"{path} defines {found}; it needs exactly one module-level rf.Dataflow "
            "(or a function named 'flow' that returns one)"
        )
    return flows[0]


def _run_flow(args: argparse.Namespace, storage: str | None, resume: bool) -> int:
    import rayflow as rf

    flow = load_flow(args.file)
    _connect(args.address)
    checkpoint = rf.Checkpointing(storage=storage, interval_s=args.interval) if storage else None
    try:
        result = rf.run(
            flow,
            job_name=args.job_name,
            checkpoint=checkpoint,
            resume=resume,
            restore_from=getattr(args, "restore_from", None),
        )
    except rf.JobFailedError as exc:
        _emit(args, {"job": exc.job, "status": "FAILED", "error": str(exc)}, str(exc))
        return EXIT_FAILED
    except (rf.ConfigError, rf.BuildError) as exc:
        raise CliError(str(exc)) from None
    steps = [
        {
            "step": step,
            "partitions": len(entries),
            "records_in": sum(e["records_in"] for e in entries),
            "records_out": sum(e["records_out"] for e in entries),
        }
        for step, entries in result.metrics.items()
    ]
    data = {
        "job": result.job,
        "status": result.status.value,
        "duration_s": result.duration_s,
        "final_checkpoint": result.final_checkpoint,
        "restored_checkpoint": result.restored_checkpoint,
        "restarts": result.restarts,
        "steps": steps,
    }
    text = (
        f"job {result.job} {result.status.value} in {result.duration_s:.1f} s"
        + (f", final checkpoint {result.final_checkpoint}" if result.final_checkpoint else "")
        + (f", {result.restarts} restart(s)" if result.restarts else "")
        + "\n"
        + table(steps, ["step", "partitions", "records_in", "records_out"])
    )
    _emit(args, data, text)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    return _run_flow(args, args.checkpoint, args.resume)


def _cmd_resume(args: argparse.Namespace) -> int:
    return _run_flow(args, args.uri, True)


# -- running jobs ----------------------------------------------------------------


def _connect(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or None,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )


def _coordinator(job: str, address: str | None) -> Any:
    import ray

    from rayflow._internal import naming

    _connect(address or os.environ.get("RAY_ADDRESS") or "auto")
    try:
        return ray.get_actor(naming.coordinator_actor(job), namespace=naming.NAMESPACE)
    except ValueError:
        raise CliError(
            f"no job named {job!r} is running on this Ray cluster", EXIT_NOT_FOUND
        ) from None


def _cmd_status(args: argparse.Namespace) -> int:
    import ray

    coordinator = _coordinator(args.job, args.address)
    status = ray.get(coordinator.status.remote())
    metrics = ray.get(coordinator.metrics.remote())
    stats = ray.get(coordinator.checkpoint_stats.remote())
    recoveries = ray.get(coordinator.recoveries.remote())
    alerts = ray.get(coordinator.alerts_active.remote())
    rows = [
        {
            "step": step,
            "partitions": len(entries),
            "records_in": sum(e["records_in"] for e in entries),
            "records_out": sum(e["records_out"] for e in entries),
            "out_per_s": sum(e["records_out_per_s"] for e in entries),
            "busy_ms_s": max(e["busy_ms_per_s"] for e in entries),
            "backpressured_ms_s": max(e["backpressured_ms_per_s"] for e in entries),
            "mailbox": sum(e["mailbox_depth"] for e in entries),
        }
        for step, entries in metrics.items()
    ]
    data = {
        "job": args.job,
        "status": status,
        "steps": rows,
        "checkpoints": stats,
        "restarts": len(recoveries),
        "alerts": alerts,
    }
    lines = [f"job {args.job}: {status}"]
    for alert in alerts:
        lines.append(f"ALERT {alert['kind']}: {alert['message']}")
    if stats:
        last = stats.get("last") or {}
        lines.append(
            f"checkpoints: {stats['completed']} completed, {stats['failed']} failed, "
            f"interval {stats.get('interval_s', 0):g} s"
            + (
                f"; last {last['id']} ({last['duration_ms']:.0f} ms, "
                f"{last['written_bytes']:,} bytes)"
                if last
                else ""
            )
        )
    if recoveries:
        lines.append(f"restarts: {len(recoveries)}")
    lines.append(
        table(
            rows,
            [
                "step",
                "partitions",
                "records_in",
                "records_out",
                "out_per_s",
                "busy_ms_s",
                "backpressured_ms_s",
                "mailbox",
            ],
        )
    )
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    import ray

    from rayflow._internal.storage.base import normalize_uri

    coordinator = _coordinator(args.job, args.address)
    savepoint = normalize_uri(args.savepoint) if args.savepoint else None
    try:
        ray.get(coordinator.stop.remote(savepoint))
    except ray.exceptions.RayTaskError as exc:  # the savepoint location was refused
        raise CliError(
            f"the job was not stopped: {str(exc.cause or exc).strip()}", EXIT_USAGE
        ) from None
    deadline = time.monotonic() + args.timeout
    status = "STOPPING"
    while time.monotonic() < deadline:
        try:
            report = ray.get(coordinator.wait.remote(), timeout=1.0)
        except ray.exceptions.GetTimeoutError:
            continue
        except ray.exceptions.RayActorError:
            status = "STOPPED"  # its driver collected the result and cleaned up
            break
        status = report.status.value
        break
    else:
        raise CliError(f"job {args.job!r} did not stop within {args.timeout:.0f} s", EXIT_FAILED)
    _emit(
        args,
        {"job": args.job, "status": status, "savepoint": savepoint},
        f"job {args.job}: {status}" + (f"; savepoint at {savepoint}" if savepoint else ""),
    )
    return EXIT_OK if status != "FAILED" else EXIT_FAILED


def _cmd_savepoint(args: argparse.Namespace) -> int:
    import ray

    from rayflow._internal.storage.base import normalize_uri

    coordinator = _coordinator(args.job, args.address)
    uri = normalize_uri(args.uri)
    try:
        info = ray.get(coordinator.checkpoint.remote(uri))
    except ray.exceptions.RayTaskError as exc:
        raise CliError(
            f"the savepoint failed: {str(exc.cause or exc).strip()}", EXIT_FAILED
        ) from None
    _emit(
        args,
        {"job": args.job, "savepoint": uri, **info},
        f"savepoint {info['id']} of job {args.job} written to {uri} "
        f"({info['written_bytes']:,} bytes, {info['duration_ms']:.0f} ms)",
    )
    return EXIT_OK


# -- checkpoints -------------------------------------------------------------------


def _cmd_cp_list(args: argparse.Namespace) -> int:
    from rayflow._internal.checkpoint import catalog

    try:
        rows = catalog.list_checkpoints(args.uri, args.job)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _emit(
        args,
        rows,
        table(
            [{**r, "time": _when(r["time"])} for r in rows],
            ["job", "id", "kind", "time", "state_bytes", "written_bytes", "steps", "uri"],
        )
        if rows
        else f"no complete checkpoints in {args.uri}",
    )
    return EXIT_OK if rows else EXIT_NOT_FOUND


def _cmd_cp_show(args: argparse.Namespace) -> int:
    from rayflow._internal.checkpoint import catalog

    try:
        info = catalog.describe(args.uri)
    except LookupError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from None
    lines = [
        f"{info['kind']} {info['id']} of job {info['job']} ({_when(info['time'])}), "
        f"{info['state_bytes']:,} bytes of state, written in {info['duration_ms']:.0f} ms",
        table(info["steps"], ["step", "kind", "parallelism", "stage"]),
        "source offsets:",
        table(info["offsets"], ["step", "partition", "offset"]),
        "objects:",
        table(info["objects"], ["stage", "partition", "key", "size", "mode", "sha256"]),
    ]
    _emit(args, info, "\n".join(lines))
    return EXIT_OK


def _cmd_cp_delete(args: argparse.Namespace) -> int:
    from rayflow._internal.checkpoint import catalog

    try:
        deleted = catalog.delete(args.uri)
    except LookupError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from None
    _emit(args, {"deleted": deleted}, f"deleted {len(deleted)} object(s) of {args.uri}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
