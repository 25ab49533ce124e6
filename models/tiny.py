"""Tiny hand-built ONNX models of ``Linear → activation → Linear`` blocks, for the pass's tests.

Every way a feed-forward block is *spelled* in real ONNX files gets a builder here, so the matcher can
be tested on each spelling (positive) and on the look-alikes it must leave alone (negative or refused).
The models are small (d=16, D=64 by default), deterministic (``seed``) and float32; each one passes
``onnx.checker.check_model(full_check=True)`` and runs in ONNX Runtime on CPU.

Graph (``layers`` residual blocks, no LayerNorm, so each layer's input is distinct)::

    x ─► x1 = x + FFN_0(x) ─► x2 = x1 + FFN_1(x1) ─► … ─► y

``ffn_model(..., return_params=True)`` also returns the per-layer weights as float64 NumPy arrays, and
``ffn_reference(x, params)`` evaluates the same graph in float64 — the ground truth for tests.

Weights are drawn so that pre-activations are roughly unit-variance (W1 ~ N(0, 1/d), W2 ~ N(0, 1/D),
biases ~ N(0, 0.1²)): GELU's curved region around zero and its linear tails are both exercised. They are
drawn in the same order whatever the spelling, so one ``seed`` gives the same numbers in every spelling.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tardis_compile.gelu import gelu as _gelu64

#: GELU spellings the pass must match, mapped to their GELU variant (ONNX ``Gelu``'s ``approximate``).
GELU_SPELLINGS: dict[str, str] = {
    "erf_op": "none",           # ONNX Gelu (opset 20), approximate="none"
    "tanh_op": "tanh",          # ONNX Gelu (opset 20), approximate="tanh"
    "erf_decomposed": "none",   # TorchScript exporter: Div(√2) → Erf → Add(1) → Mul(h) → Mul(0.5)
    "erf_decomposed_dynamo": "none",  # dynamo exporter: Div(√2) → Erf → Add(1) → Mul(0.5, ·) → Mul(h, ·)
    "tanh_decomposed": "tanh",  # GPT-2 gelu_new as exported: Mul/Pow/Mul/Add/Mul/Tanh/Add/Mul
    "tanh_decomposed_bloom": "tanh",  # BLOOM: 0.5h · (1 + tanh(0.79788456h · (1 + 0.044715h·h)))
    "ms_gelu": "none",          # com.microsoft Gelu (erf)
    "ms_fastgelu": "tanh",      # com.microsoft FastGelu(h, bias) (tanh approximation)
    "ms_biasgelu": "none",      # com.microsoft BiasGelu(h, bias) (erf)
}
#: Activations that look like GELU blocks but are not: the pass must not match them as GELU.
NON_GELU_ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "relu", "silu")
ACTIVATIONS: tuple[str, ...] = (*GELU_SPELLINGS, *NON_GELU_ACTIVATIONS)
#: Spellings of the two Linear layers.
LINEAR_SPELLINGS: tuple[str, ...] = ("matmul_add", "matmul_add_swapped", "gemm", "gemm_reshape",
                                     "transpose_matmul")
#: ``shared_intermediate`` values: which tensor of the block gets a second use.
SHARED_INTERMEDIATE: tuple[str, ...] = ("gelu", "preact", "gelu_output")

_BIAS_IN_ACTIVATION = ("ms_fastgelu", "ms_biasgelu")  # these take b1 as the activation's 2nd input
_NEEDS_OPSET_20 = ("erf_op", "tanh_op")
DEFAULT_OPSET = 17
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # opset 20/21 era; read by every ONNX Runtime this project supports (>= 1.21)


class _Graph:
    """Accumulates nodes, initializers and extra inputs/outputs, with unique node names."""

    def __init__(self, constants: Literal["node", "initializer"], half: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.constants = constants
        self.half = half  # float16 model: weights and biases are stored as float16
        self._count: dict[str, int] = {}

    def name(self, base: str) -> str:
        """A unique name ``base`` or ``base_<k>``."""
        k = self._count.get(base, 0)
        self._count[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def op(self, op_type: str, inputs: list[str], scope: str, domain: str = "", **attrs: Any) -> str:
        """Add a node named ``scope/op_type`` with one output of the same name; return the output."""
        name = self.name(f"{scope}/{op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, domain=domain, **attrs))
        return name

    def init(self, name: str, array: np.ndarray, weight: bool = True) -> str:
        """An initializer; in a float16 model, float32 weights and biases are stored as float16
        (``weight=False`` keeps float32: the activation's own constants, computed in float32)."""
        if self.half and weight and array.dtype == np.float32:
            array = array.astype(np.float16)
        self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def const(self, scope: str, value: Any, dtype: type = np.float32) -> str:
        """A constant, as a ``Constant`` node (TorchScript style) or an initializer (dynamo style)."""
        array = np.asarray(value, dtype=dtype)
        if self.constants == "initializer":
            return self.init(self.name(f"{scope}/const"), array, weight=False)
        name = self.name(f"{scope}/Constant")
        self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                           value=numpy_helper.from_array(array, name)))
        return name


