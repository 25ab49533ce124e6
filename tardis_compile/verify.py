"""Validation as its own step: run the original and the optimized model on the same held-out feeds.

Model outputs: max abs error, mean cosine (rows of the last axis), relative error, share of elements off
by more than ``atol + rtol·|ref|``. Per rewritten block (found from the ``GuardedFallback`` nodes, so this
works on any optimized file): measured coverage (share of exact pre-activations inside the range),
fallback rate (share of token-neuron pairs flagged), predictor recall and precision, and the relative
error of the block's output tensor — which keeps its name in both models — including what upstream
blocks contributed, and the block's *own* relative error: its output against the original block applied
to the same input (what ``--max-error`` bounds).

The two models never run at the same time: the original goes first, its outputs (and the feeds) going
to a scratch folder batch by batch, then the optimized model on the same feeds. The memory is that of
the larger model, not of both; block weights read in place are released after each use.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tardis_compile import fallback_op, fused_op, modelio
from tardis_compile.calibrate import BlockWeights, capture_session
from tardis_compile.errors import CalibrationDataError, TardisError, one_line
from tardis_compile.feeds import FeedSource, input_specs, mask_rows, validated
from tardis_compile.gelu import gelu
from tardis_compile.passes.ffn_match import find_blocks


@dataclasses.dataclass
class Thresholds:
    """Pass/fail bounds of a verification (None: not checked)."""

    max_abs_error: float | None = None
    min_cosine: float | None = None
    atol: float = 1e-3
    rtol: float = 1e-2
    max_share_over: float | None = None

    def __post_init__(self) -> None:
        bounds = {"max_abs_error": (0.0, math.inf), "min_cosine": (-1.0, 1.0), "atol": (0.0, math.inf),
                  "rtol": (0.0, math.inf), "max_share_over": (0.0, 1.0)}
        for name, (lo, hi) in bounds.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and lo <= value <= hi):
                flag = "--" + name.replace("_", "-")
                raise TardisError(f"{flag} must be a number in [{lo:g}, {hi:g}], got {value}")


@dataclasses.dataclass
class OutputMetrics:
    """Original vs optimized on one model output, over all evaluation batches."""

    name: str
    max_abs_error: float
    mean_cosine: float
    min_cosine: float
    relative_error: float
    share_over_bound: float


@dataclasses.dataclass
class BlockMetrics:
    """One rewritten block on the evaluation data: range coverage, fallback rate, the predictor's recall and
    precision, and the block's relative output error (in the model, and on its own original input)."""

    name: str
    coverage: float
    fallback_rate: float
    recall: float
    precision: float
    relative_error: float
    tokens: int
    own_error: float = float("nan")  # vs the original block on the same input (nan: original block not found)


@dataclasses.dataclass
class Verification:
    """What ``verify`` measured (per output and per block) and which thresholds failed."""

    outputs: list[OutputMetrics]
    blocks: list[BlockMetrics]
    batches: int
    failures: list[str]

    @property
    def passed(self) -> bool:
        """No threshold failed."""
        return not self.failures

    @property
    def max_abs_error(self) -> float:
        """The largest absolute error over all outputs."""
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def mean_cosine(self) -> float:
        """Mean over outputs of the per-row cosine similarity's mean."""
        return float(np.mean([o.mean_cosine for o in self.outputs])) if self.outputs else 1.0


@dataclasses.dataclass
class _FallbackSite:
    """Operands of one GuardedFallback node, read from the optimized model."""

    name: str
    x: ir.Value
    h_hat: ir.Value
    y: ir.Value
    lo: np.ndarray  # the fitted range
    hi: np.ndarray
    guard_lo: np.ndarray  # what the op compares ĥ with: the range shrunk by the predictor's margin
    guard_hi: np.ndarray
    w1t: np.ndarray  # as stored (the model's dtype; memory-mapped when read from external data)
    b1: np.ndarray

    def pre_activation(self, rows: np.ndarray) -> np.ndarray:
        """Exact ``h = x·W1 + b1`` in float64 (``W1`` widened only for this product)."""
        h = rows.astype(np.float64) @ np.asarray(self.w1t, np.float64).T + self.b1
        modelio.drop_pages(self.w1t)
        return h


