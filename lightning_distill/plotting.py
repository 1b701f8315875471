"""Figures made from a run's ``metrics.csv`` (matplotlib, installed with the ``dev`` extra).

    python -m lightning_distill.plotting temperature runs/digits/ctkd/version_0/metrics.csv docs/ctkd_temperature.png
    python -m lightning_distill.plotting compare results/digits_features/runs.csv docs/feature_comparison.png

draws the temperature a strategy used (``temperature/value`` or ``temperature/mean`` with its
min-max band, logged by :class:`~lightning_distill.callbacks.TemperatureMonitor`) and CTKD's
reversal strength ``temperature/lambda`` against the optimizer step.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "plot_accuracy_vs_temperature",
    "plot_curriculum_timeline",
    "plot_strategy_comparison",
    "plot_temperature",
    "read_metrics",
    "summarize_runs",
]


def read_metrics(path: Union[str, Path]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` from a Lightning ``CSVLogger`` ``metrics.csv`` (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                value = float(value)
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    return series


def plot_temperature(metrics_csv: Union[str, Path], output: Union[str, Path], title: Optional[str] = None) -> Path:
    """Plot temperature (and lambda, when logged) over optimizer steps; return the image path."""
    series = read_metrics(metrics_csv)
    key = "temperature/value" if "temperature/value" in series else "temperature/mean"
    if key not in series:
        raise ValueError(f"{metrics_csv} has no temperature/value or temperature/mean column; was TemperatureMonitor attached?")
    fig = _new_figure((7, 3.6), dpi=120)
    ax = fig.add_subplot()
    steps, values = zip(*series[key])
    ax.plot(steps, values, color="tab:red", label="temperature τ" if key.endswith("value") else "mean τ")
    if key == "temperature/mean" and "temperature/min" in series and "temperature/max" in series:
        s_min, v_min = zip(*series["temperature/min"])
        _, v_max = zip(*series["temperature/max"])
        ax.fill_between(s_min, v_min, v_max, color="tab:red", alpha=0.15, label="min-max over samples")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("temperature τ", color="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    if "temperature/lambda" in series:
        ax2 = ax.twinx()
        s_l, v_l = zip(*series["temperature/lambda"])
        ax2.plot(s_l, v_l, color="tab:blue", linestyle="--", label="reversal strength λ")
        ax2.set_ylabel("λ", color="tab:blue")
        ax2.set_ylim(-0.05, max(1.05, max(v_l) * 1.05))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title or f"Temperature over training ({Path(metrics_csv).parent.name})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    return output




# ---------------------------------------------------------------------- figures for the notebooks
# Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no backend switch): the figure is returned,
# so a notebook shows it inline, and it is saved as well when ``output`` is given.


def _new_figure(figsize: tuple[float, float], dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _save(fig, output: Optional[Union[str, Path]]) -> None:
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output)


def plot_accuracy_vs_temperature(
    temperatures,
    accuracies,
    output: Optional[Union[str, Path]] = None,
    stds=None,
):
    """Test accuracy against the distillation temperature (log2 x axis); error bars when ``stds`` is given.

    Accuracies are fractions in [0, 1] and drawn in percent. Returns the ``Figure``; saves it when
    ``output`` is given.

    Raises:
        ValueError: empty input, lengths that differ, or a temperature that is not > 0.
    """
    temperatures = [float(t) for t in temperatures]
    accuracies = [float(a) for a in accuracies]
    if not temperatures:
        raise ValueError("plot_accuracy_vs_temperature needs at least one temperature.")
    if len(accuracies) != len(temperatures):
        raise ValueError(f"got {len(temperatures)} temperatures but {len(accuracies)} accuracies.")
    if stds is not None:
        stds = [float(s) for s in stds]
        if len(stds) != len(temperatures):
            raise ValueError(f"got {len(temperatures)} temperatures but {len(stds)} stds.")
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {temperatures!r}.")
    order = sorted(range(len(temperatures)), key=temperatures.__getitem__)
    ts = [temperatures[i] for i in order]
    accs = [100.0 * accuracies[i] for i in order]
    errs = None if stds is None else [100.0 * stds[i] for i in order]
    fig = _new_figure((6, 3.6))
    ax = fig.add_subplot()
    ax.errorbar(ts, accs, yerr=errs, marker="o", color="tab:blue", capsize=4, label="KD student")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ts)
    ax.set_xticklabels([f"{t:g}" for t in ts])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Student test accuracy vs. distillation temperature", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, output)
    return fig


def plot_strategy_comparison(
    names,
    means,
    stds,
    output: Optional[Union[str, Path]] = None,
    title: Optional[str] = None,
):
    """Horizontal bar chart of mean accuracy per strategy with ±std error bars (fractions, drawn in percent).

    Returns the ``Figure``; saves it when ``output`` is given.

    Raises:
        ValueError: empty input or lengths that differ.
    """
    names = [str(n) for n in names]
    means = [float(m) for m in means]
    stds = [float(s) if s is not None and math.isfinite(float(s)) else 0.0 for s in stds]
    if not names:
        raise ValueError("plot_strategy_comparison needs at least one name.")
    if not len(names) == len(means) == len(stds):
        raise ValueError(f"names, means and stds must have the same length, got {len(names)}, {len(means)}, {len(stds)}.")
    fig = _new_figure((7, 0.35 * len(names) + 1.4))
    ax = fig.add_subplot()
    positions = list(range(len(names)))[::-1]  # first name on top
    ax.barh(positions, [100 * m for m in means], xerr=[100 * s for s in stds], color="tab:blue", alpha=0.75, capsize=3)
    ax.set_yticks(positions)
    ax.set_yticklabels(names, fontsize=8)
    low = min(100 * (m - s) for m, s in zip(means, stds))
    high = max(100 * (m + s) for m, s in zip(means, stds))
    ax.set_xlim(max(0.0, low - 2.0), min(100.0, high + 1.0) if high < 100 else high + 0.5)
    ax.set_xlabel("test accuracy (%), mean ± std")
    ax.set_title(title or "Strategy comparison", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, output)
    return fig


CURRICULUM_KEYS = ("curriculum/stage", "curriculum/fraction", "curriculum/temperature")


def plot_curriculum_timeline(metrics_csv: Union[str, Path], output: Optional[Union[str, Path]] = None):
    """POCL's timeline from a ``metrics.csv``: stage, data fraction and temperature per epoch (one panel each).

    Reads the ``curriculum/...`` values that :class:`~lightning_distill.callbacks.ProgressiveCurriculum`
    logs once per epoch. Returns the ``Figure``; saves it when ``output`` is given.

    Raises:
        ValueError: the file has no ``curriculum/stage`` values (was the callback attached?).
    """
    per_epoch: dict[str, dict[int, float]] = {key: {} for key in CURRICULUM_KEYS}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("epoch") in ("", None):
                continue
            epoch = int(float(row["epoch"]))
            for key in CURRICULUM_KEYS:
                value = row.get(key)
                if value not in ("", None) and math.isfinite(float(value)):
                    per_epoch[key][epoch] = float(value)
    if not per_epoch["curriculum/stage"]:
        raise ValueError(f"{metrics_csv} has no curriculum/stage values; was ProgressiveCurriculum attached?")
    fig = _new_figure((7, 5.4))
    axes = fig.subplots(3, 1, sharex=True)
    labels = {"curriculum/stage": "stage", "curriculum/fraction": "data fraction", "curriculum/temperature": "temperature"}
    colors = {"curriculum/stage": "tab:purple", "curriculum/fraction": "tab:green", "curriculum/temperature": "tab:red"}
    for ax, key in zip(axes, CURRICULUM_KEYS):
        points = sorted(per_epoch[key].items())
        if points:
            epochs, values = zip(*points)
            ax.step(epochs, values, where="post", marker="o", markersize=3, color=colors[key])
        ax.set_ylabel(labels[key])
        ax.grid(alpha=0.3)
    axes[0].set_yticks(sorted({int(v) for v in per_epoch["curriculum/stage"].values()}))
    axes[-1].set_xlabel("epoch")
    run = Path(metrics_csv).resolve().parent
    label = f"{run.parent.name}/{run.name}" if run.name.startswith("version_") else run.name
    axes[0].set_title(f"Progressive curriculum (POCL) timeline ({label})", fontsize=10)
    fig.tight_layout()
    _save(fig, output)
    return fig


def summarize_runs(runs_csv: list[Union[str, Path]], best: bool = False) -> tuple[list[str], list[float], list[float]]:
    """Mean and sample std of test accuracy per run name from ``runs.csv`` files, in order of appearance."""
    column = "test_acc_best" if best else "test_acc_last"
    values: dict[str, list[float]] = {}
    for path in runs_csv:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get(column):
                    values.setdefault(row["name"], []).append(float(row[column]))
    if not values:
        raise ValueError(f"no {column} values in {list(map(str, runs_csv))}.")
    names = list(values)
    means = [sum(v) / len(v) for v in values.values()]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values.values()]
    return names, means, stds


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_distill.plotting")
    sub = parser.add_subparsers(dest="command", required=True)
    temp = sub.add_parser("temperature", help="temperature and lambda over training, from a metrics.csv")
    temp.add_argument("metrics_csv")
    temp.add_argument("output")
    temp.add_argument("--title", default=None)
    cmp = sub.add_parser("compare", help="bar chart (mean ± std over seeds) from runs.csv files of `lightning-distill compare`")
    cmp.add_argument("runs_csv", nargs="+", help="one or more runs.csv files")
    cmp.add_argument("output", help="the PNG to write")
    cmp.add_argument("--title", default=None)
    cmp.add_argument("--best", action="store_true", help="use the best-validation-epoch accuracy instead of the last")
    args = parser.parse_args(argv)
    if args.command == "temperature":
        print(plot_temperature(args.metrics_csv, args.output, args.title))
        return
    names, means, stds = summarize_runs(args.runs_csv, best=args.best)
    plot_strategy_comparison(names, means, stds, output=args.output, title=args.title)
    print(args.output)


if __name__ == "__main__":
    main()
