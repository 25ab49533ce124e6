"""Rewrite a matched block into its folded form plus the guarded fallback.

Emitted graph (the block's output keeps its original tensor name, so consumers are untouched)::

    x ─┬─► MatMul(W_f) ─► Add(b_f) (int8 W_f: _fold) ─────────► y_lin ─┐
       ├─► predictor (e.g. com.microsoft::MatMulNBits with bias b1) ─► ĥ ──┤
       │   range_lo ─► Add(margin) ─► lo      range_hi ─► Sub(margin) ─► hi ┤ (constant-folded by ORT;
       │                                                                    │  float16: float32, then Cast;
       │                                                                    │  no margin: ranges go straight in)
       └───────────────────────────────────────────────────────────────────┴─► ai.tardis::GuardedFallback ─► y

The folded part is standard ``MatMul``/``Add`` (int8 W_f: our ``DequantizeMatMul``, see :func:`_fold`);
``GuardedFallback`` and ``DequantizeMatMul`` are our compiled kernels when ``libtardis_ops`` is registered and
their model-local function bodies otherwise. An int4
predictor (``ai.tardis::MatMulNBits``) whose ``ĥ`` nothing else reads is then fused with the fallback into
one ``ai.tardis::GuardedFallbackNBits`` node (:mod:`tardis_compile.fused_op`).
The guards are the fitted range shrunk by the predictor's safety margin; they are spelled as
``range ± margin`` so the file keeps both (verification measures recall against the true range).
Provenance (source nodes, coverage, fallback rate, predictor, tool version) goes into the node's
``metadata_props`` so Netron shows what happened.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tardis_compile import dequantize_matmul_op, fallback_op, fused_op, nbits_op, quantize
from tardis_compile.fit import Lines
from tardis_compile.passes.ffn_match import FfnBlock, describe
from tardis_compile.predictor import MS_DOMAIN, AddInitializer, deferred


@dataclasses.dataclass
class FoldedBlock:
    """Everything the rewrite needs for one block."""

    block: FfnBlock
    lines: Lines
    w_f: np.ndarray  # (d, d_out) float64
    b_f: np.ndarray  # (d_out,)
    predictor: object  # tardis_compile.predictor.Predictor
    margin: np.ndarray  # (resident neurons,) ≥ 0: the guards are [lo + margin, hi − margin]
    metadata: dict[str, str]
    neurons: np.ndarray | None = None  # resident neurons (None: all); the others are always linear
    fold_bits: int | None = None  # 8: W_f stored as int8 + a scale per output column (DequantizeLinear)
    fold_activations: str = "float"  # int8 (with fold_bits 8): x rounded per call too (DynamicQuantizeMatMul)

    def resident(self, values: np.ndarray) -> np.ndarray:
        """Rows (or entries) of a per-neuron array for the resident neurons only."""
        return values if self.neurons is None else values[self.neurons]


def _initializer_adder(graph: ir.Graph):
    """``add(name, array)``: a new initializer from an array or a deferred tensor (computed when the
    model is written, see :func:`tardis_compile.predictor.deferred`)."""

    def add(name: str, array: np.ndarray | ir.LazyTensor) -> ir.Value:
        tensor = array if isinstance(array, ir.LazyTensor) else ir.Tensor(np.ascontiguousarray(array))
        tensor.name = name
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape),
                         const_value=tensor)
        graph.register_initializer(value)
        return value

    return add


def _node(op: str, inputs: list[ir.Value], name: str, out_name: str, domain: str = "", **attrs) -> ir.Node:
    node = ir.Node(domain, op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                   name=name)
    node.outputs[0].name = out_name
    return node


def _fold(folded: FoldedBlock, add: AddInitializer, prefix: str, x: ir.Value,
          dtype: np.dtype) -> tuple[list[ir.Node], ir.Value]:
    """The folded product ``y_lin = x·W_f + b_f`` as nodes, by how W_f is stored::

        float (model dtype)   x ─► MatMul(W_f) ─► Add(b_f) ─► y_lin
        --fold-bits 8         x ─► ai.tardis::DequantizeMatMul(W_f_int8, scale per column, b_f) ─► y_lin
        + --fold-activations int8
                              x ─► com.microsoft::DynamicQuantizeMatMul(W_f_int8, scale, b_f) ─► y_lin

    ``DequantizeMatMul`` (:mod:`tardis_compile.dequantize_matmul_op`) is our 8-bit kernel, which rounds x to
    int8 per block of K; without ``libtardis_ops`` its body is ``MatMul(DequantizeLinear(W_f_int8, scale))
    + b_f``, which ORT 1.25 and later fuse into an 8-bit ``MatMulNBits`` and older versions dequantize on
    every call. ``DynamicQuantizeMatMul`` rounds x to uint8 (one scale per call) and runs MLAS's integer
    GEMM (AMX or VNNI where the CPU has them) on every ONNX Runtime version.
    """
    b_f = add(f"{prefix}/b_f", folded.b_f.astype(dtype))
    if folded.fold_bits == 8:
        q, scale = quantize.int8_columns(folded.w_f)
        w_q, w_scale = add(f"{prefix}/W_f_int8", q), add(f"{prefix}/W_f_scale", scale.astype(dtype))
        if folded.fold_activations == "int8":
            dqmm = _node("DynamicQuantizeMatMul", [x, w_q, w_scale, None, b_f],
                         f"{prefix}/folded/DynamicQuantizeMatMul", f"{prefix}/y_lin", domain=MS_DOMAIN)
        else:
            dqmm = _node(dequantize_matmul_op.OP_TYPE, [x, w_q, w_scale, b_f], f"{prefix}/folded/DequantizeMatMul",
                         f"{prefix}/y_lin", domain=dequantize_matmul_op.DOMAIN,
                         block_size=dequantize_matmul_op.BLOCK_SIZE)
        return [dqmm], dqmm.outputs[0]
    # the big new weights are deferred: computed one at a time while the model is written
    w_f = add(f"{prefix}/W_f", deferred(folded.w_f.shape, dtype, lambda: folded.w_f.astype(dtype)))
    mm = _node("MatMul", [x, w_f], f"{prefix}/folded/MatMul", f"{prefix}/xW_f")
    y_lin = _node("Add", [mm.outputs[0], b_f], f"{prefix}/folded/Add", f"{prefix}/y_lin")
    return [mm, y_lin], y_lin.outputs[0]


def rewrite_block(graph: ir.Graph, folded: FoldedBlock) -> ir.Node:
    """Insert the folded block, reroute the consumers of the old output, return the fallback node."""
    block, lines = folded.block, folded.lines
    dtype = block.dtype.numpy()
    prefix = f"tardis/{block.name}"
    add = _initializer_adder(graph)
    x = block.x
    fold_nodes, y_lin = _fold(folded, add, prefix, x, dtype)
    folded.predictor.check(block, None if folded.neurons is None else len(folded.neurons))
    pred_nodes, h_hat = folded.predictor.emit(x, add, prefix)
    guard_nodes, (lo, hi) = _guards(folded, add, prefix, dtype)
    keep = folded.resident
    rows = block.hidden if folded.neurons is None else len(folded.neurons)
    w1, w2 = block.w1(), block.w2()
    operands = [
        lo,
        hi,
        add(f"{prefix}/W1t", deferred((rows, block.d), dtype, lambda: np.ascontiguousarray(keep(w1.T), dtype=dtype),
                                      w1)),
        add(f"{prefix}/b1", keep(block.b1()).astype(dtype)),
        add(f"{prefix}/W2", deferred((rows, block.d_out), dtype, lambda: keep(w2).astype(dtype), w2)),
        add(f"{prefix}/alpha", keep(lines.alpha).astype(dtype)),
        add(f"{prefix}/beta", keep(lines.beta).astype(dtype)),
    ]
    fallback = _node(fallback_op.OP_TYPE, [x, y_lin, h_hat, *operands], f"{prefix}/GuardedFallback",
                     f"{prefix}/y", domain=fallback_op.DOMAIN, approximate=block.variant)
    fallback.doc_string = fallback_op.FORMULA
    fallback.metadata_props.update(folded.metadata)
    fallback.metadata_props["tardis.source_nodes"] = ",".join(describe(n) for n in block.nodes)
    fallback.metadata_props["tardis.spelling"] = block.spelling
    first = min(block.nodes, key=lambda n: _position(graph, n))
    # The predictor first, then the fold, then the fallback: ONNX Runtime runs the nodes in this order. With
    # the int8 predictor (DynamicQuantizeMatMul) right before the kernel, the whole block at 128 tokens, 10%
    # flagged, was ~4% slower (768x3072 1.45x vs 1.51x, 1024x4096 1.41x vs 1.47x the dense block,
    # alternating processes, 2026-11-30); int4 and 1 token: no difference. Mechanism unknown (not AMX).
    graph.insert_before(first, [*pred_nodes, *fold_nodes, *guard_nodes, fallback])
    _reroute_shape_reads(graph, block, h_hat, prefix, fallback)
    old_name = block.y.name
    # the new output stands in for y everywhere, a graph output included (which must keep its type)
    fallback.outputs[0].type, fallback.outputs[0].shape = block.y.type, block.y.shape
    block.y.replace_all_uses_with(fallback.outputs[0], replace_graph_outputs=True)
    block.y.name = f"{old_name}/replaced"
    fallback.outputs[0].name = old_name
    return fallback


def _guards(folded: FoldedBlock, add, prefix: str, dtype: np.dtype) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value]]:
    """``lo``/``hi`` operands: the range itself, or ``range_lo + margin`` / ``range_hi − margin``. For a
    float16 model those sums are float32 and then ``Cast``: ONNX Runtime's CPU provider has no float16
    ``Sub`` to constant-fold (it would warn and compute them on every run)."""
    if not np.any(folded.margin > 0):
        return [], tuple(add(f"{prefix}/range_{side}", folded.resident(getattr(folded.lines, side)).astype(dtype))
                         for side in ("lo", "hi"))
    half = np.dtype(dtype) == np.float16
    store = np.float32 if half else dtype
    lo = add(f"{prefix}/range_lo", folded.resident(folded.lines.lo).astype(store))
    hi = add(f"{prefix}/range_hi", folded.resident(folded.lines.hi).astype(store))
    margin = add(f"{prefix}/margin", folded.margin.astype(store))
    sums = [_node("Add", [lo, margin], f"{prefix}/guard_lo", f"{prefix}/lo" + ("32" if half else "")),
            _node("Sub", [hi, margin], f"{prefix}/guard_hi", f"{prefix}/hi" + ("32" if half else ""))]
    if not half:
        return sums, (sums[0].outputs[0], sums[1].outputs[0])
    casts = [_node("Cast", [n.outputs[0]], f"{n.name}_cast", f"{prefix}/{side}", to=ir.DataType.FLOAT16)
             for n, side in zip(sums, ("lo", "hi"))]
    return [*sums, *casts], (casts[0].outputs[0], casts[1].outputs[0])


def _reroute_shape_reads(graph: ir.Graph, block: FfnBlock, h_hat: ir.Value, prefix: str, after: ir.Node) -> None:
    """``Shape`` nodes that read a removed block tensor read a same-shaped stand-in instead.

    ``ĥ`` has the shape of the first Linear's output; with GPT-2's Reshape-wrapped Gemm, the
    activation's shape is ``Reshape(ĥ, <the model's own unflatten target>)`` (a view, no copy).
    """
    consumers = block.shape_consumers()
    if not consumers:
        return
    unflat = h_hat
    if block.reshapes and any(is_act for _, _, is_act in consumers):
        reshape = block.reshapes[0]
        unflat_node = _node("Reshape", [h_hat, reshape.inputs[1]], f"{prefix}/shape_of_activation",
                            f"{prefix}/h_hat_unflat")
        graph.insert_after(after, [unflat_node])
        unflat = unflat_node.outputs[0]
    for node, index, is_act in consumers:
        node.replace_input_with(index, unflat if is_act else h_hat)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    return 0


def rewrite(model: ir.Model, blocks: list[FoldedBlock]) -> list[ir.Node]:
    """Rewrite every block, register the op's function and opset, and drop the dead originals."""
    if not blocks:
        return []
    variants = {f.block.variant for f in blocks}
    dtypes = {f.block.dtype for f in blocks}
    if len(variants) > 1 or len(dtypes) > 1:
        raise ValueError(f"one model mixes GELU variants {sorted(variants)} or dtypes; not supported yet")
    nodes = [rewrite_block(model.graph, f) for f in blocks]
    opset = model.opset_imports.get("", 17)
    if opset < 13:
        raise ValueError(f"model opset {opset} is older than 13; upgrade it with onnx.version_converter first")
    model.opset_imports[fallback_op.DOMAIN] = fallback_op.OPSET_VERSION
    for node in model.graph:  # predictors may use ONNX Runtime contrib ops (MatMulNBits)
        if node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1
    fallback_op.add_function(model, fallback_op.fallback_function(variants.pop(), opset, int(dtypes.pop())))
    nbits_op.register(model)
    dequantize_matmul_op.register(model)
    fused_op.fuse(model)
    names = {n.name for n in nodes}  # the fused nodes keep their fallback's name
    nodes = [n for n in fallback_op.fallback_nodes(model.graph) if n.name in names]
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return nodes
