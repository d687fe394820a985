"""`edge-cbn bench stream`: the stream's frame rates against the bare LiteRT invoke, measured side by
side in one run."""
from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import time

import click
import numpy as np

from ...runtime.device_calibration import DeviceCalibration
from ...runtime.interpreter import interpreter_class, make_interpreter
from ...runtime.noise import make_noise
from ...runtime.noisy_model import NoisyModel, noise_targets
from ...runtime.processing import Processor
from ...stream import Engine, StreamLoop, StreamOptions, load_model, open_frames
from ...stream.engine import CALIBRATION_THREADS
from ...stream.sample import sample_path
from ...stream.sources import Prefetched, VideoSource
from .timing import emit, invoke_fn, perturbed_stats, time_per_call

# Peak RSS of `edge-cbn stream` per configuration, each in a fresh process (device/README.md's table).
MEMORY_CONFIGS = [
    ("clean (no --noise)", []),
    ("noisy, not calibrating, no agreement", ["--noise", "{preset}", "--eta", "{eta}", "--no-calibrate",
                                              "--agreement-every", "0"]),
    ("calibrating, no agreement", ["--noise", "{preset}", "--eta", "{eta}", "--agreement-every", "0"]),
    ("calibrating, agreement every 10 (defaults)", ["--noise", "{preset}", "--eta", "{eta}"]),
]
ROWS = [("raw LiteRT invoke (fps)", "raw_fps"), ("invoke without XNNPACK (ms)", "no_xnnpack_invoke_ms"),
        ("clean stream (fps)", "stream_fps"), ("clean stream / raw invoke", "stream_ratio"),
        ("noisy stream, {noise_states} noise states (fps)", "noisy_stream_fps"), ("noisy stream, exact (fps)", "noisy_exact_stream_fps"),
        ("calibrating, warm-up (fps)", "calibrating_fps"), ("warm-up / noisy stream", "calibrating_ratio"),
        ("warm-up, CPU of the process (s)", "warmup_cpu_s"), ("warm-up, CPU of the calibration worker (s)", "warmup_worker_cpu_s"),
        ("calibrated at frame", "calibrated_frame"), ("calibrated after (s)", "calibrated_seconds"),
        ("calibrating, tracking after it (fps)", "tracking_fps"), ("tracking / noisy stream", "tracking_ratio"),
        ("noisy stream at {camera_fps:g} fps (fps)", "camera_noisy_fps"),
        ("calibrating at {camera_fps:g} fps, warm-up (fps)", "camera_calibrating_fps"),
        ("warm-up / noisy stream at {camera_fps:g} fps", "camera_calibrating_ratio"),
        ("calibrated after (s) at {camera_fps:g} fps", "camera_calibrated_seconds"),
        ("exact noise: write + build (ms/frame)", "noise_ms_per_frame"), ("refold, {noise_states} noise states (ms)", "refold_ms"),
        ("refold, clean (ms)", "refold_clean_ms"), ("served noisy frame, CPU (ms)", "served_frame_cpu_ms"),
        ("calibration frame, CPU (ms)", "calibration_frame_cpu_ms")]


