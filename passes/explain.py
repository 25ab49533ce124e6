"""``inspect --explain NODE``: how far the matcher got for the candidate block around one node.

The matcher runs in stages — activation (is the elementwise region GELU?), ``linear1`` (the Linear
producing its input), ``linear2`` (the Linear consuming its output), ``shape`` (widths and Reshapes
agree). For a near-miss, the stages that passed say what they found and the first failing one says why::

    explain 'layer0.act/Erf' (Erf), candidate anchored at 'layer0.act/Erf'
      ok    activation: 'layer0.fc1/Add' → [Div, Erf, Add, Mul, Mul] → 'layer0.act/Mul_1' computes erf-GELU …
      ok    linear1: MatMul+Add ('layer0.fc1/MatMul', 'layer0.fc1/Add'), W1 16×64, bias
      stop  linear2: non-constant weights: weight 'layer0.fc2.weight' of node … is a graph input …

``NODE`` may be any node of the candidate (by node name, or by the name of a tensor it outputs), not
only the activation op the matcher anchors on.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from tardis_compile.errors import TardisError
from tardis_compile.passes import activation as act
from tardis_compile.passes.ffn_match import FfnBlock, Rejection, describe, find_foldable, match_block


@dataclasses.dataclass
class Explanation:
    """The stages one candidate went through; ``result`` is the block or the rejection."""

    node: str
    anchor: str
    passed: list[str]
    result: FfnBlock | Rejection

    def lines(self) -> list[str]:
        out = [f"explain '{self.node}', candidate anchored at '{self.anchor}'"]
        out += [f"  ok    {line}" for line in self.passed]
        if isinstance(self.result, Rejection):
            out.append(f"  stop  {self.result.stage}: {self.result.reason}")
            out.append(f"result: left alone (failed at {self.result.stage})")
        else:
            out.append(f"result: foldable ({self.result.spelling})")
        return out


def _find_node(graph: ir.Graph, name: str) -> ir.Node:
    for node in graph:
        if node.name == name or describe(node) == name or any(v.name == name for v in node.outputs):
            return node
    if name in graph.initializers or any(v.name == name for v in graph.inputs):
        kind = "an initializer" if name in graph.initializers else "a graph input"
        values = [v for v in [*graph.inputs, *graph.initializers.values()] if v.name == name]
        readers = ", ".join(sorted({describe(use.node) for v in values for use in v.uses()})) or "none"
        raise TardisError(f"'{name}' is {kind}, not a node output: explain a node that reads it ({readers})")
    raise TardisError(f"no node or tensor named '{name}' in the model's main graph "
                      "(use `tardis-compile inspect MODEL` to list the candidates)")


def _neighbourhood(seed: ir.Node, graph: ir.Graph) -> set[ir.Node]:
    """Nodes a candidate anchored at ``seed`` covers: its activation region, the two Linear layers'
    nodes and what lies between (a Reshape, a bias Add), a few steps either side."""
    h = act.find_region_input(seed)
    if h is None:
        return {seed}
    nodes, _ = act.collect(h, graph)
    covered = set(nodes) | {seed}
    value = h
    for _ in range(3):  # Add(bias) ← MatMul ← Transpose, or a Reshape
        producer = value.producer()
        if producer is None:
            break
        covered.add(producer)
        for operand in producer.inputs:  # weights seen through a Transpose or a dequantization
            source = operand.producer() if operand is not None else None
            if source is not None and source.op_type in ("Transpose", "DequantizeLinear"):
                covered.add(source)
        if not producer.inputs or producer.inputs[0] is None:
            break
        value = producer.inputs[0]
    frontier = [v for n in nodes for v in n.outputs]
    for _ in range(3):  # Reshape → MatMul/Gemm → Add(bias)
        step = []
        for value in frontier:
            for use in value.uses():
                if use.node not in covered:
                    covered.add(use.node)
                    step.extend(use.node.outputs)
        frontier = step
    return covered


def explain(model: ir.Model, name: str) -> Explanation:
    """Run the matcher's stages for the candidate containing node (or tensor) ``name``."""
    graph = model.graph
    node = _find_node(graph, name)
    seeds = [node] if node.op_type in act.SEED_OPS else [
        s for s in graph if s.op_type in act.SEED_OPS and node in _neighbourhood(s, graph)]
    if not seeds:
        raise TardisError(f"'{name}' ({node.op_type}) is not part of any candidate block: candidates are found "
                          f"from activation ops ({', '.join(sorted(act.SEED_OPS))})")
    # The candidate whose matched block holds the node; else the first that was rejected (the node may be
    # part of what failed to match); a block that matched without it is a neighbour, not this node's.
    chosen: tuple[ir.Node, list[str], FfnBlock | Rejection] | None = None
    for seed in seeds:
        trace: list[str] = []
        result = match_block(seed, graph, trace)
        if isinstance(result, FfnBlock) and node in result.nodes:
            chosen = (seed, trace, result)
            break
        if isinstance(result, Rejection) and chosen is None:
            chosen = (seed, trace, result)
    if chosen is None:
        raise TardisError(f"'{name}' ({node.op_type}) lies outside the blocks around it: it is not part of any "
                          "candidate block")
    seed, trace, result = chosen
    if isinstance(result, FfnBlock):  # matched, but the rewrite may still leave it (mixed GELU variants)
        anchor = describe(seed)
        result = next((r for r in find_foldable(model)[1] if r.stage == "rewrite" and r.anchor == anchor), result)
    return Explanation(name, describe(seed), trace, result)
