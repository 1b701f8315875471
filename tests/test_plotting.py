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
