"""Online predictors: which neurons leave their linear range, decided without the exact ``x·W1``.

A predictor emits graph nodes computing ``ĥ`` from the block input; the fallback op flags neuron j when
``ĥ_j ∉ [lo_j, hi_j]`` (the guards already include the predictor's safety margin). Predictors are
swappable pieces: this module holds the interface and the ``exact`` predictor (``Ŵ1 = W1``, no margin),
used for tests and as the accuracy reference; cheaper ones (int4, 2-bit, low-rank) plug in here.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import onnx_ir as ir

from tardis_compile.passes.ffn_match import FfnBlock

AddInitializer = Callable[[str, np.ndarray], ir.Value]


class Predictor(Protocol):
    """What the rewrite and the report need from a predictor."""

    kind: str

    def emit(self, block: FfnBlock, x: ir.Value, add_initializer: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        """Nodes computing ``ĥ`` (same leading axes as ``x``, last axis D) and the ``ĥ`` value."""

    def margin(self, block: FfnBlock) -> np.ndarray:
        """Per-neuron safety margin ``m_j ≥ 0`` added around the range (guards: ``[lo − m, hi + m]``
        would widen; we flag outside ``[lo + m, hi − m]``, i.e. shrink the trusted range)."""

    def parameters(self, block: FfnBlock) -> float:
        """Stored parameters in dtype-equivalents (e.g. int4 counts 4/32 in a float32 model)."""


class ExactPredictor:
    """``ĥ = x·W1 + b1`` with the original weights: perfect recall and precision, full cost."""

    kind = "exact"

    def emit(self, block: FfnBlock, x: ir.Value, add_initializer: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        dtype = block.dtype.numpy()
        w1 = add_initializer(f"{prefix}/predictor/W1", block.w1().astype(dtype))
        b1 = add_initializer(f"{prefix}/predictor/b1", block.b1().astype(dtype))
        matmul = ir.Node("", "MatMul", [x, w1], name=f"{prefix}/predictor/MatMul")
        matmul.outputs[0].name = f"{prefix}/predictor/xW1"
        add = ir.Node("", "Add", [matmul.outputs[0], b1], name=f"{prefix}/predictor/Add")
        add.outputs[0].name = f"{prefix}/h_hat"
        return [matmul, add], add.outputs[0]

    def margin(self, block: FfnBlock) -> np.ndarray:
        return np.zeros(block.hidden)

    def parameters(self, block: FfnBlock) -> float:
        return float(block.d * block.hidden + block.hidden)


PREDICTORS: dict[str, Callable[[], Predictor]] = {"exact": ExactPredictor}


def make(kind: str) -> Predictor:
    """A predictor by name; unknown names are a clear error."""
    if kind not in PREDICTORS:
        raise ValueError(f"unknown predictor {kind!r}; available: {', '.join(PREDICTORS)}")
    return PREDICTORS[kind]()
