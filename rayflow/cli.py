"""The ``rayflow`` command: run flows, list, watch and stop jobs, inspect checkpoints.

Exit codes (stable, for scripts): 0 done; 1 the job or the checkpoint asked
for failed; 2 bad usage or input; 3 not found (job, file, checkpoint);
4 cannot reach Ray or the storage; 130 interrupted. Every command takes
``--json`` for machine-readable output on stdout (errors too:
``{"error": ..., "exit_code": ...}``). ``RAYFLOW_DEBUG=1`` adds tracebacks.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import click

from rayflow._internal.cli import connect as ray_connect
from rayflow._internal.cli.output import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    cli_words,
    emit,
    emit_error,
    table,
    when,
)
from rayflow._internal.cli.progress import (
    ProgressLine,
    render_status,
    step_rows,
    summary,
)

__all__ = ["CliError", "load_flow", "main"]

_ARGV: list[str] = []  # this invocation's arguments, to forward through Ray Jobs


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = args
    as_json = "--json" in args
    # The API's parameter names become flags where the user typed those flags.
    words = cli_words if args[:1] in (["run"], ["resume"]) else _no_api_words
    try:
        code = cli.main(args=args, prog_name="rayflow", standalone_mode=False)
        return int(code or 0)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message())
        return EXIT_USAGE
    except click.UsageError as exc:
        hint = f"\n{exc.ctx.get_usage()}\nTry 'rayflow --help'." if exc.ctx else ""
        emit_error(as_json, exc.format_message() + ("" if as_json else hint), EXIT_USAGE)
        return EXIT_USAGE
    except (click.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except CliError as exc:
        emit_error(as_json, words(str(exc)), exc.code)
        if exc.hard_exit:
            sys.stdout.flush()
            os._exit(exc.code)
        return exc.code
    except Exception as exc:
        message, code = _explain(exc)
        if os.environ.get("RAYFLOW_DEBUG"):
            traceback.print_exc()
        emit_error(as_json, words(message), code)
        return code


def _no_api_words(message: str) -> str:
    return message.replace("restore_from=", "")


def _explain(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for an error the commands did not expect."""
    import rayflow as rf
    from rayflow._internal.storage import StorageError
    from rayflow.errors import JobAlreadyRunningError

    chain = list(_causes(exc))
    for err in chain:
        name = type(err).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return (
                "no AWS credentials for the S3 storage: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an instance role)",
                EXIT_UNAVAILABLE,
            )
        if name == "ClientError":
            info = getattr(err, "response", {}).get("Error", {})
            code = info.get("Code", "")
            if code in ("NoSuchBucket", "NoSuchKey", "404"):
                return f"not found in the storage: {info.get('Message') or code}", EXIT_NOT_FOUND
            return (
                f"the S3 storage refused the request: {code} {info.get('Message', '')}".strip()
                + " (check the credentials and the bucket's permissions)",
                EXIT_UNAVAILABLE,
            )
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
            return f"cannot reach the storage: {err}", EXIT_UNAVAILABLE
    if isinstance(exc, rf.JobFailedError):
        return str(exc).strip().splitlines()[0], EXIT_FAILED
    if isinstance(exc, (rf.ConfigError, rf.BuildError, JobAlreadyRunningError)):
        return str(exc), EXIT_USAGE
    if isinstance(exc, StorageError):
        return f"cannot use the storage: {exc}", EXIT_UNAVAILABLE
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"cannot reach Ray: {exc}", EXIT_UNAVAILABLE
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"unexpected error: {type(exc).__name__}: {first} (RAYFLOW_DEBUG=1 shows the traceback)",
        EXIT_FAILED,
    )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# -- options shared by commands -------------------------------------------------

_json = click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
_address = click.option(
    "--address",
    default=None,
    metavar="ADDRESS",
    help="Ray to use: HOST:PORT of the head (default port 6379), auto, or "
    "http://HOST:8265 to run through Ray Jobs (default: RAY_ADDRESS; for run, the Ray "
    "on this machine or a new local one)",
)


def _version() -> str:
    import rayflow

    return str(getattr(rayflow, "__version__", "unknown"))


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP + " Add --json to any command for machine-readable output.",
)
@click.version_option(_version(), "--version", "-V", prog_name="rayflow")
def cli() -> None:
    """Run rayflow dataflows on Ray, list, watch and stop running jobs, and inspect
    checkpoints."""


