"""Targets instead of knobs (METHOD.md §5): ``--target-params`` and the resident budget ``--resident``."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest

import tardis_compile as tc
from tardis_compile import budget, fit, resident, runtime
from tardis_compile import predictor as predictors
from tardis_compile.histogram import NeuronStats
from tardis_compile.models import tiny
from tardis_compile.passes.ffn_match import find_blocks
from tardis_compile.verify import fallback_sites
from tests.helpers import ORT_FUSES_DQ_MATMUL, batches, run, save_tiny


def _optimize(tmp_path, path, **settings):
    out = tmp_path / "out.onnx"
    report = tc.optimize(path, out, batches(d=32, n=16), eval_data=batches(d=32, n=8, seed=7),
                         settings=tc.Settings(**settings), show_progress=False)
    return out, report


@pytest.mark.parametrize(("predictor", "share"), [("exact", 0.7), ("exact", 0.8), ("int4", 0.3), ("int4", 0.45)])
def test_target_params_is_met_on_held_out_data(tmp_path, predictor, share):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    _, report = _optimize(tmp_path, path, target_params=share, predictor=predictor, refit=False)
    touched = report.summary()["params_touched_per_token_ratio"]
    assert abs(touched - share) <= 0.1 * share, touched


@pytest.mark.parametrize("predictor", ["exact", "int4"])
def test_target_fallback_counts_flagged_pairs_on_held_out_data(tmp_path, predictor):
    """The rate target is the share of pairs the op flags, an inexact predictor's extra flags included."""
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    _, report = _optimize(tmp_path, path, target_fallback=0.1, predictor=predictor, predictor_recall=0.995)
    assert abs(report.summary()["fallback_rate"] - 0.1) <= 0.01
    out_rate = report.settings["out_of_range_rate"]
    assert (out_rate < 0.1) if predictor == "int4" else (out_rate == 0.1)  # int4: ranges hold fewer outliers


def test_target_params_below_the_fixed_cost_is_a_clear_error(tmp_path):
    path, _ = save_tiny(tmp_path, d=32, D=128)
    with pytest.raises(tc.TardisError, match=r"--target-params 0.1 is below what the folded matrices and the "
                                             r"exact predictor touch on their own \(0\.6\d\d"):
        _optimize(tmp_path, path, target_params=0.1, predictor="exact")
    assert not (tmp_path / "out.onnx").exists()


def test_resident_budget_shrinks_the_file_and_keeps_only_resident_weights(tmp_path):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    out, report = _optimize(tmp_path, path, resident=0.3, predictor="exact", refit=False)
    summary = report.summary()
    assert 0.27 <= summary["params_resident_ratio"] <= 0.3
    assert os.path.getsize(out) < os.path.getsize(path)
    kept = [b.resident_neurons for b in report.blocks]
    assert 0 < sum(kept) < 2 * 128
    model = ir.load(out)
    for site, k in zip(fallback_sites(model), kept):
        assert site.w1t.shape == (k, 32) and site.lo.shape == (k,)
        assert site.y.producer().metadata_props["tardis.resident_neurons"] == f"{k}/128"
    for block in report.blocks:  # the exact predictor flags exactly the resident neurons out of range
        assert block.measured["recall"] >= 0.999 and block.measured["precision"] >= 0.999
    assert 0.07 <= summary["fallback_rate"] <= 0.13  # the target (10%) is over all neurons
    assert summary["mean_cosine"] > 0.9


