"""`edge-cbn bench converge`: how fast the stream's calibration brings agreement back on the bundled clip,
per noise preset, and whether the same command gives the same result on a quiet and a busy machine.

Each preset runs `edge-cbn stream --noise P --eta E --frames N --agreement-every K --log …` twice in fresh
processes: once as it is, once pinned to one core with a CPU-bound process beside it on that core.  The
agreement at frame n is the mean of the agreement samples over the clip loop ending at n (the bundled clip
is 140 frames: every photo counts once); the converged agreement is the mean over the last third of the
run.  The recovered share at n is (agreement(n) - uncalibrated) / (converged - uncalibrated).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from .timing import emit

CLIP_FRAMES = 140
PRESETS = (("relative", 0.05), ("paper", 0.3), ("additive-max", 0.02))
SHARES = (0.5, 0.67, 0.9)
CHECKPOINTS = (300, 600, 1000, 3000)
TIMING = ("t", "latency_ms", "fps", "seconds", "calibrated_at_seconds")


def run_stream(args: list[str], log: Path, *, busy_core: int | None = None) -> tuple[list[dict], dict]:
    """(frame lines, summary) of `edge-cbn stream ARGS --log LOG` in a fresh process; with `busy_core`,
    the stream and a CPU-bound process share that one core."""
    pin = None if busy_core is None else (lambda: os.sched_setaffinity(0, {busy_core}))
    with contextlib.ExitStack() as stack:
        if busy_core is not None:
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin)
            stack.callback(spinner.kill)
        done = subprocess.run([sys.executable, "-m", "edge_cbn.stream", *args, "--quiet", "--headless",
                               "--log", str(log)], preexec_fn=pin, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"stream {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return lines[:-1], lines[-1]["summary"]


def without_timing(lines: list[dict], summary: dict) -> tuple[list, dict]:
    """What must not depend on the machine: every field but the clock's."""
    return ([{k: v for k, v in line.items() if k not in TIMING} for line in lines],
            {k: v for k, v in summary.items() if k not in TIMING})


def agreement_curve(lines: list[dict]) -> tuple[np.ndarray, np.ndarray, float]:
    """(frames n, agreement over the clip loop ending at n, uncalibrated agreement over the run)."""
    samples = np.array([(line["frame"], line["agreement"]["after"], line["agreement"]["before"])
                        for line in lines if "agreement" in line], np.float64)
    ends = np.arange(CLIP_FRAMES, int(samples[-1, 0]) + 2, 10)
    means = np.array([samples[(samples[:, 0] >= n - CLIP_FRAMES) & (samples[:, 0] < n), 1].mean() for n in ends])
    return ends, means, float(samples[:, 2].mean())


def convergence(lines: list[dict]) -> dict:
    """Frames and seconds to each share of the converged recovery, and the agreement at the checkpoints."""
    ends, means, before = agreement_curve(lines)
    last = int(ends[-1])
    converged = float(means[ends >= last - last // 3].mean())
    seconds = {line["frame"]: line["t"] for line in lines}
    row = {"uncalibrated": round(before, 2), "converged": round(converged, 2), "to_share": {}}
    for share in SHARES:
        reached = np.nonzero(means - before >= share * (converged - before))[0]
        n = int(ends[reached[0]]) if len(reached) and converged > before else None
        row["to_share"][f"{share:.0%}"] = {"frame": n, "seconds": seconds.get(n - 1) if n else None}
    row["at"] = {n: round(float(means[ends == n][0]), 2) for n in CHECKPOINTS if n in ends}
    after = [line["agreement"]["after"] for line in lines if "agreement" in line and 300 <= line["frame"] < 600]
    if after:  # the check on held-out frames: the share of the loss (100 - uncalibrated) back
        mean = float(np.mean(after))
        row["frames_300_600"] = {"agreement": round(mean, 2),
                                 "share_of_loss": round((mean - before) / (100 - before), 3) if before < 100 else None,
                                 "share_of_recovery": round((mean - before) / (converged - before), 3)
                                 if converged > before else None}
    return row


def converge_bench(frames: int, every: int, presets, model: str | None, check: bool, extra=()) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, eta in presets:
            args = ["--noise", preset, "--eta", f"{eta:g}", "--frames", str(frames), "--agreement-every", str(every),
                    *(["--model", model] if model else []), *extra]
            lines, summary = run_stream(args, Path(tmp) / "a.jsonl")
            row = {"noise": f"{preset} {eta:g}", **convergence(lines), "fps": summary["fps"],
                   "calibrated_at_frame": summary["calibrated_at_frame"],
                   "calibrated_at_seconds": summary["calibrated_at_seconds"],
                   "summary_before": summary["agreement_before"], "summary_after": summary["agreement_after"]}
            if check:
                busy = run_stream(args, Path(tmp) / "b.jsonl", busy_core=0)
                row["identical_on_one_busy_core"] = without_timing(*busy) == without_timing(lines, summary)
                row["fps_on_one_busy_core"] = busy[1]["fps"]
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict) -> None:
    shares = "  ".join(f"{k}: frame {v['frame']} ({v['seconds']} s)" for k, v in row["to_share"].items())
    at = "  ".join(f"@{n}: {a}" for n, a in row["at"].items())
    same = ""
    if "identical_on_one_busy_core" in row:
        same = (f"  one busy core: {'identical' if row['identical_on_one_busy_core'] else 'DIFFERENT'} "
                f"({row['fps_on_one_busy_core']} fps)")
    window = row.get("frames_300_600")
    window = (f"  frames 300-600: {window['agreement']} % ({window['share_of_loss']:.0%} of the loss, "
              f"{window['share_of_recovery']:.0%} of the recovery)") if window and window["share_of_recovery"] else ""
    click.echo(f"{row['noise']:<18} uncalibrated {row['uncalibrated']} %  converged {row['converged']} %  "
               f"calibrated at frame {row['calibrated_at_frame']} ({row['calibrated_at_seconds']} s)  "
               f"{row['fps']} fps{same}\n{'':<18} to {shares}\n{'':<18} agreement {at}{window}  "
               f"summary {row['summary_before']} -> {row['summary_after']} %")


def run(frames: int, every: int, presets, model: str | None, check: bool, extra=()) -> None:
    rows = converge_bench(frames, every, presets, model, check, extra)
    emit({"bench": "converge", "frames": frames, "agreement_every": every, "model": model or "default",
          "stream_args": list(extra), "rows": rows})
