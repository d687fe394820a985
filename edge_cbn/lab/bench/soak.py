"""`edge-cbn bench soak`: does a long stream's memory stay flat?  The stream runs as a child process
writing its per-frame log; this process reads the child's resident memory each time the log passes a
multiple of `every` frames, then reports the growth after the warm-up (docs/RELIABILITY.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np


def rss_mb(pid: int) -> float | None:
    """Resident memory of process `pid` in MB, None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            kb = next(line.split()[1] for line in status if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None
    return round(int(kb) / 1024, 1)


def frames_logged(log: Path, seen: int) -> tuple[int, int]:
    """(frames in the log so far, bytes read): counts the frame lines from byte `seen` on."""
    with open(log, "rb") as f:
        f.seek(seen)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next read
    return sum(line.startswith(b'{"frame"') for line in chunk[:end].splitlines()), seen + end


def soak(stream_args: list[str], frames: int, every: int, warmup: int) -> dict:
    """Run `edge-cbn stream --frames frames --headless --quiet *stream_args`, sampling its RSS every
    `every` frames; the growth compares the samples from `warmup` frames on: the median of their last
    quarter against the median of their first."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "soak.jsonl"
        cmd = [sys.executable, "-m", "edge_cbn.cli", "stream", "--frames", str(frames), "--headless", "--quiet",
               "--log", str(log), *stream_args]
        err = Path(tmp) / "stderr.txt"  # a file, not a pipe: a long run's warnings must never block it
        with open(err, "w") as err_file:
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file)
            try:
                samples = _sample(child, log, frames, every)
            finally:
                if child.poll() is None:  # interrupted: the stream goes with its bench
                    child.terminate()
                    child.wait()
        if child.returncode != 0:
            raise click.ClickException(f"the stream failed: {err.read_text().strip()[-2000:]}")
    return _growth(samples, frames, every, warmup, stream_args)


def _sample(child, log: Path, frames: int, every: int) -> dict:
    """{frame: RSS MB} of the running stream `child`, each time its log passes a multiple of `every`."""
    samples, done, seen, next_at = {}, 0, 0, every
    while child.poll() is None:
        time.sleep(0.05)
        if not log.exists():
            continue
        new, seen = frames_logged(log, seen)
        done += new
        while done >= next_at and (rss := rss_mb(child.pid)) is not None:
            samples[next_at] = rss
            click.echo(f"soak: {next_at}/{frames} frames, {rss} MB", err=True)  # progress, and a record
            next_at += every
    return samples


def _growth(samples: dict, frames: int, every: int, warmup: int, stream_args: list) -> dict:
    """The soak's figures: the growth compares the median of the last quarter of the samples from `warmup`
    frames on against the median of their first quarter."""
    after = [r for f, r in sorted(samples.items()) if f >= warmup]
    if len(after) < 4:
        raise click.ClickException(f"fewer than four RSS samples after the warm-up ({len(samples)} in all): "
                                   "use more --frames or a smaller --every")
    # A sample may land on a frame that is building an interpreter (tens of MB for a moment), so the first
    # and the last quarter of the samples are compared by their medians.
    quarter = len(after) // 4
    first, last = float(np.median(after[:quarter])), float(np.median(after[-quarter:]))
    return {"bench": "soak", "frames": frames, "every": every, "warmup": warmup, "stream_args": stream_args,
            "rss_mb": samples, "rss_after_warmup_mb": first, "rss_last_mb": last,
            "growth_after_warmup_pct": round(100 * (last - first) / first, 2), "max_rss_mb": max(samples.values())}


def print_soak(result: dict) -> None:
    for frame, rss in result["rss_mb"].items():
        click.echo(f"{frame:>8} frames  {rss:8.1f} MB")
    click.echo(f"growth after the warm-up ({result['warmup']} frames), median of the last quarter of the samples "
               f"against the first: {result['growth_after_warmup_pct']} % ({result['rss_after_warmup_mb']} -> "
               f"{result['rss_last_mb']} MB); peak sample {result['max_rss_mb']} MB")
    click.echo(json.dumps(result, sort_keys=True))