class StreamBench:
    """One model, thread count and noise setting; `run()` measures, prints the table and the JSON."""

    def __init__(self, model, num_threads, frames, preset, eta, rounds, camera_fps=30.0):
        self.bundle, self.name = load_model(model)
        self.num_threads, self.frames, self.preset, self.eta, self.rounds = num_threads, frames, preset, eta, rounds
        self.camera_fps = camera_fps
        self.base = StreamOptions(num_threads=num_threads, headless=True, quiet=True, agreement_every=0)
        with open_frames() as src:
            self.x = Processor(self.bundle).preprocess(src.read())[0].copy()
        self.fig = {"bench": "stream", "model": self.name, "num_threads": num_threads, "frames": frames,
                    "rounds": rounds, "noise": f"{preset} eta={eta:g}", "noise_states": self.base.noise_states,
                    "camera_fps": camera_fps,
                    "no_xnnpack_invoke_ms": _no_xnnpack_invoke_ms(self.bundle.model_bytes, self.x, num_threads)}

    def stream_fps(self, n_frames: int, *, camera_fps: float | None = None, **changes):
        """(fps, summary) of one stream of `n_frames` frames over the sample clip, decoded as fast as it goes
        or delivered at `camera_fps` (the calibrating stream, whose phases are timed apart, is
        `calibrating_fps`)."""
        opts = dataclasses.replace(self.base, frames=n_frames, **changes)
        with _sample_frames(camera_fps) as source:
            summary = StreamLoop(Engine(self.bundle, opts), source, opts, model_name=self.name).run()
        return summary["fps"], summary

    def run(self, memory_frames: int = 1000) -> None:
        self.stream_fps(self.frames // 4)  # warm caches and the video decoder: the first stream is slower
        self.clean_against_raw()
        self.noisy_and_calibrating()
        self.at_camera_rate()
        self.noise_and_refold_costs()
        click.echo(f"{self.name}, {self.num_threads} threads, noise {self.fig['noise']}")
        for label, key in ROWS:
            value = self.fig[key]
            label = label.format(noise_states=self.base.noise_states, camera_fps=self.camera_fps)
            click.echo(f"  {label:<44} {value if value is not None else '-':>10}")
        if memory_frames:
            self.fig.update(peak_rss_mb={}, memory_frames=memory_frames)
            for label, flags in MEMORY_CONFIGS:
                mb = self.fig["peak_rss_mb"][label] = self.peak_rss_mb(flags, memory_frames)
                click.echo(f"  {'peak RSS (MB), ' + label:<56} {mb:>10}")
        emit(self.fig)

    def peak_rss_mb(self, flags, frames: int) -> float:
        """Peak RSS of `edge-cbn stream` with `flags` over `frames` frames of the sample clip, in a fresh
        process that reports its own peak at exit (`command.peak_rss_mb`)."""
        args = [a.format(preset=self.preset, eta=self.eta) for a in flags]
        code = ("import atexit, sys\n"
                "from edge_cbn.lab.bench.timing import peak_rss_mb\n"
                "atexit.register(lambda: print('peak-rss-mb', peak_rss_mb(), file=sys.stderr))\n"
                "from edge_cbn.cli import main; main()")
        done = subprocess.run([sys.executable, "-c", code, "stream", "--model", str(self.bundle.path), "--frames",
                               str(frames), "--headless", "--quiet", "--num-threads", str(self.num_threads),
                               *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = [line for line in done.stderr.splitlines() if line.startswith("peak-rss-mb")]
        if done.returncode != 0 or not lines:
            raise click.ClickException(f"stream {' '.join(args)} failed: {done.stderr.strip()}")
        return float(lines[-1].split()[1])

    def clean_against_raw(self) -> None:
        """The bare invoke and the clean stream alternate, `rounds` times: this shared machine's speed
        drifts within a run, so each ratio pairs figures taken a second apart; medians are reported.  Both
        are frames / elapsed (a median per call would drop the machine's hiccups from one side only)."""
        invoke = invoke_fn(make_interpreter(model_content=self.bundle.model_bytes, num_threads=self.num_threads),
                           self.x)

        def raw_fps():
            invoke()
            t = time.perf_counter()
            for _ in range(self.frames):
                invoke()
            return self.frames / (time.perf_counter() - t)

        raw, clean = [], []
        for _ in range(self.rounds):
            raw.append(raw_fps())
            clean.append(self.stream_fps(self.frames)[0])
        ratios = np.divide(clean, raw)
        self.fig.update(raw_fps=round(float(np.median(raw)), 2), raw_ms=round(1e3 / float(np.median(raw)), 2),
                        stream_fps=round(float(np.median(clean)), 2), stream_ratio=round(float(np.median(ratios)), 3),
                        stream_ratios=[round(float(r), 3) for r in ratios])

    def noisy_and_calibrating(self) -> None:
        """The noisy stream, then calibrating over the warm-up and tracking after it: a third of `rounds`
        (at least 3) calibrating streams, each paired with a noisy stream of as many frames run just before
        it (this shared machine's speed drifts within a run); medians of the fps and of the paired ratios."""
        noisy = dict(noise=self.preset, eta=self.eta, calibrate=False)
        self.fig["noisy_exact_stream_fps"] = self.stream_fps(max(10, self.frames // 4), **noisy, noise_states=0)[0]
        self.fig.update(noisy_stream_fps=self.stream_fps(self.frames, **noisy)[0], calibrating_fps=None,
                        tracking_fps=None, calibrating_ratio=None, tracking_ratio=None, calibrated_frame=None,
                        calibrated_seconds=None, warmup_cpu_s=None, warmup_worker_cpu_s=None)
        if not self.bundle.can_calibrate:
            return
        runs = []  # (noisy fps, warm-up frames, warm-up fps, tracking fps, calibrated after s, worker CPU, CPU)
        for _ in range(max(3, self.rounds // 3)):
            reference = self.stream_fps(4 * self.frames, **noisy)[0]
            (warm_frames, warm_fps), (_, tracking_fps), (calibrated, seconds), cpu = self.calibrating_fps(4 * self.frames)
            runs.append((reference, warm_frames, warm_fps, tracking_fps, seconds, *cpu))
        reference, warm_frames, warm_fps, tracking_fps, seconds, worker_cpu, cpu = np.median(np.array(runs), axis=0)
        self.fig.update(calibrating_fps=round(warm_fps, 2), calibrating_frames=int(warm_frames),
                        warmup_worker_cpu_s=round(worker_cpu, 2), warmup_cpu_s=round(cpu, 2),
                        calibrated_frame=calibrated, calibrated_seconds=round(seconds, 2),
                        tracking_fps=round(tracking_fps, 2), tracking_frames=4 * self.frames,
                        noisy_stream_fps_long=round(reference, 2),
                        calibrating_ratio=round(float(np.median([r[2] / r[0] for r in runs])), 3),
                        tracking_ratio=round(float(np.median([r[3] / r[0] for r in runs])), 3),
                        tracking_ratios=[round(r[3] / r[0], 3) for r in runs])

    def at_camera_rate(self) -> None:
        """The warm-up as a camera stream sees it: the clip delivered at `camera_fps`, the noisy stream over
        as many frames as the calibrating stream's warm-up, then the calibrating stream."""
        self.fig.update(camera_noisy_fps=None, camera_calibrating_fps=None, camera_calibrating_ratio=None,
                        camera_calibrated_seconds=None)
        if not self.bundle.can_calibrate or not self.camera_fps:
            return
        (frames, warm_fps), _, (_, seconds), _ = self.calibrating_fps(0, camera_fps=self.camera_fps)
        noisy_fps = self.stream_fps(frames, camera_fps=self.camera_fps, noise=self.preset, eta=self.eta,
                                    calibrate=False)[0]
        self.fig.update(camera_noisy_fps=noisy_fps, camera_calibrating_fps=warm_fps, camera_calibrated_seconds=seconds,
                        camera_calibrating_ratio=round(warm_fps / noisy_fps, 3))

    def calibrating_fps(self, tracking_frames: int, *, camera_fps: float | None = None):
        """One calibrating stream: (frames, fps) until it calibrates only every TRACKING_EVERY frames, then over
        `tracking_frames` more, (frame, seconds) at which the warm-up's statistics began to serve
        (`CalibrationStatus`), and (calibration worker, whole process) CPU seconds until it calibrates only every
        TRACKING_EVERY frames; decoded as fast as it goes or delivered at `camera_fps`.  One run: the frame index
        decides the schedule."""
        opts = dataclasses.replace(self.base, noise=self.preset, eta=self.eta, calibrate=True, frames=None)
        engine = Engine(self.bundle, opts)
        calls = itertools.count()
        marks = {}  # "start": time; "warm", "end": (frames done, time)
        cpu = {}  # "start", "warm": process CPU seconds; "worker": the calibration worker's at the warm mark

        def until():
            done, now = next(calls), time.perf_counter()  # frames processed before this call
            marks.setdefault("start", now)
            cpu.setdefault("start", time.process_time())
            if "warm" not in marks and engine.converged:
                marks["warm"] = (done, now)
                cpu.update(warm=time.process_time(), worker=engine.pipeline.cpu_seconds)
            if "warm" in marks and done - marks["warm"][0] >= tracking_frames:
                marks["end"] = (done, now)
            return "end" in marks

        with _sample_frames(camera_fps) as source:
            StreamLoop(engine, source, opts, model_name=self.name, until=until).run()
        (warm, t1), (end, t2) = marks["warm"], marks["end"]
        tracking = (end - warm, round((end - warm) / (t2 - t1), 2)) if end > warm else (0, None)
        status = engine.status
        return ((warm, round(warm / (t1 - marks["start"]), 2)), tracking,
                (status.calibrated_frame, status.calibrated_seconds), (cpu["worker"], cpu["warm"] - cpu["start"]))

    def noise_and_refold_costs(self) -> None:
        chip = make_noise(self.preset, self.eta, 0).instantiate(noise_targets(self.bundle))
        exact = NoisyModel(self.bundle, chip, num_threads=self.num_threads, noise_states=0)
        frame_no = itertools.count()
        self.fig["noise_ms_per_frame"] = round(time_per_call(lambda: exact.interpreter(next(frame_no))) * 1e3, 2)
        stats = [perturbed_stats(self.bundle, s) for s in (1, 2)]
        for key, model in (("refold_ms", NoisyModel(self.bundle, chip, num_threads=self.num_threads,
                                                    noise_states=self.base.noise_states)),
                           ("refold_clean_ms", NoisyModel(self.bundle, None, num_threads=self.num_threads))):
            turn = itertools.count()
            seconds = time_per_call(lambda: model.set_stats(stats[next(turn) % 2]), warmup=1, min_calls=3)
            self.fig[key] = round(seconds * 1e3, 1)
        self.cpu_per_frame(chip)

    def cpu_per_frame(self, chip) -> None:
        """CPU time of a served noisy frame and of a warm-up calibration frame (the calibration step the stream
        runs: the sweep when the model has one, else the depth-first step with its refold of the variant; the
        serving model's rebuild, every few refolds, is `refold_ms`)."""
        frame_no = itertools.count()
        serving = NoisyModel(self.bundle, chip, num_threads=self.num_threads, noise_states=self.base.noise_states)
        self.fig["served_frame_cpu_ms"] = _cpu_ms_per_call(lambda: serving.run(self.x, next(frame_no)))
        self.fig["calibration_frame_cpu_ms"] = None
        if self.bundle.can_calibrate:
            calibration = DeviceCalibration(self.bundle, chip, num_threads=CALIBRATION_THREADS,
                                            **self.base.calibrator_options(sweep=self.bundle.can_sweep))
            self.fig["calibration_frame_cpu_ms"] = _cpu_ms_per_call(lambda: calibration.step(self.x, next(frame_no)))


def _cpu_ms_per_call(fn, calls: int = 20) -> float:
    """CPU milliseconds (all of this process's threads) per call of `fn()`, after one call to warm up."""
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return round((time.process_time() - start) / calls * 1e3, 2)


def _sample_frames(camera_fps: float | None):
    """The bundled clip, looped and read ahead: as fast as it decodes, or delivered at `camera_fps`."""
    if camera_fps is None:
        return open_frames()
    return Prefetched(VideoSource(sample_path(), loop=True, realtime=camera_fps))


def _no_xnnpack_invoke_ms(model_bytes, x, num_threads):
    """Invoke time with the builtin kernels only, which read weights in place (so a live buffer patch
    would need no rebuild); None where the interpreter has no such option."""
    try:
        from ai_edge_litert.interpreter import OpResolverType  # lazy: LiteRT is optional (None without it)
    except ImportError:
        return None
    it = interpreter_class()(model_content=bytes(model_bytes), num_threads=num_threads,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return round(time_per_call(invoke_fn(it, x)) * 1e3, 2)
