"""``ai.tardis::MatMulNBits``: the int4 predictor's product, run by our compiled kernel.

Same inputs, attributes and arithmetic as ONNX Runtime's ``com.microsoft::MatMulNBits`` at
``accuracy_level=4`` (int8 activations, one scale per block of K), for ``bits=4``; specified in
``csrc/OP_SPEC.md``. ONNX Runtime's own kernel is fine at one token but dequantizes the weights to a
float32 GEMM from a few tokens on; ours (``csrc/nbits_kernel.cc``) keeps them 4-bit all the way into the
integer dot products: as fast at one token, 1.5–2× faster from 16 tokens on (``bench/bench_nbits.py``).

Like ``GuardedFallback``, the op is also a model-local function whose body is the contrib op itself, so a
runtime without ``libtardis_ops`` runs ``com.microsoft::MatMulNBits`` with the same inputs::

    A ──┐
    B, scales, zero_points, bias ──► com.microsoft::MatMulNBits(K, N, bits, block_size, accuracy_level) ──► Y
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

from tardis_compile.fallback_op import DOMAIN, add_function

OP_TYPE = "MatMulNBits"
CONTRIB_DOMAIN = "com.microsoft"
INPUT_NAMES = ("A", "B", "scales", "zero_points", "bias")
ATTRIBUTES = ("K", "N", "bits", "block_size", "accuracy_level")
BITS = 4  # the bit width the kernel implements; other widths stay on the contrib op


def contrib_node(inputs: list[str], output: str) -> onnx.NodeProto:
    """``com.microsoft::MatMulNBits`` of a function body: ``inputs`` in the order of ``INPUT_NAMES`` (no
    g_idx), its attributes taken from the calling node's."""
    body = helper.make_node(OP_TYPE, [*inputs[:4], "", inputs[4]], [output], domain=CONTRIB_DOMAIN)
    for name in ATTRIBUTES:
        body.attribute.append(onnx.AttributeProto(name=name, ref_attr_name=name, type=onnx.AttributeProto.INT))
    return body


def nbits_function() -> onnx.FunctionProto:
    """The model-local function: one ``com.microsoft::MatMulNBits`` node taking the node's attributes."""
    body = contrib_node(list(INPUT_NAMES), "Y")
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUT_NAMES), ["Y"], [body],
                                opset_imports=[helper.make_opsetid(CONTRIB_DOMAIN, 1)], attributes=list(ATTRIBUTES),
                                doc_string="com.microsoft::MatMulNBits (accuracy_level 4, bits 4) by libtardis_ops")


def register(model: ir.Model) -> None:
    """Give ``model`` the function (and opsets) when any of its nodes is this op; no-op otherwise."""
    if not any(node.domain == DOMAIN and node.op_type == OP_TYPE for node in model.graph):
        return
    model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
    add_function(model, nbits_function())
