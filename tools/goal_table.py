"""RESULTS' goal table from `edge-cbn evaluate` runs: per task and model, the clean and uncalibrated metric
and every calibration method the runs hold (streaming `shift`, streaming `absolute`, Algorithm 1), each with
its 95 % interval over the evaluation images and the chips and its recovered share, then the paired
differences between the methods.

    python tools/goal_table.py --eta 0.4 OUT_SHIFT/detection-yolo_shapes.json OUT_ABSOLUTE/detection-yolo_shapes.json

Each FILE is the `<task>-<model>.json` that `edge-cbn evaluate detection|segmentation|classification`
writes into its --out, or the --json-out of the agreement proxy (`edge-cbn evaluate --model M`: all /
confident crops, with the intervals it printed; no paired differences, its JSON keeps no resamples).  The runs of one task and model must share the evaluation images and chip seeds (the
bootstrap's resamples then pair across runs; checked).  The clean and uncalibrated columns come from the
first run of each.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edge_cbn.lab.evaluate import bootstrap, report  # noqa: E402
from edge_cbn.lab.evaluate.labelled import METHODS  # noqa: E402
from edge_cbn.lab.evaluate.metrics import METRICS, TITLES  # noqa: E402


ORDER = ("shift", "absolute", "prior", "cumulative", "ema")  # the columns, left to right


def aggregated(run: dict) -> list[dict]:
    """The run's rows as `evaluate` aggregates them (mean over chips, bootstrap replicates)."""
    return report.aggregate(run["records"], METRICS[run["evaluate"]], list(METHODS))


def method_columns(run: dict, rows: list[dict], eta: float) -> list[tuple[str, str, dict]]:
    """(header, note for the cell, aggregated row) of each calibration method of one run at `eta`."""
    out = []
    for row in rows:
        if row["eta"] != eta or row["method"] == "original":
            continue
        if row["method"] == "calibrated":
            out.append((f"streaming `{run.get('mode', 'shift')}`, batch 1, {run['cal_frames']} frames", "", row))
        else:
            estimator = row["method"].split("_", 1)[1]
            out.append((f"Algorithm 1, {estimator}", f" (batch {run.get('offline_batch_size')})", row))
    return out


def column_order(header: str) -> int:
    return next((i for i, word in enumerate(ORDER) if word in header), len(ORDER))


def reference_rows(run: dict, rows: list[dict], eta: float) -> tuple[dict, dict]:
    """(clean, uncalibrated) rows of a run: `original` at eta 0 and at `eta`."""
    pick = {(r["eta"], r["method"]): r for r in rows}
    if (0.0, "original") not in pick or (eta, "original") not in pick:
        raise click.ClickException(f"{run['model']} {run['evaluate']}: the run needs noise levels 0 and {eta:g}")
    return pick[0.0, "original"], pick[eta, "original"]


