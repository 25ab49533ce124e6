"""Per-neuron linear pieces: choose each neuron's range ``[lo, hi]`` and fit GELU by a line on it.

Two strategies (METHOD.md §2):

* ``coverage`` (the paper): the shortest interval holding a fraction ``c`` of the neuron's samples.
* ``error`` (ours, default): score candidate intervals between quantile edges by
  ``SSE_in/N · ‖W2[j,:]‖² + λ · P(h ∉ interval)`` and keep the cheapest; one multiplier λ, found by
  bisection, meets a global fallback-rate target across all neurons of all blocks, so the fallback
  budget goes where it buys the most output accuracy.

Lines are the float64 least-squares fit of the block's own GELU variant on the in-range samples, from
the exact per-bin moments of :mod:`tardis_compile.histogram`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import ndtr

from tardis_compile.gelu import gelu
from tardis_compile.histogram import NeuronStats

STRATEGIES = ("error", "coverage")
_QUANTILES = 48


@dataclasses.dataclass
class Lines:
    """Fitted pieces of one block's D neurons (float64)."""

    lo: np.ndarray
    hi: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    coverage: np.ndarray  # calibrated share of samples in range, per neuron
    sse: np.ndarray  # in-range squared error of the line, summed over samples


def _gelu_slope(h: np.ndarray, variant: str) -> np.ndarray:
    if variant == "none":
        return ndtr(h) + h * np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    eps = 1e-4
    return (gelu(h + eps, variant) - gelu(h - eps, variant)) / (2 * eps)


