"""``ai.tardis::DequantizeMatMul`` (the int8 fold of ``--fold-bits 8``): real ONNX Runtime sessions with and
without ``libtardis_ops``; the kernel against the float64 emulation of its arithmetic (A rounded to int8 per
block of K, ``predictor.int8_activations``, times ``B · scale``), the function body against the float product.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tardis_compile import dequantize_matmul_op as dqmm
from tardis_compile import quantize, runtime
from tardis_compile.predictor import int8_activations
from tests.helpers import ORT_FUSES_DQ_MATMUL, op_session

F32, F16, I8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8


def _operands(K: int, N: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 B (K, N) and float64 scale, bias as the fold stores them (``quantize.int8_columns``)."""
    rng = np.random.default_rng(seed)
    q, scale = quantize.int8_columns(rng.standard_normal((K, N)) / np.sqrt(max(K, 1)))
    return q, scale, 0.1 * rng.standard_normal(N)


def _model(K: int, N: int, block: int, dtype=np.float32, seed: int = 0, constant: bool = True, opset: int = 17,
           node_inputs: tuple = dqmm.INPUT_NAMES, leading: int = 1) -> bytes:
    """One DequantizeMatMul node, A (``leading`` symbolic axes, then K) the graph input; B, scale and bias
    initializers (``constant``) or graph inputs, with the model-local function."""
    elem = F32 if dtype == np.float32 else F16
    q, scale, bias = _operands(K, N, seed)
    weights = [numpy_helper.from_array(q, "B"), numpy_helper.from_array(scale.astype(dtype), "scale"),
               numpy_helper.from_array(bias.astype(dtype), "bias")]
    lead = [f"a{i}" for i in range(leading)]
    inputs = [helper.make_tensor_value_info("A", elem, [*lead, "k"])]
    if not constant:
        inputs += [helper.make_tensor_value_info("B", I8, None),  # any rank: the kernel checks it
                   helper.make_tensor_value_info("scale", elem, ["s"]), helper.make_tensor_value_info("bias", elem, ["o"])]
    node = helper.make_node(dqmm.OP_TYPE, list(node_inputs), ["Y"], domain=dqmm.DOMAIN, block_size=block)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", elem, [*lead, N])],
                              weights if constant else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(dqmm.DOMAIN, 1)],
                              functions=[dqmm.function(opset)])
    model.ir_version = 10
    if constant:  # the checker wants every graph input's rank
        onnx.checker.check_model(model)
    return model.SerializeToString()


def _reference(x: np.ndarray, K: int, N: int, block: int, dtype=np.float32, seed: int = 0,
               rounded: bool = True) -> np.ndarray:
    """float64 ``Y`` for rows x: the kernel's arithmetic (``rounded``) or the plain float product (the body)."""
    q, scale, bias = _operands(K, N, seed)
    w = q.astype(np.float64) * scale.astype(dtype).astype(np.float64)
    rows = np.asarray(x, np.float64).reshape(-1, K)
    a = int8_activations(rows, block) if rounded else rows
    return (a @ w + bias.astype(dtype)).reshape(*x.shape[:-1], N)


def _calls(lib) -> int:
    return runtime.kernel_stats(lib)["dqmm_calls"]


@pytest.mark.parametrize("K,N,block,tokens", [(384, 384, 128, 1), (384, 384, 32, 130), (100, 37, 16, 7), (1000, 70, 16, 13),
                                              (1000, 70, 64, 9), (48, 16, 128, 3), (256, 96, 128, 0)])
def test_kernel_matches_the_rounded_arithmetic_and_the_body_the_float_product(lib, K, N, block, tokens):
    """K not a multiple of the block, N not a multiple of 16, a block wider than K, no tokens. The kernel ran
    (its counter), the body did not need the library."""
    x = np.random.default_rng(1).standard_normal((tokens, K)).astype(np.float32)
    model = _model(K, N, block)
    before = _calls(lib)
    ours = op_session(model, library=True).run(None, {"A": x})[0]
    assert _calls(lib) == before + 1
    body = op_session(model, library=False).run(None, {"A": x})[0]
    assert ours.shape == body.shape == (tokens, N)
    ref = _reference(x, K, N, block)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    assert np.abs(ours - ref).max(initial=0.0) < 2e-6 * scale
    if ORT_FUSES_DQ_MATMUL:  # an 8-bit MatMulNBits that rounds A in blocks of 32, as the kernel at 32
        assert np.abs(body - _reference(x, K, N, 32)).max(initial=0.0) < 2e-6 * scale
    else:  # the float product
        assert np.abs(body - _reference(x, K, N, block, rounded=False)).max(initial=0.0) < 2e-6 * scale


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_instruction_set_float16_and_leading_axes(lib, isa, dtype):
    """VNNI, AVX2 (8-bit levels as two nibbles) and portable code, float32 and float16 A / scale / bias /
    Y, batch x sequence axes, against the emulation; float32 results alike across instruction sets."""
    K, N, block = 200, 61, 64
    x = np.random.default_rng(2).standard_normal((2, 5, K)).astype(dtype)
    out = op_session(_model(K, N, block, dtype, leading=2), True, {"TARDIS_OPS_ISA": isa}).run(None, {"A": x})[0]
    assert out.dtype == dtype and out.shape == (2, 5, N)
    ref = _reference(x.astype(np.float32), K, N, block, dtype)
    tol = 2e-6 if dtype == np.float32 else 2e-3
    assert np.abs(out.astype(np.float64) - ref).max() < tol * np.abs(ref).max()
    if dtype == np.float32:
        best = op_session(_model(K, N, block, leading=2), True).run(None, {"A": x})[0]
        np.testing.assert_allclose(out, best, rtol=1e-6, atol=1e-6)  # integer products exact, float sums reordered


