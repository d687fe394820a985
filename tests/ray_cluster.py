"""A real two-node Ray cluster on loopback for the cluster tests, started once per test session: `ray start
--head` on a free port and a second `ray start --address …` node on the same machine, one CPU each (two
workers at once, as on this 2-core machine).  Both run with `--block`, so they are this session's own
child processes: the teardown stops them by their pids (each stops the Ray daemons it started), never
with a machine-wide `ray stop`."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(*args, env) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray) if ray.exists() else "ray", "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_nodes(address: str, n: int, timeout: float = 120) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    deadline = time.monotonic() + timeout
    while sum(node["Alive"] for node in ray.nodes()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster at {address} did not reach {n} nodes")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to a `ray start --block` (it stops the daemons it started), SIGKILL to its group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def ray_cluster():
    """The address of a running two-node local cluster; this process is connected to it as a driver."""
    ray = pytest.importorskip("ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Worker processes import the tests' helpers (tests/sweep_faults.py) as the driver does.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
               RAY_USAGE_STATS_ENABLED="0")
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
    head = ray_start("--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp), env=env)
    nodes = [head]
    try:
        time.sleep(3)
        nodes.append(ray_start("--address", address, env=env))
        wait_for_nodes(address, 2)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
