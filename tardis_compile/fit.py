"""Per-neuron linear pieces: choose each neuron's range ``[lo, hi]`` and fit GELU by a line on it.

Two strategies (METHOD.md §2):

* ``coverage`` (the paper): the shortest interval holding a fraction ``c`` of the neuron's samples.
* ``error`` (ours, default): score candidate intervals between quantile edges by
  ``SSE_in/N · ‖W2[j,:]‖² + λ · P(h ∉ interval)`` and keep the cheapest; one multiplier λ, found by
  bisection, meets a global fallback-rate target across all neurons of all blocks, so the fallback
  budget goes where it buys the most output accuracy.

Lines are the float64 least-squares fit of the block's own GELU variant on the in-range samples, from
the exact per-bin moments of :mod:`tardis_compile.histogram`.

The error-aware search keeps, per neuron, only the candidates that can be the (first) minimiser of
``err + λ·p_out`` for some λ > 0: those on the lower convex hull of the points ``(p_out, err)``, within a
tolerance far above floating-point rounding (:func:`_prunable`). That is typically a dozen of the 1,129
candidates, so the candidates of every block fit in memory at once and each bisection step is cheap;
the chosen intervals are exactly those of the exhaustive search (``tests/test_fit.py``). Blocks are
handled one at a time and neurons in chunks, so the transient memory is one block's prefix sums.
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


def _centred(sums: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centred sums of an interval: ``n, mean_h, mean_g, Sxx, Sxy, Syy`` and where the line is defined."""
    n, sh, shh, sg, sgg, shg = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_n = np.maximum(n, 1.0)
        mean_h, mean_g = sh / safe_n, sg / safe_n
        sxx = shh - sh * mean_h
        sxy = shg - sh * mean_g
        syy = sgg - sg * mean_g
        ok = sxx > 1e-9 * np.maximum(n, 1.0) * (1.0 + mean_h * mean_h)
    return n, mean_h, mean_g, sxx, sxy, syy, ok


def _sse(sxx: np.ndarray, sxy: np.ndarray, syy: np.ndarray, ok: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, syy - sxy * sxy / np.where(ok, sxx, 1.0), 0.0)