def _bound_and_guard(value: ir.Value) -> tuple[np.ndarray, np.ndarray]:
    """(fitted range bound, guard) behind a ``lo``/``hi`` operand: a constant (no margin), or
    ``range ± margin`` evaluated in the stored dtype as the runtime does (float16 models: in float32,
    then cast)."""
    const = ir.convenience.get_const_tensor(value)
    if const is not None:
        return np.asarray(const.numpy(), np.float64), np.asarray(const.numpy(), np.float64)
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast":
        bound, guard = _bound_and_guard(producer.inputs[0])
        to = ir.DataType(producer.attributes["to"].as_int()).numpy()
        return bound, np.asarray(np.asarray(guard, np.float32).astype(to), np.float64)
    operands = [ir.convenience.get_const_tensor(v) for v in producer.inputs] if producer is not None else [None]
    if producer is None or producer.op_type not in ("Add", "Sub") or any(o is None for o in operands):
        raise ValueError(f"guard '{value.name}' is neither a constant nor range ± margin")
    bound, margin = (o.numpy() for o in operands)
    guard = bound + margin if producer.op_type == "Add" else bound - margin  # in their stored dtype
    return np.asarray(bound, np.float64), np.asarray(guard, np.float64)


def fallback_sites(model: ir.Model) -> list[_FallbackSite]:
    sites = []
    for node in fallback_op.fallback_nodes(model.graph):
        operand = fallback_op.operands(node)
        w1t = ir.convenience.get_const_tensor(operand["w1t"]).numpy()
        b1 = np.asarray(ir.convenience.get_const_tensor(operand["b1"]).numpy(), np.float64)
        (lo, guard_lo), (hi, guard_hi) = (_bound_and_guard(operand[name]) for name in ("lo", "hi"))
        sites.append(_FallbackSite(node.name, node.inputs[0], node.inputs[2], node.outputs[0],
                                   lo, hi, guard_lo, guard_hi, w1t, b1))
    return sites


