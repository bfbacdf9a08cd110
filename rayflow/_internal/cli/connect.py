"""Reaching Ray from the command line: which address, failing fast, Ray Jobs addresses.

Addresses, from ``--address`` or else ``RAY_ADDRESS``:

- ``HOST:PORT`` (the head's GCS, port 6379 by default) or ``auto``: connect
  directly; an unreachable address fails within seconds, not minutes.
- ``http(s)://HOST:8265`` (Ray's dashboard, what Ray Jobs users set): the
  command runs on the cluster as a Ray job (``run`` uploads the flow file's
  folder as its working directory) and its output streams back here.
- ``ray://`` (Ray Client) is refused with the alternatives: rayflow's
  driver keeps threads and actor handles that Ray Client does not carry.
- nothing: ``run`` joins the Ray on this machine or starts one; the other
  commands join the running one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from rayflow._internal.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
)

PROBE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
GCS_DEFAULT_PORT = 6379


@dataclass(frozen=True)
class Address:
    kind: str  # "local" | "auto" | "gcs" | "jobs" | "client"
    value: str | None


def resolve(address: str | None, *, start_local: bool) -> Address:
    raw = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not raw:
        # run: join the Ray on this machine or start one; the others: join it only.
        return Address("local", None) if start_local else Address("auto", "auto")
    if raw.startswith(("http://", "https://")):
        return Address("jobs", raw.rstrip("/"))
    if raw.startswith("ray://"):
        return Address("client", raw)
    if raw in ("auto", "local"):
        return Address(raw, raw)
    return Address("gcs", raw)


def _split(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host:
        return value, GCS_DEFAULT_PORT
    try:
        return host, int(port)
    except ValueError:
        raise CliError(
            f"--address {value!r} is not HOST:PORT, http://HOST:PORT or auto", EXIT_USAGE
        ) from None


def probe(value: str) -> None:
    """Fail within seconds when nothing listens at ``value`` (ray.init would wait minutes)."""
    host, port = _split(value)
    reason = None
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
    if reason is None:
        # Something listens; the GCS speaks gRPC (HTTP/2). Anything else would leave
        # ray.init retrying for minutes.
        try:
            import grpc
        except ImportError:  # ray without [default]: the connection timeout below still holds
            grpc = None
        if grpc is not None:
            channel = grpc.insecure_channel(f"{host}:{port}")
            try:
                grpc.channel_ready_future(channel).result(timeout=PROBE_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                reason = "something listens there, but it does not answer as Ray's GCS"
            finally:
                channel.close()
    if reason is not None:
        raise CliError(
            f"cannot reach Ray at {host}:{port}: {reason}. Is the cluster up? The address is "
            "the head's HOST:PORT (port 6379 by default), or http://HOST:8265 to submit "
            "through Ray Jobs",
            EXIT_UNAVAILABLE,
        )


def connect(address: Address, *, show_worker_output: bool = False) -> None:
    """Connect this process to Ray as a driver (``address.kind`` is not ``jobs``)."""
    import ray

    if ray.is_initialized():
        return
    if address.kind == "client":
        raise CliError(
            f"{address.value}: Ray Client (ray://) addresses are not supported. Use the "
            "head's dashboard address (http://HOST:8265) to run through Ray Jobs, or its "
            "GCS address (HOST:6379) from a machine in the cluster",
            EXIT_USAGE,
        )
    if address.kind == "gcs":
        assert address.value is not None
        probe(address.value)
        host, port = _split(address.value)
        address = Address("gcs", f"{host}:{port}")
    target = None if address.kind == "local" else address.value
    if show_worker_output:
        # Ray folds similar lines of different workers into one: not for a Print sink.
        # It read RAY_DEDUP_LOGS when it was imported, so set what it reads now.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if os.environ["RAY_DEDUP_LOGS"] == "0":
            try:
                from ray._private import ray_logging

                ray_logging.RAY_DEDUP_LOGS = False
            except (ImportError, AttributeError):
                pass
    options: dict[str, Any] = {
        "address": target,
        # Print sinks write in the operators: their output is shown here when asked.
        "log_to_driver": show_worker_output,
        "logging_level": logging.ERROR,
    }
    try:
        if address.kind == "local":
            from rayflow._internal.job.warm import preload_in_new_ray

            preload_in_new_ray()
            ray.init(**options)  # starting a local Ray may take a while on a busy machine
        else:
            _init_within(options, CONNECT_TIMEOUT_S, address.value or "auto")
    except ConnectionError as exc:
        where = "on this machine" if address.kind == "auto" else f"at {address.value}"
        raise CliError(
            f"cannot reach Ray {where}: {str(exc).strip().splitlines()[0]}. Start a cluster "
            "(`ray start --head`), or pass --address HOST:PORT (or set RAY_ADDRESS)",
            EXIT_UNAVAILABLE,
        ) from None
    except (ValueError, RuntimeError) as exc:
        raise CliError(
            f"cannot use Ray address {address.value!r}: {str(exc).strip().splitlines()[0]}",
            EXIT_UNAVAILABLE,
        ) from None


def _init_within(options: dict[str, Any], timeout_s: float, where: str) -> None:
    """``ray.init`` that gives up after ``timeout_s`` (it retries for minutes otherwise)."""
    import ray

    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**options)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=init, name="rayflow-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise CliError(
            f"cannot reach Ray at {where}: no answer within {timeout_s:.0f} s (the head "
            "answers, but Ray could not connect to it; is this the right cluster, and can "
            "this machine reach the head's node address?)",
            EXIT_UNAVAILABLE,
            hard_exit=True,
        )
    if failure:
        raise failure[0]


def through_jobs(address: str, argv: list[str], working_dir: str | None) -> int:
    """Run ``rayflow ARGV`` on the cluster as a Ray job; stream its output; its exit code.

    Ray Jobs reports only success or failure, so the code is 0 or 1.
    """
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError:
        raise CliError(
            f"{address} is a Ray Jobs address, which needs Ray's job client: "
            "pip install 'rayflow[cluster]'",
            EXIT_USAGE,
        ) from None
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # requests' and Ray's connection errors differ by version
        raise CliError(
            f"cannot reach Ray Jobs at {address}: {str(exc).strip().splitlines()[0]}",
            EXIT_UNAVAILABLE,
        ) from None
    entrypoint = "python -m rayflow " + shlex.join(argv)
    runtime_env: dict[str, Any] = {
        # `ray job stop` sends SIGTERM, then SIGKILL after this long (3 s by default):
        # give the stop its drain and final checkpoint.
        "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "120")}
    }
    if working_dir:
        runtime_env["working_dir"] = working_dir
    submission = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"rayflow: submitted as Ray job {submission} to {address}", file=sys.stderr, flush=True)

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        # Ray Jobs sends the command SIGTERM, which stops the flow gracefully.
        print(f"rayflow: stopping Ray job {submission}", file=sys.stderr, flush=True)
        client.stop_job(submission)
        raise
    status = client.get_job_status(submission)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(submission)
        print(f"rayflow: Ray job {submission} {status.value}: {info.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
