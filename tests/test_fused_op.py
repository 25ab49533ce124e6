"""``ai.tardis::GuardedFallbackNBits`` (the int4 predictor and the guarded fallback in one node) and the pass
that fuses them: real ONNX Runtime sessions with and without ``libtardis_ops``, numbers checked against the
float64 reference (the predictor's accuracy-level-4 emulation feeding ``fallback_op.reference``)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tardis_compile import fallback_op, fused_op, nbits_op, quantize, runtime
from tardis_compile import predictor as predictors
from tardis_compile.passes.ffn_rewrite import _node

OPERANDS = fallback_op.INPUT_NAMES[3:]  # lo, hi, w1t, b1, w2, alpha, beta


def _pair_model(pred: predictors.LowBitPredictor, d: int, D: int, rank: int = 2, variant: str = "none",
                fuse: bool = True) -> ir.Model:
    """x → ai.tardis::MatMulNBits → ĥ → GuardedFallback, y_lin and the fallback's operands graph inputs; fused
    by :func:`fused_op.fuse` unless ``fuse`` is false."""
    model = predictors.standalone_model(pred, d)
    graph = model.graph
    x, h_hat = graph.inputs[0], graph.outputs.pop()
    elem = x.type
    lead = [f"n{i}" for i in range(rank - 1)]
    x.shape = ir.Shape([*lead, d])
    # symbolic operand sizes: ONNX Runtime leaves their checks to the kernel
    shapes = {"y_lin": [*lead, "d"], "lo": ["D"], "hi": ["D"], "w1t": ["D", "d"], "b1": ["D"], "w2": ["D", "d"],
              "alpha": ["D"], "beta": ["D"]}
    inputs = {name: ir.Value(name=name, type=elem, shape=ir.Shape(shape)) for name, shape in shapes.items()}
    graph.inputs.extend(inputs.values())
    node = _node(fallback_op.OP_TYPE, [x, inputs["y_lin"], h_hat, *(inputs[n] for n in OPERANDS)],
                 "tardis/blk/GuardedFallback", "y", domain=fallback_op.DOMAIN, approximate=variant)
    graph.append(node)
    node.outputs[0].type, node.outputs[0].shape = elem, ir.Shape([*lead, d])
    graph.outputs.append(node.outputs[0])
    function = ir.serde.deserialize_function(fallback_op.fallback_function(variant, 17, int(elem.dtype)))
    model.functions[function.identifier()] = function
    model.opset_imports[fallback_op.DOMAIN] = fallback_op.OPSET_VERSION
    if fuse:
        assert fused_op.fuse(model) == 1
    return model


def _session(model: ir.Model, library: bool) -> ort.InferenceSession:
    so = runtime.session_options(require=True) if library else ort.SessionOptions()
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _predictor(d: int, D: int, block: int, dtype=np.float32, seed: int = 0) -> predictors.LowBitPredictor:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d, D)) / np.sqrt(d)
    return predictors.LowBitPredictor(quantize.rtn(w1, 4, block), 0.1 * rng.standard_normal(D), np.dtype(dtype),
                                      "int4")


def _operands(pred, d: int, D: int, flags: str, dtype, seed: int = 1) -> dict[str, np.ndarray]:
    """Fallback operands whose guards flag no neuron, every neuron, or a random ~10% of the pairs."""
    rng = np.random.default_rng(seed)
    w = pred.weights()
    ops = {"w1t": w.T + 0.01 * rng.standard_normal((D, d)), "b1": pred.b1,
           "w2": rng.standard_normal((D, d)) / np.sqrt(D),
           "alpha": rng.uniform(0.3, 0.9, D), "beta": rng.uniform(-0.1, 0.1, D)}
    if flags == "none":
        ops["lo"], ops["hi"] = np.full(D, -np.inf), np.full(D, np.inf)
    elif flags == "all":
        ops["lo"], ops["hi"] = np.full(D, np.inf), np.full(D, -np.inf)
    else:  # a neuron's range covers ~90% of its standard-normal-input pre-activations
        spread = np.linalg.norm(w, axis=0)
        ops["lo"], ops["hi"] = pred.b1 - 1.65 * spread, pred.b1 + 1.65 * spread
    return {k: np.asarray(v, dtype) for k, v in ops.items()}


def _reference(pred, x: np.ndarray, y_lin: np.ndarray, ops: dict[str, np.ndarray], variant: str = "none",
               h_hat: np.ndarray | None = None):
    d = x.shape[-1]
    rows, ylin = x.reshape(-1, d).astype(np.float32), y_lin.reshape(-1, d)
    h_hat = pred.estimate(rows) if h_hat is None else h_hat.reshape(rows.shape[0], -1)
    return fallback_op.reference(rows, ylin, h_hat, *(ops[n] for n in OPERANDS), variant=variant).reshape(x.shape)


@pytest.mark.parametrize("flags", ["none", "all", "random"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 40])
def test_kernel_matches_the_reference_and_the_body(lib, flags, tokens):
    """Few tokens (≤ 8) take the fused path, more the two kernels in turn; both match the float64 reference
    and the function body (ORT's MatMulNBits + the dense fallback). All flagged: the exact block."""
    d, D = 128, 768
    pred = _predictor(d, D, 32)
    model = _pair_model(pred, d, D)
    rng = np.random.default_rng(tokens)
    ops = _operands(pred, d, D, flags, np.float32)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    feed = {"x": x, "y_lin": rng.standard_normal((tokens, d)).astype(np.float32), **ops}
    before = runtime.kernel_stats(lib)
    ours = _session(model, library=True).run(None, feed)[0]
    after = runtime.kernel_stats(lib)
    assert after["fused_calls"] == before["fused_calls"] + 1
    assert after["calls"] == before["calls"] + 1
    assert after["nbits_calls"] == before["nbits_calls"]
    fused = after["fused_paths"] - before["fused_paths"]
    if after["cpu_has_avx2"]:
        assert fused == (1 if tokens <= 8 else 0)
    body = _session(model, library=False).run(None, feed)[0]
    ref = _reference(pred, x, feed["y_lin"], ops)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ours - ref).max() < 1e-5 * scale
    assert np.abs(body - ref).max() < 1e-4 * scale  # ORT's contrib MatMulNBits: float32 block scaling
    flagged = {"none": 0, "all": tokens * D}.get(flags)
    if flagged is not None:
        assert after["flagged_pairs"] - before["flagged_pairs"] == flagged
    else:
        assert 0 < after["flagged_pairs"] - before["flagged_pairs"] < tokens * D


