"""Pruning baselines at the same FFN parameter budget: Wanda and RIA (METHOD.md §6).

TARDIS is only worth its complexity if it beats pruning the same weights with the same calibration data
and the same budget, so the baselines run on exactly what the fold sees: the blocks found by
:func:`tardis_compile.passes.ffn_match.find_blocks` (W1 and W2 of each), calibrated through the same
feed sources and the same padding-free streaming (:func:`tardis_compile.calibrate.stream_block_inputs`).

Scores, for a weight in ONNX ``MatMul`` layout ``W: (in, out)`` (an output neuron is a *column*):

* Wanda (Sun et al. 2023): ``|W_ji| · ‖X_j‖₂``
* RIA (Zhang et al. 2024): ``(|W_ji| / Σ_j'|W_j'i| + |W_ji| / Σ_i'|W_ji'|) · ‖X_j‖₂^0.5``

``X_j`` is input feature j over all calibration tokens: the block input ``x`` for W1, the GELU output
``GELU(x·W1 + b1)`` for W2. Only sums of squares are kept, so memory does not grow with the token count.
Each output neuron keeps its highest-scoring inputs: ``floor(in·s)`` are pruned per column
(unstructured), or 2 of every 4 consecutive inputs (2:4, fixed 50%).

Like both papers' reference code, calibration is **sequential** by default: block i's statistics come
from the model whose blocks before i are already pruned (one streaming pass per block; ORT computes
only up to the captured tensor). ``sequential=False`` takes every block's statistics from the original
model in one pass, and those norms can be reused across sparsities (:func:`input_norms`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tardis_compile import api, modelio
from tardis_compile.calibrate import BlockWeights, stream_block_inputs
from tardis_compile.errors import CalibrationDataError, NoFoldableBlockError, TardisError
from tardis_compile.feeds import FeedSource
from tardis_compile.gelu import gelu
from tardis_compile.passes.ffn_match import FfnBlock, count_rewritten, find_blocks
from tardis_compile.passes.linear import Linear
from tardis_compile.progress import Progress

METHODS = ("wanda", "ria")
PATTERNS = ("unstructured", "2:4")
RIA_EXPONENT = 0.5  # RIA's a: ‖X_j‖₂ enters as its square root (the paper's default)


class PruneSettingsError(TardisError):
    """Method, pattern or sparsity are not a valid pruning configuration."""


@dataclasses.dataclass
class InputNorms:
    """Streamed per-feature sums of squares of one block's two weight inputs (x for W1, GELU for W2)."""

    x_sq: np.ndarray  # (d,)
    g_sq: np.ndarray  # (D,)
    tokens: int = 0

    @classmethod
    def empty(cls, block: FfnBlock) -> "InputNorms":
        return cls(np.zeros(block.d), np.zeros(block.hidden))

    def add(self, x: np.ndarray, g: np.ndarray) -> None:
        self.x_sq += np.einsum("td,td->d", x, x, dtype=np.float64)
        self.g_sq += np.einsum("td,td->d", g, g, dtype=np.float64)
        self.tokens += x.shape[0]

    @property
    def x_norm(self) -> np.ndarray:
        return np.sqrt(self.x_sq)

    @property
    def g_norm(self) -> np.ndarray:
        return np.sqrt(self.g_sq)


def scores(w: np.ndarray, norm: np.ndarray, method: str) -> np.ndarray:
    """Importance of every weight of ``w`` (in, out) given the L2 norms (in,) of its input features."""
    a = np.abs(np.asarray(w, dtype=np.float64))
    norm = np.asarray(norm, dtype=np.float64)[:, None]
    if method == "wanda":
        return a * norm
    if method == "ria":
        per_out = a.sum(axis=0, keepdims=True)  # Σ over the inputs of each output neuron (a row in torch layout)
        per_in = a.sum(axis=1, keepdims=True)  # Σ over the outputs each input feeds (a column in torch layout)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.nan_to_num(a / per_out) + np.nan_to_num(a / per_in)
        return rel * norm**RIA_EXPONENT
    raise PruneSettingsError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")


