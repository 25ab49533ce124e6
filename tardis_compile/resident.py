"""Resident budget (METHOD.md §5, ours): keep the original weights only for the neurons that need them.

A neuron without resident weights is always linear: its line is fitted on *all* its calibration samples
(the least-squares line over the whole range, never flagged) and neither its W1 column, W2 row nor
predictor column is stored. A resident neuron keeps the guarded fallback with an error-aware range.
Which neurons stay is decided by what the fallback buys: the drop in output error between the neuron's
full-range line and its ranged line, ``(SSE_full − SSE_ranged)/N · ‖W2[j,:]‖²``, taken greedily across
all blocks until the resident parameter budget is spent. The fallback-rate target keeps its meaning (the
share of *all* token-neuron pairs flagged), so the resident neurons' ranges are refitted to carry it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tardis_compile import fit
from tardis_compile.errors import TardisError
from tardis_compile.histogram import NeuronStats


def subset(stats: NeuronStats, neurons: np.ndarray) -> NeuronStats:
    """The statistics of some of a block's neurons."""
    return NeuronStats(stats.variant, stats.grid, stats.moments[:, neurons, :], stats.gram, stats.source)


def select(stats: dict[str, NeuronStats], ranged: dict[str, fit.Lines], full: dict[str, fit.Lines],
           w2_norm2: dict[str, np.ndarray], fixed: dict[str, float], per_neuron: dict[str, float],
           budget: float) -> dict[str, np.ndarray]:
    """Resident neuron indices per block.

    ``ranged``/``full``: each neuron's error-aware and full-range lines; ``fixed``: parameters every block
    keeps anyway (the folded matrix); ``per_neuron``: what one resident neuron adds (its W1 column, W2 row,
    predictor column); ``budget``: total resident parameters allowed.
    """
    spare = budget - sum(fixed.values())
    if spare < -1e-9 * budget:
        raise TardisError(f"--resident budget of {budget:,.0f} parameters is below the folded matrices alone "
                          f"({sum(fixed.values()):,.0f})")
    gains, owners, costs = [], [], []
    for name, s in stats.items():
        gains.append((full[name].sse - ranged[name].sse) / max(s.tokens, 1) * w2_norm2[name] / per_neuron[name])
        owners.append(np.full(s.neurons, name, dtype=object))
        costs.append(np.full(s.neurons, per_neuron[name]))
    gain, owner, cost = np.concatenate(gains), np.concatenate(owners), np.concatenate(costs)
    order = np.argsort(-gain, kind="stable")
    keep = order[np.cumsum(cost[order]) <= spare]
    chosen = {name: [] for name in stats}
    offsets, start = {}, 0
    for name, s in stats.items():
        offsets[name], start = start, start + s.neurons
    for k in keep:
        chosen[owner[k]].append(k - offsets[owner[k]])
    return {name: np.sort(np.asarray(idx, np.int64)) for name, idx in chosen.items()}


def lines(stats: dict[str, NeuronStats], full: dict[str, fit.Lines], w2_norm2: dict[str, np.ndarray],
          neurons: dict[str, np.ndarray], target_fallback: float) -> dict[str, fit.Lines]:
    """Full-size lines per block: error-aware ranges on the resident neurons (carrying the whole fallback
    target), full-range lines and no range (never flagged) on the others."""
    total = sum(s.neurons for s in stats.values())
    kept = sum(len(n) for n in neurons.values())
    if kept == 0:  # nothing resident: every neuron is always linear (the fold alone, 1 − d/2D of the FFN cut)
        return dict(full)
    sub_target = min(1.0, target_fallback * total / max(kept, 1))
    ranged, _ = fit.error_aware_lines({n: subset(stats[n], neurons[n]) for n in stats},
                                      {n: w2_norm2[n][neurons[n]] for n in stats}, sub_target)
    out = {}
    for name in stats:
        merged = fit.Lines(*(np.array(getattr(full[name], f.name), np.float64) for f in dataclasses.fields(fit.Lines)))
        for f in dataclasses.fields(fit.Lines):
            getattr(merged, f.name)[neurons[name]] = getattr(ranged[name], f.name)
        out[name] = merged
    return out
