"""Find the activation between two Linear layers and decide, numerically, whether it is GELU.

Exporters spell GELU in many ways (ONNX ``Gelu``, ``com.microsoft`` ``Gelu``/``FastGelu``/``BiasGelu``,
erf and tanh decompositions with their operands in any order, ``Cast`` pairs in float16 models). Rather
than one structural pattern per spelling and per commutation, the matcher collects the *activation
region* — the closure of elementwise nodes fed only by the pre-activation ``h`` and scalar constants —
and evaluates it on probe values. If it equals erf-GELU or tanh-GELU to float precision, it is GELU,
whatever its spelling; if not, the candidate is refused with the measured deviation::

      h ─┬─► Div(·, √2) ─► Erf ─► Add(·, 1) ─┐
         └──────────────────────────────────► Mul ─► Mul(·, 0.5) ─► g      (one of many spellings)

A region may start with a per-neuron bias (``FastGelu(h, b)``, ``BiasGelu(h, b)``); that bias belongs to
the first Linear layer and is returned separately so the fold can add it to ``b1``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir
from scipy.special import erf

from tardis_compile.gelu import gelu

# Elementwise ops the region may contain, with their NumPy meaning (float64).
_UNARY = {
    "Erf": erf,
    "Tanh": np.tanh,
    "Sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "Relu": lambda a: np.maximum(a, 0.0),
    "Sqrt": np.sqrt,
    "Neg": np.negative,
    "Exp": np.exp,
    "Reciprocal": lambda a: 1.0 / a,
    "Identity": lambda a: a,
    "Cast": lambda a: a,
    "Softplus": lambda a: np.log1p(np.exp(a)),
}
_BINARY = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
}
# Fused activation ops; the optional second input is a per-neuron bias added before the activation.
_FUSED = {
    ("", "Gelu"): None,  # variant from the attribute
    ("com.microsoft", "Gelu"): "none",
    ("com.microsoft", "BiasGelu"): "none",
    ("com.microsoft", "FastGelu"): "tanh",
    ("com.microsoft", "QuickGelu"): "quick",
}
SEED_OPS = {"Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "BiasGelu", "FastGelu", "QuickGelu"}

_PROBE = np.concatenate([np.linspace(-12.0, 12.0, 4801), [-1e-3, 1e-3, 0.0]])


@dataclasses.dataclass
class Activation:
    """An elementwise region from ``h`` to ``g`` and what it computes."""

    h: ir.Value
    g: ir.Value
    nodes: list[ir.Node]
    entry_bias: np.ndarray | None  # per-neuron bias fused into the activation op, if any
    variant: str | None  # "none" (erf GELU), "tanh", or None when not GELU
    deviation: float  # max |region(p) - GELU(p)| / (1 + |p|) for the closest variant
    closest: str
    reason: str | None  # why this region is not a usable GELU (None when usable)


def data_uses(value: ir.Value) -> list:
    """Uses that read the tensor's data; ``Shape`` consumers only read its shape, which the rewrite
    preserves (GPT-2's export computes ``size_out`` from the activation's shape)."""
    return [u for u in value.uses() if u.node.op_type != "Shape"]


def _const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """A constant's tensor, seeing through ``Cast``/``Identity`` of a constant (float16 converters keep
    an op's constants in float16 and cast them up next to the op)."""
    tensor = ir.convenience.get_const_tensor(value)
    producer = value.producer()
    while tensor is None and producer is not None and producer.op_type in ("Cast", "Identity") \
            and producer.inputs and producer.inputs[0] is not None:
        value = producer.inputs[0]
        tensor = ir.convenience.get_const_tensor(value)
        producer = value.producer()
    return tensor


def _scalar_const(value: ir.Value | None) -> float | None:
    """The value of a constant holding a single number, else None."""
    if value is None:
        return None
    tensor = _const_tensor(value)
    if tensor is None or math.prod(tensor.shape.numpy()) != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(-1)[0])


def _vector_const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = _const_tensor(value)
    return None if tensor is None else np.asarray(tensor.numpy())


