"""Recognise the two Linear layers around an activation, in every spelling exporters use.

Matched spellings (``W`` must be a constant; ``b`` is optional — Falcon has none)::

    MatMul + Add            x ─► MatMul(·, W) ─► Add(·, b) ─►            (Add operands in either order)
    Gemm                    x ─► Gemm(·, W|Wᵀ, b; alpha, beta, transB) ─►
    Transpose → MatMul      x ─► MatMul(·, Transpose(Wᵀ)) ─► [Add(·, b)] ─►
    Reshape-wrapped Gemm    x2d ─► Gemm ─► Reshape(→[B,S,D]) ─► GELU ─► Reshape(→[-1,D]) ─► Gemm ─►
                            (GPT-2's Conv1D export: the inner Reshape pair is dropped by the rewrite,
                             since GELU is rowwise; the outer Reshapes stay where they are)

Every failure returns a reason naming the node and the problem (quantized weights, weights that are
graph inputs, a bias or intermediate with another consumer, an unsupported layout).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from tardis_compile.passes.activation import data_uses

_QUANTIZED_PRODUCERS = {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}
_QUANTIZED_LINEARS = {"MatMulInteger", "MatMulNBits", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
                      "DynamicQuantizeMatMul", "GatherBlockQuantized", "QAttention"}


@dataclasses.dataclass
class Linear:
    """``y = x · W + b`` as found in the graph; weights are read lazily (large models)."""

    x: ir.Value
    y: ir.Value
    nodes: list[ir.Node]
    weight: Callable[[], np.ndarray]  # (in, out)
    bias: Callable[[], np.ndarray | None]
    in_features: int
    out_features: int
    spelling: str
    dtype: ir.DataType


class LinearMismatch(Exception):
    """The tensors around the activation are not a foldable Linear; the message says why."""


def quantized_origin(value: ir.Value, depth: int = 4) -> ir.Node | None:
    """The quantized matrix product ``value`` is computed from, if any.

    ONNX Runtime's dynamic quantization spells ``x·W`` as::

        x ─► DynamicQuantizeLinear ─► MatMulInteger(·, W_q) ─► Cast ─► Mul(scales) ─► [Add(b)] ─►

    so the float tensor next to the activation is a few elementwise ops away from the quantized op.
    """
    frontier, seen = [value], set()
    for _ in range(depth):
        next_frontier = []
        for v in frontier:
            node = v.producer()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node.op_type in _QUANTIZED_LINEARS or node.op_type in _QUANTIZED_PRODUCERS:
                return node
            if node.op_type in ("Mul", "Cast", "Add"):
                next_frontier.extend(i for i in node.inputs if i is not None)
        frontier = next_frontier
    return None


def _const(value: ir.Value, role: str, node: ir.Node) -> ir.TensorProtocol:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor
    producer = value.producer()
    if producer is not None and producer.op_type in _QUANTIZED_PRODUCERS:
        raise LinearMismatch(
            f"quantized weights: {role} of node '{node.name}' comes from {producer.op_type} "
            f"'{producer.name}'; quantized blocks are not folded")
    if value.is_graph_input():
        raise LinearMismatch(
            f"non-constant weights: {role} '{value.name}' of node '{node.name}' is a graph input, "
            "not a constant initializer")
    what = f"{producer.op_type} '{producer.name}'" if producer is not None else "nothing"
    raise LinearMismatch(f"non-constant weights: {role} '{value.name}' of node '{node.name}' is "
                         f"computed by {what}")


def _matrix(value: ir.Value, node: ir.Node, role: str) -> tuple[Callable[[], np.ndarray], tuple[int, int], list[ir.Node], ir.DataType]:
    """A constant 2-D weight (reader, (in, out), Transpose nodes seen through, element type)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and ir.convenience.get_const_tensor(value) is None:
        perm = producer.attributes.get("perm")
        if perm is not None and list(perm.value) != [1, 0]:
            raise LinearMismatch(f"unsupported layout: Transpose '{producer.name}' feeding {role} has perm "
                                 f"{list(perm.value)}")
        tensor = _const(producer.inputs[0], role, producer)
        if len(tensor.shape) != 2:
            raise LinearMismatch(f"unsupported layout: {role} of '{node.name}' is not a matrix")
        rows, cols = (int(s) for s in tensor.shape)
        return (lambda: np.asarray(tensor.numpy()).T), (cols, rows), [producer], tensor.dtype
    tensor = _const(value, role, node)
    if len(tensor.shape) != 2:
        raise LinearMismatch(f"unsupported layout: {role} of '{node.name}' has shape {list(tensor.shape)}, "
                             "not a matrix")
    rows, cols = (int(s) for s in tensor.shape)
    return (lambda: np.asarray(tensor.numpy())), (rows, cols), [], tensor.dtype


