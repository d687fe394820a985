"""The stream loop, read top to bottom like the TFLite Raspberry Pi examples' `run()`: read a frame,
infer (the engine), draw, emit to the outputs; then save, close and summarise."""
from __future__ import annotations

import contextlib
import signal
import threading
import time

import click

from . import overlay
from .engine import Engine
from .options import StreamOptions
from .outputs import Outputs, describe, draw_prediction, log_fields


class StreamLoop:
    """Drive `source` through `engine` into the outputs `opts` asks for; `run()` returns the summary.

    Args:
        engine: the stream's `Engine`.
        source: a frame source (`edge_cbn.stream.sources`): `read()` gives BGR uint8 frames, None at the end;
            `fps` (a hint, or None) and `name`.
        opts: the stream's `StreamOptions` (outputs, --frames, progress lines).
        model_name: the model's name in the summary and the preview's status.
        stop: a `threading.Event` that ends the loop after the frame in hand; None: a new one (`.stop`).
        echo: callable(message) for progress lines; None: stderr.
        until: optional callable; the loop ends once it returns True (benchmarks).
    """

    def __init__(self, engine: Engine, source, opts: StreamOptions, *, model_name: str, stop=None, echo=None,
                 until=None):
        self.engine, self.source, self.opts = engine, source, opts
        self.until = until  # optional: stop once until() is true (benchmarks)
        self.model_name = model_name
        self.stop = stop or threading.Event()
        self.echo = echo or (lambda msg: click.echo(msg, err=True))
        self.fps = overlay.FpsCounter(10)
        self._start = time.perf_counter()  # of the first frame: the log's "t"

    def run(self) -> dict:
        """Stream until the source ends, --frames, `stop`, `until` or the user quits; then save, close the
        engine and the outputs, and summarise.  An error of the source or the engine propagates after that.

        Returns:
            The summary (`summary`), also written to the log.

        Raises:
            StreamError: an output cannot be opened (--serve, --log) or written (--record).
        """
        outputs, frames, latency_sum = None, 0, 0.0
        start = time.perf_counter()
        try:
            outputs = Outputs(self.opts, self.source.fps, self.echo)
            next_progress = time.monotonic() + self.opts.progress_every
            start = self._start = time.perf_counter()
            while self._more(frames):
                frame = self.source.read()
                if frame is None:
                    break
                result = self.engine.process(frame, frames)
                frames += 1
                latency_sum += result.latency_ms
                self.fps.tick()
                if outputs.shows_frames:
                    self.draw(frame, result)
                if not outputs.emit(frame, lambda: self.log_line(frames - 1, result),
                                    lambda: self.status(frames, result)):
                    break
                if not outputs.on_screen and not self.opts.quiet and time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + self.opts.progress_every
                    self.report(frames, result)
        finally:
            summary = self.finish(frames, time.perf_counter() - start, latency_sum, outputs)
        return summary

    def _more(self, frames: int) -> bool:
        return not self.stop.is_set() and (self.opts.frames is None or frames < self.opts.frames) and not (
            self.until and self.until())

    def draw(self, frame, result) -> None:
        """Draw the prediction and the overlay (fps, noise, calibration) onto `frame`.

        Args:
            frame: the BGR uint8 frame, drawn on in place.
            result: its `FrameResult`.
        """
        e = self.engine
        draw_prediction(frame, e.task, result.prediction, e.proc.labels)
        progress, label = None, ""
        if e.cal is not None:
            progress = e.status.progress
            label = f"calibrating {progress:.0%}" if not e.status.warm else f"calibrated ({e.refolds} refolds)"
        overlay.draw_hud(frame, self.fps.fps, e.noise_text, progress, label)

    def log_line(self, frame_index: int, result) -> dict:
        """One frame's line of the JSON log (--log).

        Args:
            frame_index: the frame's index in this run, 0-based.
            result: its `FrameResult`.

        Returns:
            {"frame", "t" (seconds since the first frame), "latency_ms", "calibrating", "refolds", the
            prediction's fields}, with "progress" when calibrating and "agreement" on sampled frames.
        """
        e = self.engine
        line = {"frame": frame_index, "t": round(time.perf_counter() - self._start, 3),
                "latency_ms": round(result.latency_ms, 3), "calibrating": result.calibrating,
                "refolds": e.refolds, **log_fields(e.task, result.prediction)}
        if e.cal is not None:
            line["progress"] = round(e.status.progress, 4)
        if result.sample is not None:
            line["agreement"] = result.sample
        return line

    def report(self, frames: int, result) -> None:
        """One progress line through `echo`.

        Args:
            frames: the frames done.
            result: the latest frame's `FrameResult`.
        """
        e = self.engine
        cal = f"  calibration {e.calibration_text()}" if e.cal else ""
        self.echo(f"frames {frames}  fps {self.fps.fps:.1f}{cal}  refolds {e.refolds}  "
                  f"{describe(e.task, result.prediction)}")

    def status(self, frames, result) -> dict:
        """The stream's status for the browser preview (its /status JSON).

        Args:
            frames: the frames done.
            result: the latest frame's `FrameResult` (None before the first).

        Returns:
            {"model", "task", "source", "delegate", "fps", "frames", "noise", "calibration", "calibration_progress",
            "calibrated_at_frame", "calibrated_at_seconds", "noise_states", "refolds", "latency_ms", "result",
            "agreement", "layer_shift"} ("agreement": this frame's sample {"frame", "before", "after"}, or None;
            "layer_shift": on a sampled frame with the preview on, the live Fig. 1, `LayerShift.snapshot`).
        """
        e = self.engine
        return {"model": self.model_name, "task": e.task, "source": self.source.name, "delegate": e.delegate.name,
                "fps": round(self.fps.fps, 2), "frames": frames, "noise": e.noise_text,
                "calibration": e.calibration_text(),
                "calibration_progress": round(e.status.progress, 4) if e.cal else (1.0 if e.calibrated else None),
                **self.calibrated_at(),
                "noise_states": self.opts.noise_states if self.opts.noise_on else None,
                "refolds": e.refolds, "latency_ms": round(result.latency_ms, 2) if result else None,
                "result": describe(e.task, result.prediction) if result else None,
                "agreement": {k: result.sample[k] for k in ("frame", "before", "after")}
                if result is not None and result.sample is not None else None,
                "layer_shift": e.layer_shift.snapshot() if e.layer_shift is not None and result is not None
                and result.sample is not None else None}

    def calibrated_at(self) -> dict:
        """The frame (of this run) and the second of the stream at which the warm-up's statistics began to
        serve; None while warming up (and both 0 when resumed warm).

        Returns:
            {"calibrated_at_frame": int or None, "calibrated_at_seconds": float or None}.
        """
        s = self.engine.status
        return {"calibrated_at_frame": s.calibrated_frame, "calibrated_at_seconds": s.calibrated_seconds}

    def finish(self, frames, elapsed, latency_sum, outputs) -> dict:
        """Save the state, close the engine and the outputs, and write the summary to the log.

        Args:
            frames: the frames processed.
            elapsed: the run's duration, seconds.
            latency_sum: the sum of the frames' latencies, ms.
            outputs: the `Outputs` to close (None: none were opened).

        Returns:
            The summary (`summary`).

        Raises:
            Exception: what `Engine.save` raised (a calibration worker's error), after everything is closed.
        """
        summary = None
        try:
            self.engine.save(frames)
        finally:
            with contextlib.suppress(Exception):
                self.engine.close()
            summary = self.summary(frames, elapsed, latency_sum)
            if outputs is not None:
                outputs.close(summary)
        return summary

    def summary(self, frames, elapsed, latency_sum) -> dict:
        """The run's summary, as the command prints it and the log's last line holds it.

        Args:
            frames: the frames processed.
            elapsed: the run's duration, seconds.
            latency_sum: the sum of the frames' latencies, ms.

        Returns:
            {"frames", "fps", "seconds", "latency_ms" (mean), "refolds", "calibrated", "rollbacks", the
            agreement figures, the calibration's state, counters and setup, the model, task and source, and
            "delegate": where serving ran ("xnnpack" or the delegate library)}.
        """
        e, opts = self.engine, self.opts
        return {"frames": frames, "fps": round(frames / elapsed, 2) if elapsed > 0 and frames else 0.0,
                "seconds": round(elapsed, 2),
                "latency_ms": round(latency_sum / frames, 2) if frames else None,
                "refolds": e.refolds, "calibrated": e.calibrated, "rollbacks": e.rollbacks,
                **e.agreement_summary(frames),
                "calibration": e.calibration_text(),
                "calibration_progress": round(e.status.progress, 4) if e.cal else None, **self.calibrated_at(),
                "dropped_frames": e.status.dropped_frames if e.cal else None,
                "rejected_estimates": e.status.rejected_estimates if e.cal else None,
                "model": self.model_name, "task": e.task, "source": self.source.name,
                "skipped_frames": getattr(self.source, "skipped", 0),
                "noise": opts.noise, "eta": opts.eta if opts.noise_on else None, "seed": opts.seed,
                "noise_options": opts.noise_options, "noise_states": opts.noise_states,
                "mode": opts.mode if e.cal else None, "state": opts.state, "resumed": e.resumed,
                "delegate": e.delegate.name}


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, source=None):
    """SIGTERM and Ctrl-C set `stop` (the loop finishes its frame, saves and exits); a second Ctrl-C
    interrupts at once.  Only in the main thread (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        if source is not None and source.live:  # a camera may be waiting to reconnect: end that wait
            source.close()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
