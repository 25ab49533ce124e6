"""The report's plots: GELU with the fitted line and range for sample neurons, and per-layer fallback and
error; without matplotlib the report says how to get them and nothing else changes."""

from __future__ import annotations

import pytest

import tardis_compile as tc
from tardis_compile import plots
from tests.helpers import batches, save_tiny


def _optimize(tmp_path):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    return tc.optimize(path, tmp_path / "out.onnx", batches(d=32, n=8), eval_data=batches(d=32, n=4, seed=3),
                       show_progress=False)


def test_plots_are_written_and_linked(tmp_path):
    pytest.importorskip("matplotlib")
    report = _optimize(tmp_path)
    assert report.plots == ["out.report.gelu.png", "out.report.layers.png"]
    for name in report.plots:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (tmp_path / "out.report.md").read_text()
    assert "![out.report.gelu.png](out.report.gelu.png)" in md


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    report = _optimize(tmp_path)
    assert report.plots == []
    assert not list(tmp_path.glob("*.png"))
    assert "plots need matplotlib" in (tmp_path / "out.report.md").read_text()