def test_extreme_levels_do_not_saturate(lib):
    """B at ±127 everywhere with A at its block's maximum: on AVX2 a level x int8 pair sum would overflow the
    int16 of VPMADDUBSW (2 · 255 · 127) were the 8-bit levels not split into nibbles."""
    K, N, block = 64, 16, 64
    rng = np.random.default_rng(5)
    q = np.where(rng.random((K, N)) < 0.5, 127, -127).astype(np.int8)
    q[:, 0] = 127
    model = helper.make_model(
        helper.make_graph([helper.make_node(dqmm.OP_TYPE, list(dqmm.INPUT_NAMES), ["Y"], domain=dqmm.DOMAIN,
                                            block_size=block)], "g",
                          [helper.make_tensor_value_info("A", F32, [1, K])], [helper.make_tensor_value_info("Y", F32, [1, N])],
                          [numpy_helper.from_array(q, "B"), numpy_helper.from_array(np.ones(N, np.float32), "scale"),
                           numpy_helper.from_array(np.zeros(N, np.float32), "bias")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(dqmm.DOMAIN, 1)],
        functions=[dqmm.function(17)]).SerializeToString()
    x = np.full((1, K), 3.0, np.float32)
    expected = 3.0 * q.astype(np.float64).sum(axis=0)
    for isa in ("avx512", "avx2", "portable"):
        np.testing.assert_allclose(op_session(model, True, {"TARDIS_OPS_ISA": isa}).run(None, {"A": x})[0][0], expected,
                                   rtol=1e-6)
    assert expected[0] == 3.0 * 127 * K


def test_weights_fed_as_inputs_are_read_on_every_call(lib):
    """Only initializer weights are repacked once: weights that are graph inputs may change (even in place)."""
    K, N, block = 64, 32, 32
    sess = op_session(_model(K, N, block, constant=False), library=True)
    rng = np.random.default_rng(8)
    feed = {"A": rng.standard_normal((3, K)).astype(np.float32), "B": rng.integers(-127, 128, (K, N), dtype=np.int8),
            "scale": rng.random(N).astype(np.float32), "bias": np.zeros(N, np.float32)}
    first = sess.run(None, feed)[0]
    feed["B"][:] = rng.integers(-127, 128, feed["B"].shape, dtype=np.int8)  # same buffer, new levels
    second = sess.run(None, feed)[0]
    fresh = op_session(_model(K, N, block, constant=False), library=True).run(None, feed)[0]
    assert np.abs(second - first).max() > 0.1
    np.testing.assert_array_equal(second, fresh)


def test_malformed_inputs_are_clear_errors(lib):
    K, N, block = 64, 32, 32
    sess = op_session(_model(K, N, block, constant=False), library=True)
    good = {"A": np.ones((3, K), np.float32), "B": np.zeros((K, N), np.int8), "scale": np.ones(N, np.float32),
            "bias": np.zeros(N, np.float32)}
    assert sess.run(None, good)[0].shape == (3, N)
    bad = [("A", np.ones((3, K + 1), np.float32), "A must have shape [..., K] with K = 64"),
           ("B", np.zeros((K, N, 1), np.int8), "B must have shape [K, N], got [64, 32, 1]"),
           ("B", np.zeros((K + 1, N), np.int8), "A must have shape [..., K] with K = 65 (B's rows), got [3, 64]"),
           ("scale", np.ones(N + 1, np.float32), "scale must have shape [N] = [32]"),
           ("bias", np.zeros(N - 1, np.float32), "bias must have shape [N] = [32], got [31]")]
    for name, value, needle in bad:
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=re.escape(needle)):
            sess.run(None, {**good, name: value})
    refused = [({"block": 48}, "block_size must be 16, 32, 64 or 128, got 48"),
               ({"node_inputs": ("A", "B", "scale", "")}, r"input 3 \(bias\) is required"),
               ({"node_inputs": ("A", "B", "scale")}, r"input 3 \(bias\) is required")]
    for kwargs, needle in refused:  # at session creation, not a crash or a garbled read at run time
        args = {"K": K, "N": N, "block": block, **kwargs}
        with pytest.raises(Exception, match=needle):
            op_session(_model(**args), library=True)