def test_resident_keeps_the_neurons_the_fallback_helps_most():
    rng = np.random.default_rng(0)
    (block,), _ = find_blocks(ir.from_proto(tiny.ffn_model(16, 64, rank=2, constants="initializer")))
    stats = NeuronStats.empty(64, "none", inputs=16)
    h = rng.standard_normal((4000, 64)) * np.linspace(0.1, 3.0, 64)  # wider neurons bend more
    stats.add(h)
    stats.add_inputs(rng.standard_normal((4000, 16)))
    w2n = {"b": np.ones(64)}
    ranged, _ = fit.error_aware_lines({"b": stats}, w2n, 0.1)
    per = budget.per_neuron([block], "exact", predictors.PredictorOptions())
    cost = per[block.name]
    full = {"b": fit.full_range_lines(stats)}
    chosen = resident.select({"b": stats}, ranged, full, w2n, {"b": 0.0}, {"b": cost}, 10 * cost)["b"]
    assert len(chosen) == 10 and set(chosen) <= set(range(40, 64))  # the widest (most curved) ones
    lines = resident.lines({"b": stats}, full, w2n, {"b": chosen}, 0.1)["b"]
    others = np.setdiff1d(np.arange(64), chosen)
    assert np.all(np.isneginf(lines.lo[others])) and np.all(np.isposinf(lines.hi[others]))
    assert np.mean(lines.coverage) == pytest.approx(0.9, abs=0.02)  # 10% of all pairs, carried by 10 neurons


def test_resident_needs_the_error_aware_strategy():
    with pytest.raises(tc.TardisError, match="--resident works with the error-aware strategy"):
        tc.Settings(resident=0.3, coverage=0.9)
    with pytest.raises(tc.TardisError, match=r"--resident must be within \(0, 1\]"):
        tc.Settings(resident=1.5)


def test_resident_at_the_fold_floor_keeps_no_neuron_and_cuts_87_5_percent(tmp_path):
    """``--resident 0.125`` with D = 4d: the folded matrix alone; every neuron always linear, no predictor,
    and the compiled kernel and the function body agree on the empty fallback."""
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    out, report = _optimize(tmp_path, path, resident=0.125)
    summary = report.summary()
    assert summary["ffn_param_reduction"] == pytest.approx(0.875)
    assert summary["params_resident_ratio"] == pytest.approx(0.125)
    assert summary["fallback_rate"] == 0.0
    assert all(b.resident_neurons == 0 and b.measured["coverage"] == 1.0 for b in report.blocks)
    assert 0.8 < summary["mean_cosine"] < 0.999  # a real, lossy cut
    feed = batches(d=32, n=1, seed=9)[0]
    np.testing.assert_allclose(run(out, feed, tc.session_options()), run(out, feed), rtol=1e-6, atol=1e-6)


def test_int8_fold_stores_a_quarter_of_w_f_at_the_same_accuracy(tmp_path, lib):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    _, full = _optimize(tmp_path, path, predictor="exact")
    out, int8 = _optimize(tmp_path, path, predictor="exact", fold_bits=8)
    d, D = 32, 128
    saved = (d * d - (d * d / 4 + d)) / (2 * d * D)  # per block: W_f at a quarter, plus one scale per column
    assert int8.summary()["ffn_param_reduction"] == pytest.approx(full.summary()["ffn_param_reduction"] + saved)
    assert int8.summary()["mean_cosine"] == pytest.approx(full.summary()["mean_cosine"], abs=2e-3)
    model = ir.load(out)
    folds = [n for n in model.graph if "/folded/" in n.name]
    assert [(n.domain, n.op_type, n.attributes["block_size"].value) for n in folds] == [
        ("ai.tardis", "DequantizeMatMul", 32)] * 2
    assert [v.name for v in folds[0].inputs] == [
        "x", "tardis/ffn0/W_f_int8", "tardis/ffn0/W_f_scale", "tardis/ffn0/b_f"]
    assert model.graph.initializers["tardis/ffn0/W_f_int8"].const_value.dtype == ir.DataType.INT8
    feed = batches(d=32, n=1, seed=9)[0]
    before = runtime.kernel_stats(lib)["dqmm_calls"]
    ours, body = run(out, feed, tc.session_options()), run(out, feed)
    assert runtime.kernel_stats(lib)["dqmm_calls"] == before + 2
    # the kernel rounds the fold's input to int8 per block of 32; so does the body on ONNX Runtime 1.25+
    # (fused into MatMulNBits), older versions compute it in float
    assert np.abs(ours - body).max() < (1e-5 if ORT_FUSES_DQ_MATMUL else 1e-2) * np.abs(body).max()


