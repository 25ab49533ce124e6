"""``ai.tardis::DequantizeMatMul``: the int8 fold's product (``--fold-bits 8``), run by our compiled kernel.

``Y = A · DequantizeLinear(B, scale, axis=1) + bias`` with ``B`` int8 ``(K, N)`` (symmetric, no zero point) and
one scale per output column, as :func:`tardis_compile.quantize.int8_columns` stores ``W_f``. The kernel
(``csrc/nbits_kernel.cc`` at 8 bits) rounds ``A`` to int8 in blocks of ``block_size`` values of K, as ONNX
Runtime's ``MatMulNBits`` does at ``accuracy_level=4``, and keeps ``B`` in 8 bits all the way into the integer
dot products. Why our own: ONNX Runtime 1.25 and later fuse the standard spelling into an 8-bit
``MatMulNBits``, 1.27-1.53x slower than ours at one token and 1.89-3.26x from 16 tokens on
(``bench/results/nbits8.md``); older versions dequantize ``B`` on every call.

The op is also a model-local function whose body is that standard spelling, so a runtime without
``libtardis_ops`` computes the same product: in float before ONNX Runtime 1.25, from 1.25 on as an 8-bit
``MatMulNBits`` that rounds ``A`` in blocks of 32 like the kernel at ``block_size=32``::

    B, scale ─► DequantizeLinear(axis=1) ─► W ─┐
    A ─────────────────────────────────────────┴─► MatMul ─► Add(bias) ─► Y
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

from tardis_compile.fallback_op import DOMAIN, add_function

OP_TYPE = "DequantizeMatMul"
INPUT_NAMES = ("A", "B", "scale", "bias")
ATTRIBUTES = ("block_size",)
# Values of K per activation scale that tardis-compile writes: ONNX Runtime's fused 8-bit MatMulNBits rounds
# in blocks of 32, so with and without the library the fold computes the same to float rounding (4e-7 of
# the output, onnxruntime 1.32). Blocks of 128 ran the same at one token and 2x faster at 128 tokens (before
# the 8-bit tile's many-token changes of 2026-12-01, which shrank the per-block cost they save).
BLOCK_SIZE = 32


def function(opset: int) -> onnx.FunctionProto:
    """The model-local function at the model's default-domain ``opset`` (13 or later: ``axis``)."""
    n = helper.make_node
    body = [n("DequantizeLinear", ["B", "scale"], ["W"], axis=1), n("MatMul", ["A", "W"], ["AW"]),
            n("Add", ["AW", "bias"], ["Y"])]
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUT_NAMES), ["Y"], body,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
                                doc_string="A · DequantizeLinear(B, scale, axis=1) + bias; by libtardis_ops with "
                                           "A rounded to int8 per block_size values")


def register(model: ir.Model) -> None:
    """Give ``model`` the function (and opset) when any of its nodes is this op; no-op otherwise."""
    if not any(node.domain == DOMAIN and node.op_type == OP_TYPE for node in model.graph):
        return
    add_function(model, function(model.opset_imports.get("", 17)))
