"""Block-wise low-bit copies of ``W1`` for the predictor, in ONNX Runtime's ``MatMulNBits`` layout.

A predictor only has to tell whether ``h_j`` left its range, so a 4- or 2-bit copy of ``W1`` is enough
(METHOD.md §4). Weights are quantized along the input axis K in blocks of ``block_size`` with an
asymmetric grid per (output column, block): ``w ≈ (q − zp)·scale``, ``q ∈ [0, 2^bits)``.

Two quantizers:

* **round-to-nearest** (``rtn``) with a per-block clipping search (shrinking the min/max range often
  lowers the error a lot at 2 bits);
* **GPTQ** (``gptq``): quantize one input row of ``W1`` at a time and push its rounding error onto the
  rows not yet quantized, weighted by the inverse of the calibration inputs' second-moment matrix
  ``H = Σ xᵀx`` — the error that matters is ``x·(Ŵ1 − W1)``, not ``Ŵ1 − W1``.

:func:`pack` lays the result out as ``MatMulNBits`` expects: ``B`` uint8 ``(N, k_blocks, blob)``, values
packed low bits first; ``scales`` ``(N, k_blocks)``; ``zero_points`` uint8 ``(N, ceil(k_blocks·bits/8))``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHRINK_GRID = np.linspace(1.0, 0.5, 11)
GPTQ_BATCH = 128
_VECTOR_LIMIT = 1 << 22  # block_params: elements × shrink factors evaluated in one go


@dataclasses.dataclass
class Quantized:
    """``W ≈ (q − zp)·scale`` for a (K, N) matrix, blocks of ``block_size`` along K."""

    bits: int
    block_size: int
    q: np.ndarray  # (N, K_padded) uint8 levels
    scales: np.ndarray  # (N, k_blocks) float64
    zero_points: np.ndarray  # (N, k_blocks) uint8
    k: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """The (K, N) float64 matrix the runtime will multiply with."""
        w = self.q.reshape(self.n, self.k_blocks, self.block_size).astype(np.float64)
        w -= self.zero_points[:, :, None]  # in place: one (K, N) float64 array, no temporaries
        w *= self.scales[:, :, None]
        return w.reshape(self.n, -1)[:, : self.k].T

    def stored_bits(self, scale_bits: int) -> int:
        return stored_bits(self.k, self.n, self.bits, self.block_size, scale_bits)


def stored_bits(k: int, n: int, bits: int, block_size: int, scale_bits: int) -> int:
    """Bits a (k, n) matrix takes in ``MatMulNBits`` form: packed levels, scales (in the model's dtype)
    and packed zero points."""
    k_blocks = -(-k // block_size)
    zp_bytes = -(-k_blocks * bits // 8)
    return n * (k_blocks * block_size * bits + k_blocks * scale_bits + 8 * zp_bytes)


def _grid(w: np.ndarray, bits: int, shrink: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of ``w`` (rows: groups) for its [min, max] shrunk by ``shrink`` (a
    factor, or factors along a new leading axis)."""
    top = (1 << bits) - 1
    lo = np.minimum(w.min(axis=-1), 0.0) * shrink
    hi = np.maximum(w.max(axis=-1), 0.0) * shrink
    scale = (hi - lo) / top
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, top)
    return scale, zp


def _round(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale[..., None]) + zp[..., None], 0, (1 << bits) - 1)


def block_params(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, zero point) per group row of ``w`` (..., block) over the clipping grid (the first
    best shrink factor wins ties)."""
    if w.size * SHRINK_GRID.size <= _VECTOR_LIMIT:  # every shrink factor at once (same arithmetic)
        shrink = SHRINK_GRID.reshape((-1,) + (1,) * (w.ndim - 1))
        scale, zp = _grid(w, bits, shrink)
        err = np.sum(((_round(w[None], scale, zp, bits) - zp[..., None]) * scale[..., None] - w[None]) ** 2,
                     axis=-1)
        best = np.argmin(err, axis=0)[None]
        return np.take_along_axis(scale, best, axis=0)[0], np.take_along_axis(zp, best, axis=0)[0]
    best_err = np.full(w.shape[:-1], np.inf)
    best_scale = np.ones(w.shape[:-1])
    best_zp = np.zeros(w.shape[:-1])
    for shrink in SHRINK_GRID:
        scale, zp = _grid(w, bits, shrink)
        err = np.sum(((_round(w, scale, zp, bits) - zp[..., None]) * scale[..., None] - w) ** 2, axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def _padded_rows(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w`` (K, N) transposed to (N, K) and zero-padded to whole blocks."""
    k = w.shape[0]
    pad = (-k) % block_size
    return np.pad(np.asarray(w, np.float64).T, ((0, 0), (0, pad)))


