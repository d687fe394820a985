"""Calibration beside serving, with every decision taken by frame index, so a stream's predictions and
summary are the same on any machine and under any load; the clock only sets the frame rate.

The serving thread hands each calibration frame to a worker thread, which runs the calibration step on
its own interpreters (LiteRT's `invoke` releases the GIL: it runs on another core).  What the worker
finds takes effect a fixed number of frames later, `lag` (8) while calibration warms up, TRACKING_LAG (128)
once it only tracks:

- the result of calibration frame c (progress, a refold, the end of the warm-up) is seen by the stream
  at frame c + lag;
- when it brings new serving statistics, the serving model's states are rebuilt one at a time from the
  frame f it is seen (or, when another update is being installed, the frame that one ends): at f + j * lag
  state j is dropped (its frames go to a neighbouring state) and the worker builds its successor, which
  serves from f + (j + 1) * lag.  The noise states are never held twice, nor one state more than the
  serving model has (memory).
- state 0, the first built, is checked on the calibration frame (the probe): when its outputs are not all
  finite, the worker builds it again with the statistics serving, and the update ends there, at
  f + lag.  The check costs no model of its own (a build is about a third of a calibration frame).

At frame i the serving thread waits for whatever is due by then (`sync`): a slow or busy machine waits
(a lower frame rate), a fast one never does.  `background=False` runs every task in place, with the same
results.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time

import numpy as np

LAG = 8
# Once calibration only tracks, what a calibration frame finds serves this many frames later: the worker's
# work spreads over them instead of stalling serving.  (At a lower CPU priority it would starve beside
# another busy process while serving waits for it: docs/DESIGN.md.)
TRACKING_LAG = 128


@dataclasses.dataclass
class CalibrationResult:
    """What calibration frame `frame` (this run's stream index) produced."""
    frame: int
    refolded: bool          # new calibrated statistics (the calibration variant refolded)
    progress: float         # warm-up progress after this frame
    warmed: bool            # the warm-up ended on this frame
    text: str               # the calibrator's state, as the preview and progress lines show it
    dropped_frames: int
    rejected_estimates: int
    update: "ServingUpdate | None" = None


@dataclasses.dataclass
class ServingUpdate:
    """New statistics for the serving model and its states as the worker builds them."""
    stats: dict
    lag: int  # frames between its steps: state j is dropped and rebuilt at first_frame + j * lag
    probe: np.ndarray  # the model input state 0 must give finite outputs on
    frame: int = 0  # the calibration frame that produced it
    warmed: bool = False  # the warm-up ended on that frame
    first_frame: int = 0  # set when it starts; state j serves from first_frame + (j + 1) * lag
    previous: dict | None = None  # the statistics serving when it started (what a refused state 0 is rebuilt with)
    refused: bool = False  # state 0 gave non-finite outputs on the probe: the update ends at state 0
    built: dict = dataclasses.field(default_factory=dict)  # state index -> interpreter, not yet installed


class CalibrationPipeline:
    """The serving thread calls `submit(i, fi, x)` on calibration frames and `sync(i)` before serving frame
    i; the worker runs `calibrate(i, fi, x, serve)`, which returns a `CalibrationResult` and may call
    `serve(stats, probe, warmed)` for new serving statistics (a `ServingUpdate` for the result).

    Args:
        calibrate: the calibration step (worker thread).
        serving: the serving `NoisyModel`.
        lag: frames from a calibration frame to its result, and between the steps of an update.
        background: False runs every task in place (the same results).
        num_threads: LiteRT threads of the serving states the worker builds.
        lock: held for each task.
        on_probed: callable(update), worker thread: state 0 of `update` passed the probe.
        on_refused: callable(update, i), serving thread: state 0 of `update` failed it; frame `i` ends the update.
    """

    def __init__(self, calibrate, serving, *, lag: int = LAG, background: bool = True, num_threads=None,
                 lock=None, on_probed=None, on_refused=None):
        self._calibrate, self.serving, self.lag = calibrate, serving, lag
        self._on_probed = on_probed or (lambda update: None)
        self._on_refused = on_refused or (lambda update, i: None)
        self._lock = lock or contextlib.nullcontext()
        self._twin = serving.twin()
        self._twin.num_threads = num_threads
        self._cond = threading.Condition()
        self._tasks: collections.deque = collections.deque()
        self._results: dict[int, CalibrationResult] = {}
        self._submitted: collections.deque = collections.deque()  # calibration frames not yet synced
        self._update: ServingUpdate | None = None  # the one being installed
        self._queued: ServingUpdate | None = None  # the newest one waiting for it
        self._next_state = 0
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0  # CPU time of the tasks run so far (`bench stream`'s cost of calibrating)
        self._closed = self._busy = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="edge-cbn-calibration", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------ serving thread
    def submit(self, i: int, fi: int, x: np.ndarray, *, tracking: bool = False) -> None:
        """Calibration frame `i` (noise frame index `fi`), model input `x` (copied); `tracking`: its result
        is due TRACKING_LAG frames later, not `lag`, and the worker may take its time."""
        lag = TRACKING_LAG if tracking else self.lag
        self._submitted.append((i + lag, i))
        self._put(("calibrate", i, fi, np.array(x, copy=True), lag))

    def sync(self, i: int) -> list[CalibrationResult]:
        """Before serving frame `i`: the results due by frame i, in order, and the serving states due at
        frame i swapped in (waiting for the worker when it is behind)."""
        results = []
        while self._submitted and self._submitted[0][0] <= i:
            frame = self._submitted[0][1]
            result = self._wait_for(lambda: self._results.pop(frame, None))
            self._submitted.popleft()
            results.append(result)
            if result.update is not None:  # waits for one being installed; a newer one replaces it
                if self._queued is not None:  # and ends the warm-up if the one it replaces did (a save is due)
                    result.update.warmed |= self._queued.warmed
                self._queued = result.update
        update = self._update
        if update is not None and i >= update.first_frame + (self._next_state + 1) * update.lag:
            self._install_next(update, i)
        if self._update is None and self._queued is not None:
            self._update, self._queued, self._next_state = self._queued, None, 0
            self._update.first_frame, self._update.previous = i, self.serving.stats()
            self._rebuild(self._update, 0)
        return results

    def _install_next(self, update: ServingUpdate, i: int) -> None:
        """Serve the state the worker built for `update` (waiting for it), then start the next one, or end the
        update: after its last state, or at state 0 when the probe refused it."""
        j = self._next_state
        built = self._wait_for(lambda: update.built.pop(j, None))
        if update.refused:
            self.serving.install(0, built)
            self._update = None
            self._on_refused(update, i)
            return
        self.serving.install(j, built, update.stats if j == 0 else None)
        self._next_state += 1
        if self._next_state < self.serving.states:
            self._rebuild(update, self._next_state)
        else:
            self._update = None

    def _rebuild(self, update: ServingUpdate, j: int) -> None:
        """Drop serving state `j` (when others can serve its frames) and have the worker build its successor
        (exact noise, without states: a model to probe)."""
        self.serving.drop(j)
        self._put(("build", update, j))

    def drain(self) -> None:
        """Until every task handed over has run (re-raises a worker error)."""
        self._wait_for(lambda: not self._tasks and not self._busy or None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------------------- worker thread
    def _put(self, task) -> None:
        if self._thread is None:
            self._run(task)
            self._raise()
            return
        with self._cond:
            # A serving state is built before pending calibration frames: the stream may be waiting for it.
            self._tasks.appendleft(task) if task[0] == "build" else self._tasks.append(task)
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._tasks or self._closed)
                if not self._tasks:
                    return
                task, self._busy = self._tasks.popleft(), True
            self._run(task)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _run(self, task) -> None:
        start = time.thread_time()
        try:
            with self._lock:
                self._run_task(task)
        except BaseException as e:  # noqa: BLE001 - handed to the serving thread, which raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            self.cpu_seconds += time.thread_time() - start

    def _run_task(self, task) -> None:
        if task[0] == "build":
            _, update, j = task
            self._store(update.built, j, self._build_state(update, j))
        else:
            _, i, fi, x, lag = task

            def serve(stats, probe, warmed):
                return ServingUpdate(stats, lag, probe, i, warmed)  # `probe`: this task's own copy of the input

            self._store(self._results, i, self._calibrate(i, fi, x, serve))

    def _build_state(self, update: ServingUpdate, j: int):
        """Serving state `j` of `update`, built; state 0 is checked on the probe first, and built with the
        statistics serving instead when it fails (`update.refused`).  Exact noise keeps no model: True."""
        self._twin.prepare(update.stats)
        state = self._twin.build_state(j)
        if j == 0:
            if self._twin.probe_ok(state, update.probe):
                self._on_probed(update)
            else:
                update.refused, state = True, None  # dropped before its replacement is built (memory)
                if self.serving.states:
                    self._twin.prepare(update.previous)
                    state = self._twin.build_state(0)
        return state if self.serving.states else True

    def _store(self, where: dict, key, value) -> None:
        with self._cond:
            where[key] = value
            self._cond.notify_all()

    def _wait_for(self, take):
        """`take()` under the lock until it gives something (not None); re-raises a worker error."""
        with self._cond:
            while True:
                self._raise()
                value = take()
                if value is not None:
                    return value
                if self._thread is None:
                    raise RuntimeError("calibration pipeline: waiting in place for a task never handed over")
                self._cond.wait()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