def test_int8_activation_fold_is_one_dynamic_quantize_matmul_computing_the_rounded_product(tmp_path):
    """``--fold-activations int8``: each fold is one ``DynamicQuantizeMatMul`` (no DequantizeLinear, MatMul,
    Add) that computes ``uint8(x)·(W_f_int8·scale) + b_f``; the model stays as accurate as with float
    activations, and kernel and function body agree."""
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    _, weights_only = _optimize(tmp_path, path, predictor="exact", fold_bits=8)
    out, dynamic = _optimize(tmp_path, path, predictor="exact", fold_bits=8, fold_activations="int8")
    assert dynamic.summary()["ffn_param_reduction"] == pytest.approx(weights_only.summary()["ffn_param_reduction"])
    assert dynamic.summary()["mean_cosine"] == pytest.approx(weights_only.summary()["mean_cosine"], abs=2e-3)
    model = ir.load(out)
    folds = [n for n in model.graph if "/folded/" in n.name]
    assert [(n.domain, n.op_type, n.outputs[0].name) for n in folds] == [
        ("com.microsoft", "DynamicQuantizeMatMul", f"tardis/ffn{i}/y_lin") for i in (0, 1)]
    fold = folds[0]
    assert [v.name if v is not None else None for v in fold.inputs[1:]] == [
        "tardis/ffn0/W_f_int8", "tardis/ffn0/W_f_scale", None, "tardis/ffn0/b_f"]
    fallbacks = [n for n in model.graph if n.op_type == "GuardedFallback"]
    assert {n.metadata_props["tardis.fold_activations"] for n in fallbacks} == {"int8"}
    # the emitted node alone against the documented arithmetic: the int8 predictor's node with the fold's
    # operands, so its standalone model and float64 emulation (uint8(x)·(q·scale) + bias) serve here too
    q, scale, b_f = (model.graph.initializers[f"tardis/ffn0/{k}"].const_value.numpy()
                     for k in ("W_f_int8", "W_f_scale", "b_f"))
    same = predictors.Int8Predictor(q, scale, b_f, np.dtype(np.float32))
    alone = tmp_path / "fold.onnx"
    ir.save(predictors.standalone_model(same, 32), alone)
    x = np.random.default_rng(3).standard_normal((9, 32)).astype(np.float32)
    np.testing.assert_allclose(run(alone, {"x": x}), same.estimate(x), rtol=1e-5, atol=1e-5)
    feed = batches(d=32, n=1, seed=9)[0]
    np.testing.assert_allclose(run(out, feed, tc.session_options()), run(out, feed), rtol=1e-5, atol=1e-5)


def test_int8_activation_fold_refusals(tmp_path):
    with pytest.raises(tc.TardisError, match="--fold-activations int8 multiplies int8 activations by an int8 "
                                             "folded matrix: add --fold-bits 8"):
        tc.Settings(fold_activations="int8")
    with pytest.raises(tc.TardisError, match="--fold-activations must be one of float, int8, got 'int4'"):
        tc.Settings(fold_activations="int4", fold_bits=8)
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=1, dtype="float16")
    with pytest.raises(tc.TardisError, match="DynamicQuantizeMatMul, which takes float32 activations; this model's "
                                             "blocks are float16: drop --fold-activations"):
        _optimize(tmp_path, path, predictor="int4", fold_bits=8, fold_activations="int8")


def test_int8_fold_refuses_the_exactness_self_test():
    with pytest.raises(tc.TardisError, match="--flag-all checks exactness"):
        tc.Settings(fold_bits=8, flag_all=True)