def rtn(w: np.ndarray, bits: int, block_size: int = 32) -> Quantized:
    """Round-to-nearest block quantization of ``w`` (K, N) with a per-block clipping search."""
    wt = _padded_rows(w, block_size)
    n = wt.shape[0]
    groups = wt.reshape(n, -1, block_size)
    scale, zp = block_params(groups, bits)
    q = _round(groups, scale, zp, bits).reshape(n, -1)
    return Quantized(bits, block_size, q.astype(np.uint8), scale, zp.astype(np.uint8), w.shape[0])


def gptq_setup(w: np.ndarray, gram: np.ndarray, block_size: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's starting point: ``w`` as (N, Kp) rows padded to whole blocks (GPTQ's (out, in) convention,
    inputs never seen zeroed) and the upper Cholesky factor of the damped inverse Hessian ``gram``."""
    k = w.shape[0]
    wt = _padded_rows(w, block_size)
    kp = wt.shape[1]
    h = np.zeros((kp, kp))
    h[:k, :k] = gram
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h[np.diag_indices(kp)] += damp * float(np.mean(np.diag(h)))
    return wt, np.linalg.cholesky(np.linalg.inv(h)).T


def gptq(w: np.ndarray, gram: np.ndarray, bits: int, block_size: int = 32, damp: float = 0.01) -> Quantized:
    """GPTQ block quantization of ``w`` (K, N) given ``gram = Σ xᵀx`` (K, K) of the calibration inputs.

    Input rows are quantized in order; each row's error is spread over the later rows through the
    upper Cholesky factor of ``H⁻¹`` (lazy batches of :data:`GPTQ_BATCH` rows, as in the GPTQ paper).
    Group parameters are chosen when the quantizer reaches a group's first row.
    """
    if GPTQ_BATCH % block_size:
        raise ValueError(f"block_size {block_size} must divide {GPTQ_BATCH}")
    wt, hinv = gptq_setup(w, gram, block_size, damp)
    kp = wt.shape[1]
    n, groups = wt.shape[0], kp // block_size
    q = np.zeros((n, kp), np.uint8)  # levels are integers in [0, 2^bits)
    scales, zps = np.zeros((n, groups)), np.zeros((n, groups))
    for start in range(0, kp, GPTQ_BATCH):
        stop = min(start + GPTQ_BATCH, kp)
        # Within a batch, quantizing column i updates every later column c by −e_i·H⁻¹[i, c]. The updates
        # are applied lazily, each column receiving them in the same order (so with the same rounding) as
        # an immediate rank-1 update would: a group's columns when the group starts (its parameters need
        # them), one column when it is quantized.
        block = wt[:, start:stop].T.copy()  # (columns, N): a column is contiguous
        err = np.zeros_like(block)
        hb = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            g = col // block_size
            if col % block_size == 0:
                cols = block[i:i + block_size]
                for j in range(i):
                    cols -= hb[j, i:i + block_size, None] * err[j]
                scales[:, g], zps[:, g] = block_params(cols.T, bits)
            v = block[i]
            for j in range(i - i % block_size, i):
                v -= err[j] * hb[j, i]
            qi = np.clip(np.round(v / scales[:, g]) + zps[:, g], 0, (1 << bits) - 1)
            q[:, col] = qi
            err[i] = (v - (qi - zps[:, g]) * scales[:, g]) / hb[i, i]
        wt[:, stop:] -= np.ascontiguousarray(err.T) @ hinv[start:stop, stop:]
    return Quantized(bits, block_size, q, scales, zps.astype(np.uint8), w.shape[0])


def _pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 levels along the last axis, ``8 // bits`` per byte, low bits first."""
    per = 8 // bits
    pad = (-levels.shape[-1]) % per
    levels = np.pad(levels, [(0, 0)] * (levels.ndim - 1) + [(0, pad)]).astype(np.uint8)
    grouped = levels.reshape(*levels.shape[:-1], -1, per)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per):
        out |= (grouped[..., j] << (bits * j)).astype(np.uint8)
    return out


def pack(quant: Quantized, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, scales, zero_points)`` initializers for ``com.microsoft::MatMulNBits``."""
    b = _pack_levels(quant.q.reshape(quant.n, quant.k_blocks, quant.block_size), quant.bits)
    zp = _pack_levels(quant.zero_points, quant.bits)
    return b, quant.scales.astype(dtype), zp


def int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a (K, N) matrix: ``w ≈ q·scale[None, :]`` (for ``DequantizeLinear``
    with ``axis=1``)."""
    w = np.asarray(w, np.float64)
    scale = np.max(np.abs(w), axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale
