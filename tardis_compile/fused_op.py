"""``ai.tardis::GuardedFallbackNBits``: the int4 predictor and the guarded fallback as one node, and the
pass that fuses them.

Pattern (what :func:`rewrite` emits for an int4 predictor) and its fused form::

    x ─┬─► ai.tardis::MatMulNBits(B, scales, zero_points, bias) ─► ĥ ─┐
       ├───────────────────────────────────────────────────────────────┼─► ai.tardis::GuardedFallback ─► y
       └─► y_lin, lo, hi, w1t, b1, w2, alpha, beta ────────────────────┘
    ==>
    x, y_lin, B, scales, zero_points, bias, lo, hi, w1t, b1, w2, alpha, beta ─► ai.tardis::GuardedFallbackNBits ─► y

Why: at a few tokens the two kernels are small (tens of µs at 384×1536) and each pays its own parallel
section; fused, each work item of the compiled kernel predicts its own range of neurons, flags it and adds
their corrections in one pass (``RunFloatFused`` in ``csrc/gf_kernel.cc``), and ``ĥ`` never becomes a
tensor. From 9 tokens on (and for float16) it runs the two kernels one after the other, in one node. The node keeps the
fallback's name, metadata and attribute, and takes the predictor's attributes; its model-local function is
the unfused pair (ONNX Runtime's ``com.microsoft::MatMulNBits`` and the dense fallback body), so a runtime
without ``libtardis_ops`` computes the same. :func:`unfuse` restores the pair, for steps that read ``ĥ``.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx import helper

from tardis_compile import fallback_op, nbits_op

log = logging.getLogger(__name__)

OP_TYPE = fallback_op.FUSED_OP_TYPE
PREDICTOR_INPUTS = nbits_op.INPUT_NAMES[1:]  # B, scales, zero_points, bias
INPUT_NAMES = fallback_op.FUSED_INPUT_NAMES


def fused_function(variant: str, opset: int, dtype: int) -> onnx.FunctionProto:
    """The model-local function: the predictor's contrib node into ``h_hat``, then the fallback's body."""
    fallback = fallback_op.fallback_function(variant, opset, dtype)
    predict = nbits_op.contrib_node(["x", *PREDICTOR_INPUTS], "h_hat")
    return helper.make_function(
        fallback_op.DOMAIN, OP_TYPE, list(INPUT_NAMES), ["y"], [predict, *fallback.node],
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(nbits_op.CONTRIB_DOMAIN, 1)],
        attributes=["approximate", *nbits_op.ATTRIBUTES],
        doc_string=f"h_hat = com.microsoft::MatMulNBits(x, B, scales, zero_points, bias); {fallback_op.FORMULA}")


def check(fallback: ir.Node) -> str:
    """Why a ``GuardedFallback`` node and its predictor cannot be fused ("" when they can)."""
    h_hat = fallback.inputs[2]
    producer = h_hat.producer() if h_hat is not None else None
    if producer is None or (producer.domain, producer.op_type) != (nbits_op.DOMAIN, nbits_op.OP_TYPE):
        return "the predictor is not ai.tardis::MatMulNBits (int4)"
    if producer.inputs[0] is not fallback.inputs[0]:
        return "the predictor reads a different tensor from the fallback's x"
    if len(h_hat.uses()) != 1 or h_hat.is_graph_output():
        return f"ĥ '{h_hat.name}' has other consumers (e.g. Shape reads of the replaced activation)"
    return ""


def fuse(model: ir.Model) -> int:
    """Fuse every fusable predictor + fallback pair of ``model`` (the last step of the rewrite); returns how
    many (logged, with the reasons of the pairs left apart)."""
    fused, kept = 0, {}
    for fallback in list(fallback_op.fallback_nodes(model.graph)):
        if fallback.op_type != fallback_op.OP_TYPE:
            continue
        reason = check(fallback)
        if reason:
            kept[reason] = kept.get(reason, 0) + 1
            continue
        predictor = fallback.inputs[2].producer()
        inputs = [fallback.inputs[0], fallback.inputs[1], *predictor.inputs[1:], *fallback.inputs[3:]]
        node = ir.Node(fallback_op.DOMAIN, OP_TYPE, inputs,
                       attributes=[*fallback.attributes.values(), *predictor.attributes.values()],
                       name=fallback.name, doc_string=fallback.doc_string)
        node.metadata_props.update(fallback.metadata_props)
        _replace(model.graph, [predictor, fallback], [node], fallback.outputs[0])
        fused += 1
        _register(model, node)
    log.info("fused %d int4 predictor + GuardedFallback pair(s) into %s%s", fused, OP_TYPE,
             "".join(f"; {n} left apart: {why}" for why, n in kept.items()))
    return fused


def unfuse(model: ir.Model) -> int:
    """The reverse of :func:`fuse` (``ĥ`` back as a tensor named ``<block>/h_hat``), for steps that read ``ĥ``
    (verification); returns how many. :func:`fuse` restores the model."""
    nodes = [n for n in model.graph if (n.domain, n.op_type) == (fallback_op.DOMAIN, OP_TYPE)]
    for node in nodes:
        operand = fallback_op.operands(node)
        attrs = node.attributes
        prefix = node.name.rsplit("/", 1)[0]
        predictor = ir.Node(nbits_op.DOMAIN, nbits_op.OP_TYPE,
                            [operand["x"], *(operand[n] for n in PREDICTOR_INPUTS)],
                            attributes=[attrs[a] for a in nbits_op.ATTRIBUTES], name=f"{prefix}/h_hat")
        predictor.outputs[0].name = f"{prefix}/h_hat"
        fallback = ir.Node(fallback_op.DOMAIN, fallback_op.OP_TYPE,
                           [operand["x"], operand["y_lin"], predictor.outputs[0],
                            *(operand[n] for n in fallback_op.INPUT_NAMES[3:])],
                           attributes=[attrs["approximate"]] if "approximate" in attrs else [],
                           name=node.name, doc_string=node.doc_string)
        fallback.metadata_props.update(node.metadata_props)
        _replace(model.graph, [node], [predictor, fallback], node.outputs[0])
    nbits_op.register(model)  # the fallback's function stays in every rewritten model
    return len(nodes)


def _replace(graph: ir.Graph, old: list[ir.Node], new: list[ir.Node], output: ir.Value) -> None:
    """Put ``new`` where ``old`` was; the last new node's output takes over ``output`` (name and type)."""
    graph.insert_before(old[0], new)
    out = new[-1].outputs[0]
    name, out.type, out.shape = output.name, output.type, output.shape
    output.name = f"{name}/replaced"
    output.replace_all_uses_with(out, replace_graph_outputs=True)
    for node in reversed(old):
        graph.remove(node, safe=True)
    out.name = name


def _register(model: ir.Model, node: ir.Node) -> None:
    """Give ``model`` the fused function for ``node``'s GELU variant and element type (once)."""
    if (fallback_op.DOMAIN, OP_TYPE, "") in model.functions:
        return
    variant, dtype = fallback_op.kind(node)
    model.opset_imports.setdefault(nbits_op.CONTRIB_DOMAIN, 1)
    fallback_op.add_function(model, fused_function(variant, model.opset_imports[""], int(dtype)))