def _is_elementwise(node: ir.Node) -> bool:
    return (node.domain in ("", "ai.onnx") and (node.op_type in _UNARY or node.op_type in _BINARY)) or (
        (node.domain if node.domain != "ai.onnx" else "", node.op_type) in _FUSED
    )


def _has_fp16_constant(nodes: list[ir.Node]) -> bool:
    for node in nodes:
        for value in node.inputs:
            tensor = ir.convenience.get_const_tensor(value) if value is not None else None
            if tensor is not None and tensor.dtype == ir.DataType.FLOAT16:
                return True
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            if to is not None and to.value == ir.DataType.FLOAT16:
                return True
    return False


def find_region_input(seed: ir.Node) -> ir.Value | None:
    """Walk back from a seed op through elementwise ops with scalar operands to the region's input h."""
    frontier = [seed]
    roots: set[ir.Value] = set()
    seen: set[ir.Node] = set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        data_inputs = _data_inputs(node)
        for value in data_inputs:
            producer = value.producer()
            if producer is not None and _is_elementwise(producer) and _region_op_ok(producer):
                frontier.append(producer)
            else:
                roots.add(value)
    return roots.pop() if len(roots) == 1 else None


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """Inputs that are not scalar constants (the fused ops' bias input is not data either)."""
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    inputs = list(node.inputs[:1]) if key in _FUSED else list(node.inputs)
    return [v for v in inputs if v is not None and _scalar_const(v) is None]


def _region_op_ok(node: ir.Node) -> bool:
    """An elementwise op whose constant operands are all scalars (a fused op may carry a bias vector).

    This stops the backward walk at ``Add(MatMul(x, W1), b1)``: the bias vector belongs to the Linear.
    """
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    if key in _FUSED:
        return True
    for value in node.inputs:
        if value is None:
            return False
        if _const_tensor(value) is not None and _scalar_const(value) is None:
            return False
    return True


def collect(h: ir.Value, graph: ir.Graph) -> tuple[list[ir.Node], list[str]]:
    """Forward closure of elementwise nodes from ``h``; returns the nodes and problems found on the way.

    A node joins the region when it is elementwise and each of its inputs is either a region value or a
    scalar constant (a fused activation op may also take a bias as second input when it consumes ``h``).
    """
    region: list[ir.Node] = []
    region_values: set[ir.Value] = {h}
    entry_values: set[ir.Value] = {h}  # h itself, or h through Cast/Identity only (same values)
    problems: list[str] = []
    changed = True
    while changed:
        changed = False
        for value in list(region_values):
            for use in value.uses():
                node = use.node
                if node in region or not _is_elementwise(node):
                    continue
                key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
                others = [v for v in node.inputs if v is not None and v not in region_values]
                at_entry = node.inputs[0] in entry_values
                if key in _FUSED:  # a bias input is only foldable into b1 when added to h itself
                    others = [v for v in node.inputs[1:] if v is not None] if at_entry else others
                    ok = node.inputs[0] in region_values and (
                        not others or (at_entry and _vector_const(others[0]) is not None)
                    )
                else:
                    ok = all(_scalar_const(v) is not None for v in others)
                if ok:
                    region.append(node)
                    region_values.update(node.outputs)
                    if at_entry and node.op_type in ("Cast", "Identity"):
                        entry_values.update(node.outputs)
                    changed = True
    for value in region_values:
        for use in value.uses():
            node = use.node
            if node in region or node.op_type != "Mul":
                continue
            other = node.inputs[1 - use.idx]
            if other is not None and _const_tensor(other) is None:
                problems.append(
                    f"gated FFN: the activation is multiplied by the non-constant tensor '{other.name}' "
                    f"(node '{node.name}'); linearising a gate leaves a term quadratic in x, so it "
                    "cannot fold")
    return _topological(region, graph), problems


