"""plotting: metrics.csv parsing and the temperature figure."""

from __future__ import annotations

import pytest

from lightning_distill.plotting import plot_temperature, read_metrics

CSV = """epoch,step,temperature/lambda,temperature/value,train/loss,val/acc
0,0,0.0,2.0,1.5,
0,4,0.25,2.5,1.2,
0,4,,,,0.5
1,9,1.0,3.0,0.9,
"""


def test_read_metrics_skips_empty_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    series = read_metrics(path)
    assert series["temperature/value"] == [(0, 2.0), (4, 2.5), (9, 3.0)]
    assert series["temperature/lambda"] == [(0, 0.0), (4, 0.25), (9, 1.0)]
    assert series["val/acc"] == [(4, 0.5)]
    assert "epoch" not in series and "step" not in series


def test_plot_temperature_writes_a_png(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    out = plot_temperature(path, tmp_path / "fig" / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_needs_a_temperature_column(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,1.0\n")
    with pytest.raises(ValueError, match="no temperature/value or temperature/mean column"):
        plot_temperature(path, tmp_path / "t.png")


# ------------------------------------------------------------------ figures used by the notebooks
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_accuracy_vs_temperature_returns_and_saves(tmp_path):
    from matplotlib.figure import Figure

    from lightning_distill.plotting import plot_accuracy_vs_temperature

    fig = plot_accuracy_vs_temperature([4, 1, 2], [0.95, 0.93, 0.96], output=tmp_path / "sub" / "t.png", stds=[0.01, 0.0, 0.02])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1.0, 2.0, 4.0]  # sorted by temperature
    assert list(line.get_ydata()) == pytest.approx([93.0, 96.0, 95.0])  # percent
    assert (tmp_path / "sub" / "t.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_accuracy_vs_temperature([2.0], [0.9]) is not None  # no output: nothing written, still a figure


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2], [0.9]), "2 temperatures but 1 accuracies"),
        (([], []), "at least one"),
        (([0, 2], [0.9, 0.9]), "> 0"),
    ],
)
def test_plot_accuracy_vs_temperature_rejects_bad_input(args, match):
    from lightning_distill.plotting import plot_accuracy_vs_temperature

    with pytest.raises(ValueError, match=match):
        plot_accuracy_vs_temperature(*args)


def test_plot_accuracy_vs_temperature_rejects_mismatched_stds():
    from lightning_distill.plotting import plot_accuracy_vs_temperature

    with pytest.raises(ValueError, match="2 temperatures but 3 stds"):
        plot_accuracy_vs_temperature([1, 2], [0.9, 0.91], stds=[0.1, 0.1, 0.1])


def test_plot_strategy_comparison_returns_and_saves(tmp_path):
    from lightning_distill.plotting import plot_strategy_comparison

    out = tmp_path / "cmp.png"
    fig = plot_strategy_comparison(["kd", "baseline", "crd"], [0.961, 0.960, 0.966], [0.003, 0.004, 0.0], output=out, title="T")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["kd", "baseline", "crd"]
    assert sorted(p.get_width() for p in ax.patches) == pytest.approx([96.0, 96.1, 96.6])
    assert ax.get_title() == "T"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 3000


@pytest.mark.parametrize(
    "names, means, stds",
    [(["a", "b"], [0.9], [0.1, 0.1]), (["a"], [0.9], [0.1, 0.2]), ([], [], [])],
)
def test_plot_strategy_comparison_rejects_bad_input(names, means, stds):
    from lightning_distill.plotting import plot_strategy_comparison

    with pytest.raises(ValueError):
        plot_strategy_comparison(names, means, stds)


CURRICULUM_CSV = """epoch,step,curriculum/alpha,curriculum/fraction,curriculum/stage,curriculum/temperature,train/loss,val/acc
0,5,0.1,0.3333,1.0,1.0,,
0,5,,,,,,0.5
0,9,,,,,1.2,
1,11,0.3,0.6667,2.0,1.5,,
1,11,,,,,,0.7
2,17,0.5,1.0,3.0,2.0,,
"""


def test_plot_curriculum_timeline_reads_per_epoch_values(tmp_path):
    from lightning_distill.plotting import plot_curriculum_timeline

    path = tmp_path / "metrics.csv"
    path.write_text(CURRICULUM_CSV)
    fig = plot_curriculum_timeline(path, output=tmp_path / "pocl.png")
    assert len(fig.axes) == 3
    stage, fraction, temperature = (ax.get_lines()[0] for ax in fig.axes)
    assert list(stage.get_xdata()) == [0, 1, 2] and list(stage.get_ydata()) == [1.0, 2.0, 3.0]
    assert list(fraction.get_ydata()) == pytest.approx([0.3333, 0.6667, 1.0])
    assert list(temperature.get_ydata()) == [1.0, 1.5, 2.0]
    assert (tmp_path / "pocl.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_curriculum_timeline_needs_curriculum_columns(tmp_path):
    from lightning_distill.plotting import plot_curriculum_timeline

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,1.0\n")
    with pytest.raises(ValueError, match="no curriculum/stage values"):
        plot_curriculum_timeline(path)


def test_summarize_runs_and_compare_command(tmp_path):
    import statistics
    import subprocess
    import sys

    from lightning_distill.plotting import summarize_runs

    runs = tmp_path / "runs.csv"
    runs.write_text(
        "name,seed,test_acc_last,test_acc_best\nkd,0,0.90,0.91\nkd,1,0.92,0.93\nkd,2,0.94,0.95\nbase,0,0.80,\n"
    )
    names, means, stds = summarize_runs([runs])
    assert names == ["kd", "base"]
    assert means == pytest.approx([0.92, 0.80]) and stds == pytest.approx([statistics.stdev([0.90, 0.92, 0.94]), 0.0])
    names, means, _ = summarize_runs([runs], best=True)
    assert names == ["kd"] and means == pytest.approx([0.93])  # rows without a best value are skipped
    out = tmp_path / "chart.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_distill.plotting", "compare", str(runs), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no test_acc_last values"):
        (tmp_path / "empty.csv").write_text("name,seed,test_acc_last\n")
        summarize_runs([tmp_path / "empty.csv"])
