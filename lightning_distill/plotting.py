"""Figures made from a run's ``metrics.csv`` (matplotlib, installed with the ``dev`` extra).

    python -m lightning_distill.plotting temperature runs/digits/ctkd/version_0/metrics.csv docs/ctkd_temperature.png

draws the temperature a strategy used (``temperature/value`` or ``temperature/mean`` with its
min-max band, logged by :class:`~lightning_distill.callbacks.TemperatureMonitor`) and CTKD's
reversal strength ``temperature/lambda`` against the optimizer step.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Optional, Union

__all__ = ["plot_temperature", "read_metrics"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    key = "temperature/value" if "temperature/value" in series else "temperature/mean"
    if key not in series:
        raise ValueError(f"{metrics_csv} has no temperature/value or temperature/mean column; was TemperatureMonitor attached?")
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
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
    plt.close(fig)
    return output


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_distill.plotting")
    sub = parser.add_subparsers(dest="command", required=True)
    temp = sub.add_parser("temperature", help="temperature and lambda over training, from a metrics.csv")
    temp.add_argument("metrics_csv")
    temp.add_argument("output")
    temp.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(plot_temperature(args.metrics_csv, args.output, args.title))


if __name__ == "__main__":
    main()
