"""METHOD.md §7 through real ONNX Runtime sessions, for both GELU variants.

1. every neuron flagged → the rewritten block equals the original (float32 tolerance);
2. no neuron flagged → the output equals ``x·W_f + b_f``;
3. exact predictor → only in-range fit error remains, bounded by max |GELU − αt − β| on [lo, hi];
5. a gated block is reported and left untouched.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import tardis_compile as tc
from tardis_compile.errors import NoFoldableBlockError
from tardis_compile.gelu import gelu
from tardis_compile.models import tiny
from tardis_compile.verify import fallback_sites
from tests.helpers import batches, run, save_tiny

VARIANTS = {"none": "erf_decomposed", "tanh": "tanh_decomposed"}


def _operands(path):
    """Per block: W_f, b_f, lo, hi, alpha, beta read back from the optimized model."""
    model = ir.load(path)
    out = []
    for site in fallback_sites(model):
        node = site.y.producer()
        y_lin_add = node.inputs[1].producer()
        matmul = y_lin_add.inputs[0].producer()
        const = lambda v: np.asarray(ir.convenience.get_const_tensor(v).numpy(), np.float64)  # noqa: E731
        names = ["lo", "hi", "w1t", "b1", "w2", "alpha", "beta"]
        vals = {n: const(v) for n, v in zip(names, node.inputs[3:])}
        vals.update(w_f=const(matmul.inputs[1]), b_f=const(y_lin_add.inputs[1]))
        out.append(vals)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_flagged_equals_original(tmp_path, variant):
    path, params = save_tiny(tmp_path, gelu=VARIANTS[variant], layers=3)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), settings=tc.Settings(flag_all=True), show_progress=False)
    ops = _operands(out)
    assert all(np.all(np.isposinf(o["lo"])) and np.any(o["alpha"] != 0) for o in ops)  # a real fold, all flagged
    x = batches(seed=3)[0]["x"]
    np.testing.assert_allclose(run(out, {"x": x}), run(path, {"x": x}), atol=1e-5, rtol=1e-5)


def test_block_output_that_is_the_graph_output(tmp_path):
    """A block whose output is the model's output (no residual Add after it): the rewritten output keeps its
    name, type and shape, and with every neuron flagged equals the original."""
    model = tiny.ffn_model(16, 64)
    residual = next(n for n in model.graph.node if n.op_type == "Add" and "x" in n.input)
    block_out = next(i for i in residual.input if i != "x")
    model.graph.node.remove(residual)
    out_info = model.graph.output[0]
    out_info.name = block_out
    onnx.checker.check_model(model, full_check=True)
    path, out = tmp_path / "no_residual.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    tc.optimize(path, out, batches(), settings=tc.Settings(flag_all=True), show_progress=False)
    rewritten = onnx.load(out)
    assert [o.name for o in rewritten.graph.output] == [block_out]
    assert rewritten.graph.output[0].type == out_info.type
    x = batches(seed=3)[0]["x"]
    np.testing.assert_allclose(run(out, {"x": x}), run(path, {"x": x}), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_none_flagged_is_the_folded_linear_map(tmp_path, variant):
    path, params = save_tiny(tmp_path, gelu=VARIANTS[variant], layers=1)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), settings=tc.Settings(refit=False, predictor="exact"), show_progress=False)
    model = onnx.load(out)
    for init in model.graph.initializer:  # widen every range: nobody is flagged
        if init.name.endswith("/range_lo") or init.name.endswith("/range_hi"):
            value = -np.inf if init.name.endswith("/range_lo") else np.inf
            init.CopyFrom(onnx.numpy_helper.from_array(np.full(init.dims, value, np.float32), init.name))
    onnx.save(model, tmp_path / "none.onnx")
    (op,) = _operands(out)
    p = params[0]
    w_f = (p["W1"] * op["alpha"]) @ p["W2"]
    b_f = (op["alpha"] * p["b1"] + op["beta"]) @ p["W2"] + p["b2"]
    np.testing.assert_allclose(op["w_f"], w_f, atol=1e-5)
    x = batches(seed=4)[0]["x"].astype(np.float64)
    expected = x + x @ w_f + b_f  # the tiny model is residual: y = x + FFN(x)
    np.testing.assert_allclose(run(tmp_path / "none.onnx", {"x": x.astype(np.float32)}), expected, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_predictor_error_is_bounded_by_in_range_fit_error(tmp_path, variant):
    path, params = save_tiny(tmp_path, gelu=VARIANTS[variant], layers=1, D=64)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), settings=tc.Settings(refit=False, target_fallback=0.2, predictor="exact"),
                show_progress=False)
    (op,) = _operands(out)
    p = params[0]
    # worst line error of each neuron over its range [lo, hi] (open ends clipped to the data range)
    x = batches(seed=5)[0]["x"].astype(np.float64)
    h = x @ p["W1"] + p["b1"]
    bound = np.zeros(64)
    for j in range(64):
        lo, hi = max(op["lo"][j], h[..., j].min()), min(op["hi"][j], h[..., j].max())
        if lo < hi:
            t = np.linspace(lo, hi, 2001)
            bound[j] = np.max(np.abs(gelu(t, variant) - op["alpha"][j] * t - op["beta"][j]))
    got = run(out, {"x": x.astype(np.float32)}) - x
    dense = gelu(h, variant) @ p["W2"] + p["b2"]
    err = np.abs(got - dense)
    limit = bound @ np.abs(p["W2"]) + 1e-4  # Σ_j |e_j|·|W2[j,:]| per output
    assert np.all(err <= limit)
    assert err.max() > 1e-4  # the approximation is real, not the dense block in disguise


def test_gated_block_is_reported_and_left_untouched(tmp_path):
    path, _ = save_tiny(tmp_path, gated=True)
    out = tmp_path / "out.onnx"
    with pytest.raises(NoFoldableBlockError, match="gated FFN"):
        tc.optimize(path, out, batches(), show_progress=False)
    assert not out.exists()


def test_target_fallback_is_met_on_held_out_data(tmp_path):
    path, _ = save_tiny(tmp_path, layers=2, D=128)
    out = tmp_path / "out.onnx"
    report = tc.optimize(path, out, batches(n=30), settings=tc.Settings(target_fallback=0.1, predictor="exact"),
                         show_progress=False)
    rate = report.summary()["fallback_rate"]
    assert 0.07 <= rate <= 0.13
    assert report.summary()["mean_cosine"] > 0.9
