"""``--max-error``: the fallback rate at which no block's own output error exceeds a bound (METHOD.md §5).

The error target is solved through the same single budget multiplier as ``--target-fallback``: the lines
of every candidate rate come from the same fit (one λ across all neurons and blocks), and the rate is the
smallest whose *worst* block stays within the bound. A block's own error is the relative error of its
output on its own (original) input,

    e_b(rate) = ‖ Σ_{j in range} (GELU(h_j) − α_j h_j − β_j)·W2[j,:] ‖ / ‖ GELU(h)·W2 + b2 ‖

summed over tokens: what the fold leaves behind when every out-of-range neuron is flagged. It is measured,
not modelled (correlations between neurons' residuals matter), in one extra pass (a replay of the block
inputs pass 1 recorded, see :mod:`tardis_compile.calibrate`) over the first ``max_tokens`` calibration
tokens of every block, for a geometric grid of rates, then again for a finer grid inside the bracket that
holds the bound, and interpolated log-log between grid points. Two effects make the delivered error a
little lower than the solved bound:
the refit of the folded matrix only removes error, and an inexact predictor flags more than the
out-of-range pairs (its few misses, 1 − recall, are the effect the other way).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from tardis_compile.calibrate import BlockWeights, stream_block_inputs
from tardis_compile.errors import TardisError
from tardis_compile.feeds import FeedSource
from tardis_compile.fit import Lines
from tardis_compile.gelu import gelu
from tardis_compile.passes.ffn_match import FfnBlock
from tardis_compile.progress import Progress

RATES = tuple(float(r) for r in np.geomspace(0.001, 0.6, 14))
MAX_TOKENS = 8192


@dataclasses.dataclass
class ErrorCurve:
    """Each block's own relative output error at each candidate fallback rate (measured)."""

    rates: np.ndarray  # increasing
    errors: dict[str, np.ndarray]  # block → error per rate
    tokens: int

    def worst(self) -> np.ndarray:
        return np.max(np.stack(list(self.errors.values())), axis=0)

    def _bracket(self, max_error: float) -> int:
        """Index of the first grid point whose worst error is within ``max_error`` (0: the first)."""
        worst = np.minimum.accumulate(self.worst())  # more fallback never costs accuracy
        if worst[-1] > max_error:
            raise TardisError(f"--max-error {max_error:g} is out of reach: even a {self.rates[-1]:.0%} fallback "
                              f"rate leaves a block error of {worst[-1]:.4g} on the calibration data")
        return int(np.argmax(worst <= max_error))

    def rate_for(self, max_error: float) -> float:
        """The smallest rate whose worst block error is ``max_error`` (log-log interpolation)."""
        k = self._bracket(max_error)
        if k == 0:
            return float(self.rates[0])
        worst = np.minimum.accumulate(self.worst())
        e0, e1 = np.log(max(worst[k - 1], 1e-300)), np.log(max(worst[k], 1e-300))
        r0, r1 = np.log(self.rates[k - 1]), np.log(self.rates[k])
        t = 1.0 if e0 == e1 else (e0 - np.log(max_error)) / (e0 - e1)
        return float(np.exp(r0 + t * (r1 - r0)))

    def merged(self, other: "ErrorCurve") -> "ErrorCurve":
        rates = np.concatenate([self.rates, other.rates])
        order = np.argsort(rates, kind="stable")
        errors = {n: np.concatenate([e, other.errors[n]])[order] for n, e in self.errors.items()}
        return ErrorCurve(rates[order], errors, min(self.tokens, other.tokens))

    def to_dict(self) -> dict:
        return {"rates": self.rates.tolist(), "worst_error": self.worst().tolist(), "tokens": self.tokens}


def solve(probe: Callable[[tuple[float, ...]], ErrorCurve], max_error: float,
          refine: int = 6) -> tuple[float, ErrorCurve]:
    """The fallback rate for ``max_error``: a coarse grid brackets it, ``refine`` rates inside the
    bracket (a second probe) pin it down. ``probe(rates)`` measures the curve (see :func:`measure`)."""
    curve = probe(RATES)
    k = curve._bracket(max_error)
    if k > 0 and refine > 0:
        inner = np.geomspace(curve.rates[k - 1], curve.rates[k], refine + 2)[1:-1]
        curve = curve.merged(probe(tuple(float(r) for r in inner)))
    return curve.rate_for(max_error), curve


def measure(model: ir.Model, blocks: list[FfnBlock], source: FeedSource, lines_at: Callable[[float], dict[str, Lines]],
            rates: tuple[float, ...], *, max_tokens: int = MAX_TOKENS, mask_input: str | None = None,
            threads: int = 0, progress: Progress | None = None) -> ErrorCurve:
    """Stream block inputs until ``max_tokens`` per block and measure every block's own error at ``rates``.

    ``lines_at(rate)``: the fitted lines of every block at a fallback rate (the plan the target drives).
    """
    plans = [lines_at(r) for r in rates]
    weights = BlockWeights(blocks)
    w2 = {b.name: np.asarray(b.w2(), np.float32) for b in blocks}
    b2 = {b.name: np.asarray(b.b2(), np.float64) for b in blocks}
    variant = {b.name: b.variant for b in blocks}
    err2 = {b.name: np.zeros(len(rates)) for b in blocks}
    ref2 = {b.name: 0.0 for b in blocks}
    seen = 0
    with contextlib.closing(stream_block_inputs(model, blocks, source, what="calibration data",
                                                mask_input=mask_input, threads=threads,
                                                progress=progress)) as stream:  # ends the session early
        for batch in stream:
            take = max_tokens - seen
            for name, x in batch.items():
                x = x[:take]
                h = weights.pre_activation(name, x).astype(np.float64)
                g = gelu(h, variant[name])
                y = (g.astype(np.float32) @ w2[name]).astype(np.float64) + b2[name]
                ref2[name] += float(np.sum(y * y))
                for k, plan in enumerate(plans):
                    lines = plan[name]
                    inside = (h >= lines.lo) & (h <= lines.hi)
                    residual = np.where(inside, g - lines.alpha * h - lines.beta, 0.0).astype(np.float32)
                    err2[name][k] += float(np.sum(np.square(residual @ w2[name], dtype=np.float64)))
            seen += min(take, next(iter(batch.values())).shape[0])
            if seen >= max_tokens:
                break
    if progress is not None:
        progress.done()
    errors = {name: np.sqrt(err2[name] / max(ref2[name], 1e-300)) for name in err2}
    return ErrorCurve(np.asarray(rates), errors, seen)