def check_paired(runs: list[dict]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if (run["images"], run["seeds"], run["dataset"]) != (first["images"], first["seeds"], first["dataset"]):
            raise click.ClickException(f"{run['model']} {run['evaluate']}: the runs differ in images or chip seeds, "
                                       "so their resamples do not pair")


def group_table(runs: list[dict], eta: float) -> tuple[dict, list[str]]:
    """({column: cell} of the goal table, the differences' lines) for the runs of one task and model."""
    check_paired(runs)
    metric = METRICS[runs[0]["evaluate"]][0]
    rows = [aggregated(run) for run in runs]
    clean, uncal = reference_rows(runs[0], rows[0], eta)
    columns = sorted((c for run, r in zip(runs, rows) for c in method_columns(run, r, eta)),
                     key=lambda c: column_order(c[0]))
    cells = {"task": runs[0]["evaluate"], "model": f"`{runs[0]['model']}`", "metric": TITLES[metric],
             "clean": report.cell(clean, metric), "η0 (paper's scale)": f"{eta:g} ({eta * eta:.2g})",
             "uncalibrated": report.cell(uncal, metric)}
    for header, note, row in columns:
        cells[header] = report.cell(row, metric) + note
        cells[f"{header}: recovered"] = report.share_cell(report.recovered_with_interval(clean, uncal, row, metric))
    diffs = []
    first_header, _, first = columns[0]
    for header, _, row in columns[1:]:
        d = report.paired_difference(first, row, metric)
        if d is None:
            continue
        verdict = "a difference" if d["significant"] else "not a difference (the interval holds 0)"
        diffs.append(f"- {runs[0]['evaluate']}: {first_header} − {header}: {d['difference']:+.2f} points "
                     f"[{d['lo']:+.2f}, {d['hi']:+.2f}], {verdict}")
    return cells, diffs


def agreement_cell(mean: dict, key: str, suffix: str = "") -> str:
    """`all [lo, hi] / confident [lo, hi]` of an agreement-proxy mean (`suffix` "_recovered": the shares)."""
    def one(k):
        value, lo = mean.get(k + suffix), mean.get(k + suffix + "_lo")
        if value is None:
            return "–"
        unit = " %" if suffix else ""
        text = f"{value:.0f}{unit}" if suffix else f"{value:.1f}"
        return text if lo is None else f"{text} [{lo:.0f}, {mean[k + suffix + '_hi']:.0f}]"
    return f"{one(key)} / {one(key + '_confident')}"


def agreement_table(runs: list[dict], eta: float) -> tuple[dict, list[str]]:
    """The goal table's cells for agreement-proxy runs of one model (`edge-cbn evaluate --json-out`): all /
    confident crops, the clean model agreeing with itself on every crop; each mean's interval as the run
    printed it.  No paired differences: the proxy's JSON keeps no resamples."""
    first = next((m for m in runs[0]["means"] if m["eta"] == eta), None)
    if first is None:
        raise click.ClickException(f"{runs[0]['model']} agreement: the run has no noise level {eta:g}")
    cells = {"task": "classification", "model": f"`{runs[0]['model']}`", "metric": "top-1 agreement, all / confident",
             "clean": "100", "η0 (paper's scale)": f"{eta:g} ({eta * eta:.2g})",
             "uncalibrated": agreement_cell(first, "uncalibrated")}
    for run in runs:
        mean = next(m for m in run["means"] if m["eta"] == eta)
        streaming = max((k for k in mean if k.startswith("calibrated@") and k.count("_") == 0),
                        key=lambda k: int(k.split("@")[1]))
        columns = [(f"streaming `{run.get('mode', 'shift')}`, batch 1, {streaming.split('@')[1]} frames", streaming, "")]
        columns += [(f"Algorithm 1, {k.split('_', 1)[1]}", k, f" (batch {run.get('offline_batch_size')})")
                    for k in ("offline_cumulative", "offline_ema") if k in mean]
        for header, key, note in columns:
            cells[header] = agreement_cell(mean, key) + note
            cells[f"{header}: recovered"] = agreement_cell(mean, key, "_recovered")
    return cells, []


def read_run(path) -> dict:
    """An `edge-cbn evaluate` JSON: a labelled task's (with per-record resamples) or the agreement proxy's."""
    try:
        run = json.loads(Path(path).read_text())
    except ValueError:
        run = {}
    labelled = "records" in run and all("resampled" in r for r in run["records"])
    if not labelled and not (run.get("evaluate") == "agreement" and "means" in run):
        raise click.ClickException(f"{path}: not an `edge-cbn evaluate` JSON (a task's from --out, with per-record "
                                   "resamples, or the agreement proxy's --json-out)")
    return run


@click.command(help=__doc__)
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--eta", type=float, required=True, help="The noise level of the table (the preset's scale).")
def main(files, eta):
    runs: dict[tuple, list[dict]] = {}
    for f in files:
        run = read_run(f)
        runs.setdefault((run["evaluate"], run["model"]), []).append(run)
    tables = [(agreement_table if kind == "agreement" else group_table)(group, eta) for (kind, _), group in runs.items()]
    header = list(dict.fromkeys(k for cells, _ in tables for k in cells))
    header = header[:6] + sorted(header[6:], key=column_order)  # stable: a method's value, then its share
    click.echo(f"Cells: mean over chips [{bootstrap.method_title()}]; recovered: the share of the loss won back.\n")
    click.echo("| " + " | ".join("recovered" if h.endswith(": recovered") else h for h in header) + " |\n|"
               + "---|" * len(header))
    for cells, _ in tables:
        click.echo("| " + " | ".join(cells.get(h, "–") for h in header) + " |")
    diffs = [d for _, group_diffs in tables for d in group_diffs]
    if diffs:
        click.echo("\nPaired differences (the first method minus each other, points, [95 % interval]):\n")
        click.echo("\n".join(diffs))


if __name__ == "__main__":
    main()
