"""What `edge-cbn evaluate TASK` writes: per (preset, eta, method) the mean over chip seeds with its 95 %
interval over the evaluation images and the chips (`bootstrap`), as a markdown table shaped like the paper's
(a row per method, a column per eta and metric); the recovered shares and the differences between methods,
each with its interval; a CSV (with the std over chips too) and a PNG of each metric against eta
(matplotlib, from the `eval` extra; without it the PNG is skipped with one warning)."""
from __future__ import annotations

import csv
from pathlib import Path

import click
import numpy as np

from . import bootstrap
from .metrics import TITLES

MIN_LOSS = 1.0  # points; below it a recovered share is noise over noise


def aggregate(records: list[dict], metrics: tuple, methods: list[str]) -> list[dict]:
    """Rows {preset, eta, method, seeds, <metric>_mean, <metric>_std, <metric>_lo, <metric>_hi} in sweep
    order (presets and etas as first seen, methods in `methods` order): std over seeds with ddof 1 (0 for a
    single seed), lo / hi the bootstrap interval over images and chips (None for records made without
    resamples), and the cell's bootstrap replicates per metric under "replicates" (not in the CSV)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["preset"], r["eta"], r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(methods)}
    rows = []
    for (preset, eta, method), recs in sorted(groups.items(), key=lambda kv: (
            _first(records, "preset", kv[0][0]), kv[0][1], order.get(kv[0][2], len(order)))):
        row = {"preset": preset, "eta": eta, "method": method, "seeds": [r["seed"] for r in recs], "replicates": {}}
        for m in metrics:
            values = np.array([r["metrics"][m] for r in recs], np.float64)
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            if all(m in r.get("resampled", {}) for r in recs):
                row["replicates"][m] = bootstrap.cell_replicates([r["resampled"][m] for r in recs])
            row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap.interval(row["replicates"].get(m, []))
        rows.append(row)
    return rows


def _first(records, key, value) -> int:
    return next(i for i, r in enumerate(records) if r[key] == value)


def cell(row: dict, metric: str) -> str:
    """`mean [lo, hi]` with the bootstrap interval, else `mean ± std` over the seeds, else the mean."""
    mean, std, lo, hi = (row[f"{metric}_{k}"] for k in ("mean", "std", "lo", "hi"))
    if lo is not None:
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{mean:.2f} ± {std:.2f}" if len(row["seeds"]) > 1 else f"{mean:.2f}"


def markdown_table(rows: list[dict], metrics: tuple, method_titles: dict[str, str]) -> str:
    """A row per (preset, method), a column per (eta, metric): the paper's Tables 1-3 (original vs
    calibrated per eta); cells `mean [95 % interval]` (`cell`), the method named above the table."""
    etas = sorted({r["eta"] for r in rows})
    header = ["noise", "method"] + [f"η0 = {eta:g} {TITLES[m]}" for eta in etas for m in metrics]
    lines = [cells_legend(rows), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r["preset"], r["method"]) for r in rows))
    by_key = {(r["preset"], r["method"], r["eta"]): r for r in rows}
    for preset, method in keys:
        cells = [cell(by_key[preset, method, eta], m) if (preset, method, eta) in by_key else "–"
                 for eta in etas for m in metrics]
        lines.append("| " + " | ".join([preset, method_titles.get(method, method)] + cells) + " |")
    return "\n".join(lines) + "\n"


def cells_legend(rows: list[dict]) -> str:
    chips = max((len(r["seeds"]) for r in rows), default=1)
    if any(r["replicates"] for r in rows):
        return f"Cells: the mean over {chips} chip(s) [{bootstrap.method_title()}]."
    return f"Cells: the mean ± std over {chips} chip(s)." if chips > 1 else "Cells: one chip."


def recovered_share(clean: float, uncalibrated: float, calibrated: float) -> float | None:
    """The share (%) of the uncalibrated model's loss against the clean one that calibration wins back,
    (calibrated - uncalibrated) / (clean - uncalibrated); None when less than MIN_LOSS points were lost."""
    loss = clean - uncalibrated
    return 100.0 * (calibrated - uncalibrated) / loss if loss >= MIN_LOSS else None


def share_replicates(clean, uncalibrated, calibrated) -> np.ndarray:
    """`recovered_share` replicate by replicate (NaN where a replicate lost nothing)."""
    loss = np.asarray(clean) - np.asarray(uncalibrated)
    return np.where(loss > 0, 100.0 * (np.asarray(calibrated) - uncalibrated) / np.where(loss > 0, loss, 1.0), np.nan)


def recovery(rows: list[dict], metric: str) -> list[dict]:
    """Per (preset, calibration method, eta > 0): the points of `metric` the uncalibrated model loses
    against the clean one (the preset's `original` at eta 0) and the share of them the method wins back,
    (method - original) / loss, from the means over seeds, with its bootstrap interval (None without
    resamples); a preset swept without eta 0 has none."""
    by_key = {(r["preset"], r["method"], r["eta"]): r for r in rows}
    out = []
    for r in rows:
        clean, original = by_key.get((r["preset"], "original", 0.0)), by_key.get((r["preset"], "original", r["eta"]))
        if r["method"] == "original" or r["eta"] == 0 or clean is None or original is None:
            continue
        out.append({"preset": r["preset"], "eta": r["eta"], "method": r["method"], "metric": metric,
                    "loss": clean[f"{metric}_mean"] - original[f"{metric}_mean"],
                    **recovered_with_interval(clean, original, r, metric)})
    return out


def recovered_with_interval(clean: dict, uncalibrated: dict, row: dict, metric: str) -> dict:
    """{recovered_pct, recovered_lo, recovered_hi} of aggregated `row` against the `clean` and `uncalibrated`
    rows: the share from the means over seeds, its interval replicate by replicate (None without resamples
    or without a share)."""
    share = recovered_share(*(x[f"{metric}_mean"] for x in (clean, uncalibrated, row)))
    replicates = [x["replicates"].get(metric) for x in (clean, uncalibrated, row)]
    lo, hi = bootstrap.interval(share_replicates(*replicates)) if share is not None and all(
        x is not None for x in replicates) else (None, None)
    return {"recovered_pct": share, "recovered_lo": lo, "recovered_hi": hi}


def paired_difference(a: dict, b: dict, metric: str) -> dict | None:
    """Aggregated row `a` minus row `b` in points of `metric`: the difference of the means over seeds, its
    paired bootstrap interval, and whether that interval leaves out 0 (only then is it called a difference);
    None without finite resamples."""
    lo, hi = bootstrap.interval(a["replicates"][metric] - b["replicates"][metric])
    if lo is None:
        return None
    return {"difference": a[f"{metric}_mean"] - b[f"{metric}_mean"], "lo": lo, "hi": hi,
            "significant": bool(lo > 0 or hi < 0)}


def share_cell(r: dict | None) -> str:
    if r is None or r["recovered_pct"] is None:
        return "–"
    if r["recovered_lo"] is not None:
        return f"{r['recovered_pct']:.0f} % [{r['recovered_lo']:.0f}, {r['recovered_hi']:.0f}]"
    return f"{r['recovered_pct']:.0f} %"


def recovery_table(recovered: list[dict], method_titles: dict[str, str]) -> str:
    """The uncalibrated loss and each method's recovered share per eta, as markdown ('' when empty)."""
    if not recovered:
        return ""
    etas = sorted({r["eta"] for r in recovered})
    metric = TITLES[recovered[0]["metric"]]
    lines = [f"Loss of the uncalibrated model (points of {metric} against η0 = 0) and the share of it each "
             "method recovers, from the means over seeds [95 % interval, the same bootstrap]:", "",
             "| noise | loss, or the share a method recovers | " + " | ".join(f"η0 = {eta:g}" for eta in etas) + " |",
             "|" + "---|" * (len(etas) + 2)]
    by_key = {(r["preset"], r["method"], r["eta"]): r for r in recovered}
    for preset in dict.fromkeys(r["preset"] for r in recovered):
        first = next(r["method"] for r in recovered if r["preset"] == preset)
        lines.append(f"| {preset} | loss (points) | " + " | ".join(
            f"{by_key[preset, first, eta]['loss']:.1f}" if (preset, first, eta) in by_key else "–" for eta in etas) + " |")
        for method in dict.fromkeys(r["method"] for r in recovered if r["preset"] == preset):
            cells = [share_cell(by_key.get((preset, method, eta))) for eta in etas]
            lines.append(f"| {preset} | {method_titles.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences(rows: list[dict], metric: str) -> list[dict]:
    """Per (preset, eta > 0) and pair of calibration methods: the difference of their means over seeds in
    points of `metric`, its paired bootstrap interval, and whether that interval leaves out 0 (only then is
    it called a difference)."""
    out = []
    cells = {}
    for r in rows:
        if r["method"] != "original" and r["eta"] != 0 and metric in r["replicates"]:
            cells.setdefault((r["preset"], r["eta"]), []).append(r)
    for (preset, eta), group in cells.items():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                d = paired_difference(a, b, metric)
                if d is not None:
                    out.append({"preset": preset, "eta": eta, "a": a["method"], "b": b["method"], "metric": metric, **d})
    return out


def differences_table(diffs: list[dict], method_titles: dict[str, str]) -> str:
    """The differences between calibration methods, as markdown ('' when there is no pair)."""
    if not diffs:
        return ""
    lines = [f"Differences between the calibration methods (points of {TITLES[diffs[0]['metric']]}, first minus "
             "second, [95 % paired interval]); one whose interval holds 0 is not a difference:", "",
             "| noise | η0 | first | second | difference | a difference? |", "|---|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['preset']} | {d['eta']:g} | {method_titles.get(d['a'], d['a'])} | "
                     f"{method_titles.get(d['b'], d['b'])} | {d['difference']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] | "
                     f"{'yes' if d['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], metrics: tuple, path) -> Path:
    fields = ["preset", "eta", "method", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std", "lo", "hi")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in fields if k != "seeds"}, "seeds": " ".join(map(str, r["seeds"]))})
    return Path(path)


def error_bars(line: list[dict], metric: str) -> np.ndarray:
    """(2, points) distances from each mean down and up to its interval's ends (the std over seeds both
    ways for rows without an interval)."""
    down = [r[f"{metric}_mean"] - r[f"{metric}_lo"] if r[f"{metric}_lo"] is not None else r[f"{metric}_std"]
            for r in line]
    up = [r[f"{metric}_hi"] - r[f"{metric}_mean"] if r[f"{metric}_hi"] is not None else r[f"{metric}_std"]
          for r in line]
    return np.maximum(np.array([down, up], np.float64), 0.0)


def plot(rows: list[dict], metrics: tuple, method_titles: dict[str, str], title: str, path) -> Path | None:
    """One panel per metric, the metric against eta, a line per (preset, method) with its 95 % interval
    (`aggregate`) as error bars; None (and one warning) without matplotlib."""
    try:
        # lazy: matplotlib is optional (the [eval] extra), only for the PNG
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: after the backend is chosen
    except ImportError:
        click.echo("warning: matplotlib is not installed, no PNG (pip install 'edge-cbn[eval]')", err=True)
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    keys = list(dict.fromkeys((r["preset"], r["method"]) for r in rows))
    for ax, m in zip(axes[0], metrics):
        for preset, method in keys:
            line = sorted((r for r in rows if (r["preset"], r["method"]) == (preset, method)), key=lambda r: r["eta"])
            label = method_titles.get(method, method) + (f" ({preset})" if len({k[0] for k in keys}) > 1 else "")
            ax.errorbar([r["eta"] for r in line], [r[f"{m}_mean"] for r in line], yerr=error_bars(line, m),
                        marker="o", capsize=3, label=label)
        ax.set(xlabel="noise level η0", ylabel=f"{TITLES[m]} (%)", title=TITLES[m], ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