# -- running flows -------------------------------------------------------------


def load_flow(path: str, argv: Sequence[str] = ()) -> Any:
    """The Dataflow that the Python file ``path`` defines.

    A module-level ``rf.Dataflow``; else a function ``flow()`` (or ``build()``)
    that can be called without arguments and returns one. While the file
    loads, ``sys.argv`` is ``[path, *argv]``, as with ``python path ARGS``.
    """
    import rayflow as rf

    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}", EXIT_NOT_FOUND)
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    saved = sys.argv
    sys.argv = [path, *argv]
    try:
        namespace = runpy.run_path(path, run_name="__rayflow__")
        flows = [v for v in namespace.values() if isinstance(v, rf.Dataflow)]
        if not flows:
            for name in ("flow", "build"):
                maker = namespace.get(name)
                if callable(maker) and _callable_without_arguments(maker):
                    made = maker()
                    if isinstance(made, rf.Dataflow):
                        flows = [made]
                        break
    except SystemExit as exc:  # the file parsed its arguments and exited (e.g. --help)
        raise CliError(f"{path} exited while loading (code {exc.code})") from None
    except (rf.BuildError, rf.ConfigError) as exc:
        raise CliError(f"{path}: {exc}") from None
    except Exception as exc:
        raise CliError(f"{path} failed while loading: {type(exc).__name__}: {exc}") from None
    finally:
        sys.argv = saved
    if len(flows) != 1:
        found = "no Dataflow" if not flows else f"{len(flows)} Dataflows"
        raise CliError(
            f"{path} defines {found}; it needs exactly one module-level rf.Dataflow "
            "(or a function named 'flow' that returns one)"
        )
    return flows[0]


