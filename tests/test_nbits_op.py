"""``ai.tardis::MatMulNBits`` (the int4 predictor's product): real ONNX Runtime sessions with and without
``libtardis_ops``, numbers checked against the float64 emulation of MatMulNBits' accuracy-level-4
arithmetic (``LowBitPredictor.estimate``) and against ONNX Runtime's own contrib kernel (the function body).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tardis_compile import nbits_op, quantize, runtime
from tardis_compile import predictor as predictors
from tests.helpers import op_session


def _predictor(d: int, D: int, block: int, dtype=np.float32, seed: int = 0) -> predictors.LowBitPredictor:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d, D)) / np.sqrt(d)
    return predictors.LowBitPredictor(quantize.rtn(w1, 4, block), 0.1 * rng.standard_normal(D), np.dtype(dtype),
                                      "int4")


def _session(pred: predictors.LowBitPredictor, d: int, library: bool, env: dict | None = None):
    return op_session(ir.to_proto(predictors.standalone_model(pred, d)).SerializeToString(), library, env)


def _calls(lib) -> int:
    return runtime.kernel_stats(lib)["nbits_calls"]


@pytest.mark.parametrize("d,D,block,tokens", [(384, 1536, 32, 1), (384, 1536, 128, 130), (100, 48, 32, 7),
                                              (64, 40, 16, 3), (48, 16, 64, 9), (256, 96, 128, 0)])
def test_kernel_matches_the_contrib_arithmetic(lib, d, D, block, tokens):
    """Shapes with K not a multiple of the block, N not a multiple of 16, blocks wider than K, no tokens."""
    pred = _predictor(d, D, block)
    x = np.random.default_rng(1).standard_normal((tokens, d)).astype(np.float32)
    ref = pred.estimate(x)
    before = _calls(lib)
    ours = _session(pred, d, library=True).run(None, {"x": x})[0]
    assert _calls(lib) == before + 1
    contrib = _session(pred, d, library=False).run(None, {"x": x})[0]  # the function body: ORT's MatMulNBits
    assert ours.shape == contrib.shape == (tokens, D)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    assert np.abs(ours - ref).max(initial=0.0) < 2e-6 * scale
    assert np.abs(contrib - ref).max(initial=0.0) < 1e-5 * scale


def test_instruction_sets_agree(lib):
    """AVX-512 VNNI, AVX2 and portable code give the same numbers (integer products are exact)."""
    pred = _predictor(192, 80, 32, seed=3)
    x = np.random.default_rng(4).standard_normal((11, 192)).astype(np.float32)
    outs = {isa: _session(pred, 192, True, {"TARDIS_OPS_ISA": isa}).run(None, {"x": x})[0]
            for isa in ("avx512", "avx2", "portable")}
    assert runtime.kernel_stats(lib)["nbits_level"] in (0, 1, 2)
    for isa in ("avx2", "portable"):
        np.testing.assert_allclose(outs[isa], outs["avx512"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ["default", "avx2", "portable"])
@pytest.mark.parametrize("K,N,lead", [(128, 64, (2, 5)), (100, 61, (3,))], ids=["even", "odd"])
def test_float16_and_leading_axes(lib, monkeypatch, isa, K, N, lead):
    """float16 A, bias and Y (widened / narrowed 8 values at a time with F16C; "odd": counts off the vector
    width), batch x sequence axes, every instruction set, against the float64 emulation."""
    if isa != "default":
        monkeypatch.setenv("TARDIS_OPS_ISA", isa)
    pred = _predictor(K, N, 32, dtype=np.float16, seed=5)
    x = np.random.default_rng(6).standard_normal((*lead, K)).astype(np.float16)
    model = predictors.standalone_model(pred, K)
    model.graph.inputs[0].shape = ir.Shape([f"n{i}" for i in range(len(lead))] + [K])
    proto = ir.to_proto(model).SerializeToString()
    ours = ort.InferenceSession(proto, runtime.session_options(require=True),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert ours.dtype == np.float16 and ours.shape == (*lead, N)
    ref = pred.estimate(x.reshape(-1, K).astype(np.float64)).reshape(*lead, N)
    assert np.abs(ours - ref).max() < 2e-3 * np.abs(ref).max()


def test_concurrent_runs_share_one_repacked_copy(lib):
    """The weights are repacked on the first call; threads calling at once all get the right numbers."""
    pred = _predictor(256, 512, 32, seed=7)
    sess = _session(pred, 256, library=True)
    xs = [np.random.default_rng(10 + i).standard_normal((n, 256)).astype(np.float32) for i, n in
          enumerate([1, 8, 33, 2, 64, 5] * 3)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        outs = list(pool.map(lambda x: sess.run(None, {"x": x})[0], xs))
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, sess.run(None, {"x": x})[0])
        assert np.abs(out - pred.estimate(x)).max() < 2e-6 * np.abs(out).max()


def _bare_model(K: int, N: int, block: int, bits: int = 4, node_inputs: tuple = nbits_op.INPUT_NAMES,
                accuracy_level: int = 4) -> bytes:
    """One ai.tardis::MatMulNBits node with every operand a graph input (for malformed feeds)."""
    f = TensorProto.FLOAT
    u8 = TensorProto.UINT8
    inputs = [helper.make_tensor_value_info("A", f, ["m", "k"]), helper.make_tensor_value_info("B", u8, ["n", "b", "h"]),
              helper.make_tensor_value_info("scales", f, ["s"]), helper.make_tensor_value_info("zero_points", u8, ["z"]),
              helper.make_tensor_value_info("bias", f, ["o"])]
    node = helper.make_node(nbits_op.OP_TYPE, list(node_inputs), ["Y"], domain=nbits_op.DOMAIN, K=K, N=N,
                            bits=bits, block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", f, ["m", N])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(nbits_op.DOMAIN, 1),
                                                    helper.make_opsetid(nbits_op.CONTRIB_DOMAIN, 1)],
                              functions=[nbits_op.nbits_function()])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_malformed_inputs_are_clear_errors(lib):
    K, N, block = 64, 32, 32
    sess = ort.InferenceSession(_bare_model(K, N, block), runtime.session_options(require=True),
                                providers=["CPUExecutionProvider"])
    good = {"A": np.ones((3, K), np.float32), "B": np.zeros((N, 2, 16), np.uint8),
            "scales": np.ones(N * 2, np.float32), "zero_points": np.zeros(N, np.uint8),
            "bias": np.zeros(N, np.float32)}
    assert sess.run(None, good)[0].shape == (3, N)
    bad = [("A", np.ones((3, K + 1), np.float32), "A must have shape [..., K] with K = 64"),
           ("B", np.zeros((N, 2, 8), np.uint8), "B must have shape [32, 2, 16]"),
           ("scales", np.ones(N, np.float32), "scales must have shape [64]"),
           ("zero_points", np.zeros(3, np.uint8), "zero_points must have shape [32]"),
           ("bias", np.zeros(N + 1, np.float32), "bias must have shape [32]")]
    for name, value, needle in bad:
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=needle.replace("[", r"\[")):
            sess.run(None, {**good, name: value})
    refused = [({"bits": 2}, "only bits = 4"), ({"accuracy_level": 0}, "accuracy_level must be 4"),
               ({"node_inputs": ("A", "B", "scales", "", "bias")}, r"input 3 \(zero_points\) is required"),
               ({"node_inputs": ("A", "B", "scales", "zero_points", "")}, r"input 4 \(bias\) is required"),
               ({"node_inputs": ("A", "B", "scales")}, r"input 3 \(zero_points\) is required")]
    for kwargs, needle in refused:  # at session creation, not a crash or a garbled read at run time
        with pytest.raises(Exception, match=needle):
            ort.InferenceSession(_bare_model(K, N, block, **kwargs), runtime.session_options(require=True),
                                 providers=["CPUExecutionProvider"])


def test_weights_fed_as_inputs_are_read_on_every_call(lib):
    """Only initializer weights are repacked once: weights that are graph inputs may change (even in place)."""
    K, N, block = 64, 32, 32
    sess = ort.InferenceSession(_bare_model(K, N, block), runtime.session_options(require=True),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(8)
    feed = {"A": rng.standard_normal((3, K)).astype(np.float32), "B": rng.integers(0, 256, (N, 2, 16), dtype=np.uint8),
            "scales": rng.random(N * 2).astype(np.float32), "zero_points": rng.integers(0, 256, N, dtype=np.uint8),
            "bias": np.zeros(N, np.float32)}
    first = sess.run(None, feed)[0]
    feed["B"][:] = rng.integers(0, 256, feed["B"].shape, dtype=np.uint8)  # same buffer, new levels
    second = sess.run(None, feed)[0]
    fresh = ort.InferenceSession(_bare_model(K, N, block), runtime.session_options(require=True),
                                 providers=["CPUExecutionProvider"]).run(None, feed)[0]  # packs the new levels
    assert np.abs(second - first).max() > 0.1
    np.testing.assert_array_equal(second, fresh)


def test_nan_activations_count_as_zero_like_the_contrib_op(lib):
    """A NaN in A is read as 0 by ONNX Runtime's MatMulNBits; ours does the same on every instruction set."""
    pred = _predictor(96, 48, 32, seed=9)
    x = np.random.default_rng(10).standard_normal((4, 96)).astype(np.float32)
    x[1, 5] = x[2, 70] = np.nan
    clean = x.copy()
    clean[np.isnan(clean)] = 0.0
    contrib = _session(pred, 96, library=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(contrib, pred.estimate(clean), rtol=1e-5, atol=1e-5)
    for isa in ("avx512", "avx2", "portable"):
        ours = _session(pred, 96, True, {"TARDIS_OPS_ISA": isa}).run(None, {"x": x})[0]
        np.testing.assert_allclose(ours, contrib, rtol=1e-5, atol=1e-5)


def test_infinite_activations_keep_their_sign_on_every_instruction_set(lib):
    """An infinite activation is quantized to ±127 by its sign (its block's other values to 0) on every
    instruction set: +inf and -inf in the same place give outputs of opposite sign, identical across ISAs
    (inf · 0 used to become NaN, then the most negative level on AVX-512 and the largest on the others)."""
    pred = _predictor(32, 16, 32, seed=11)
    x = np.random.default_rng(12).standard_normal((2, 32)).astype(np.float32)
    x[0, 3], x[1, 3] = np.inf, -np.inf
    outs = {isa: _session(pred, 32, True, {"TARDIS_OPS_ISA": isa}).run(None, {"x": x})[0]
            for isa in ("avx512", "avx2", "portable")}
    for isa in ("avx2", "portable"):
        np.testing.assert_array_equal(outs[isa], outs["avx512"])
    finite = np.isfinite(outs["avx512"][0])
    assert not finite.all()
    np.testing.assert_array_equal(np.sign(outs["avx512"][0][~finite]), -np.sign(outs["avx512"][1][~finite]))
