"""``--max-error`` (METHOD.md §5): the fallback rate at which no block's own output error exceeds a bound."""

from __future__ import annotations

import numpy as np
import pytest

import tardis_compile as tc
from tardis_compile.error_target import ErrorCurve
from tests.helpers import batches, save_tiny


def _curve(errors: list[float], rates: list[float] | None = None) -> ErrorCurve:
    rates = np.geomspace(0.01, 0.64, len(errors)) if rates is None else np.asarray(rates)
    return ErrorCurve(rates, {"a": np.asarray(errors), "b": np.asarray(errors) / 2}, tokens=100)


def test_rate_is_interpolated_log_log_on_the_worst_block():
    rates = [0.01, 0.1]
    curve = _curve([0.4, 0.1], rates)  # error ∝ rate^(-0.602): 0.2 at rate 10^-1.5
    assert curve.rate_for(0.2) == pytest.approx(10 ** -1.5, rel=1e-9)
    assert curve.rate_for(0.5) == 0.01  # the first grid point already meets it
    assert curve.rate_for(0.1) == pytest.approx(0.1)


def test_an_error_that_more_fallback_does_not_reduce_is_not_chased():
    curve = _curve([0.4, 0.2, 0.25, 0.1], [0.01, 0.02, 0.04, 0.08])  # a bump from sampling noise
    assert curve.rate_for(0.2) == pytest.approx(0.02)


def test_an_unreachable_bound_is_a_clear_error():
    with pytest.raises(tc.TardisError, match=r"--max-error 0.001 is out of reach: even a 64% fallback rate "
                                             r"leaves a block error of 0.01"):
        _curve([0.4, 0.1, 0.01]).rate_for(0.001)


@pytest.mark.parametrize("max_error", [0.03, 0.1])
def test_max_error_is_met_within_10_percent_on_held_out_data(tmp_path, max_error):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    report = tc.optimize(path, tmp_path / "out.onnx", batches(d=32, n=16), eval_data=batches(d=32, n=8, seed=7),
                         settings=tc.Settings(max_error=max_error, predictor="exact", refit=False),
                         show_progress=False)
    own = [b.measured["own_error"] for b in report.blocks]
    assert 0.8 * max_error <= max(own) <= 1.1 * max_error, own
    assert report.summary()["max_own_error"] == max(own)
    curve = report.settings["error_curve"]
    assert len(curve["rates"]) == len(curve["worst_error"]) and curve["tokens"] > 0
    assert "--max-error" in report.markdown()


def test_own_error_of_the_first_block_is_its_error_in_the_model(tmp_path):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    report = tc.optimize(path, tmp_path / "out.onnx", batches(d=32, n=8), eval_data=batches(d=32, n=4, seed=7),
                         settings=tc.Settings(target_fallback=0.05, predictor="exact"), show_progress=False)
    first, second = report.verification.blocks
    assert first.own_error == pytest.approx(first.relative_error, rel=1e-6)  # same input in both models
    assert 0 < second.own_error < 1 and second.relative_error > 0


def test_max_error_with_another_rate_target_is_refused():
    with pytest.raises(tc.TardisError, match="--target-params and --max-error each set the ranges. budget"):
        tc.Settings(max_error=0.1, target_params=0.5)
