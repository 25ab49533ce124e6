"""Targets, not knobs (METHOD.md §5): turn what the user asks for into what the fit needs.

All parameter counts follow the report's accounting, in the model dtype's equivalents, as shares of the
original FFN parameters ``Σ (W1 + W2)``:

* touched per token = ``W_f`` + predictor + (fallback rate)·``D·(d + d_out)`` (the flagged rows of
  ``W1ᵀ`` and ``W2``), so a ``--target-params`` share fixes the fallback rate;
* resident = ``W_f`` + predictor + fallback rows of the resident neurons, so a ``--resident`` share fixes
  how many neurons keep their original weights.
"""

from __future__ import annotations

import numpy as np

from tardis_compile import predictor as predictors
from tardis_compile.errors import TardisError
from tardis_compile.passes.ffn_match import FfnBlock


def original(blocks: list[FfnBlock]) -> float:
    return float(sum(b.d * b.hidden + b.hidden * b.d_out for b in blocks))


def folded(blocks: list[FfnBlock], fold_bits: int | None = None) -> dict[str, float]:
    """What each block's folded matrix stores: ``d·d_out`` in the model dtype, or at ``fold_bits`` per weight
    plus one scale per output column."""
    return {b.name: float(folded_parameters(b.d, b.d_out, b.dtype.numpy(), fold_bits)) for b in blocks}


def folded_parameters(d: int, d_out: int, dtype, fold_bits: int | None) -> float:
    if fold_bits is None:
        return float(d * d_out)
    return d * d_out * fold_bits / (8 * np.dtype(dtype).itemsize) + d_out


def per_neuron(blocks: list[FfnBlock], kind: str, options: predictors.PredictorOptions) -> dict[str, float]:
    """What one neuron with resident weights stores: its predictor column and its W1ᵀ and W2 rows."""
    return {b.name: predictors.neuron_parameters(kind, b.d, b.dtype.numpy(), options) + b.d + b.d_out
            for b in blocks}


def fallback_for_params(blocks: list[FfnBlock], share: float, kind: str, options: predictors.PredictorOptions,
                        predicted: dict[str, int] | None = None, fold_bits: int | None = None) -> float:
    """The fallback rate at which ``share`` of the original FFN parameters is touched per token.

    ``predicted``: neurons covered by each block's predictor (default: all of them).
    """
    fixed = sum(folded(blocks, fold_bits).values())
    pred = sum(predictors.neuron_parameters(kind, b.d, b.dtype.numpy(), options)
               * (b.hidden if predicted is None else predicted[b.name]) for b in blocks)
    rows = sum(b.hidden * (b.d + b.d_out) for b in blocks)
    rate = (share * original(blocks) - fixed - pred) / rows
    if rate < 0:
        floor = (fixed + pred) / original(blocks)
        raise TardisError(f"--target-params {share:g} is below what the folded matrices and the {kind} predictor "
                          f"touch on their own ({floor:.3f} of the FFN parameters)")
    return min(rate, 1.0)
