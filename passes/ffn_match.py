"""Find plain ``Linear → GELU → Linear`` feed-forward blocks; explain every candidate left alone.

The matched pattern::

    x ─► Linear1 (W1: d×D, b1) ─► h ─► [Reshape] ─► GELU(erf | tanh) ─► g ─► [Reshape] ─► Linear2 (W2: D×d', b2) ─► y

Anchoring on activation ops (``Erf``, ``Tanh``, ``Gelu``, ``FastGelu``, ``BiasGelu``, ``Sigmoid``, ``Relu``,
...) means every activation in the model is looked at once; each either yields a block or a
:class:`Rejection` whose reason names the problem (gated FFN, quantized weights, non-constant weights,
shared intermediate, unsupported activation). ``check`` never fuses when an intermediate tensor has a
consumer outside the block.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from tardis_compile import fallback_op
from tardis_compile.passes import activation as act
from tardis_compile.passes.linear import Linear, LinearMismatch, match_after, match_before, shape_last_dim


@dataclasses.dataclass
class FfnBlock:
    """A foldable block: ``y = GELU(x·W1 + b1)·W2 + b2`` (row-wise over the leading axes of ``x``)."""

    name: str
    x: ir.Value
    y: ir.Value
    linear1: Linear
    activation: act.Activation
    linear2: Linear
    reshapes: list[ir.Node]

    @property
    def variant(self) -> str:
        assert self.activation.variant is not None
        return self.activation.variant

    @property
    def d(self) -> int:
        return self.linear1.in_features

    @property
    def hidden(self) -> int:
        return self.linear1.out_features

    @property
    def d_out(self) -> int:
        return self.linear2.out_features

    @property
    def dtype(self) -> ir.DataType:
        return self.linear2.dtype

    def w1(self) -> np.ndarray:
        return self.linear1.weight()

    def b1(self) -> np.ndarray:
        bias = self.linear1.bias()
        b = np.zeros(self.hidden, np.float64) if bias is None else bias.astype(np.float64)
        if self.activation.entry_bias is not None:
            b = b + self.activation.entry_bias.reshape(-1).astype(np.float64)
        return b

    def w2(self) -> np.ndarray:
        return self.linear2.weight()

    def b2(self) -> np.ndarray:
        bias = self.linear2.bias()
        return np.zeros(self.d_out, np.float64) if bias is None else bias.astype(np.float64)

    @property
    def nodes(self) -> list[ir.Node]:
        return [*self.linear1.nodes, *self.reshapes, *self.activation.nodes, *self.linear2.nodes]

    def shape_consumers(self) -> list[tuple[ir.Node, int, bool]]:
        """``Shape`` nodes reading a block-internal tensor: (node, input index, reads an [.., D] tensor
        of the activation's rank rather than the 2-D Linear output)."""
        inner = {self.linear1.y, self.activation.h, self.activation.g}
        inner.update(v for n in self.activation.nodes for v in n.outputs)
        flat = {self.linear1.y}
        for n in self.reshapes:
            inner.update(n.outputs)
        if self.reshapes:
            flat.add(self.reshapes[-1].outputs[0])
        found = []
        for value in inner:
            for use in value.uses():
                if use.node.op_type == "Shape":
                    found.append((use.node, use.idx, value not in flat))
        return found

    @property
    def spelling(self) -> str:
        ops = "+".join(dict.fromkeys(n.op_type for n in self.activation.nodes))
        wrap = "Reshape-wrapped " if self.reshapes else ""
        return f"{wrap}{self.linear1.spelling} → GELU[{self.variant}: {ops}] → {self.linear2.spelling}"


@dataclasses.dataclass
class Rejection:
    """A candidate activation that was not rewritten, and why."""

    anchor: str  # name of the activation node the candidate was found from
    op_type: str
    stage: str  # how far the match got: "activation", "linear1", "linear2", "shape"
    reason: str


def _step_over_reshape(value: ir.Value, forward: bool) -> tuple[ir.Value, ir.Node | None]:
    """Step over one Reshape next to the activation (GPT-2's Conv1D export wraps Gemm in Reshapes)."""
    if value.is_graph_output():  # stepping over would hide the second use; match_after refuses it
        return value, None
    if forward:
        uses = act.data_uses(value)
        if len(uses) == 1 and uses[0].node.op_type == "Reshape" and uses[0].idx == 0:
            return uses[0].node.outputs[0], uses[0].node
        return value, None
    node = value.producer()
    if node is not None and node.op_type == "Reshape":
        return node.inputs[0], node
    return value, None


def _check_reshapes(before: ir.Node | None, after: ir.Node | None, hidden: int) -> str | None:
    """The inner Reshape pair must only unflatten/flatten the leading axes (the last stays D)."""
    if before is None and after is None:
        return None
    if before is None or after is None:
        node = before or after
        return (f"unsupported layout: a single Reshape '{node.name}' between the Linear layers and the "
                "activation (expected none or an unflatten/flatten pair)")
    _, last_before = shape_last_dim(before.inputs[1])
    rank_after, last_after = shape_last_dim(after.inputs[1], after.inputs[0], hidden)
    if last_before not in (hidden, None) or last_after != hidden or rank_after != 2:
        return (f"unsupported layout: Reshapes '{before.name}'/'{after.name}' around the activation do not "
                f"provably keep the last axis {hidden} (targets end in {last_before}, {last_after})")
    if last_before is None:
        return (f"unsupported layout: cannot prove that Reshape '{before.name}' keeps the last axis "
                f"{hidden}")
    return None


def describe(node: ir.Node) -> str:
    """A node's name for messages; exporters sometimes leave nodes unnamed."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}→{out}"


def _linear_summary(linear: Linear, weight: str) -> str:
    names = ", ".join(f"'{describe(n)}'" for n in linear.nodes)
    bias = "bias" if linear.bias() is not None else "no bias"
    return f"{linear.spelling} ({names}), {weight} {linear.in_features}×{linear.out_features}, {bias}"


def match_block(seed: ir.Node, graph: ir.Graph, trace: list[str] | None = None) -> FfnBlock | Rejection:
    """``pattern`` + ``check`` for one activation seed: a block, or the reason there is none.

    With ``trace``, each stage that passed appends one line saying what it found (``inspect --explain``).
    """
    note = trace.append if trace is not None else (lambda line: None)

    def refuse(stage: str, reason: str) -> Rejection:
        return Rejection(describe(seed), seed.op_type, stage, reason)

    h = act.find_region_input(seed)
    if h is None:
        return refuse("activation", "unsupported activation: the activation does not have a single input tensor")
    activation = act.classify(h, graph)
    if activation.reason is not None:
        return refuse("activation", activation.reason)
    ops = ", ".join(n.op_type for n in activation.nodes)
    name = "erf-GELU" if activation.variant == "none" else "tanh-GELU"
    note(f"activation: '{h.name}' → [{ops}] → '{activation.g.name}' computes {name} (max deviation "
         f"{activation.deviation:.2g})" + (", with a fused bias" if activation.entry_bias is not None else ""))
    h_lin, reshape_before = _step_over_reshape(h, forward=False)
    g_lin, reshape_after = _step_over_reshape(activation.g, forward=True)
    try:
        linear1 = match_before(h_lin)
    except LinearMismatch as err:
        return refuse("linear1", str(err))
    if reshape_before is not None and (len(act.data_uses(h_lin)) != 1 or h_lin.is_graph_output()):
        return refuse("linear1", f"shared intermediate: '{h_lin.name}' has another consumer")
    note(f"linear1: {_linear_summary(linear1, 'W1')}")
    try:
        linear2 = match_after(g_lin)
    except LinearMismatch as err:
        return refuse("linear2", str(err))
    note(f"linear2: {_linear_summary(linear2, 'W2')}")
    if linear2.in_features != linear1.out_features:
        return refuse("shape", f"shape mismatch: W1 has {linear1.out_features} columns but W2 has "
                               f"{linear2.in_features} rows")
    if activation.entry_bias is not None and activation.entry_bias.size != linear1.out_features:
        return refuse("shape", "the fused activation bias is not a vector of D")
    reason = _check_reshapes(reshape_before, reshape_after, linear1.out_features)
    if reason is not None:
        return refuse("shape", reason)
    reshapes = [n for n in (reshape_before, reshape_after) if n is not None]
    note("shape: " + ("Reshape pair " + ", ".join(f"'{describe(n)}'" for n in reshapes) + " keeps the last axis"
                      if reshapes else f"D = {linear1.out_features} on both sides"))
    return FfnBlock("", linear1.x, linear2.y, linear1, activation, linear2, reshapes)


def count_rewritten(model: ir.Model) -> int:
    """How many blocks of ``model`` are already tardis-compile's rewritten form (``GuardedFallback`` nodes)."""
    return len(fallback_op.fallback_nodes(model.graph))


def find_blocks(model: ir.Model) -> tuple[list[FfnBlock], list[Rejection]]:
    """All foldable blocks of the main graph (in graph order) and the rejected candidates."""
    graph = model.graph
    blocks: list[FfnBlock] = []
    rejections: list[Rejection] = []
    claimed: set[ir.Node] = set()
    taken = {fallback_op.block_name(n.name) for n in fallback_op.fallback_nodes(graph)}  # a rewritten model's
    names = (f"ffn{i}" for i in itertools.count() if f"ffn{i}" not in taken)
    for node in list(graph):
        if node.op_type not in act.SEED_OPS or node in claimed:
            continue
        result = match_block(node, graph)
        if isinstance(result, FfnBlock):
            result.name = next(names)
            blocks.append(result)
            claimed.update(result.nodes)
        else:
            region_nodes = _region_of(node, graph)
            if not any(n in claimed for n in region_nodes):
                rejections.append(result)
            claimed.update(region_nodes)
    return blocks, rejections


def _region_of(seed: ir.Node, graph: ir.Graph) -> list[ir.Node]:
    """The activation nodes around a seed, so one rejected activation is reported once."""
    h = act.find_region_input(seed)
    if h is None:
        return [seed]
    nodes, _ = act.collect(h, graph)
    return nodes or [seed]


def find_foldable(model: ir.Model) -> tuple[list[FfnBlock], list[Rejection]]:
    """:func:`find_blocks`, less the blocks the rewrite cannot give this model: a rewritten model carries
    one ``GuardedFallback`` function, and an ONNX function body cannot branch on the GELU variant, so every
    block must share one variant and dtype: those of the blocks already rewritten, else the most common
    (the first block's on a tie). The others are rejected with that reason."""
    blocks, rejected = find_blocks(model)
    kinds = [(b.variant, b.dtype) for b in blocks]
    done = [fallback_op.kind(n) for n in fallback_op.fallback_nodes(model.graph)]
    if done:
        keep, whose = done[0], f"the {len(done)} already rewritten are"
    elif len(set(kinds)) > 1:
        keep = max(kinds, key=lambda k: (kinds.count(k), -kinds.index(k)))
        whose = f"{kinds.count(keep)} other(s) are"
    else:
        return blocks, rejected
    kept = []
    for block, kind in zip(blocks, kinds):
        if kind == keep:
            kept.append(block)
            continue
        seed = next((n for n in block.activation.nodes if n.op_type in act.SEED_OPS), block.activation.nodes[0])
        rejected.append(Rejection(
            describe(seed), seed.op_type, "rewrite",
            f"mixed GELU variants or dtypes: this block is {_kind_name(kind)}, {whose} {_kind_name(keep)}; "
            "one rewrite handles one variant and dtype per model"))
    return kept, rejected


def _kind_name(kind: tuple[str, ir.DataType]) -> str:
    return f"{'erf' if kind[0] == 'none' else kind[0]} GELU in {kind[1].numpy().name}"
