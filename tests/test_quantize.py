"""GPTQ with lazily applied in-batch updates and the vectorised clipping search give bit-identical results
to the straightforward implementation (kept here as the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from tardis_compile import quantize


def _block_params_reference(w, bits):
    best_err = np.full(w.shape[:-1], np.inf)
    best_scale = np.ones(w.shape[:-1])
    best_zp = np.zeros(w.shape[:-1])
    for shrink in quantize.SHRINK_GRID:
        scale, zp = quantize._grid(w, bits, shrink)
        err = np.sum(((quantize._round(w, scale, zp, bits) - zp[..., None]) * scale[..., None] - w) ** 2, axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def _gptq_reference(w, gram, bits, block_size=32, damp=0.01):
    """GPTQ with an immediate rank-1 update of the batch after every column."""
    wt, hinv = quantize.gptq_setup(w, gram, block_size, damp)
    kp = wt.shape[1]
    n, groups = wt.shape[0], kp // block_size
    q = np.zeros((n, kp))
    scales, zps = np.zeros((n, groups)), np.zeros((n, groups))
    for start in range(0, kp, quantize.GPTQ_BATCH):
        stop = min(start + quantize.GPTQ_BATCH, kp)
        block = wt[:, start:stop].copy()
        err = np.zeros_like(block)
        hb = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % block_size == 0:
                g = col // block_size
                scales[:, g], zps[:, g] = _block_params_reference(block[:, i:i + block_size], bits)
            g = col // block_size
            qi = np.clip(np.round(block[:, i] / scales[:, g]) + zps[:, g], 0, (1 << bits) - 1)
            q[:, col] = qi
            e = (block[:, i] - (qi - zps[:, g]) * scales[:, g]) / hb[i, i]
            block[:, i:] -= np.outer(e, hb[i, i:])
            err[:, i] = e
        wt[:, stop:] -= err @ hinv[start:stop, stop:]
    return q.astype(np.uint8), scales, zps.astype(np.uint8)


@pytest.mark.parametrize("bits,block_size,k", [(4, 32, 200), (2, 32, 160), (4, 64, 256), (4, 16, 90)])
def test_gptq_matches_the_immediate_update_reference(bits, block_size, k):
    rng = np.random.default_rng(bits * 1000 + k)
    w = rng.standard_normal((k, 48)) / np.sqrt(k)
    x = rng.standard_normal((400, k)) * rng.uniform(0.2, 2.0, k)
    x[:, 3] = 0.0  # a dead input
    gram = x.T @ x / 400
    quant = quantize.gptq(w, gram, bits, block_size)
    q, scales, zps = _gptq_reference(w, gram, bits, block_size)
    assert quant.q.dtype == np.uint8 and quant.q.shape == q.shape
    np.testing.assert_array_equal(quant.q, q)
    np.testing.assert_array_equal(quant.scales, scales)
    np.testing.assert_array_equal(quant.zero_points, zps)


@pytest.mark.parametrize("shape", [(7, 32), (300, 5, 32), (40000, 32)])  # the last: the per-shrink loop
def test_block_params_match_the_per_shrink_search(shape):
    rng = np.random.default_rng(len(shape))
    w = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, shape[:-1] + (1,))
    w[..., :3] = 0.0
    for bits in (2, 4):
        got, want = quantize.block_params(w, bits), _block_params_reference(w, bits)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
