"""A two-node (or N-node) Ray cluster on this machine's loopback, for tests and `edge-cbn bench sweep`:
`ray start --head` on a free port, then `ray start --address …` for each further node, `--num-cpus` each.
Every node runs with `--block`, so it is a child process of ours: `stop` ends exactly those processes
(each stops the Ray daemons it started), never every Ray process on the machine as `ray stop` would."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """`with LocalRayCluster(nodes=2) as address:` a running cluster, this process connected as a driver."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, env: dict | None = None, timeout: float = 120):
        self.nodes, self.cpus, self.timeout = nodes, cpus_per_node, timeout
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.address, self.procs, self.temp = f"127.0.0.1:{free_port()}", [], None

    def _start(self, *args) -> subprocess.Popen:
        ray = Path(sys.executable).with_name("ray")
        cmd = [str(ray) if ray.exists() else "ray", "start", "--block", "--num-cpus", str(self.cpus),
               "--disable-usage-stats", "--node-ip-address", "127.0.0.1", *args]
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def start(self) -> str:
        import ray  # lazy: Ray is optional (the [cluster] extra)

        self.temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
        port = self.address.rsplit(":", 1)[1]
        self.procs.append(self._start("--head", "--port", port, "--include-dashboard", "false",
                                      "--temp-dir", self.temp))
        deadline = time.monotonic() + self.timeout
        self._connect(ray, deadline)
        for _ in range(self.nodes - 1):
            self.procs.append(self._start("--address", self.address))
        while sum(node["Alive"] for node in ray.nodes()) < self.nodes:
            self._check(deadline)
            time.sleep(0.5)
        return self.address

    def _connect(self, ray, deadline) -> None:
        while True:
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                return
            except ConnectionError:
                self._check(deadline)
                time.sleep(0.5)

    def _check(self, deadline) -> None:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"the local Ray cluster at {self.address} did not start ({dead or 'timeout'})")

    def stop(self) -> None:
        """Disconnect, then SIGTERM each node's `ray start --block` (SIGKILL to its group if it lingers)."""
        import ray  # lazy: Ray is optional (the [cluster] extra)

        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs = []
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
