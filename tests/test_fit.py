"""The error-aware range search keeps only the candidates that can win (lower convex hull, repeats
dropped) and must choose exactly the intervals the exhaustive search over all 1,129 candidates chooses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tardis_compile import fit
from tardis_compile.histogram import Grid, NeuronStats


def _exhaustive(stats: dict[str, NeuronStats], w2_norm2: dict[str, np.ndarray], target: float):
    """The search as it was before pruning: every candidate of every block, argmin over all of them."""
    cands = {}
    for name, s in stats.items():
        prefix = s.prefix()
        cum = prefix[0]
        total = np.maximum(cum[:, -1:], 1.0)
        qs = np.linspace(0.0, 1.0, fit._QUANTILES)
        edge_idx = np.stack([(cum < q * total - 1e-9).sum(axis=1) for q in qs], axis=1)
        p, q = np.triu_indices(fit._QUANTILES, k=1)
        a = np.concatenate([edge_idx[:, p], np.zeros((s.neurons, 1), np.int64)], axis=1)
        b = np.maximum(a, np.concatenate([edge_idx[:, q], np.zeros((s.neurons, 1), np.int64)], axis=1))
        sums = fit._interval_sums(prefix, a, b)
        _, _, sse = fit._line_fit(sums, s.variant)
        cands[name] = (a, b, sse / total * w2_norm2[name][:, None], 1.0 - sums[0] / total, prefix)
    neurons = sum(c[0].shape[0] for c in cands.values())

    def choose(lam):
        picks, out = {}, 0.0
        for name, (a, b, err, p_out, _) in cands.items():
            k = np.argmin(err + lam * p_out, axis=1)
            picks[name] = k
            out += float(np.take_along_axis(p_out, k[:, None], axis=1).sum())
        return picks, out / neurons

    lo_l, hi_l = -30.0, 30.0
    best, rate = choose(math.exp(hi_l))
    if rate <= target:
        for _ in range(60):
            mid = 0.5 * (lo_l + hi_l)
            picks, rate = choose(math.exp(mid))
            if rate <= target:
                hi_l, best = mid, picks
            else:
                lo_l = mid
    lines = {}
    for name, (a, b, _, _, prefix) in cands.items():
        k = best[name][:, None]
        lines[name] = fit._lines_from(stats[name], prefix, np.take_along_axis(a, k, axis=1)[:, 0],
                                      np.take_along_axis(b, k, axis=1)[:, 0])
    return lines, math.exp(hi_l)


def _stats(rng: np.random.Generator, neurons: int, tokens: int, variant: str = "none", *, kind: str = "normal",
           bins: int = 512) -> NeuronStats:
    s = NeuronStats.empty(neurons, variant, Grid(bins=bins))
    scale = rng.uniform(0.2, 4.0, neurons)
    shift = rng.normal(0.0, 1.5, neurons)
    for _ in range(3):
        if kind == "normal":
            h = rng.standard_normal((tokens, neurons)) * scale + shift
        elif kind == "heavy":  # heavy tails and a few huge outliers
            h = rng.standard_t(2.0, (tokens, neurons)) * scale + shift
            h[rng.random(h.shape) < 1e-3] *= 500.0
        elif kind == "discrete":  # few distinct values: many coinciding quantile edges and exact ties
            h = rng.integers(-3, 4, (tokens, neurons)).astype(np.float64) * 0.5
        else:  # constant per neuron: every interval fits exactly (zero error everywhere)
            h = np.broadcast_to(shift, (tokens, neurons)).copy()
        s.add(h)
    return s


def _assert_same(got, want):
    (lines_got, lam_got), (lines_want, lam_want) = got, want
    assert lam_got == lam_want
    assert lines_got.keys() == lines_want.keys()
    for name in lines_want:
        for field in ("lo", "hi", "alpha", "beta", "coverage", "sse"):
            np.testing.assert_array_equal(getattr(lines_got[name], field), getattr(lines_want[name], field),
                                          err_msg=f"{name}.{field}")


@pytest.mark.parametrize("kind", ["normal", "heavy", "discrete", "constant"])
@pytest.mark.parametrize("target", [0.0, 0.003, 0.05, 0.1, 0.3, 1.0])
def test_pruned_search_chooses_the_exhaustive_intervals(kind, target):
    rng = np.random.default_rng(hash((kind, target)) % 2**32)
    stats = {"b0": _stats(rng, 300, 40, "none", kind=kind), "b1": _stats(rng, 200, 7, "tanh", kind=kind)}
    w2 = {"b0": rng.uniform(0.1, 3.0, 300), "b1": rng.uniform(0.1, 3.0, 200)}
    w2["b1"][:5] = 0.0  # a neuron whose error does not matter
    _assert_same(fit.error_aware_lines(stats, w2, target), _exhaustive(stats, w2, target))


def test_pruned_search_with_coarse_bins():
    rng = np.random.default_rng(7)
    s = _stats(rng, 256, 25, kind="normal", bins=16)  # few bins: quantile edges coincide a lot
    w2 = {"b": rng.uniform(0.5, 2.0, 256)}
    for target in (0.0, 0.02, 0.2):
        _assert_same(fit.error_aware_lines({"b": s}, w2, target), _exhaustive({"b": s}, w2, target))


def test_pruning_keeps_few_candidates():
    rng = np.random.default_rng(3)
    s = _stats(rng, 512, 300)
    prefix = s.prefix()
    a, b, err, p_out = fit._all_candidates(prefix, np.ones(512))
    kept = (~fit._prunable(a, b, err, p_out)).sum(axis=1)
    assert a.shape[1] == 1129
    assert kept.min() >= 1
    assert kept.mean() < 113  # a tenth of the 1,129 candidates per neuron (about the 47 quantile steps)
    cands = fit._candidates(s, prefix, np.ones(512))
    assert cands.err.shape == (512, kept.max()) and cands.a.dtype == np.int32


def test_every_kept_candidate_is_in_original_order_and_padding_never_wins():
    rng = np.random.default_rng(5)
    s = _stats(rng, 64, 50)
    cands = fit._candidates(s, s.prefix(), np.ones(64))
    padded = ~np.isfinite(cands.err)
    assert padded.any()  # rows have different widths
    assert np.all(cands.p_out[padded] == 0.0)
    for lam in (1e-12, 1e-3, 1.0, 1e3, 1e12):
        k = np.argmin(cands.err + lam * cands.p_out, axis=1)
        assert np.isfinite(np.take_along_axis(cands.err, k[:, None], axis=1)).all()