def _topological(nodes: list[ir.Node], graph: ir.Graph) -> list[ir.Node]:
    """The region's nodes in dependency order, ties broken by file order.

    File order alone is not enough: ONNX Runtime's float16 converter appends the ``Cast`` nodes it
    inserts at the end of the node list, so a file need not be topologically sorted.
    """
    order = {node: i for i, node in enumerate(graph)}
    pending = sorted(nodes, key=lambda n: order.get(n, 0))
    produced_inside = {v for n in nodes for v in n.outputs}
    ready: set[ir.Value] = set()
    result: list[ir.Node] = []
    while pending:
        for node in pending:
            if all(v is None or v not in produced_inside or v in ready for v in node.inputs):
                break
        else:  # a cycle cannot occur in a valid graph; keep file order rather than loop forever
            return result + pending
        pending.remove(node)
        result.append(node)
        ready.update(node.outputs)
    return result


def evaluate(h: ir.Value, nodes: list[ir.Node], probe: np.ndarray) -> tuple[dict[ir.Value, np.ndarray], np.ndarray | None]:
    """Run the region on ``probe`` (float64) and return every value, plus a fused entry bias if any."""
    env: dict[ir.Value, np.ndarray] = {h: probe}
    entry_bias = None
    for node in nodes:
        key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        args = [env[v] if v in env else _scalar_const(v) for v in node.inputs if v is not None]
        if key in _FUSED:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                entry_bias = _vector_const(node.inputs[1])
            variant = _FUSED[key]
            if variant is None:
                attr = node.attributes.get("approximate")
                variant = attr.value if attr is not None else "none"
            a = args[0]
            out = a / (1.0 + np.exp(-1.702 * a)) if variant == "quick" else gelu(a, variant)
        elif node.op_type in _UNARY:
            out = _UNARY[node.op_type](args[0])
        else:
            with np.errstate(all="ignore"):
                out = _BINARY[node.op_type](args[0], args[1])
        env[node.outputs[0]] = np.asarray(out, dtype=np.float64)
    return env, entry_bias


def classify(h: ir.Value, graph: ir.Graph) -> Activation:
    """Collect the activation region after ``h`` and tell whether it is erf- or tanh-GELU."""
    nodes, problems = collect(h, graph)
    if not nodes:
        return Activation(h, h, [], None, None, math.inf, "none",
                          problems[0] if problems else "no elementwise activation after the first Linear")
    env, entry_bias = evaluate(h, nodes, _PROBE)
    node_set = set(nodes)
    exits = []
    for node in nodes:
        for value in node.outputs:
            outside = [u.node for u in data_uses(value) if u.node not in node_set]
            if outside or value.is_graph_output():
                exits.append(value)
    outside_h = [u.node for u in data_uses(h) if u.node not in node_set]
    reason = None
    if problems:
        reason = problems[0]
    elif outside_h:
        reason = (f"shared intermediate: the pre-activation '{h.name}' is also used by node "
                  f"'{outside_h[0].name}' ({outside_h[0].op_type})")
    elif h.is_graph_output():
        reason = f"shared intermediate: the pre-activation '{h.name}' is also a graph output"
    elif len(exits) != 1:
        names = ", ".join(f"'{v.name}'" for v in exits)
        reason = (f"shared intermediate: the activation has {len(exits)} tensors used outside it ({names}); "
                  "folding would change what the other consumers see")
    g = exits[0] if exits else nodes[-1].outputs[0]
    result = env[g]
    deviations = {}
    for variant in ("none", "tanh"):
        ref = gelu(_PROBE, variant)
        with np.errstate(all="ignore"):
            dev = np.abs(result - ref) / (1.0 + np.abs(_PROBE))
        deviations[variant] = float(np.nanmax(dev)) if np.all(np.isfinite(result)) else math.inf
    closest = min(deviations, key=deviations.get)
    tolerance = 2e-3 if _has_fp16_constant(nodes) else 2e-5
    variant = closest if deviations[closest] <= tolerance else None
    if variant is None and reason is None:
        name = "erf-GELU" if closest == "none" else "tanh-GELU"
        reason = (f"unsupported activation: not GELU (closest is {name}, max deviation "
                  f"{deviations[closest]:.3g} relative on probe values, tolerance {tolerance:g}); "
                  f"ops: {', '.join(n.op_type for n in nodes)}")
    return Activation(h, g, nodes, entry_bias, variant, deviations[closest], closest, reason)
