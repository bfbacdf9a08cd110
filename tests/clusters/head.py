"""A Ray head node started with ``ray start --head --block`` for one test, ended by pid.

Every port is chosen free and every listener is on 127.0.0.1; its files live in
a temp folder of its own. ``stop`` snapshots the process tree (fake autoscaler
nodes are children of the monitor) and sends SIGKILL to the ``ray start`` process
group and to every process of that tree: never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

import psutil

from tests.support.ports import free_port


class HeadNode:
    def __init__(
        self,
        *,
        num_cpus: int,
        dashboard: bool = False,
        autoscaling_config: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = port or free_port()
        self.dashboard_port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="rf-head-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(
            {
                "RAY_TMPDIR": self.tmp,
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "disabled",
                **(env or {}),
            }
        )
        cmd = [
            "ray", "start", "--head", "--block",
            f"--port={self.port}", f"--num-cpus={num_cpus}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if autoscaling_config:
            cmd.append(f"--autoscaling-config={autoscaling_config}")
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self.log = open(os.path.join(self.tmp, "ray-start.log"), "wb")
        self.process = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 90.0, dashboard: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.logs()[-3000:]}")
            probe = subprocess.run(
                [
                    "python",
                    "-c",
                    f"import ray; ray.init(address={self.address!r}); print(len(ray.nodes()))",
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if probe.returncode == 0:
                if not dashboard or self._dashboard_up():
                    return
            time.sleep(1.0)
        raise RuntimeError(f"the head node did not come up: {self.logs()[-3000:]}")

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as r:
                return bool(r.status == 200)
        except Exception:
            return False

    def logs(self) -> str:
        with open(os.path.join(self.tmp, "ray-start.log"), errors="replace") as f:
            return f.read()

    def run(
        self, *args: str, timeout: float = 300, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def stop(self) -> None:
        try:
            tree = [
                psutil.Process(self.process.pid),
                *psutil.Process(self.process.pid).children(recursive=True),
            ]
        except psutil.NoSuchProcess:
            tree = []
        # SIGKILL at once: `ray start --block` (Ray 2.60) does not end on SIGTERM, so a
        # grace period only waited (20 s per test, measured), and nothing of a test head
        # outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(tree, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