def keep_mask(score: np.ndarray, sparsity: float, pattern: str = "unstructured") -> np.ndarray:
    """Boolean (in, out) mask of kept weights: per output neuron (column) the lowest scores go."""
    n_in, n_out = score.shape
    keep = np.ones(score.shape, dtype=bool)
    if pattern == "2:4":
        if n_in % 4:
            raise PruneSettingsError(f"2:4 pruning needs an input width divisible by 4, got {n_in}")
        groups = score.reshape(n_in // 4, 4, n_out)
        low = np.argpartition(groups, 1, axis=1)[:, :2, :]
        k = keep.reshape(n_in // 4, 4, n_out)
        np.put_along_axis(k, low, False, axis=1)
        return keep
    k = int(math.floor(n_in * sparsity + 1e-9))
    if k <= 0:
        return keep
    if k >= n_in:
        return np.zeros_like(keep)
    low = np.argpartition(score, k - 1, axis=0)[:k, :]
    np.put_along_axis(keep, low, False, axis=0)
    return keep


def _check_settings(method: str, sparsity: float, pattern: str) -> float:
    if method not in METHODS:
        raise PruneSettingsError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if pattern not in PATTERNS:
        raise PruneSettingsError(f"unknown sparsity pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if pattern == "2:4":
        if sparsity is not None and not math.isclose(sparsity, 0.5):
            raise PruneSettingsError(f"2:4 pruning is fixed at 50% sparsity; got --sparsity {sparsity}")
        return 0.5
    if sparsity is None or not 0.0 <= sparsity < 1.0:
        raise PruneSettingsError(f"--sparsity must be within [0, 1), got {sparsity}")
    return float(sparsity)


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------

def _stream_norms(model: ir.Model, blocks: list[FfnBlock], source: FeedSource, *, mask_input: str | None,
                  threads: int, progress: Progress | None) -> dict[str, InputNorms]:
    norms = {b.name: InputNorms.empty(b) for b in blocks}
    weights = BlockWeights(blocks)
    variant = {b.name: b.variant for b in blocks}
    for batch in stream_block_inputs(model, blocks, source, what="calibration data", mask_input=mask_input,
                                     threads=threads, progress=progress):
        for name, x in batch.items():
            g = gelu(weights.pre_activation(name, x), variant[name])
            norms[name].add(np.asarray(x, np.float64), g)
    if progress is not None:
        progress.done()
    if min((n.tokens for n in norms.values()), default=0) == 0:
        raise CalibrationDataError("calibration data: no tokens left after removing padding")
    return norms


def input_norms(model: str | os.PathLike, calib: api.DataSpec, *, data: api.DataOptions | None = None,
                threads: int = 0, show_progress: bool = True) -> dict[str, InputNorms]:
    """One pass over ``calib`` on the original model: every block's input-feature norms (one-shot mode)."""
    data = data or api.DataOptions()
    original = modelio.load(model)
    blocks, rejected = find_blocks(original)
    api._require_blocks(Path(model), blocks, rejected)
    source = api.open_data(calib, api._input_names(original), data)
    return _stream_norms(original, blocks, source, mask_input=data.mask_input, threads=threads,
                         progress=Progress("prune: input norms", enabled=show_progress))


# ---------------------------------------------------------------------------------------------------
# Writing pruned weights back into the graph
# ---------------------------------------------------------------------------------------------------

def _weight_site(linear: Linear) -> tuple[ir.Node, int, ir.Value, bool]:
    """Where the stored weight enters: (consumer node, input index, stored value, stored as (out, in)).

    The compute node is the first of ``linear.nodes`` (MatMul or Gemm). A ``Transpose`` in front of it
    and Gemm's ``transB`` each flip the stored layout relative to (in, out).
    """
    node = linear.nodes[0]
    consumer, index, value, flipped = node, 1, node.inputs[1], False
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and ir.convenience.get_const_tensor(value) is None:
        consumer, index, value, flipped = producer, 0, producer.inputs[0], True
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        if trans_b is not None and trans_b.value:
            flipped = not flipped
    return consumer, index, value, flipped


def _apply_mask(graph: ir.Graph, linear: Linear, keep: np.ndarray, name: str) -> None:
    """Zero the pruned weights in the stored tensor (its own layout and dtype); shared tensors are copied."""
    consumer, index, value, flipped = _weight_site(linear)
    tensor = ir.convenience.get_const_tensor(value)
    stored = np.asarray(tensor.numpy())
    mask = keep.T if flipped else keep
    pruned = np.where(mask, stored, np.zeros((), stored.dtype)).astype(stored.dtype)
    if value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_output():
        value.const_value = ir.tensor(pruned, name=value.name)
        return
    new_name = f"{value.name or name}.pruned"
    while new_name in graph.initializers:
        new_name += "_"
    new = ir.Value(name=new_name, shape=ir.Shape(pruned.shape), type=ir.TensorType(tensor.dtype),
                   const_value=ir.tensor(pruned, name=new_name))
    graph.register_initializer(new)
    consumer.replace_input_with(index, new)
    if value.is_initializer() and not value.uses() and not value.is_graph_output():
        graph.initializers.pop(value.name)


# ---------------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BlockPrune:
    """One pruned block: its shapes and how many W1 / W2 weights were kept."""

    name: str
    d: int
    hidden: int
    d_out: int
    params_original: int  # W1 + W2
    kept_w1: int
    kept_w2: int

    @property
    def kept(self) -> int:
        return self.kept_w1 + self.kept_w2

    @property
    def reduction(self) -> float:
        return 1.0 - self.kept / self.params_original


@dataclasses.dataclass
class PruneReport:
    """What was pruned. Parameters are counted as nonzero weights (no sparse-index overhead)."""

    model: str
    output: str
    method: str
    pattern: str
    sparsity: float
    sequential: bool
    calibration_tokens: int
    blocks: list[BlockPrune]
    seconds: float = 0.0

    def summary(self) -> dict:
        """Blocks pruned, FFN parameter reduction, and the shares touched per token and kept resident."""
        original = sum(b.params_original for b in self.blocks)
        kept = sum(b.kept for b in self.blocks)
        # A pruned FFN reads every kept weight for every token: touched = resident = kept.
        return {"blocks_pruned": len(self.blocks), "ffn_param_reduction": 1.0 - kept / original,
                "params_touched_per_token_ratio": kept / original, "params_resident_ratio": kept / original}

    def to_dict(self) -> dict:
        """Everything, JSON-ready, the summary included."""
        out = dataclasses.asdict(self)
        out["summary"] = self.summary()
        return out

    def table(self) -> str:
        """The per-block table (Markdown)."""
        rows = ["| block | d×D | kept W1 | kept W2 | reduction |", "|---|---|---|---|---|"]
        rows += [f"| {b.name} | {b.d}×{b.hidden} | {b.kept_w1:,} | {b.kept_w2:,} | {b.reduction:.1%} |"
                 for b in self.blocks]
        return "\n".join(rows)

    def write(self, json_path: Path) -> None:
        """Write ``to_dict()`` as JSON."""
        json_path.write_text(json.dumps(self.to_dict(), indent=2))


def prune(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calib: api.DataSpec,
    *,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    data: api.DataOptions | None = None,
    sequential: bool = True,
    norms: dict[str, InputNorms] | None = None,
    threads: int = 0,
    show_progress: bool = True,
) -> PruneReport:
    """Prune W1 and W2 of every foldable FFN block of ``model`` with Wanda or RIA; write ``output``.

    ``sparsity`` is the share of each output neuron's weights removed (so also of W1 + W2); ``pattern``
    ``"2:4"`` is fixed at 50%. ``calib`` is any data spec :func:`tardis_compile.api.open_data` accepts.
    ``norms`` (from :func:`input_norms`) skips calibration; it implies one-shot (``sequential=False``).
    The output is checked (``onnx.checker``, an ORT session) before it is moved into place atomically;
    the input is never overwritten.
    """
    start = time.monotonic()
    sparsity = _check_settings(method, sparsity, pattern)
    if norms is not None and sequential:
        raise PruneSettingsError("precomputed norms are one-shot statistics: pass sequential=False with norms")
    data = data or api.DataOptions()
    model_path, out_path = Path(model), Path(output)
    modelio.check_destination(model_path, out_path, reads={"the calibration data": calib,
                                                           "the tokenizer": data.tokenizer_file()})
    modelio.check_model_name(out_path)
    pruned = modelio.load(model_path)
    blocks, rejected = find_blocks(pruned)
    if not blocks and count_rewritten(pruned):  # unlike optimize run twice, an output was asked for: an error
        raise NoFoldableBlockError(f"nothing to prune: '{model_path}' is a tardis-compile output (its FFN blocks "
                                   "are rewritten); prune the original model")
    api._require_blocks(model_path, blocks, rejected)
    if pattern == "2:4":
        bad = [f"{b.name} ({'d' if b.d % 4 else 'D'}={b.d if b.d % 4 else b.hidden})" for b in blocks
               if b.d % 4 or b.hidden % 4]
        if bad:
            raise PruneSettingsError(f"2:4 pruning needs input widths divisible by 4: {', '.join(bad)}")
    source = None if norms is not None else api.open_data(calib, api._input_names(pruned), data)
    progress: Callable[[str], Progress] = lambda label: Progress(label, enabled=show_progress)  # noqa: E731
    if norms is None and not sequential:
        norms = _stream_norms(pruned, blocks, source, mask_input=data.mask_input, threads=threads,
                              progress=progress("prune: input norms"))
    elif norms is not None:
        missing = [b.name for b in blocks if b.name not in norms]
        if missing:
            raise CalibrationDataError(f"input norms do not cover blocks {missing}")
    reports, tokens = [], None
    for block in blocks:
        if sequential:  # statistics of this block on the model pruned so far
            stats = _stream_norms(pruned, [block], source, mask_input=data.mask_input, threads=threads,
                                  progress=progress(f"prune: input norms {block.name}"))[block.name]
        else:
            stats = norms[block.name]
        tokens = stats.tokens if tokens is None else min(tokens, stats.tokens)
        keep1 = keep_mask(scores(block.w1(), stats.x_norm, method), sparsity, pattern)
        keep2 = keep_mask(scores(block.w2(), stats.g_norm, method), sparsity, pattern)
        _apply_mask(pruned.graph, block.linear1, keep1, f"{block.name}.W1")
        _apply_mask(pruned.graph, block.linear2, keep2, f"{block.name}.W2")
        reports.append(BlockPrune(block.name, block.d, block.hidden, block.d_out,
                                  block.d * block.hidden + block.hidden * block.d_out,
                                  int(keep1.sum()), int(keep2.sum())))
    pruned.metadata_props.update({"tardis.version": api.version(), "tardis.baseline": method,
                                  "tardis.pattern": pattern, "tardis.sparsity": f"{sparsity:g}",
                                  "tardis.sequential": str(sequential).lower()})

    def validate(tmp_path: Path) -> None:
        ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])

    modelio.save(pruned, out_path, validate=validate)
    return PruneReport(str(model_path), str(out_path), method, pattern, sparsity, sequential, int(tokens or 0),
                       reports, seconds=time.monotonic() - start)