class _Accumulator:
    """Running sums for one compared tensor (memory independent of data size)."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.cos: list[float] = []
        self.err2 = self.ref2 = 0.0
        self.over = self.count = 0

    def add(self, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> None:
        """Add one batch. Cosines are per row of the last axis, except when that axis has size 1 (a score
        per row, whose one-element "cosine" would only compare signs): then one per batch, over the whole
        tensor. A value that is finite on one side only (NaN or ±inf where the other is finite) is an
        infinite error, and its row's cosine 0: a broken output can never pass."""
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        ok_r, ok_g = np.isfinite(ref64), np.isfinite(got64)
        with np.errstate(invalid="ignore"):
            diff = np.where(ok_r & ok_g, got64 - ref64, np.where(ok_r != ok_g, np.inf, 0.0))
        ref64, got64 = np.where(ok_r, ref64, 0.0), np.where(ok_g, got64, 0.0)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)
        width = ref64.shape[-1] if ref64.ndim else 1
        r = ref64.reshape(-1, width) if width > 1 else ref64.reshape(1, -1)
        g = got64.reshape(r.shape)
        broken = (ok_r != ok_g).reshape(r.shape).any(axis=1)
        denom = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
        cos = np.where(denom > 0, (r * g).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
        self.cos.extend(np.where(broken, 0.0, cos).tolist())
        self.err2 += float(np.sum(diff * diff))
        self.ref2 += float(np.sum(ref64 * ref64))
        self.over += int(np.sum(np.abs(diff) > atol + rtol * np.abs(ref64)))
        self.count += diff.size


def compare(
    original: ir.Model, optimized: ir.Model, source: FeedSource, *, thresholds: Thresholds | None = None,
    mask_input: str | None = None, threads: int = 0,
    optimized_options: ort.SessionOptions | None = None,
) -> Verification:
    """Run both models on ``source`` (one after the other) and measure outputs and rewritten blocks.

    A fused predictor and fallback (``GuardedFallbackNBits``) is measured as the unfused pair, which
    computes the same (``tests/test_fused_op.py``) and exposes ``ĥ``; ``optimized`` is restored after."""
    fused = fused_op.unfuse(optimized)
    try:
        return _compare(original, optimized, source, thresholds or Thresholds(), mask_input, threads,
                        optimized_options)
    finally:
        if fused:
            fused_op.fuse(optimized)


def _compare(original: ir.Model, optimized: ir.Model, source: FeedSource, thresholds: Thresholds,
             mask_input: str | None, threads: int, optimized_options: ort.SessionOptions | None) -> Verification:
    _require_same_interface(original, optimized)
    sites = fallback_sites(optimized)
    out_names = [v.name for v in original.graph.outputs]
    opt_values = [*optimized.graph.outputs, *(v for s in sites for v in (s.x, s.h_hat, s.y))]
    orig_by_name = {v.name: v for v in _all_values(original)}
    orig_values = [*original.graph.outputs, *(orig_by_name[s.y.name] for s in sites if s.y.name in orig_by_name)]
    orig_blocks = {b.name: b for b in find_blocks(original)[0]}
    own_block = {s.name: orig_blocks.get(fallback_op.block_name(s.name)) for s in sites}
    weights = BlockWeights([b for b in own_block.values() if b is not None])
    w2 = {name: (np.asarray(b.w2(), np.float32), b.b2()) for name, b in own_block.items() if b is not None}
    own_err = {name: _Accumulator() for name in w2}
    outputs = {name: _Accumulator() for name in out_names}
    block_err = {s.name: _Accumulator() for s in sites}
    counts = {s.name: np.zeros(5) for s in sites}  # tokens·D, in-range, flagged, out, flagged∧out
    with tempfile.TemporaryDirectory(prefix="tardis-verify-") as tmp:
        spill = _Spill(Path(tmp))
        with capture_session(original, orig_values, threads) as s_orig:
            specs = input_specs(s_orig)
            orig_names = [o.name for o in s_orig.get_outputs()]
            for feed in validated(source, specs, "evaluation data")():
                spill.put(feed, dict(zip(orig_names, _run(s_orig, orig_names, feed, "the original model"))))
        del s_orig  # the session (and its mapping of the weights) goes before the optimized one comes
        if spill.batches == 0:
            raise CalibrationDataError("evaluation data: no data")
        with capture_session(optimized, opt_values, threads, options=optimized_options) as s_opt:
            opt_names = [o.name for o in s_opt.get_outputs()]
            for feed, ref in spill:
                got = dict(zip(opt_names, _run(s_opt, opt_names, feed, "the optimized model")))
                for name in out_names:
                    outputs[name].add(*_unpadded(ref[name], got[name], feed, mask_input), thresholds.atol,
                                      thresholds.rtol)
                for site in sites:
                    x = got[site.x.name]
                    rows = x.reshape(-1, x.shape[-1])
                    keep = mask_rows(feed, rows.shape[0], mask_input)
                    h_hat = got[site.h_hat.name].reshape(rows.shape[0], -1)
                    y_ref = ref[site.y.name].reshape(rows.shape[0], -1)
                    y_got = got[site.y.name].reshape(rows.shape[0], -1)
                    if keep is not None:
                        rows, h_hat, y_ref, y_got = rows[keep], h_hat[keep], y_ref[keep], y_got[keep]
                    h = site.pre_activation(rows)
                    inside = (h >= site.lo) & (h <= site.hi)
                    flagged = (h_hat < site.guard_lo) | (h_hat > site.guard_hi)
                    out = ~inside
                    counts[site.name] += [h.size, inside.sum(), flagged.sum(), out.sum(), (flagged & out).sum()]
                    block_err[site.name].add(y_ref, y_got, thresholds.atol, thresholds.rtol)
                    if site.name in own_err:
                        block = own_block[site.name]
                        g = gelu(weights.pre_activation(block.name, rows), block.variant).astype(np.float32)
                        own_err[site.name].add(g @ w2[site.name][0] + w2[site.name][1], y_got, thresholds.atol,
                                               thresholds.rtol)
                        modelio.drop_pages(w2[site.name][0])
        del s_opt
        batches = spill.batches
    out_metrics = [_output_metrics(name, acc) for name, acc in outputs.items()]
    blocks = []
    for site in sites:
        total, inside, flagged, out, hit = counts[site.name]
        acc = block_err[site.name]
        blocks.append(BlockMetrics(
            site.name, inside / total if total else 1.0, flagged / max(total, 1), hit / out if out else 1.0,
            hit / flagged if flagged else 1.0, _relative(acc),
            int(total // max(site.lo.size, 1)),
            _relative(own_err[site.name]) if site.name in own_err else float("nan")))
    return Verification(out_metrics, blocks, batches, _failures(out_metrics, thresholds))


def _unpadded(ref: np.ndarray, got: np.ndarray, feed: dict[str, np.ndarray],
              mask_input: str | None) -> tuple[np.ndarray, np.ndarray]:
    """An output's rows at non-padding positions, when its leading axes are the attention mask's (a
    per-token output); any other output whole. Padding rows would otherwise count (a zeroed row as a
    cosine of 1)."""
    if ref.ndim < 2:
        return ref, got
    rows = ref.reshape(-1, ref.shape[-1])
    keep = mask_rows(feed, rows.shape[0], mask_input)
    if keep is None:
        return ref, got
    return rows[keep], got.reshape(rows.shape)[keep]


def _run(session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as err:  # ORT's own message names the failing node and shapes
        raise CalibrationDataError(f"evaluation data: {which} failed on this data: {one_line(err)}") from err


class _Spill:
    """Feeds and reference outputs of each batch, in a scratch folder (memory: one batch)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.batches = 0
        self._names: list[tuple[list[str], list[str]]] = []

    def put(self, feed: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
        for kind, arrays in (("in", feed), ("ref", ref)):
            for j, array in enumerate(arrays.values()):
                np.save(self.folder / f"{self.batches}.{kind}{j}.npy", np.asarray(array), allow_pickle=False)
        self._names.append((list(feed), list(ref)))
        self.batches += 1

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        for i, (feed_names, ref_names) in enumerate(self._names):
            load = lambda kind, j: np.load(self.folder / f"{i}.{kind}{j}.npy", allow_pickle=False)  # noqa: E731
            yield ({n: load("in", j) for j, n in enumerate(feed_names)},
                   {n: load("ref", j) for j, n in enumerate(ref_names)})


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs


def _relative(acc: _Accumulator) -> float:
    return float(np.sqrt(acc.err2 / max(acc.ref2, 1e-300)))


def _require_same_interface(original: ir.Model, optimized: ir.Model) -> None:
    """The two models must take the same inputs and give the same outputs (names, element types, and the
    sizes both fix)."""
    for what, a, b in (("inputs", original.graph.inputs, optimized.graph.inputs),
                       ("outputs", original.graph.outputs, optimized.graph.outputs)):
        sig_a = {v.name: str(v.dtype) for v in a}
        sig_b = {v.name: str(v.dtype) for v in b}
        if sig_a != sig_b:
            raise TardisError(f"the two models' {what} differ (original: {sig_a}; optimized: {sig_b}): compare a "
                              "model with its own optimized version")
        shapes_b = {v.name: v.shape for v in b}
        for v in a:
            sa, sb = v.shape, shapes_b[v.name]
            if sa is None or sb is None:
                continue
            fixed = [(x, y) for x, y in zip(sa, sb) if isinstance(x, int) and isinstance(y, int)]
            if len(sa) != len(sb) or any(x != y for x, y in fixed):
                dims = lambda shape: "[" + ", ".join(str(x) for x in shape) + "]"  # noqa: E731
                raise TardisError(f"the two models' {what} differ: '{v.name}' is {dims(sa)} in the original and "
                                  f"{dims(sb)} in the optimized model: compare a model with its own optimized "
                                  "version")


def _output_metrics(name: str, acc: _Accumulator) -> OutputMetrics:
    cos = np.asarray(acc.cos) if acc.cos else np.ones(1)
    return OutputMetrics(name, acc.max_abs, float(cos.mean()), float(cos.min()), _relative(acc),
                         acc.over / max(acc.count, 1))


def _failures(outputs: list[OutputMetrics], t: Thresholds) -> list[str]:
    failures = []
    for o in outputs:
        if t.max_abs_error is not None and o.max_abs_error > t.max_abs_error:
            failures.append(f"output '{o.name}': max abs error {o.max_abs_error:.3g} > {t.max_abs_error:g}")
        if t.min_cosine is not None and o.mean_cosine < t.min_cosine:
            failures.append(f"output '{o.name}': mean cosine {o.mean_cosine:.5f} < {t.min_cosine:g}")
        if t.max_share_over is not None and o.share_over_bound > t.max_share_over:
            failures.append(f"output '{o.name}': {o.share_over_bound:.2%} of elements over "
                            f"atol {t.atol:g} + rtol {t.rtol:g}")
    return failures


def load_pair(original: str | Path, optimized: str | Path) -> tuple[ir.Model, ir.Model]:
    from tardis_compile.modelio import load

    return load(original), load(optimized)
