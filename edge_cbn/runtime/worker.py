"""A background worker that runs only the newest job: refolds and state saves must never stall the
stream, and when a newer request arrives the older one still waiting is obsolete."""
from __future__ import annotations

import threading


class LatestJobWorker:
    """`submit(job)` hands `job` to `run(job)` on a background thread (or runs it in place when
    `background` is False), replacing a job still waiting.  An exception in `run` goes to `on_error`
    when given, else it is re-raised by the next `submit`/`wait` on the caller's thread."""

    def __init__(self, run, *, name: str, background: bool = True, on_error=None):
        self._run_job, self._on_error = run, on_error
        self.done = 0
        self._error = None
        self._cond = threading.Condition()
        self._pending = None
        self._busy = self._closed = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    def submit(self, job) -> None:
        self._raise()
        if self._thread is None:
            self._execute(job)
            self._raise()
            return
        with self._cond:
            self._pending = job
            self._cond.notify_all()

    def _execute(self, job) -> None:
        try:
            self._run_job(job)
            self.done += 1
        except Exception as e:
            if self._on_error is None:
                self._error = e
            else:
                self._on_error(e)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def wait(self, timeout: float | None = None) -> bool:
        """Until every submitted job has run (False on timeout); re-raises a job's error."""
        ok = True
        if self._thread is not None:
            with self._cond:
                ok = self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)
        self._raise()
        return ok

    def close(self) -> None:
        self.wait()
        if self._thread is not None:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