def _callable_without_arguments(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def _run_options(storage: bool) -> Any:
    def decorate(f: Any) -> Any:
        options = [
            click.option("--job-name", default=None, help="job name (default: the flow's name)"),
            click.option(
                "--interval",
                type=float,
                default=5.0,
                show_default=True,
                help="checkpoint interval in seconds",
            ),
            click.option(
                "--progress-every",
                type=float,
                default=10.0,
                show_default=True,
                help="when the output is not a terminal, a progress line every this many "
                "seconds (0: none)",
            ),
            click.option("--quiet", "-q", is_flag=True, help="no progress line"),
        ]
        if storage:
            options += [
                click.option(
                    "--checkpoint",
                    "storage",
                    default=None,
                    metavar="URI",
                    help="take checkpoints into this folder or s3://bucket/prefix",
                ),
                click.option(
                    "--resume",
                    is_flag=True,
                    help="continue from the latest checkpoint in --checkpoint",
                ),
                click.option(
                    "--restore-from", default=None, metavar="URI", help="start from this savepoint"
                ),
            ]
        for option in reversed(options):
            f = option(f)
        return _address(_json(f))

    return decorate


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_run_options(storage=True)
def run(file: str, args: tuple[str, ...], storage: str | None, **options: Any) -> int:
    """Run the flow that FILE defines, until it ends or Ctrl-C (which stops it with a
    final checkpoint; a second Ctrl-C cancels).

    FILE defines a module-level rf.Dataflow, or a function flow() that returns one;
    ARGS after FILE are passed to it as sys.argv. On a terminal a live line shows
    records, rates, backpressure and the last checkpoint.
    """
    return _run_flow(file, args, storage, **options)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("uri")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_run_options(storage=False)
def resume(uri: str, file: str, args: tuple[str, ...], **options: Any) -> int:
    """Continue a job from the latest complete checkpoint in the storage URI (a folder
    or s3://bucket/prefix), running the flow FILE defines."""
    return _run_flow(file, args, uri, resume=True, **options)


def _run_flow(
    file: str,
    args: tuple[str, ...],
    storage: str | None,
    *,
    job_name: str | None,
    interval: float,
    progress_every: float,
    quiet: bool,
    as_json: bool,
    address: str | None,
    resume: bool = False,
    restore_from: str | None = None,
) -> int:
    import rayflow as rf

    where = ray_connect.resolve(address, start_local=True)
    if where.kind == "jobs":
        assert where.value is not None
        if not os.path.isfile(file):
            raise CliError(f"no such file: {file}", EXIT_NOT_FOUND)
        forwarded = [os.path.basename(file) if a == file else a for a in _without_address()]
        return ray_connect.through_jobs(
            where.value, forwarded, os.path.dirname(os.path.abspath(file))
        )
    flow = load_flow(file, args)
    ray_connect.connect(where, show_worker_output=True)
    checkpoint = rf.Checkpointing(storage=storage, interval_s=interval) if storage else None
    handle = rf.start(
        flow, job_name=job_name, checkpoint=checkpoint, resume=resume, restore_from=restore_from
    )
    kinds = {s.name: s.kind.value for s in handle.plan.flow.steps}
    sources = [s for s, k in kinds.items() if k == "source"]
    sinks = [s for s, k in kinds.items() if k == "sink"]
    line = ProgressLine(
        sys.stderr,
        tty=sys.stderr.isatty() and not quiet,
        every_s=progress_every if progress_every > 0 and not quiet else float("inf"),
    )
    began = time.monotonic()
    stopping = False
    with _sigterm_interrupts(), _logs_above(line):
        while True:
            try:
                try:
                    result = handle.wait(timeout=min(1.0, max(0.1, progress_every or 1.0)))
                    break
                except TimeoutError:
                    pass
                except rf.JobFailedError as exc:
                    line.clear()
                    raise CliError(str(exc), EXIT_FAILED) from None
                # What the driver's telemetry poll last read: no calls of our own.
                latest = handle._publisher.latest if handle._publisher else {}
                if latest.get("metrics"):
                    line.update(
                        summary(
                            handle.job,
                            latest.get("status", "RUNNING"),
                            time.monotonic() - began,
                            latest["metrics"],
                            latest.get("checkpoints"),
                            sources=sources,
                            sinks=sinks,
                        )
                    )
            except KeyboardInterrupt:
                line.clear()
                if stopping:
                    raise CliError(
                        f"job {handle.job} cancelled"
                        + ("; its last complete checkpoint stays" if checkpoint else ""),
                        EXIT_INTERRUPTED,
                    ) from None
                stopping = True
                print(
                    f"rayflow: stopping job {handle.job}: the sources stop, the rest drains"
                    + (", a final checkpoint commits" if checkpoint else "")
                    + " (Ctrl-C again to cancel)",
                    file=sys.stderr,
                    flush=True,
                )
                threading.Thread(target=_stop_quietly, args=(handle,), daemon=True).start()
    line.clear()
    steps = [
        {k: r[k] for k in ("step", "partitions", "records_in", "records_out")}
        for r in step_rows(result.metrics)
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
    emit(as_json, data, text)
    return EXIT_OK


def _stop_quietly(handle: Any) -> None:
    with contextlib.suppress(Exception):
        handle.stop()


@contextlib.contextmanager
def _logs_above(line: ProgressLine) -> Iterator[None]:
    """rayflow's log lines print above the live line instead of running into it."""

    def clear_first(record: logging.LogRecord) -> bool:
        line.clear()
        return True

    handlers = logging.getLogger("rayflow").handlers
    for handler in handlers:
        handler.addFilter(clear_first)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(clear_first)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``ray job stop``, ``kill``, Kubernetes) stops the job like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _without_address() -> list[str]:
    """This invocation's arguments without ``--address``: the cluster runs it locally."""
    out: list[str] = []
    skip = False
    for arg in _ARGV:
        if skip:
            skip = False
        elif arg == "--address":
            skip = True
        elif not arg.startswith("--address="):
            out.append(arg)
    return out


# -- running jobs ----------------------------------------------------------------


def _cluster(address: str | None) -> bool:
    """Connect for a command about running jobs; False when it ran through Ray Jobs."""
    where = ray_connect.resolve(address, start_local=False)
    if where.kind == "jobs":
        return False
    if where.kind == "local":
        where = ray_connect.Address("auto", "auto")
    ray_connect.connect(where)
    return True


def _coordinator(job: str) -> Any:
    import ray

    from rayflow._internal import naming

    try:
        return ray.get_actor(naming.coordinator_actor(job), namespace=naming.NAMESPACE)
    except ValueError:
        raise CliError(
            f"no job named {job!r} is running on this Ray cluster (`rayflow list` shows the "
            "running ones)",
            EXIT_NOT_FOUND,
        ) from None


def _remote(address: str | None) -> int | None:
    """For a Ray Jobs address: run this very command on the cluster."""
    where = ray_connect.resolve(address, start_local=False)
    if where.kind != "jobs":
        return None
    assert where.value is not None
    return ray_connect.through_jobs(where.value, _without_address(), None)


def _job_state(coordinator: Any, job: str, timeout: float = 10.0) -> dict[str, Any]:
    import ray

    # One call for all of it (no events: a cursor past every event number).
    state = ray.get(coordinator.telemetry.remote(2**62), timeout=timeout)
    return {
        "job": job,
        "status": state["status"],
        "steps": step_rows(state["metrics"]),
        "checkpoints": state["checkpoints"],
        "restarts": state["restarts"],
        "alerts": state["alerts"],
    }


@cli.command("list")
@_json
@_address
def list_jobs(as_json: bool, address: str | None) -> int:
    """List the rayflow jobs running on the Ray cluster."""
    import ray

    from rayflow._internal import naming

    if (code := _remote(address)) is not None:
        return code
    _cluster(address)
    prefix, suffix = "rayflow/", "/coordinator"
    names = sorted(
        entry["name"][len(prefix) : -len(suffix)]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry.get("namespace") == naming.NAMESPACE
        and entry["name"].startswith(prefix)
        and entry["name"].endswith(suffix)
    )
    rows = []
    for job in names:
        row: dict[str, Any] = {"job": job}
        try:
            state = _job_state(_coordinator(job), job, timeout=5.0)
        except CliError:
            continue  # ended meanwhile
        except Exception as exc:
            row["status"] = f"unknown ({type(exc).__name__})"
        else:
            stats = state["checkpoints"] or {}
            last = stats.get("last") or {}
            row.update(
                status=state["status"],
                steps=len(state["steps"]),
                partitions=sum(s["partitions"] for s in state["steps"]),
                records_out=sum(s["records_out"] for s in state["steps"]),
                last_checkpoint=last.get("id"),
                restarts=state["restarts"],
                alerts=len(state["alerts"]),
            )
        rows.append(row)
    columns = [
        "job",
        "status",
        "steps",
        "partitions",
        "records_out",
        "last_checkpoint",
        "restarts",
        "alerts",
    ]
    emit(as_json, rows, table(rows, columns) if rows else "no rayflow jobs are running")
    return EXIT_OK


@cli.command()
@click.argument("job")
@click.option("--watch", "-w", is_flag=True, help="refresh until the job ends (Ctrl-C leaves)")
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="seconds between refreshes"
)
@_json
@_address
def status(job: str, watch: bool, interval: float, as_json: bool, address: str | None) -> int:
    """Show a running job's status, checkpoints, alerts and per-step metrics."""
    import ray

    if (code := _remote(address)) is not None:
        return code
    _cluster(address)
    coordinator = _coordinator(job)
    tty = sys.stdout.isatty() and not as_json
    while True:
        try:
            data = _job_state(coordinator, job)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if not watch:
                raise CliError(
                    f"job {job!r} did not answer (it may be ending)", EXIT_FAILED
                ) from None
            emit(as_json, {"job": job, "status": "ENDED"}, f"job {job}: no longer running")
            return EXIT_OK
        if tty and watch:
            click.clear()
        emit(as_json, data, render_status(job, data))
        if not watch or data["status"] in ("FINISHED", "STOPPED", "FAILED"):
            return EXIT_FAILED if data["status"] == "FAILED" else EXIT_OK
        time.sleep(interval)


