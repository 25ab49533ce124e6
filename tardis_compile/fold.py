"""Fold the linearised block into one matrix: ``W_f = W1·diag(α)·W2``, ``b_f = (α⊙b1 + β)·W2 + b2``.

Computed in float64 and stored in the model's dtype; a block without biases still gets ``b_f``.
"""

from __future__ import annotations

import numpy as np

from tardis_compile import modelio


def fold(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
         alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Analytic fold of one block (float64 in, float64 out)."""
    w1_64 = np.asarray(w1, np.float64)
    w2_64 = np.asarray(w2, np.float64)
    modelio.drop_pages(w1, w2)  # memory-mapped weights: the float64 copies are what is used
    w_f = (w1_64 * alpha[None, :]) @ w2_64
    b_f = (alpha * np.asarray(b1, np.float64) + beta) @ w2_64 + np.asarray(b2, np.float64)
    return w_f, b_f
