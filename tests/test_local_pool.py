"""`LocalPool` when workers die: a unit whose submission meets a pool broken since the last wait runs again
(it ended the whole sweep before), and workers end with their driver instead of staying alive as orphans
holding a model's memory."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

from edge_cbn.cluster import shared
from edge_cbn.cluster.local import LocalPool


class BrokenOnSecondSubmit:
    """An executor whose pool breaks between the first and the second submission."""

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        if self.submitted == 2:
            raise BrokenProcessPool("a child process terminated abruptly")
        future = Future()
        future.set_result(fn(*args))
        return future


def test_a_unit_submitted_to_a_pool_broken_since_the_last_wait_runs_again():
    key = shared.key_of("value")
    shared.install(key, "value")
    todo, results = deque([1, 2, 3]), {}
    again = LocalPool(2)._drain(BrokenOnSecondSubmit(), lambda value, unit: (value, unit * 10), key, todo,
                                lambda unit, result: results.__setitem__(unit, result))
    assert again == [2] and list(todo) == [3] and results == {1: ("value", 10)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).split()[1] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_when_their_driver_is_killed(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, sys, time
        from edge_cbn.cluster.local import LocalPool

        def sleeper(folder, unit):
            open(os.path.join(folder, str(os.getpid())), "w").close()
            time.sleep(120)

        if __name__ == "__main__":
            LocalPool(2).run(sleeper, sys.argv[1], [0, 1], lambda unit, result: ())
    """))
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, str(driver), str(pids)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(pids)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        workers = [int(name) for name in os.listdir(pids)]
        assert len(workers) == 2 and all(map(_alive, workers))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their driver"