def _vector(value: ir.Value, node: ir.Node, size: int) -> Callable[[], np.ndarray] | None:
    """A constant bias broadcastable to ``[size]`` (shapes [size], [1, size], [1, 1, size])."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    shape = [int(s) for s in tensor.shape]
    if not shape or shape[-1] != size or any(s != 1 for s in shape[:-1]):
        return None
    return lambda: np.asarray(tensor.numpy()).reshape(size)


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _gemm(node: ir.Node, input_index: int) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray | None], int, int, ir.DataType]:
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("transA", 0) or input_index != 0:
        raise LinearMismatch(f"unsupported layout: Gemm '{node.name}' uses transA or takes the activation "
                             "as its second operand")
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    weight_raw, shape, _, dtype = _matrix(node.inputs[1], node, "weight")
    if attrs.get("transB", 0):
        raw = weight_raw
        weight_raw = lambda: raw().T  # noqa: E731 - tiny adapter
        shape = (shape[1], shape[0])
    weight = (lambda: weight_raw() * alpha) if alpha != 1.0 else weight_raw
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        raw_bias = _vector(node.inputs[2], node, shape[1])
        if raw_bias is None:
            raise LinearMismatch(f"unsupported layout: bias C of Gemm '{node.name}' is not a constant "
                                 f"vector of {shape[1]}")
        bias = (lambda: raw_bias() * beta) if beta != 1.0 else raw_bias
    return weight, (bias or (lambda: None)), shape[0], shape[1], dtype


def _refuse_quantized(h: ir.Value, which: str) -> None:
    origin = quantized_origin(h)
    if origin is not None:
        raise LinearMismatch(f"quantized weights: the {which} Linear is {origin.op_type} '{origin.name}'")


def match_before(h: ir.Value) -> Linear:
    """The Linear layer producing ``h`` (the activation's input)."""
    node = h.producer()
    if node is None:
        raise LinearMismatch(f"no Linear before the activation: '{h.name}' is a graph input")
    if node.op_type in _QUANTIZED_LINEARS:
        raise LinearMismatch(f"quantized weights: the first Linear is {node.op_type} '{node.name}'")
    if node.op_type == "Gemm":
        weight, bias, d_in, d_out, dtype = _gemm(node, 0)
        return Linear(node.inputs[0], h, [node], weight, bias, d_in, d_out, "Gemm", dtype)
    bias = lambda: None  # noqa: E731
    nodes: list[ir.Node] = []
    spelling = "MatMul"
    if node.op_type == "Add":
        a, b = node.inputs
        mm_value = a if (a.producer() is not None and a.producer().op_type in ("MatMul", *_QUANTIZED_LINEARS)) else b
        bias_value = b if mm_value is a else a
        mm = mm_value.producer()
        if mm is None or mm.op_type not in ("MatMul", *_QUANTIZED_LINEARS):
            _refuse_quantized(h, "first")
            raise LinearMismatch(f"no Linear before the activation: '{h.name}' comes from Add '{node.name}' "
                                 "whose operands are not a MatMul and a constant bias")
        if mm.op_type in _QUANTIZED_LINEARS:
            raise LinearMismatch(f"quantized weights: the first Linear is {mm.op_type} '{mm.name}'")
        if not _single_use(mm_value):
            raise LinearMismatch(f"shared intermediate: the MatMul output '{mm_value.name}' before the bias "
                                 "has another consumer")
        nodes.append(node)
        node_bias = bias_value
        spelling = "MatMul+Add"
    elif node.op_type == "MatMul":
        mm, node_bias = node, None
    else:
        _refuse_quantized(h, "first")
        raise LinearMismatch(f"no Linear before the activation: '{h.name}' is produced by {node.op_type} "
                             f"'{node.name}'")
    if mm.inputs[1] is None or mm.inputs[0] is None:
        raise LinearMismatch(f"malformed MatMul '{mm.name}'")
    weight, (d_in, d_out), extra, dtype = _matrix(mm.inputs[1], mm, "weight")
    if extra:
        spelling = "Transpose→" + spelling
    if node_bias is not None:
        vector = _vector(node_bias, node, d_out)
        if vector is None:
            _const(node_bias, "bias", node)  # raises the precise reason when it is not constant
            raise LinearMismatch(f"unsupported layout: bias of '{node.name}' is not a vector of {d_out}")
        bias = vector
    return Linear(mm.inputs[0], h, [mm, *extra, *nodes], weight, bias, d_in, d_out, spelling, dtype)


def match_after(g: ir.Value) -> Linear:
    """The Linear layer consuming ``g`` (the activation's output) as its only consumer."""
    uses = data_uses(g)
    if len(uses) != 1 or g.is_graph_output():
        users = ", ".join(sorted(f"'{u.node.name or u.node.op_type}'" for u in uses))
        raise LinearMismatch(f"shared intermediate: the activation output '{g.name}' is read by "
                             f"{len(uses)} node(s) ({users}){' and is a graph output' if g.is_graph_output() else ''}"
                             "; folding would change what the other consumers see")
    node, index = uses[0].node, uses[0].idx
    if node.op_type in _QUANTIZED_LINEARS:
        raise LinearMismatch(f"quantized weights: the second Linear is {node.op_type} '{node.name}'")
    if node.op_type == "Gemm":
        weight, bias, d_in, d_out, dtype = _gemm(node, index)
        return Linear(g, node.outputs[0], [node], weight, bias, d_in, d_out, "Gemm", dtype)
    if node.op_type in _QUANTIZED_PRODUCERS:
        consumer = next((u.node for o in node.outputs for u in o.uses()
                         if u.node.op_type in _QUANTIZED_LINEARS), node)
        raise LinearMismatch(f"quantized weights: the second Linear is {consumer.op_type} '{consumer.name}' "
                             f"(the activation is quantized by {node.op_type} '{node.name}')")
    if node.op_type != "MatMul" or index != 0:
        raise LinearMismatch(f"no Linear after the activation: '{g.name}' feeds {node.op_type} "
                             f"'{node.name}'" + (" as its right operand" if node.op_type == "MatMul" else ""))
    weight, (d_in, d_out), extra, dtype = _matrix(node.inputs[1], node, "weight")
    y = node.outputs[0]
    nodes = [node, *extra]
    bias = lambda: None  # noqa: E731
    spelling = ("Transpose→" if extra else "") + "MatMul"
    y_uses = list(y.uses())
    if len(y_uses) == 1 and not y.is_graph_output() and y_uses[0].node.op_type == "Add":
        add = y_uses[0].node
        other = add.inputs[1 - y_uses[0].idx]
        vector = _vector(other, add, d_out) if other is not None else None
        if vector is not None:
            bias, y = vector, add.outputs[0]
            nodes.append(add)
            spelling += "+Add"
    return Linear(g, y, nodes, weight, bias, d_in, d_out, spelling, dtype)


def shape_last_dim(shape_value: ir.Value, data: ir.Value | None = None, hidden: int | None = None) -> tuple[int | None, int | None]:
    """(rank, last dim) of a Reshape target when knowable.

    Understands a constant, and a ``Concat`` of one-element pieces whose last piece is a constant or is
    read from ``Shape(data)`` at index -1 (``x.view(-1, x.size(-1))`` as TorchScript exports it; the last
    axis then stays ``hidden``).
    """
    tensor = ir.convenience.get_const_tensor(shape_value)
    if tensor is not None:
        dims = np.asarray(tensor.numpy()).reshape(-1)
        return len(dims), int(dims[-1])
    producer = shape_value.producer()
    if producer is None or producer.op_type != "Concat":
        return None, None
    rank = len(producer.inputs)
    last = ir.convenience.get_const_tensor(producer.inputs[-1])
    if last is not None:
        return rank, int(np.asarray(last.numpy()).reshape(-1)[-1])
    node = producer.inputs[-1].producer()
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze", "Slice", "Gather", "Cast"):
        if node.op_type in ("Slice", "Gather"):
            start = ir.convenience.get_const_tensor(node.inputs[1])
            if start is None or int(np.asarray(start.numpy()).reshape(-1)[0]) != -1:
                return rank, None
        node = node.inputs[0].producer()
    if node is not None and node.op_type == "Shape" and data is not None and node.inputs[0] is data:
        return rank, hidden
    return rank, None