@cli.command()
@click.argument("job")
@click.option("--savepoint", default=None, metavar="URI", help="end with a savepoint at URI")
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="seconds to wait for the end"
)
@_json
@_address
def stop(
    job: str, savepoint: str | None, timeout: float, as_json: bool, address: str | None
) -> int:
    """Stop a running job (the sources stop, the rest drains, a final checkpoint commits)
    and wait for its end."""
    import ray

    from rayflow._internal.storage.base import normalize_uri

    if (code := _remote(address)) is not None:
        return code
    _cluster(address)
    coordinator = _coordinator(job)
    location = normalize_uri(savepoint) if savepoint else None
    try:
        ray.get(coordinator.stop.remote(location), timeout=60)
    except ray.exceptions.RayTaskError as exc:  # the savepoint location was refused
        raise CliError(
            f"the job was not stopped: {str(exc.cause or exc).strip()}", EXIT_USAGE
        ) from None
    ended = coordinator.wait.remote()
    try:
        state = ray.get(ended, timeout=timeout).status.value
    except ray.exceptions.GetTimeoutError:
        raise CliError(f"job {job!r} did not stop within {timeout:.0f} s", EXIT_FAILED) from None
    except ray.exceptions.RayActorError:
        state = "STOPPED"  # its driver collected the result and cleaned up
    emit(
        as_json,
        {"job": job, "status": state, "savepoint": location},
        f"job {job}: {state}" + (f"; savepoint at {location}" if location else ""),
    )
    return EXIT_OK if state != "FAILED" else EXIT_FAILED