# ---------------------------------------------------------------------------------------------------
# Linear spellings
# ---------------------------------------------------------------------------------------------------

def _weight(g: _Graph, name: str, stored: np.ndarray, source: str, out_axis: int) -> tuple[str, np.ndarray]:
    """Make the weight tensor ``name`` from ``stored`` (its on-file layout); return (name, value).

    ``source``: ``"initializer"``; ``"input"`` (a graph input — non-constant, must be refused);
    ``"quantized"`` (``DequantizeLinear`` of an int8 initializer with a per-output-channel scale along
    ``out_axis`` — must be refused). The returned value is what the graph computes with (float32).
    """
    if source == "initializer":
        g.init(name, stored.astype(np.float32))
        return name, stored.astype(np.float32)
    if source == "input":
        value = stored.astype(np.float32)
        g.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
        g.feeds[name] = value
        return name, value
    if source == "quantized":
        reduce_axes = tuple(a for a in range(stored.ndim) if a != out_axis)
        scale = (np.abs(stored).max(axis=reduce_axes) / 127.0).astype(np.float32)
        shape = [1] * stored.ndim
        shape[out_axis] = -1
        q = np.clip(np.round(stored / scale.reshape(shape)), -127, 127).astype(np.int8)
        zero_point = np.zeros_like(scale, dtype=np.int8)
        inputs = [g.init(f"{name}_quantized", q), g.init(f"{name}_scale", scale),
                  g.init(f"{name}_zero_point", zero_point)]
        g.nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}/DequantizeLinear",
                                        axis=out_axis))
        return name, (q.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
    raise ValueError(f"unknown weight source {source!r}")


def _linear(g: _Graph, x: str, W: np.ndarray, b: np.ndarray | None, spelling: str, scope: str,
            source: str = "initializer") -> tuple[str, np.ndarray]:
    """``x·W + b`` in one of ``LINEAR_SPELLINGS``; W is [in, out]. Return (output, W as computed).

    Layouts follow the exporters: ``nn.Linear`` stores W^T ([out, in]; ``gemm``, ``transpose_matmul``),
    GPT-2's ``Conv1D`` stores W ([in, out]; ``gemm_reshape``, exported as ``addmm``).
    """
    d_in, d_out = W.shape
    if spelling in ("matmul_add", "matmul_add_swapped"):
        w, W_used = _weight(g, f"{scope}.weight", W, source, out_axis=1)
        h = g.op("MatMul", [x, w], scope)
    elif spelling == "transpose_matmul":
        wt, Wt_used = _weight(g, f"{scope}.weight", W.T, source, out_axis=0)
        W_used = Wt_used.T
        w = g.op("Transpose", [wt], scope, perm=[1, 0])
        h = g.op("MatMul", [x, w], scope)
    elif spelling == "gemm":
        wt, Wt_used = _weight(g, f"{scope}.weight", W.T, source, out_axis=0)
        W_used = Wt_used.T
        inputs = [x, wt] + ([g.init(f"{scope}.bias", b.astype(np.float32))] if b is not None else [])
        return g.op("Gemm", inputs, scope, alpha=1.0, beta=1.0, transB=1), W_used
    elif spelling == "gemm_reshape":
        # As the TorchScript exporter writes GPT-2's Conv1D (x.view(-1, d) → addmm → view(*lead, out)):
        # flatten shape = Concat([-1], Unsqueeze(Squeeze(Slice(Shape(x), -1:)))),
        # restore shape = Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [out]).
        w, W_used = _weight(g, f"{scope}.weight", W, source, out_axis=1)
        i64 = np.int64
        shape = g.op("Shape", [x], scope)
        batch = g.op("Gather", [shape, g.const(scope, 0, i64)], scope, axis=0)
        shape1 = g.op("Shape", [x], scope)
        seq = g.op("Gather", [shape1, g.const(scope, 1, i64)], scope, axis=0)
        shape2 = g.op("Shape", [x], scope)
        last = g.op("Slice", [shape2, g.const(scope, [-1], i64), g.const(scope, [np.iinfo(i64).max], i64),
                              g.const(scope, [0], i64)], scope)
        last = g.op("Squeeze", [last, g.const(scope, [0], i64)], scope)
        last = g.op("Unsqueeze", [last, g.const(scope, [0], i64)], scope)
        flat_shape = g.op("Concat", [g.const(scope, [-1], i64), last], scope, axis=0)
        flat = g.op("Reshape", [x, flat_shape], scope)
        inputs = [flat, w] + ([g.init(f"{scope}.bias", b.astype(np.float32))] if b is not None else [])
        h2 = g.op("Gemm", inputs, scope, alpha=1.0, beta=1.0)
        out_shape = g.op("Concat", [g.op("Unsqueeze", [batch, g.const(scope, [0], i64)], scope),
                                    g.op("Unsqueeze", [seq, g.const(scope, [0], i64)], scope),
                                    g.const(scope, [d_out], i64)], scope, axis=0)
        return g.op("Reshape", [h2, out_shape], scope), W_used
    else:
        raise ValueError(f"unknown linear spelling {spelling!r}; expected one of {LINEAR_SPELLINGS}")
    if b is not None:
        bias = g.init(f"{scope}.bias", b.astype(np.float32))
        # The TorchScript exporter writes Add(bias, MatMul(...)); dynamo writes Add(MatMul(...), bias).
        h = g.op("Add", [bias, h] if spelling == "matmul_add_swapped" else [h, bias], scope)
    return h, W_used


# ---------------------------------------------------------------------------------------------------
# Activation spellings
# ---------------------------------------------------------------------------------------------------

def _activation(g: _Graph, h: str, spelling: str, scope: str, bias: str | None) -> str:
    """The activation of ``h`` in ``spelling``; ``bias`` is b1 for the bias-taking com.microsoft ops."""
    c = lambda v: g.const(scope, v)  # noqa: E731 — float32 scalar constant
    if spelling == "erf_op":
        return g.op("Gelu", [h], scope, approximate="none")
    if spelling == "tanh_op":
        return g.op("Gelu", [h], scope, approximate="tanh")
    if spelling == "erf_decomposed":  # x * 0.5 * (1 + erf(x / sqrt(2))), TorchScript's aten::gelu
        t = g.op("Div", [h, c(1.4142135)], scope)
        t = g.op("Erf", [t], scope)
        t = g.op("Add", [t, c(1.0)], scope)
        t = g.op("Mul", [h, t], scope)
        return g.op("Mul", [t, c(0.5)], scope)
    if spelling == "erf_decomposed_dynamo":  # the same formula as torch.onnx's dynamo exporter orders it
        t = g.op("Div", [h, c(1.4142135)], scope)
        t = g.op("Erf", [t], scope)
        t = g.op("Add", [t, c(1.0)], scope)
        t = g.op("Mul", [c(0.5), t], scope)
        return g.op("Mul", [h, t], scope)
    if spelling == "tanh_decomposed_bloom":  # BLOOM's bloom_gelu_forward, both exporters
        half = g.op("Mul", [h, c(0.5)], scope)
        k = g.op("Mul", [h, c(0.79788456)], scope)
        t = g.op("Mul", [h, c(0.044715)], scope)
        t = g.op("Mul", [t, h], scope)
        t = g.op("Add", [t, c(1.0)], scope)
        t = g.op("Mul", [k, t], scope)
        t = g.op("Tanh", [t], scope)
        t = g.op("Add", [t, c(1.0)], scope)
        return g.op("Mul", [half, t], scope)
    if spelling == "tanh_decomposed":  # GPT-2 gelu_new: 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))
        half = g.op("Mul", [h, c(0.5)], scope)
        t = g.op("Pow", [h, c(3.0)], scope)
        t = g.op("Mul", [t, c(0.044715)], scope)
        t = g.op("Add", [h, t], scope)
        t = g.op("Mul", [t, c(0.7978845608028654)], scope)
        t = g.op("Tanh", [t], scope)
        t = g.op("Add", [t, c(1.0)], scope)
        return g.op("Mul", [half, t], scope)
    if spelling == "ms_gelu":
        return g.op("Gelu", [h], scope, domain=MS_DOMAIN)
    if spelling == "ms_fastgelu":
        return g.op("FastGelu", [h] + ([bias] if bias else []), scope, domain=MS_DOMAIN)
    if spelling == "ms_biasgelu":
        assert bias is not None
        return g.op("BiasGelu", [h, bias], scope, domain=MS_DOMAIN)
    if spelling == "quick_gelu":  # CLIP: x * sigmoid(1.702 x) — GELU-like, but not GELU
        t = g.op("Mul", [h, c(1.702)], scope)
        t = g.op("Sigmoid", [t], scope)
        return g.op("Mul", [h, t], scope)
    if spelling == "relu":
        return g.op("Relu", [h], scope)
    if spelling == "silu":
        t = g.op("Sigmoid", [h], scope)
        return g.op("Mul", [h, t], scope)
    raise ValueError(f"unknown activation {spelling!r}; expected one of {ACTIVATIONS}")


def _activation_in_float32(g: _Graph, h: str, spelling: str, scope: str, bias: str | None) -> str:
    """In a float16 model, the activation runs in float32 between two ``Cast`` nodes, as ONNX Runtime's
    float16 converter writes an op kept in float32 (``op_block_list``) and autocast exports write GELU::

        h (fp16) ─► Cast(to=FLOAT) ─► GELU … ─► Cast(to=FLOAT16) ─► g (fp16)
    """
    if not g.half:
        return _activation(g, h, spelling, scope, bias)
    up = g.op("Cast", [h], scope, to=TensorProto.FLOAT)
    return g.op("Cast", [_activation(g, up, spelling, scope, bias)], scope, to=TensorProto.FLOAT16)


def activation64(h: np.ndarray, activation: str) -> np.ndarray:
    """Float64 NumPy value of an activation spelling (or of a GELU variant ``"none"``/``"tanh"``)."""
    h = np.asarray(h, dtype=np.float64)
    if activation in GELU_SPELLINGS:
        return _gelu64(h, GELU_SPELLINGS[activation])
    if activation in ("none", "tanh"):
        return _gelu64(h, activation)
    if activation == "quick_gelu":
        return h / (1.0 + np.exp(-1.702 * h))
    if activation == "relu":
        return np.maximum(h, 0.0)
    if activation == "silu":
        return h / (1.0 + np.exp(-h))
    raise ValueError(f"unknown activation {activation!r}")


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------

def ffn_model(
    d: int = 16,
    D: int = 64,
    *,
    gelu: str = "erf_op",
    linear: str = "matmul_add",
    bias: bool = True,
    layers: int = 1,
    seed: int = 0,
    rank: int = 3,
    opset: int | None = None,
    gated: bool = False,
    shared_intermediate: bool | str = False,
    weights_as_inputs: bool = False,
    quantized: bool = False,
    constants: Literal["node", "initializer"] = "node",
    dtype: Literal["float32", "float16"] = "float32",
    return_params: bool = False,
) -> onnx.ModelProto | tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A model of ``layers`` residual FFN blocks ``x ← x + W2ᵀ·act(W1ᵀ·x + b1) + b2`` (row convention).

    Args:
        d, D: model and intermediate widths.
        gelu: the activation spelling, one of ``ACTIVATIONS`` (GELU spellings and non-GELU look-alikes).
        linear: spelling of both Linear layers, one of ``LINEAR_SPELLINGS``. ``"gemm"`` needs ``rank=2``
            (Gemm is 2-D only); ``"gemm_reshape"`` needs ``rank=3``.
        bias: whether the Linear layers have biases (Falcon has none). ``ms_biasgelu`` needs one.
        rank: 3 → input ``x`` [batch, seq, d]; 2 → [n, d].
        opset: default-domain opset; default 17, or 20 for the ONNX ``Gelu`` op spellings.
        gated: Gemma-style gated block ``down(act(gate(x)) ⊙ up(x))`` — must be refused.
        shared_intermediate: give a block tensor a second use — must be refused. ``"gelu"`` (or True):
            the activation output also feeds a ``ReduceSum`` whose result is graph output ``aux{i}``;
            ``"preact"``: the same for the pre-activation; ``"gelu_output"``: the activation output is
            itself a graph output (no second node consumer — a pass looking only at node uses misses it).
        weights_as_inputs: W1 is a graph input (non-constant weights) — must be refused; its value is
            in ``params[i]["feeds"]``.
        quantized: W1 is ``DequantizeLinear`` of an int8 initializer — must be refused. ``params`` hold the
            dequantized W1. Note ONNX Runtime's default optimisation level fuses ``DequantizeLinear →
            MatMul`` into ``MatMulNBits``, which also quantises the activations (errors ~1e-2): compare
            with the reference at ``ORT_ENABLE_BASIC`` for exact results.
        constants: scalar and shape constants as ``Constant`` nodes (TorchScript exporter style) or as
            initializers (dynamo exporter style).
        dtype: ``"float16"`` stores x, y, weights and biases as float16 and computes the activation in
            float32 between ``Cast`` nodes; ``params`` then hold the float16-rounded weights.
        return_params: also return the per-layer parameters (see below).

    Returns:
        The model, or ``(model, params)`` with one dict per layer: ``W1`` [d, D], ``b1`` [D], ``W2``
        [D, d], ``b2`` [d] (float64 copies of the float32 values the graph computes with; zero biases
        when ``bias=False``), ``variant`` (``"none"``/``"tanh"`` for GELU spellings, else ``None``),
        ``activation`` (the spelling), ``bias`` (bool), ``gated`` (and ``Wu`` [d, D], ``bu`` [D] when
        gated: W1 is then the gate), ``feeds`` (extra graph inputs to feed, name → array) and ``names``
        (initializer/input names of W1, b1, W2, b2 in the graph).
    """
    if gelu not in ACTIVATIONS:
        raise ValueError(f"unknown activation {gelu!r}; expected one of {ACTIVATIONS}")
    if linear not in LINEAR_SPELLINGS:
        raise ValueError(f"unknown linear spelling {linear!r}; expected one of {LINEAR_SPELLINGS}")
    if rank not in (2, 3):
        raise ValueError("rank must be 2 or 3")
    if linear == "gemm" and rank != 2:
        raise ValueError("linear='gemm' needs rank=2 (Gemm is 2-D); use 'gemm_reshape' for rank 3")
    if linear == "gemm_reshape" and rank != 3:
        raise ValueError("linear='gemm_reshape' needs rank=3 input [batch, seq, d]")
    if gelu == "ms_biasgelu" and not bias:
        raise ValueError("ms_biasgelu takes the bias as an input; it needs bias=True")
    if weights_as_inputs and quantized:
        raise ValueError("choose one of weights_as_inputs and quantized")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    half = dtype == "float16"
    if half and (weights_as_inputs or quantized):
        raise ValueError("dtype='float16' is for plain, gated and shared-intermediate blocks only")
    shared = {False: None, True: "gelu"}.get(shared_intermediate, shared_intermediate)  # type: ignore[call-overload]
    if shared is not None and shared not in SHARED_INTERMEDIATE:
        raise ValueError(f"shared_intermediate must be a bool or one of {SHARED_INTERMEDIATE}")
    min_opset = 20 if gelu in _NEEDS_OPSET_20 else 13
    opset = opset if opset is not None else max(DEFAULT_OPSET, min_opset)
    if opset < min_opset:
        raise ValueError(f"gelu={gelu!r} needs opset >= {min_opset}, got {opset}")

    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    g = _Graph(constants, half)
    lead = ["batch", "seq"] if rank == 3 else ["n"]
    w1_source = "input" if weights_as_inputs else "quantized" if quantized else "initializer"
    bias_in_act = gelu in _BIAS_IN_ACTIVATION
    params: list[dict[str, Any]] = []
    x = "x"
    for i in range(layers):
        # Draw everything in a fixed order so one seed gives the same numbers in every spelling.
        W1 = rng.normal(0.0, 1.0 / math.sqrt(d), (d, D)).astype(np.float32)
        b1 = rng.normal(0.0, 0.1, D).astype(np.float32)
        W2 = rng.normal(0.0, 1.0 / math.sqrt(D), (D, d)).astype(np.float32)
        b2 = rng.normal(0.0, 0.1, d).astype(np.float32)
        Wu = rng.normal(0.0, 1.0 / math.sqrt(d), (d, D)).astype(np.float32)
        bu = rng.normal(0.0, 0.1, D).astype(np.float32)
        if not bias:
            b1, b2, bu = np.zeros_like(b1), np.zeros_like(b2), np.zeros_like(bu)
        if half:  # the values the float16 graph computes with
            W1, b1, W2, b2, Wu, bu = (a.astype(np.float16).astype(np.float32) for a in (W1, b1, W2, b2, Wu, bu))
        scope = f"layer{i}"
        fc1 = f"{scope}.fc1" if not gated else f"{scope}.gate"
        b1_for_linear = b1 if bias and not bias_in_act else None
        h, W1_used = _linear(g, x, W1, b1_for_linear, linear, fc1, source=w1_source)
        # A bias fused into the activation op has the activation's type (float32 in a float16 model).
        b1_act = g.init(f"{fc1}.bias", b1, weight=False) if bias and bias_in_act else None
        a = _activation_in_float32(g, h, gelu, f"{scope}.act", b1_act)
        if shared in ("gelu", "preact"):
            t = a if shared == "gelu" else h
            aux = g.op("ReduceSum", [t, g.const(f"{scope}.aux", [-1], np.int64)], f"{scope}.aux", keepdims=1)
            g.outputs.append(helper.make_tensor_value_info(aux, elem, lead + [1]))
        elif shared == "gelu_output":
            g.outputs.append(helper.make_tensor_value_info(a, elem, lead + [D]))
        if gated:
            u, _ = _linear(g, x, Wu, bu if bias else None, linear, f"{scope}.up")
            a = g.op("Mul", [a, u], f"{scope}.gated")
        f, _ = _linear(g, a, W2, b2 if bias else None, linear, f"{scope}.fc2" if not gated else f"{scope}.down")
        x = g.op("Add", [x, f], f"{scope}.residual")
        p: dict[str, Any] = {
            "W1": W1_used.astype(np.float64), "b1": b1.astype(np.float64),
            "W2": W2.astype(np.float64), "b2": b2.astype(np.float64),
            "variant": GELU_SPELLINGS.get(gelu), "activation": gelu, "bias": bias, "gated": gated,
            "feeds": {k: v for k, v in g.feeds.items() if k.startswith(f"{scope}.")},
            "names": {"W1": f"{fc1}.weight", "b1": f"{fc1}.bias" if bias else None,
                      "W2": f"{scope}.{'down' if gated else 'fc2'}.weight",
                      "b2": f"{scope}.{'down' if gated else 'fc2'}.bias" if bias else None},
        }
        if gated:
            p["Wu"], p["bu"] = Wu.astype(np.float64), bu.astype(np.float64)
        params.append(p)
    # The last residual Add's output is renamed to the graph output "y".
    g.nodes[-1].output[0] = "y"

    graph = helper.make_graph(
        g.nodes, f"ffn_{gelu}_{linear}",
        [helper.make_tensor_value_info("x", elem, lead + [d]), *g.inputs],
        [helper.make_tensor_value_info("y", elem, lead + [d]), *g.outputs],
        initializer=g.initializers,
    )
    imports = [helper.make_opsetid("", opset)]
    if any(n.domain == MS_DOMAIN for n in g.nodes):
        imports.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION,
                              producer_name="tardis_compile.models.tiny")
    model.doc_string = (f"{layers} residual FFN block(s) d={d} D={D}: activation={gelu}, linear={linear}, "
                        f"bias={bias}, gated={gated}, shared_intermediate={shared}, "
                        f"weights_as_inputs={weights_as_inputs}, quantized={quantized}, seed={seed}")
    return (model, params) if return_params else model


def ffn_reference(x: np.ndarray, params: list[dict[str, Any]]) -> np.ndarray:
    """Output ``y`` of ``ffn_model``'s graph for input ``x`` [..., d], in float64."""
    y = np.asarray(x, dtype=np.float64)
    for p in params:
        a = activation64(y @ p["W1"] + p["b1"], p["activation"])
        if p["gated"]:
            a = a * (y @ p["Wu"] + p["bu"])
        y = y + a @ p["W2"] + p["b2"]
    return y


def random_input(d: int = 16, *, rank: int = 3, batch: int = 2, seq: int = 5, seed: int = 0,
                 dtype: str = "float32") -> np.ndarray:
    """An input for ``ffn_model``: [batch, seq, d] (rank 3) or [batch·seq, d] (rank 2), N(0, 1)."""
    shape = (batch, seq, d) if rank == 3 else (batch * seq, d)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
