"""Run one hostile input through a loader in a forked child, with a time bound and a bound on the
memory the case adds, and say how it ended.  The fuzz corpus's one way of judging a case.

    result = run_case(torch_pickle.load, path)
    assert result.kind == "refused", result     # BadInput, one line naming the file

A forked child starts with the parent's pages (some of them mapped only when touched), so the child
resets its own peak (`/proc/self/clear_refs`) and reports its peak minus its RSS at that moment; a child
that dies before reporting is judged by its rusage peak against the parent's RSS at the fork.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import resource
import signal
import time

TIME_LIMIT_S = 10.0
RSS_LIMIT_MB = 512.0


@dataclasses.dataclass
class CaseResult:
    kind: str          # "refused" (BadInput), "loaded", "error" (another exception), "killed", "timeout"
    message: str       # the exception's text, one line expected
    seconds: float
    added_rss_mb: float

    def ok_refusal(self, path=None) -> bool:
        """A one-line BadInput naming `path`, within the bounds."""
        return (self.kind == "refused" and "\n" not in self.message and self.seconds <= TIME_LIMIT_S
                and self.added_rss_mb <= RSS_LIMIT_MB and (path is None or str(path) in self.message))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _child(fn, args, w: int) -> None:
    from edge_cbn.runtime.errors import BadInput
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
    except OSError:
        pass
    base = _status_mb("VmRSS")
    try:
        fn(*args)
        out = ("loaded", "")
    except BadInput as e:
        out = ("refused", str(e))
    except BaseException as e:  # noqa: BLE001 - anything else is what the corpus looks for
        out = ("error", f"{type(e).__name__}: {e}")
    os.write(w, pickle.dumps((*out, _status_mb("VmHWM") - base)))
    os._exit(0)


def run_case(fn, *args, time_limit: float = TIME_LIMIT_S, rss_limit_mb: float = RSS_LIMIT_MB) -> CaseResult:
    """`fn(*args)` in a forked child: how it ended, how long it took and the RSS it added.  The child is
    killed at `time_limit` and capped at `rss_limit_mb` over the parent (address-space limit)."""
    base = _status_mb("VmRSS")
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        vm = resource.getrlimit(resource.RLIMIT_AS)[0]
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        cap = size + int(rss_limit_mb * 2 * 2**20)  # address space: generous, RSS is judged below
        resource.setrlimit(resource.RLIMIT_AS, (cap if vm == resource.RLIM_INFINITY else min(cap, vm), vm))
        _child(fn, args, w)
    os.close(w)
    chunks, deadline = [], t0 + time_limit
    os.set_blocking(r, False)
    status = rusage = None
    while True:
        try:
            data = os.read(r, 1 << 16)
            if data:
                chunks.append(data)
        except BlockingIOError:
            pass
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, rusage = os.wait4(pid, 0)
            os.close(r)
            return CaseResult("timeout", "", time.monotonic() - t0, rusage.ru_maxrss / 1024 - base)
        time.sleep(0.002)
    try:
        while data := os.read(r, 1 << 16):
            chunks.append(data)
    except BlockingIOError:
        pass
    os.close(r)
    seconds, added = time.monotonic() - t0, rusage.ru_maxrss / 1024 - base
    if not chunks:
        return CaseResult("killed", f"status {status}", seconds, added)
    kind, message, added = pickle.loads(b"".join(chunks))
    return CaseResult(kind, message, seconds, added)
