"""The two GELU variants in float64 NumPy.

``"none"`` is the exact erf GELU (BERT, ONNX ``Gelu``'s default), ``"tanh"`` is the tanh approximation
(GPT-2 ``gelu_new``, BLOOM, Gemma ``gelu_pytorch_tanh``). The method must honour the model's own variant;
the names follow the ``approximate`` attribute of ONNX ``Gelu``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

VARIANTS = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(h: np.ndarray, variant: str) -> np.ndarray:
    """GELU of ``h`` in float64 for ``variant`` ``"none"`` (erf) or ``"tanh"``."""
    h = np.asarray(h, dtype=np.float64)
    if variant == "none":
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if variant == "tanh":
        return 0.5 * h * (1.0 + np.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3)))
    raise ValueError(f"unknown GELU variant {variant!r}; expected one of {VARIANTS}")