def _interval_sums(prefix: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(6, D, K) sums of each moment over bins [a, b) for index arrays a, b of shape (D, K)."""
    hi = np.take_along_axis(prefix, np.broadcast_to(b, (prefix.shape[0],) + b.shape), axis=2)
    lo = np.take_along_axis(prefix, np.broadcast_to(a, (prefix.shape[0],) + a.shape), axis=2)
    return hi - lo


def _line_fit(sums: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares line and its SSE from interval sums (n, Σh, Σh², Σg, Σg², Σhg)."""
    n, sh, shh, sg, sgg, shg = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_n = np.maximum(n, 1.0)
        mean_h, mean_g = sh / safe_n, sg / safe_n
        sxx = shh - sh * mean_h
        sxy = shg - sh * mean_g
        syy = sgg - sg * mean_g
        ok = sxx > 1e-9 * np.maximum(n, 1.0) * (1.0 + mean_h * mean_h)
        alpha = np.where(ok, sxy / np.where(ok, sxx, 1.0), _gelu_slope(mean_h, variant))
        sse = np.where(ok, syy - sxy * sxy / np.where(ok, sxx, 1.0), 0.0)
    beta = mean_g - alpha * mean_h
    empty = n < 0.5
    alpha, beta = np.where(empty, 0.0, alpha), np.where(empty, 0.0, beta)
    return alpha, beta, np.maximum(sse, 0.0)


def _lines_from(stats: NeuronStats, prefix: np.ndarray, a: np.ndarray, b: np.ndarray) -> Lines:
    edges = stats.grid.edges()
    sums = _interval_sums(prefix, a[:, None], b[:, None])[:, :, 0]
    alpha, beta, sse = _line_fit(sums, stats.variant)
    total = np.maximum(prefix[0, :, -1], 1.0)
    empty = b <= a
    lo = np.where(empty, np.inf, edges[a])
    hi = np.where(empty, -np.inf, edges[np.minimum(b, len(edges) - 1)])
    return Lines(lo, hi, alpha, beta, np.where(empty, 0.0, sums[0] / total), sse)


def full_range_lines(stats: NeuronStats) -> Lines:
    """Each neuron's least-squares line over all its samples, with the unbounded range (−∞, ∞)."""
    zeros = np.zeros(stats.neurons, np.int64)
    return _lines_from(stats, stats.prefix(), zeros, zeros + stats.grid.bins)


def coverage_lines(stats: NeuronStats, coverage: float) -> Lines:
    """The paper's strategy: per neuron, the shortest interval holding ``coverage`` of its samples."""
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be within [0, 1], got {coverage}")
    prefix = stats.prefix()
    cum = prefix[0]
    edges = stats.grid.edges()
    total = cum[:, -1]
    a_best = np.zeros(stats.neurons, np.int64)
    b_best = np.zeros(stats.neurons, np.int64)
    for j in range(stats.neurons):
        need = coverage * total[j]
        if need <= 0:
            continue
        starts = np.arange(cum.shape[1])
        ends = np.searchsorted(cum[j], cum[j] + need - 1e-9, side="left")
        valid = ends < cum.shape[1]
        with np.errstate(invalid="ignore"):  # inf − inf where both ends are open
            width = np.where(valid, edges[np.minimum(ends, len(edges) - 1)] - edges[starts], np.inf)
        # prefer finite widths; among equal widths, the earliest start
        width = np.where(np.isnan(width), np.inf, width)
        k = int(np.argmin(width)) if np.isfinite(width).any() else 0
        if not np.isfinite(width).any():  # needs an open-ended bin: take everything
            a_best[j], b_best[j] = 0, cum.shape[1] - 1
        else:
            a_best[j], b_best[j] = starts[k], ends[k]
    return _lines_from(stats, prefix, a_best, b_best)


@dataclasses.dataclass
class _Candidates:
    """Per-block candidate intervals and their two cost terms (error, fallback probability)."""

    a: np.ndarray  # (D, K) start bin
    b: np.ndarray  # (D, K) end bin (exclusive)
    err: np.ndarray  # (D, K) SSE/N · ‖W2_j‖²
    p_out: np.ndarray  # (D, K) share of samples outside


def _candidates(stats: NeuronStats, prefix: np.ndarray, w2_norm2: np.ndarray) -> _Candidates:
    cum = prefix[0]
    total = np.maximum(cum[:, -1:], 1.0)
    qs = np.linspace(0.0, 1.0, _QUANTILES)
    edge_idx = np.stack([(cum < q * total - 1e-9).sum(axis=1) for q in qs], axis=1)  # (D, Q)
    p, q = np.triu_indices(_QUANTILES, k=1)
    a = np.concatenate([edge_idx[:, p], np.zeros((stats.neurons, 1), np.int64)], axis=1)
    b = np.concatenate([edge_idx[:, q], np.zeros((stats.neurons, 1), np.int64)], axis=1)  # last: empty
    b = np.maximum(a, b)
    sums = _interval_sums(prefix, a, b)
    _, _, sse = _line_fit(sums, stats.variant)
    err = sse / total * w2_norm2[:, None]
    p_out = 1.0 - sums[0] / total
    return _Candidates(a, b, err, p_out)


def error_aware_lines(
    stats: dict[str, NeuronStats], w2_norm2: dict[str, np.ndarray], target_fallback: float
) -> tuple[dict[str, Lines], float]:
    """Our default: one λ across all blocks meets ``target_fallback`` (mean share of flagged pairs).

    Returns the lines per block and the λ found.
    """
    if not 0.0 <= target_fallback <= 1.0:
        raise ValueError(f"target fallback rate must be within [0, 1], got {target_fallback}")
    prefixes = {name: s.prefix() for name, s in stats.items()}
    cands = {name: _candidates(stats[name], prefixes[name], w2_norm2[name]) for name in stats}
    neurons = sum(c.a.shape[0] for c in cands.values())

    def choose(lam: float) -> tuple[dict[str, np.ndarray], float]:
        picks, out = {}, 0.0
        for name, c in cands.items():
            k = np.argmin(c.err + lam * c.p_out, axis=1)
            picks[name] = k
            out += float(np.take_along_axis(c.p_out, k[:, None], axis=1).sum())
        return picks, out / neurons

    lo_l, hi_l = -30.0, 30.0  # log λ
    picks, rate = choose(math.exp(hi_l))
    if rate > target_fallback:  # even a huge λ cannot reach the target: keep the best effort
        best = picks
    else:
        best = picks
        for _ in range(60):
            mid = 0.5 * (lo_l + hi_l)
            picks, rate = choose(math.exp(mid))
            if rate <= target_fallback:
                hi_l, best = mid, picks
            else:
                lo_l = mid
    lines = {}
    for name, c in cands.items():
        k = best[name][:, None]
        a = np.take_along_axis(c.a, k, axis=1)[:, 0]
        b = np.take_along_axis(c.b, k, axis=1)[:, 0]
        lines[name] = _lines_from(stats[name], prefixes[name], a, b)
    return lines, math.exp(hi_l)
