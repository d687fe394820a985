"""A unit of work whose worker is killed from outside while it runs (imported by worker processes, local
or Ray, by reference): the first unit to start anywhere computes its result, records its process id and
waits to be killed before it can hand the result back; every other unit (and its retry) runs normally."""
import os
import time
from pathlib import Path


def killed_once(folder, real, payload, unit):
    folder = Path(folder)
    try:
        claim = os.open(folder / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # one unit, atomically
    except FileExistsError:
        return real(payload, unit)
    os.close(claim)
    result = real(payload, unit)  # the work is done, the result not yet delivered
    (folder / "pid.tmp").write_text(str(os.getpid()))
    os.replace(folder / "pid.tmp", folder / "pid")
    time.sleep(300)  # the test kills this process meanwhile
    return result


def kill_when_ready(folder, timeout=120) -> int:
    """Wait for the waiting worker's pid, SIGKILL it; its pid."""
    import signal

    pid_file = Path(folder) / "pid"
    deadline = time.monotonic() + timeout
    while not pid_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no unit started")
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    return pid
