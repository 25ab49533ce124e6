"""The ``ai.tardis::GuardedFallback`` op as ONNX: its model-local function and node constructor.

The op (specified in ``csrc/OP_SPEC.md``) adds the exact correction of the flagged neurons back onto the
folded linear output. Every model we emit carries the op *also* as a model-local function whose body
computes the same formula densely with standard ONNX ops, so that a runtime without our compiled library
(``libtardis_ops``) inlines the body and still computes the right answer; with the library registered,
ONNX Runtime runs the fast kernel instead.

Dense body, drawn::

    x ──MatMul(Transpose(w1t))──Add(b1)──► h ──GELU──► g
                                           └──► alpha·h + beta ─► lin
    h_hat ──(h_hat < lo) or (h_hat > hi)──► flag
    corr = Where(flag, g − lin, 0)
    y = y_lin + corr · w2
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from tardis_compile.gelu import VARIANTS as GELU_VARIANTS
from tardis_compile.gelu import gelu

DOMAIN = "ai.tardis"
OP_TYPE = "GuardedFallback"
OPSET_VERSION = 1
INPUT_NAMES = ("x", "y_lin", "h_hat", "lo", "hi", "w1t", "b1", "w2", "alpha", "beta")
# The op with the int4 predictor inside (tardis_compile/fused_op.py): ĥ's place taken by the predictor's weights.
FUSED_OP_TYPE = "GuardedFallbackNBits"
FUSED_INPUT_NAMES = ("x", "y_lin", "B", "scales", "zero_points", "bias", *INPUT_NAMES[3:])


FORMULA = (
    "y = y_lin + sum_{j in F} (GELU(h_j) - alpha_j*h_j - beta_j) * w2[j,:], "
    "h_j = x . w1t[j,:] + b1_j (exact), F = {j : h_hat_j < lo_j or h_hat_j > hi_j}; "
    "GELU is erf-GELU when approximate='none', tanh-GELU when approximate='tanh'."
)


def _gelu_nodes(variant: str, dtype: int) -> list[onnx.NodeProto]:
    """Standard-op GELU of ``h`` into ``g`` for one variant, constants in the body's ``dtype``."""
    if variant not in GELU_VARIANTS:
        raise ValueError(f"unknown GELU variant {variant!r}; expected one of {GELU_VARIANTS}")
    n = helper.make_node
    consts = {"half": 0.5, "one": 1.0, "inv_sqrt2": 1.0 / math.sqrt(2.0),
              "k_tanh": math.sqrt(2.0 / math.pi), "c_cubic": 0.044715}
    nodes = [n("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))
             for name, value in consts.items()]
    nodes.append(n("Mul", ["h", "half"], ["half_h"]))
    if variant == "none":  # 0.5·h·(1 + erf(h/√2))
        nodes += [
            n("Mul", ["h", "inv_sqrt2"], ["h_s"]),
            n("Erf", ["h_s"], ["erf_h"]),
            n("Add", ["erf_h", "one"], ["one_p"]),
        ]
    else:  # 0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³)))
        nodes += [
            n("Mul", ["h", "h"], ["h2"]),
            n("Mul", ["h2", "c_cubic"], ["c_h2"]),
            n("Add", ["c_h2", "one"], ["c_h2_p1"]),
            n("Mul", ["h", "c_h2_p1"], ["inner0"]),
            n("Mul", ["inner0", "k_tanh"], ["inner"]),
            n("Tanh", ["inner"], ["tanh_h"]),
            n("Add", ["tanh_h", "one"], ["one_p"]),
        ]
    nodes.append(n("Mul", ["half_h", "one_p"], ["g"]))
    return nodes


def fallback_function(variant: str, opset: int, dtype: int = TensorProto.FLOAT) -> onnx.FunctionProto:
    """The model-local function defining ``GuardedFallback`` with a dense, exact standard-op body.

    ONNX function bodies cannot branch on a string attribute, so the body is specialised to the GELU
    variant of the model being written (``"none"`` = erf, ``"tanh"``); the node keeps the
    ``approximate`` attribute so the compiled kernel and Netron see it. ``opset`` is the model's
    default-domain opset (the body uses ops available since opset 13); ``dtype`` the element type.
    """
    n = helper.make_node
    nodes = [
        n("Transpose", ["w1t"], ["w1"], perm=[1, 0]),
        n("MatMul", ["x", "w1"], ["xw1"]),
        n("Add", ["xw1", "b1"], ["h"]),
        *_gelu_nodes(variant, dtype),
        n("Mul", ["alpha", "h"], ["alpha_h"]),
        n("Add", ["alpha_h", "beta"], ["line"]),
        n("Sub", ["g", "line"], ["corr_all"]),
        n("Less", ["h_hat", "lo"], ["below"]),
        n("Greater", ["h_hat", "hi"], ["above"]),
        n("Or", ["below", "above"], ["flag"]),
        n("Constant", [], ["zero"], value=helper.make_tensor("zero", dtype, [], [0.0])),
        n("Where", ["flag", "corr_all", "zero"], ["corr"]),
        n("MatMul", ["corr", "w2"], ["corr_out"]),
        n("Add", ["y_lin", "corr_out"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUT_NAMES), ["y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["approximate"],
        doc_string=FORMULA,
    )


def add_function(model: ir.Model, proto: onnx.FunctionProto) -> None:
    """Store ``proto`` as a model-local function of ``model`` (replacing one of the same identifier), with the
    ``ai.tardis`` opset imported."""
    model.opset_imports.setdefault(DOMAIN, OPSET_VERSION)
    function = ir.serde.deserialize_function(proto)
    model.functions[function.identifier()] = function


def fallback_nodes(graph) -> list:
    """The ``GuardedFallback`` and ``GuardedFallbackNBits`` nodes of an ``onnx_ir`` graph (the blocks
    tardis-compile rewrote)."""
    return [n for n in graph if n.domain == DOMAIN and n.op_type in (OP_TYPE, FUSED_OP_TYPE)]


def input_names(op_type: str) -> tuple[str, ...]:
    """The input names of a fallback op: ``INPUT_NAMES`` or, fused, ``FUSED_INPUT_NAMES``."""
    return FUSED_INPUT_NAMES if op_type == FUSED_OP_TYPE else INPUT_NAMES


def operands(node) -> dict:
    """An ``onnx_ir`` fallback node's inputs by name."""
    return dict(zip(input_names(node.op_type), node.inputs))


def kind(node) -> tuple:
    """(GELU variant, element type) of a fallback ``onnx_ir`` node, from its attribute and its weights."""
    attr = node.attributes.get("approximate")
    w1t = operands(node)["w1t"]
    dtype = w1t.dtype if w1t.dtype is not None else w1t.const_value.dtype
    return (attr.as_string() if attr is not None else "none"), dtype


def block_name(node_name: str) -> str:
    """The FFN block a fallback node rewrote, from its name ``tardis/<block>/GuardedFallback`` ("" if not)."""
    parts = node_name.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "tardis" else ""


def make_fallback_node(inputs: list[str], output: str, variant: str, name: str) -> onnx.NodeProto:
    """A ``GuardedFallback`` node with inputs in the order of ``INPUT_NAMES``."""
    if len(inputs) != len(INPUT_NAMES):
        raise ValueError(f"GuardedFallback takes {len(INPUT_NAMES)} inputs, got {len(inputs)}")
    return helper.make_node(OP_TYPE, inputs, [output], name=name, domain=DOMAIN, approximate=variant)


def standalone_model(
    d: int, D: int, variant: str = "none", dtype: int = TensorProto.FLOAT, opset: int = 17,
    rank: int = 2, with_function: bool = True,
) -> onnx.ModelProto:
    """A model holding one ``GuardedFallback`` node with every operand a graph input.

    For kernel tests and benchmarks: feed x [*lead, d], y_lin [*lead, d], h_hat [*lead, D] with
    ``len(lead) == rank - 1`` symbolic leading axes, and the weights.
    """
    lead = [f"n{i}" for i in range(rank - 1)]
    shapes = {"x": lead + [d], "y_lin": lead + [d], "h_hat": lead + [D], "lo": [D], "hi": [D],
              "w1t": [D, d], "b1": [D], "w2": [D, d], "alpha": [D], "beta": [D]}
    inputs = [helper.make_tensor_value_info(name, dtype, shapes[name]) for name in INPUT_NAMES]
    out = helper.make_tensor_value_info("y", dtype, lead + [d])
    node = make_fallback_node(list(INPUT_NAMES), "y", variant, "guarded_fallback")
    graph = helper.make_graph([node], "guarded_fallback", inputs, [out])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=[fallback_function(variant, opset, dtype)] if with_function else [],
    )
    model.ir_version = 8
    return model


def reference(
    x: np.ndarray, y_lin: np.ndarray, h_hat: np.ndarray, lo: np.ndarray, hi: np.ndarray,
    w1t: np.ndarray, b1: np.ndarray, w2: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
    variant: str = "none",
) -> np.ndarray:
    """Float64 NumPy reference of the op (the test oracle)."""
    f = np.float64
    h = x.astype(f) @ w1t.astype(f).T + b1.astype(f)
    corr = gelu(h, variant) - alpha.astype(f) * h - beta.astype(f)
    flag = (h_hat < lo) | (h_hat > hi)
    return y_lin.astype(f) + np.where(flag, corr, 0.0) @ w2.astype(f)