def _line_fit(sums: np.ndarray, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares line and its SSE from interval sums (n, Σh, Σh², Σg, Σg², Σhg)."""
    n, mean_h, mean_g, sxx, sxy, syy, ok = _centred(sums)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(ok, sxy / np.where(ok, sxx, 1.0), _gelu_slope(mean_h, variant))
    sse = _sse(sxx, sxy, syy, ok)
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


_CHUNK = 512  # neurons per step of the candidate search: (6, 512, 1129) float64 sums ≈ 28 MB
_PAIRS = np.triu_indices(_QUANTILES, k=1)  # candidate (start, end) quantile pairs, then one empty interval
_TOLERANCE = 1e-10  # of a neuron's full-range error: far above the rounding of err + λ·p_out (≈ 1e-15)


@dataclasses.dataclass
class _Candidates:
    """Per-block candidate intervals and their two cost terms (error, fallback probability).

    Rows are neurons; columns the candidates that can win for some λ, in their original order, padded
    with ``err = inf`` (never chosen) to the block's widest row.
    """

    a: np.ndarray  # (D, H) start bin
    b: np.ndarray  # (D, H) end bin (exclusive)
    err: np.ndarray  # (D, H) SSE/N · ‖W2_j‖²
    p_out: np.ndarray  # (D, H) share of samples outside


def _all_candidates(prefix: np.ndarray, w2_norm2: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every candidate of some neurons: intervals between quantile edges of each neuron's samples plus
    the empty interval; ``(a, b, err, p_out)``, each (neurons, K)."""
    cum = prefix[0]
    total = np.maximum(cum[:, -1:], 1.0)
    qs = np.linspace(0.0, 1.0, _QUANTILES)
    edge_idx = np.stack([(cum < q * total - 1e-9).sum(axis=1) for q in qs], axis=1)  # (n, Q)
    p, q = _PAIRS
    zeros = np.zeros((cum.shape[0], 1), np.int64)
    a = np.concatenate([edge_idx[:, p], zeros], axis=1)
    b = np.maximum(a, np.concatenate([edge_idx[:, q], zeros], axis=1))  # last: empty
    # interval sums P[b] − P[a], reading the prefix only at the Q edges (then at the empty interval's 0)
    at_edges = np.take_along_axis(prefix, np.broadcast_to(edge_idx, (prefix.shape[0],) + edge_idx.shape), axis=2)
    at_edges = np.concatenate([at_edges, prefix[:, :, :1]], axis=2)  # index Q: bin 0
    lo_idx = np.concatenate([p, [_QUANTILES]])
    hi_idx = np.concatenate([q, [_QUANTILES]])
    sums = at_edges[:, :, hi_idx] - at_edges[:, :, lo_idx]  # edges never decrease: b ≥ a already
    _, _, _, sxx, sxy, syy, ok = _centred(sums)
    sse = np.maximum(_sse(sxx, sxy, syy, ok), 0.0)
    err = sse / total * w2_norm2[:, None]
    p_out = 1.0 - sums[0] / total
    return a, b, err, p_out


def _prunable(a: np.ndarray, b: np.ndarray, err: np.ndarray, p_out: np.ndarray) -> np.ndarray:
    """(n, K) mask of candidates that are never the first minimiser of ``err + λ·p_out`` over λ > 0.

    * a repeat of an earlier candidate's interval (all empty intervals alike) ties with it and loses on
      order;
    * a candidate lying more than ``δ = _TOLERANCE·err_full`` above the lower convex hull of its
      neuron's points ``(p_out, err)`` loses to a hull point by at least δ for every λ. The full range
      (``p_out = 0``) is a candidate, so the minimum never exceeds its error ``err_full``, and the
      rounding of ``err + λ·p_out`` (all terms ≥ 0) is below 3 ulp of that: δ ≈ 10⁵ ulp leaves room.

    Neurons without a ``p_out = 0`` candidate (no samples) or with non-finite errors are not pruned
    beyond repeats.
    """
    n, k = err.shape
    rows = np.arange(n)[:, None]
    # repeats: same (a, b); every empty interval as one key
    key = np.where(b > a, a * (int(b.max(initial=0)) + 1) + b, -1)
    order = np.argsort(key, axis=1, kind="stable")
    sorted_key = key[rows, order]
    repeat = np.zeros((n, k), bool)
    repeat[rows, order[:, 1:]] = sorted_key[:, 1:] == sorted_key[:, :-1]
    # lower-left hull (decreasing part) of the points sorted by p_out, then err: the Pareto front first
    finite = np.isfinite(err).all(axis=1)
    order = np.lexsort((err, p_out), axis=1)
    xs, ys = p_out[rows, order], err[rows, order]
    best = np.minimum.accumulate(ys, axis=1)
    front = np.ones((n, k), bool)
    front[:, 1:] = ys[:, 1:] < best[:, :-1]
    width = int(front.sum(axis=1).max())
    pick = np.argsort(~front, axis=1, kind="stable")[:, :width]
    fx, fy = xs[rows, pick], ys[rows, pick]
    count = front.sum(axis=1)
    hx, hy = np.zeros_like(fx), np.zeros_like(fy)  # hull stacks (monotone chain, vectorised over rows)
    top = np.zeros(n, np.int64)
    for t in range(width):
        live = np.nonzero(count > t)[0]
        cx, cy = fx[live, t], fy[live, t]
        popping = live[top[live] >= 2]
        while popping.size:
            i = top[popping]
            ox, oy = hx[popping, i - 2], hy[popping, i - 2]
            ax, ay = hx[popping, i - 1], hy[popping, i - 1]
            px, py = fx[popping, t], fy[popping, t]
            pop = (ax - ox) * (py - oy) - (ay - oy) * (px - ox) <= 0.0
            popping = popping[pop]
            top[popping] -= 1
            popping = popping[top[popping] >= 2]
        hx[live, top[live]], hy[live, top[live]] = cx, cy
        top[live] += 1
    # height of every point above the hull, extended flat at its lowest error right of its last vertex
    envelope = np.empty_like(err)
    for j in range(n):
        envelope[j] = np.interp(p_out[j], hx[j, :top[j]], hy[j, :top[j]])
    err_full = hy[:, 0]
    exact = finite & (hx[:, 0] == 0.0)  # the bound needs a p_out = 0 candidate
    far = err - envelope > _TOLERANCE * err_full[:, None]
    return repeat | (far & exact[:, None])


def _candidates(stats: NeuronStats, prefix: np.ndarray, w2_norm2: np.ndarray) -> _Candidates:
    parts = []
    for start in range(0, stats.neurons, _CHUNK):
        rows = slice(start, min(start + _CHUNK, stats.neurons))
        a, b, err, p_out = _all_candidates(prefix[:, rows], w2_norm2[rows])
        keep = ~_prunable(a, b, err, p_out)
        width = int(keep.sum(axis=1).max(initial=1))
        pick = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # kept columns, in order
        valid = np.take_along_axis(keep, pick, axis=1)
        take = lambda v: np.take_along_axis(v, pick, axis=1)  # noqa: E731
        parts.append((np.where(valid, take(a), 0).astype(np.int32), np.where(valid, take(b), 0).astype(np.int32),
                      np.where(valid, take(err), np.inf), np.where(valid, take(p_out), 0.0)))
    width = max((part[0].shape[1] for part in parts), default=1)
    pad = lambda v, fill: np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=fill)  # noqa: E731
    return _Candidates(*(np.concatenate([pad(part[i], fill) for part in parts]) if parts else
                         np.zeros((0, width))
                         for i, fill in enumerate((0, 0, np.inf, 0.0))))


def error_aware_lines(
    stats: dict[str, NeuronStats], w2_norm2: dict[str, np.ndarray], target_fallback: float
) -> tuple[dict[str, Lines], float]:
    """Our default: one λ across all blocks meets ``target_fallback`` (mean share of flagged pairs).

    Returns the lines per block and the λ found.
    """
    if not 0.0 <= target_fallback <= 1.0:
        raise ValueError(f"target fallback rate must be within [0, 1], got {target_fallback}")
    cands = {}
    for name, s in stats.items():  # one block's prefix sums at a time
        cands[name] = _candidates(s, s.prefix(), w2_norm2[name])
        s.release()
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
        a = np.take_along_axis(c.a, k, axis=1)[:, 0].astype(np.int64)
        b = np.take_along_axis(c.b, k, axis=1)[:, 0].astype(np.int64)
        lines[name] = _lines_from(stats[name], stats[name].prefix(), a, b)
        stats[name].release()
    return lines, math.exp(hi_l)
