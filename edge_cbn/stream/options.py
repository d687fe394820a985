"""What `edge-cbn stream` can be told (`StreamOptions`), and how it says no (`StreamError`, `warn`)."""
from __future__ import annotations

import dataclasses

import click

from ..runtime.stream_calibrator import DEFAULTS as CALIBRATION_DEFAULTS


@dataclasses.dataclass
class StreamOptions:
    """Everything the stream's engine and loop can be told (defaults = the command's defaults); the
    command's flags of the same names fill it."""
    num_threads: int | None = None
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
    calibrate_every: int = 2  # calibration frames by index: every N-th (docs/DESIGN.md, "Calibrated in seconds")
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
        """The options among a command's parameters (same names), then `overrides`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in params.items() if k in names}, **overrides})

    @property
    def noise_on(self) -> bool:
        return self.noise != "none"

    def calibrator_options(self) -> dict:
        return dict(mode=self.mode, window=self.window, refold_every=self.refold_every, stages=self.stages,
                    track_every=self.track_every)


class StreamError(click.ClickException):
    """One clear line for the user (exit code 1)."""


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)