@cli.command()
@click.argument("job")
@click.argument("uri")
@click.option(
    "--timeout", type=float, default=600.0, show_default=True, help="seconds to wait for it"
)
@_json
@_address
def savepoint(job: str, uri: str, timeout: float, as_json: bool, address: str | None) -> int:
    """Write a savepoint of a running job to URI (an empty folder or s3:// prefix)."""
    import ray

    from rayflow._internal.storage.base import normalize_uri

    if (code := _remote(address)) is not None:
        return code
    _cluster(address)
    coordinator = _coordinator(job)
    location = normalize_uri(uri)
    try:
        info = ray.get(coordinator.checkpoint.remote(location), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise CliError(
            f"the savepoint did not complete within {timeout:.0f} s", EXIT_FAILED
        ) from None
    except ray.exceptions.RayTaskError as exc:
        raise CliError(
            f"the savepoint failed: {str(exc.cause or exc).strip()}", EXIT_FAILED
        ) from None
    emit(
        as_json,
        {"job": job, "savepoint": location, **info},
        f"savepoint {info['id']} of job {job} written to {location} "
        f"({info['written_bytes']:,} bytes, {info['duration_ms']:.0f} ms)",
    )
    return EXIT_OK


# -- checkpoints -------------------------------------------------------------------


@cli.group()
def checkpoints() -> None:
    """List, show or delete checkpoints and savepoints (reads the storage directly)."""


@checkpoints.command("list")
@click.argument("uri")
@click.option("--job", default=None, help="only this job's checkpoints")
@_json
def checkpoints_list(uri: str, job: str | None, as_json: bool) -> int:
    """List the complete checkpoints (those with a manifest) of every job in the
    storage URI, or of --job only."""
    from rayflow._internal.checkpoint import catalog

    try:
        rows = catalog.list_checkpoints(uri, job)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    text = (
        table(
            [{**r, "time": when(r["time"])} for r in rows],
            ["job", "id", "kind", "time", "state_bytes", "written_bytes", "steps", "uri"],
        )
        if rows
        else f"no complete checkpoints in {uri}"
    )
    emit(as_json, rows, text)
    return EXIT_OK if rows else EXIT_NOT_FOUND


@checkpoints.command("show")
@click.argument("uri")
@_json
def checkpoints_show(uri: str, as_json: bool) -> int:
    """Show a checkpoint (URI = <storage>/<job>/checkpoints/<id>) or a savepoint
    folder: steps, parallelism, source offsets and objects."""
    from rayflow._internal.checkpoint import catalog

    try:
        info = catalog.describe(uri)
    except LookupError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from None
    lines = [
        f"{info['kind']} {info['id']} of job {info['job']} ({when(info['time'])}), "
        f"{info['state_bytes']:,} bytes of state, written in {info['duration_ms']:.0f} ms",
        table(info["steps"], ["step", "kind", "parallelism", "stage"]),
        "source offsets:",
        table(info["offsets"], ["step", "partition", "offset"]),
        "objects:",
        table(info["objects"], ["stage", "partition", "key", "size", "mode", "sha256"]),
    ]
    emit(as_json, info, "\n".join(lines))
    return EXIT_OK


@checkpoints.command("delete")
@click.argument("uri")
@_json
def checkpoints_delete(uri: str, as_json: bool) -> int:
    """Delete a savepoint folder, or one checkpoint (its manifest and the objects no
    other checkpoint of the job needs)."""
    from rayflow._internal.checkpoint import catalog

    try:
        deleted = catalog.delete(uri)
    except LookupError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from None
    emit(as_json, {"deleted": deleted}, f"deleted {len(deleted)} object(s) of {uri}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
