"""Predictors (METHOD.md §4): each kind against a NumPy reference through ONNX Runtime, the margin search,
the recall target on held-out data, and refusal of a predictor that does not fit its block."""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import tardis_compile as tc
from tardis_compile import predictor as predictors
from tardis_compile import quantize
from tardis_compile.fit import Lines
from tardis_compile.models import tiny
from tardis_compile.passes.ffn_match import find_blocks
from tests.helpers import batches, save_tiny


def _block(d: int = 64, hidden: int = 256, seed: int = 0):
    (block,), _ = find_blocks(ir.from_proto(tiny.ffn_model(d, hidden, seed=seed, rank=2, constants="initializer")))
    return block


def _gram(x: np.ndarray) -> np.ndarray:
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return xa.T @ xa / len(x)


def _correlated_inputs(d: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.linspace(2.0, 0.1, d)[:, None]  # anisotropic, like real activations
    return rng.standard_normal((n, d)) @ mix / np.sqrt(d)


def _run_predictor(built: predictors.Built, x: np.ndarray) -> np.ndarray:
    """The emitted predictor subgraph alone, in ORT."""
    proto = ir.to_proto(predictors.standalone_model(built.predictor, x.shape[1]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("k", [64, 80])  # 80: a partial last block
def test_packed_matmulnbits_equals_dequantized_reference(bits, k):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, 48)) * 0.1
    quant = quantize.rtn(w, bits, 32)
    assert quant.q.max() < (1 << bits)
    block = _block(k, 48)
    x = rng.standard_normal((5, k))
    pred = predictors.LowBitPredictor(quant, np.zeros(48), np.dtype(np.float32), f"int{bits}")
    got = _run_predictor(predictors.Built(pred, np.zeros(48)), x)
    # accuracy_level 4 rounds activations to int8 per block; estimate() models exactly that
    np.testing.assert_allclose(got, pred.estimate(x), rtol=2e-3, atol=2e-3 * np.abs(x @ quant.dequantize()).max())
    pred.check(block)


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_beats_round_to_nearest_in_the_input_metric(bits):
    w = np.random.default_rng(2).standard_normal((64, 96)) / 8
    x = _correlated_inputs(64, 4096)
    gram = x.T @ x
    err = {name: np.linalg.norm(x @ (q.dequantize() - w)) for name, q in
           (("rtn", quantize.rtn(w, bits, 32)), ("gptq", quantize.gptq(w, gram, bits, 32)))}
    assert err["gptq"] < 0.9 * err["rtn"]


@pytest.mark.parametrize("kind", ["exact", "int8", "int4", "int2", "lowrank"])
def test_each_kind_runs_as_its_numpy_reference(kind):
    block = _block()
    x = _correlated_inputs(64, 2048)
    built = predictors.build(kind, block, _gram(x))
    probe = x[:7]
    ref = built.predictor.estimate(probe)
    got = _run_predictor(built, probe)
    np.testing.assert_allclose(got, ref, atol=1e-2 * np.abs(ref).max())
    # the error scale σ is the RMS of ĥ − h over the calibration inputs (exact from the second moments)
    h = x @ block.w1() + block.b1()
    rms = np.sqrt(np.mean((x @ built.predictor.weights() + block.b1() - h) ** 2, axis=0))
    np.testing.assert_allclose(built.sigma, rms, rtol=1e-6, atol=1e-9)
    if kind == "exact":
        assert not built.sigma.any()
    else:
        assert 0 < built.predictor.parameters() < block.d * block.hidden


def test_int8_rounds_activations_per_tensor_like_dynamic_quantize_linear():
    """ĥ of a token depends on the whole tensor's range (one uint8 scale and zero point per call): the
    reference reproduces ORT's, and a batch with a large outlier token moves the others' estimates."""
    block = _block()
    x = _correlated_inputs(64, 512)
    built = predictors.build("int8", block, _gram(x))
    assert built.predictor.q.dtype == np.int8 and built.predictor.parameters() == 64 * 256 / 4 + 2 * 256
    batch = x[:9].copy()
    alone = _run_predictor(built, batch)
    batch[0] *= 50.0
    np.testing.assert_allclose(_run_predictor(built, batch), built.predictor.estimate(batch), atol=1e-4)
    assert np.abs(_run_predictor(built, batch)[1:] - alone[1:]).max() > 1e-3


def test_auto_is_int8_for_float32_and_int4_for_float16():
    x = _correlated_inputs(32, 512)
    assert predictors.build("auto", _block(32, 128), _gram(x)).predictor.kind == "int8"
    (half,), _ = find_blocks(ir.from_proto(tiny.ffn_model(32, 128, rank=2, constants="initializer", dtype="float16")))
    assert predictors.build("auto", half, _gram(x)).predictor.kind == "int4"
    assert predictors.neuron_parameters("auto", 32, np.dtype(np.float32)) == 32 / 4 + 2
    with pytest.raises(predictors.PredictorError, match="int8 predictor runs ONNX Runtime's DynamicQuantizeMatMul, "
                                                        "which takes float32 activations; this model is float16"):
        predictors.build("int8", half, _gram(x))


def test_default_quantization_blocks_per_width():
    """int4 and int2 default to blocks of 32; the default or an explicit block is halved while wider than d
    (a padded block would store and read zeros)."""
    default = predictors.PredictorOptions()
    assert [default.block_for(d) for d in (4544, 384, 32, 20, 8)] == [32, 32, 32, 16, 16]
    assert predictors.PredictorOptions(block_size=128).block_for(384) == 128
    assert [predictors.PredictorOptions(block_size=128).block_for(d) for d in (100, 40, 16)] == [64, 32, 16]
    built = predictors.build("int4", _block(16, 64), _gram(_correlated_inputs(16, 512)))
    assert built.predictor.quant.block_size == 16
    # 4-bit weights plus a float32 scale and a 4-bit zero point per block of 128, bias included
    wide = predictors.PredictorOptions(block_size=128)
    assert predictors.neuron_parameters("int4", 384, np.dtype(np.float32), wide) == pytest.approx(
        quantize.stored_bits(384, 1, 4, 128, 32) / 32 + 1)


def test_lowrank_rank_choice():
    block = _block()
    x = _correlated_inputs(64, 2048)
    fixed = predictors.build("lowrank", block, _gram(x), predictors.PredictorOptions(rank=5)).predictor
    assert fixed.rank == 5 and fixed.parameters() == 5 * (64 + 256) + 256
    chosen = predictors.build("lowrank", block, _gram(x)).predictor
    assert 1 <= chosen.rank <= 64 * 256 // (2 * (64 + 256))


def test_margin_search_matches_brute_force():
    rng = np.random.default_rng(3)
    h = rng.standard_normal((500, 20))
    h_hat = h + 0.1 * rng.standard_normal(h.shape)
    lines = Lines(lo=np.full(20, -1.0), hi=np.full(20, 1.0), alpha=np.ones(20), beta=np.zeros(20),
                  coverage=np.ones(20), sse=np.zeros(20))
    sigma = np.full(20, 0.1)
    search = predictors.MarginSearch(lines, sigma)
    search.add(h[:250], h_hat[:250])
    search.add(h[250:], h_hat[250:])
    recall, flagged = search.curve()
    out = (h < -1) | (h > 1)
    for k in (0, 10, 20, 40):
        z = predictors.Z_GRID[k]
        flag = (h_hat < -1 + z * 0.1) | (h_hat > 1 - z * 0.1)
        assert recall[k] == pytest.approx((flag & out).sum() / out.sum())
        assert flagged[k] == pytest.approx(flag.mean())
    margin = search.choose(0.99)
    assert margin.recall >= 0.99 and margin.z > 0
    assert search.choose(0.5).z <= margin.z


@pytest.mark.parametrize("kind", ["int8", "int4", "int2", "lowrank"])
def test_recall_target_is_met_on_held_out_data(tmp_path, kind):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    report = tc.optimize(path, tmp_path / "out.onnx", batches(d=32, n=24, seed=1), eval_data=batches(d=32, n=12, seed=9),
                         settings=tc.Settings(predictor=kind, predictor_recall=0.99, refit=False),
                         show_progress=False)
    for block in report.blocks:
        assert block.measured["recall"] >= 0.97, (kind, block.name, block.measured)
        if kind != "lowrank":  # isotropic random inputs and weights have no low-rank structure to exploit
            assert block.measured["precision"] > 0.2
    baseline = tc.optimize(path, tmp_path / "exact.onnx", batches(d=32, n=24, seed=1),
                           eval_data=batches(d=32, n=12, seed=9), settings=tc.Settings(refit=False),
                           show_progress=False)
    assert report.verification.mean_cosine >= baseline.verification.mean_cosine - 0.01


def test_every_flagged_with_a_cheap_predictor_is_still_exact(tmp_path):
    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    report = tc.optimize(path, tmp_path / "out.onnx", batches(d=32, n=8), eval_data=batches(d=32, n=4, seed=5),
                         settings=tc.Settings(predictor="int4", flag_all=True), show_progress=False)
    assert report.verification.max_abs_error < 1e-4


def test_a_predictor_that_does_not_fit_the_block_is_refused():
    small, big = _block(64, 256), _block(32, 128)
    built = predictors.build("int4", small, _gram(_correlated_inputs(64, 512)))
    with pytest.raises(predictors.PredictorError, match=r"int4 predictor for a 64×256 W1 cannot serve block"):
        built.predictor.check(big)
    with pytest.raises(predictors.PredictorError, match="needs the calibration inputs' moments"):
        predictors.build("int2", small, None)


def test_bad_predictor_settings_are_clear_errors():
    with pytest.raises(tc.TardisError, match="unknown predictor 'int3'"):
        tc.Settings(predictor="int3")
    with pytest.raises(tc.TardisError, match="predictor-recall"):
        tc.Settings(predictor="int4", predictor_recall=1.5)


def test_inspect_shows_the_predictor_of_rewritten_blocks(tmp_path, capsys):
    from tardis_compile.cli import main

    path, _ = save_tiny(tmp_path, d=32, D=128, layers=2)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(d=32, n=12), settings=tc.Settings(predictor="int4", refit=False),
                show_progress=False)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 block(s) already rewritten by tardis-compile" in text
    lines = [line for line in text.splitlines() if "GuardedFallback:" in line]
    assert len(lines) == 2
    for line in lines:
        assert "predictor=int4" in line
        assert float(re.search(r"predictor_calibrated_recall=([0-9.]+)", line).group(1)) >= tc.Settings().predictor_recall
