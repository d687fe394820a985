"""`edge-cbn plot LOG.jsonl`: the charts of a stream's `--log`, as a PNG: agreement with the clean model
before and after calibration over frames (the sampled values and a running mean), frames per second and
latency over the stream with the refolds marked, and the calibration's progress with the frame at which
the model became calibrated.  `--compare OTHER.jsonl` draws a second log on the same axes (e.g. `shift`
against `absolute`).  matplotlib comes with the `eval` extra."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np

from ..runtime.errors import BadInput, MissingDependency
from ..runtime.validation import regular_file
from .bench.converge import CLIP_FRAMES

RUNNING_MEAN_FRAMES = CLIP_FRAMES  # one loop of the bundled clip, as `bench converge` averages
MAX_LINE_BYTES = 1 << 20


@dataclasses.dataclass
class StreamLog:
    """What a `--log` file holds, as arrays over its frame lines.

    Attributes:
        name: what the charts call it (the file's stem unless given).
        frame, t, latency_ms, progress, refolds: one value per frame line.
        sample_frame, before, after: the agreement samples (frame, % uncalibrated, % served).
        summary: the last line's summary, {} when the stream did not end cleanly.
    """
    name: str
    frame: np.ndarray
    t: np.ndarray
    latency_ms: np.ndarray
    progress: np.ndarray
    refolds: np.ndarray
    sample_frame: np.ndarray
    before: np.ndarray
    after: np.ndarray
    summary: dict

    @property
    def calibrated_at(self) -> int | None:
        """The frame from which calibrated statistics served, when the log says so."""
        return self.summary.get("calibrated_at_frame")

    def refold_frames(self) -> np.ndarray:
        """The frames at which the stream took in new calibrated statistics (the refold count went up)."""
        return self.frame[1:][np.diff(self.refolds) > 0]

    def fps(self, window: int = 30) -> np.ndarray:
        """Frames per second over the last `window` frames, per frame (NaN until there are that many)."""
        out = np.full(len(self.t), np.nan)
        if len(self.t) > window:
            out[window:] = window / np.maximum(self.t[window:] - self.t[:-window], 1e-9)
        return out


def read_log(path, name: str | None = None) -> StreamLog:
    """The `--log` JSON-lines file at `path`.

    Args:
        path: the log `edge-cbn stream --log` wrote.
        name: what the charts call it (default: the file's stem).

    Returns:
        A `StreamLog`.

    Raises:
        BadInput: not a readable stream log (naming the file and the line).
    """
    path = regular_file(path)
    rows, summary = [], {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if len(line) > MAX_LINE_BYTES:
                raise BadInput(path, f"line {n} is longer than {MAX_LINE_BYTES} bytes: not a stream log")
            try:
                entry = json.loads(line)
            except ValueError:
                if n > 1 and not line.endswith(b"\n"):
                    break  # the last line cut short by a kill: the frames before it are whole
                raise BadInput(path, f"line {n} is not JSON: not a stream log (`edge-cbn stream --log`)") from None
            if isinstance(entry, dict) and isinstance(entry.get("summary"), dict):
                summary = entry["summary"]
            elif isinstance(entry, dict) and _frame_line(entry):
                rows.append(entry)
            else:
                raise BadInput(path, f"line {n} is neither a frame line nor the summary of a stream log")
    if not rows:
        raise BadInput(path, "holds no frame lines")
    return _arrays(name or path.stem, rows, summary)


def _frame_line(entry: dict) -> bool:
    return all(isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
               for k in ("frame", "t", "latency_ms"))


def _arrays(name: str, rows: list[dict], summary: dict) -> StreamLog:
    samples = [r["agreement"] for r in rows if isinstance(r.get("agreement"), dict)
               and all(isinstance(r["agreement"].get(k), (int, float)) for k in ("frame", "before", "after"))]

    def column(key, default=0.0):
        return np.array([float(r.get(key) if isinstance(r.get(key), (int, float)) else default) for r in rows])

    return StreamLog(name, column("frame"), column("t"), column("latency_ms"), column("progress", np.nan),
                     column("refolds"), np.array([s["frame"] for s in samples], float),
                     np.array([s["before"] for s in samples], float), np.array([s["after"] for s in samples], float),
                     summary)


def running_mean(frames: np.ndarray, values: np.ndarray, window: int = RUNNING_MEAN_FRAMES) -> np.ndarray:
    """At each sample, the mean of the samples over the `window` frames ending at it."""
    return np.array([values[(frames > f - window) & (frames <= f)].mean() for f in frames]) if len(frames) \
        else np.array([])


def plot(logs: list[StreamLog], out) -> Path:
    """The three charts of `logs` (one colour each) into the PNG `out`.

    Returns:
        `out`.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    try:  # lazy: matplotlib is optional (the [eval] extra), only for the picture
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: as above
    except ImportError:
        raise MissingDependency("matplotlib", "pip install 'edge-cbn[eval]'") from None
    fig, (agree, speed, progress) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    latency = speed.twinx()
    latency.set_ylabel("latency (ms), per frame")
    for log, colour in zip(logs, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        _agreement(agree, log, colour)
        _speed(speed, latency, log, colour)
        progress.plot(log.frame, 100 * log.progress, color=colour, label=log.name)
        if log.calibrated_at is not None:
            for ax in (agree, speed, progress):
                ax.axvline(log.calibrated_at, color=colour, linestyle=":", linewidth=1)
            progress.annotate(f"calibrated at frame {log.calibrated_at}", (log.calibrated_at, 100),
                              textcoords="offset points", xytext=(4, -12), color=colour, fontsize=8)
    agree.set(ylabel="agreement with the clean model (%)", ylim=(-2, 102))
    speed.set(ylabel="frames per second")
    progress.set(ylabel="warm-up progress (%)", xlabel="frame", ylim=(-2, 105))
    for ax in (agree, speed, progress):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _agreement(ax, log: StreamLog, colour) -> None:
    ax.scatter(log.sample_frame, log.before, s=6, color=colour, alpha=0.25, marker="x")
    ax.scatter(log.sample_frame, log.after, s=6, color=colour, alpha=0.25)
    ax.plot(log.sample_frame, running_mean(log.sample_frame, log.before), color=colour, linestyle="--",
            label=f"{log.name}: uncalibrated (mean over {RUNNING_MEAN_FRAMES} frames)")
    ax.plot(log.sample_frame, running_mean(log.sample_frame, log.after), color=colour,
            label=f"{log.name}: served")


def _speed(ax, latency, log: StreamLog, colour) -> None:
    ax.plot(log.frame, log.fps(), color=colour, label=f"{log.name}: fps (over 30 frames)")
    latency.plot(log.frame, log.latency_ms, color=colour, alpha=0.15, linewidth=0.5)
    refolds = log.refold_frames()
    ax.plot(refolds, np.zeros(len(refolds)), "|", color=colour, markersize=10,
            label=f"{log.name}: refolds, new statistics ({len(refolds)})")


@click.command("plot")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--compare", type=click.Path(dir_okay=False), help="A second log drawn on the same axes.")
@click.option("-o", "--out", default=None, help="The PNG [default: LOG's name with .png].")
def main(log, compare, out):
    """Charts of a stream's --log: agreement before and after calibration over frames, fps and latency
    with the refolds marked, and the warm-up's progress with the frame the model became calibrated.

    \b
    edge-cbn stream --noise relative --eta 0.05 --frames 1000 --log shift.jsonl
    edge-cbn stream --noise relative --eta 0.05 --frames 1000 --mode absolute --log absolute.jsonl
    edge-cbn plot shift.jsonl --compare absolute.jsonl -o shift-vs-absolute.png
    """
    logs = [read_log(log)] + ([read_log(compare)] if compare else [])
    path = plot(logs, out or Path(log).with_suffix(".png"))
    for entry in logs:
        s = entry.summary
        click.echo(f"{entry.name}: {len(entry.frame)} frames, {len(entry.sample_frame)} agreement samples"
                   + (f", {s.get('agreement_before')}% -> {s.get('agreement_after')}%, calibrated at frame "
                      f"{entry.calibrated_at}" if s else " (no summary: the stream did not end cleanly)"), err=True)
    click.echo(str(path))