def test_fused_and_unfused_kernels_agree(lib):
    """The fused node and the unfused pair (ai.tardis::MatMulNBits, then GuardedFallback) under the library."""
    d, D = 384, 1536
    pred = _predictor(d, D, 128, seed=5)
    ops = _operands(pred, d, D, "random", np.float32, seed=6)
    rng = np.random.default_rng(7)
    for tokens in (1, 4, 64):
        feed = {"x": rng.standard_normal((tokens, d)).astype(np.float32),
                "y_lin": rng.standard_normal((tokens, d)).astype(np.float32), **ops}
        fused = _session(_pair_model(pred, d, D), True).run(None, feed)[0]
        pair = _session(_pair_model(pred, d, D, fuse=False), True).run(None, feed)[0]
        np.testing.assert_allclose(fused, pair, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float16_batch_and_sequence_axes(lib, dtype):
    """The reference takes ĥ from the unfused pair's MatMulNBits in the model's dtype (float16 rounding of ĥ
    and of the bias decides flags near a guard)."""
    d, D, lead = 64, 256, (2, 3)
    pred = _predictor(d, D, 32, dtype=dtype, seed=2)
    model = _pair_model(pred, d, D, rank=3, variant="tanh")
    pair = _pair_model(pred, d, D, rank=3, variant="tanh", fuse=False)
    pair.graph.outputs.append(pair.graph.node(0).outputs[0])
    rng = np.random.default_rng(3)
    ops = _operands(pred, d, D, "random", dtype)
    x = rng.standard_normal((*lead, d)).astype(dtype)
    feed = {"x": x, "y_lin": rng.standard_normal((*lead, d)).astype(dtype), **ops}
    ours = _session(model, library=True).run(None, feed)[0]
    assert ours.shape == x.shape and ours.dtype == dtype
    h_hat = _session(pair, library=True).run(None, feed)[1]
    ref = _reference(pred, x, feed["y_lin"].astype(np.float64), {k: v.astype(np.float64) for k, v in ops.items()},
                     "tanh", h_hat.astype(np.float64))
    tol = 2e-2 if dtype == np.float16 else 1e-5
    assert np.abs(ours - ref).max() < tol * max(1.0, float(np.abs(ref).max()))


def test_malformed_inputs_are_clear_errors(lib):
    d, D = 64, 256
    pred = _predictor(d, D, 32)
    session = _session(_pair_model(pred, d, D), library=True)
    ops = _operands(pred, d, D, "random", np.float32)
    x = np.zeros((2, d), np.float32)
    good = {"x": x, "y_lin": x, **ops}
    cases = [({"w1t": ops["w1t"][:, :-1]},
              "w1t must have shape [D, d] = [256, 64] (neuron-major W1^T; D from attribute N"),
             ({"alpha": ops["alpha"][:-1]}, "alpha must have shape [D] = [256] (D from attribute N)"),
             ({"y_lin": np.zeros((3, d), np.float32)}, "y_lin must have the shape of x [2, 64]")]
    for change, message in cases:
        with pytest.raises(Exception, match=r"GuardedFallbackNBits") as err:
            session.run(None, {**good, **change})
        assert message in str(err.value)


def test_the_pass_fuses_only_int4_predictors_whose_estimate_nothing_else_reads(caplog):
    """Must not fuse: ĥ read by another node (a graph output here; in models, Shape reads of the replaced
    activation), or a predictor that is not ai.tardis::MatMulNBits. The log counts both."""
    d, D = 32, 64
    model = _pair_model(_predictor(d, D, 32), d, D, fuse=False)
    h_hat = model.graph.node(0).outputs[0]
    model.graph.outputs.append(h_hat)
    with caplog.at_level(logging.INFO, logger=fused_op.__name__):
        assert fused_op.fuse(model) == 0
    assert "has other consumers" in caplog.text
    model.graph.outputs.pop()
    predictor = model.graph.node(0)
    predictor.domain = nbits_op.CONTRIB_DOMAIN
    assert fused_op.check(model.graph.node(1)) == "the predictor is not ai.tardis::MatMulNBits (int4)"
    predictor.domain = nbits_op.DOMAIN
    assert fused_op.check(model.graph.node(1)) == ""


def test_unfuse_restores_the_pair_and_fuse_the_node():
    d, D = 32, 64
    model = _pair_model(_predictor(d, D, 32), d, D)
    [node] = list(model.graph)
    assert (node.op_type, node.name) == (fallback_op.FUSED_OP_TYPE, "tardis/blk/GuardedFallback")
    assert [a for a in node.attributes] == ["approximate", *nbits_op.ATTRIBUTES]
    assert fused_op.unfuse(model) == 1
    assert [(n.op_type, n.outputs[0].name) for n in model.graph] == [
        ("MatMulNBits", "tardis/blk/h_hat"), ("GuardedFallback", "y")]
    assert fused_op.fuse(model) == 1
    assert [n.op_type for n in model.graph] == [fallback_op.FUSED_OP_TYPE]
    onnx.checker.check_model(ir.to_proto(model))


def test_an_int4_model_is_written_fused_and_verified_through_the_pair(tmp_path):
    """``optimize`` with the int4 predictor: the written blocks are fused nodes; verification (which reads ĥ
    of the unfused pair) measured each block before writing; the file is left fused; a second run sees the
    blocks as rewritten."""
    import tardis_compile as tc
    from tardis_compile.errors import AlreadyOptimizedError
    from tests.helpers import batches, save_tiny

    path, _ = save_tiny(tmp_path, layers=2)
    out = tmp_path / "out.onnx"
    report = tc.optimize(path, out, batches(), settings=tc.Settings(predictor="int4"), show_progress=False)
    written = onnx.load(str(out))
    assert [n.op_type for n in written.graph.node if n.domain == fallback_op.DOMAIN] == [fallback_op.FUSED_OP_TYPE] * 2
    assert {(f.domain, f.name) for f in written.functions} >= {(fallback_op.DOMAIN, fallback_op.FUSED_OP_TYPE)}
    blocks = report.verification.blocks
    assert len(blocks) == 2 and all(0.0 < b.fallback_rate < 1.0 and 0.0 <= b.recall <= 1.0 and b.tokens > 0
                                    for b in blocks)
    with pytest.raises(AlreadyOptimizedError, match=r"\(2 block\(s\) rewritten"):
        tc.optimize(out, tmp_path / "again.onnx", batches(), show_progress=False)
