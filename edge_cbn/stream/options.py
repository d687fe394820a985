"""What `edge-cbn stream` can be told (`StreamOptions`), and how it says no (`StreamError`, `warn`)."""
from __future__ import annotations

import dataclasses

import click

from ..runtime.interpreter import CPU_DELEGATE
from ..runtime.stream_calibrator import DEFAULTS as CALIBRATION_DEFAULTS


# The warm-up's calibration frames come every N-th frame (docs/DESIGN.md, "Calibrated in seconds"): the
# depth-first warm-up needs one frame per BN layer, the sweep calibrates them all from each frame.
DEPTH_EVERY = 2
SWEEP_EVERY = 32
TRACKING_EVERY = 256  # once converged: the statistics only drift, and the stream gets its frame rate back


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Which stream frames calibrate, a function of the frame index alone.

    Attributes:
        every: through the warm-up, every N-th frame.
        second_every: after the warm-up, every N-th frame until converged.
        converged_warmups: converged once this many warm-ups' worth of calibration frames are in.
        tracking_every: once converged, every N-th frame.
    """
    every: int
    second_every: int
    converged_warmups: int
    tracking_every: int = TRACKING_EVERY

    @classmethod
    def of(cls, every: int, sweep: bool) -> "Cadence":
        """The depth-first warm-up's second pass every 2N-th frame until twice its frames are in (its deepest
        layers have had one frame each at its end; frames further apart see more of the scene); the sweep's
        every N-th until four times its frames are in (each frame calibrates every layer: what is left is the
        average over frames)."""
        return cls(every, every, 4) if sweep else cls(every, 2 * every, 2)


@dataclasses.dataclass
class StreamOptions:
    """Everything the stream's engine and loop can be told (defaults = the command's defaults); the
    command's flags of the same names fill it.

    Attributes:
        num_threads: LiteRT threads (None: LiteRT's default).
        delegate: where serving runs: "xnnpack" (LiteRT's CPU default), "gpu", "edgetpu", a delegate library's
            path, or "auto" (edgetpu, then gpu, else xnnpack); calibration stays on the CPU.
        delegate_options: the delegate's options (--delegate-option KEY=VALUE, LiteRT's `load_delegate`).
        max_results: classification: the classes shown.
        score_threshold: detection: the lowest score shown.
        noise: the noise preset (`noise.PRESETS`); "none" runs clean.
        eta: the noise level η0 (unused without noise).
        seed: the chip's seed.
        noise_options: `make_noise` keywords (--noise-option KEY=VALUE).
        noise_states: temporal-noise states served in turn (0: exact per-frame noise).
        calibrate: re-estimate the BN statistics on the stream; None: when noise is on.
        mode: the calibration mode: "shift", "absolute" or "prior".
        window: the moments' window in calibration frames (cumulative average, then an EMA).
        refold_every: warm-up: calibration frames per stage.
        stages: warm-up stages, depth first (capped at the number of BN layers).
        track_every: after the warm-up, refold every N calibration frames.
        sweep: calibrate every BN layer from each calibration frame through the sweep variant; None: when the
            model has one and the mode is shift; False: the depth-first warm-up, one layer per frame.
        warmup_frames: sweep: the warm-up's calibration frames.
        calibrate_every: every N-th frame calibrates through the warm-up (less often after it); None: the
            schedule's default (`cadence`).
        agreement_every: compare with the clean model every N-th frame (0: never; only with noise).
        state: the calibration state file (--state) to resume from and save to; None: none.
        save_interval: save after a refold at most every this many seconds (0: after every refold); always at exit.
        frames: stop after this many frames (None: at the source's end).
        headless: no window.
        record: an .mp4 to write the annotated frames to (None: none).
        serve: the browser preview's port (None: no preview).
        host: the preview's address.
        log: a JSON-lines log file (None: none).
        quiet: no progress lines.
        progress_every: seconds between progress lines.
    """
    num_threads: int | None = None
    delegate: str = CPU_DELEGATE  # serving only (runtime.interpreter.open_delegate)
    delegate_options: dict = dataclasses.field(default_factory=dict)
    max_results: int = 3
    score_threshold: float = 0.25
    noise: str = "none"
    eta: float = 0.05
    seed: int = 0
    noise_options: dict = dataclasses.field(default_factory=dict)  # make_noise keywords (--noise-option)
    noise_states: int = 3  # temporal-noise states served in turn (device/README.md: memory, and figures per count)
    calibrate: bool | None = None  # None: when noise is on (and the model has a calibration variant)
    mode: str = CALIBRATION_DEFAULTS["mode"]
    window: float = CALIBRATION_DEFAULTS["window"]
    refold_every: int = CALIBRATION_DEFAULTS["refold_every"]
    stages: int = 64  # at most: a warm-up of 64 calibration frames, 128 stream frames (DESIGN, "Calibrated in seconds")
    track_every: int = CALIBRATION_DEFAULTS["track_every"]
    sweep: bool | None = None
    warmup_frames: int = 2  # sweep (docs/DESIGN.md, "Calibrated in seconds")
    calibrate_every: int | None = None  # by index, every N-th (docs/DESIGN.md, "Calibrated in seconds")
    agreement_every: int = 10
    state: str | None = None
    save_interval: float = 30.0
    frames: int | None = None
    headless: bool = True
    record: str | None = None
    serve: int | None = None
    host: str = "127.0.0.1"
    log: str | None = None
    quiet: bool = False
    progress_every: float = 2.0

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "StreamOptions":
        """The options among a command's parameters (same names), then `overrides`.

        Args:
            params: the command's parameters {name: value}; names that are no field are left out.
            **overrides: field values that replace those of `params`.

        Returns:
            The `StreamOptions`.

        Raises:
            TypeError: an override that is not a field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in names}, **overrides})

    @property
    def noise_on(self) -> bool:
        """True unless `noise` is "none"."""
        return self.noise != "none"

    def calibrator_options(self, sweep: bool = False) -> dict:
        """The `StreamCalibrator` keywords among the options.

        Args:
            sweep: for a sweep calibrator (its warm-up is `warmup_frames` frames).

        Returns:
            {"mode", "window", "refold_every", "stages", "track_every", "sweep"}.
        """
        return dict(mode=self.mode, window=self.window, refold_every=1 if sweep else self.refold_every,
                    stages=self.warmup_frames if sweep else self.stages, track_every=self.track_every, sweep=sweep)

    def cadence(self, sweep: bool) -> Cadence:
        """Which frames calibrate: the warm-up every --calibrate-every frames, or the schedule's default
        (`SWEEP_EVERY` with the sweep, `DEPTH_EVERY` without), then as `Cadence.of` says.

        Args:
            sweep: the stream calibrates through the sweep variant.

        Returns:
            The `Cadence`.
        """
        return Cadence.of(self.calibrate_every or (SWEEP_EVERY if sweep else DEPTH_EVERY), sweep)


class StreamError(click.ClickException):
    """One clear line for the user (exit code 1)."""


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)
