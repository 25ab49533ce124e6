"""Shared test fixtures-as-functions: tiny models on disk, feed batches, ORT runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tardis_compile.models import tiny

# onnxruntime 1.25 and later fuse DequantizeLinear + MatMul into MatMulNBits (accuracy level 4: the
# activations rounded to int8 per block of 32) by default
ORT_FUSES_DQ_MATMUL = tuple(int(p) for p in ort.__version__.split(".")[:2]) >= (1, 25)


def save_tiny(tmp: Path, name: str = "tiny.onnx", **kwargs) -> tuple[Path, list[dict]]:
    model, params = tiny.ffn_model(return_params=True, **kwargs)
    path = tmp / name
    onnx.save(model, path)
    return path, params


def batches(d: int = 16, n: int = 12, rank: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (4, 8, d) if rank == 3 else (32, d)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def run(path: Path, feed: dict[str, np.ndarray], options: ort.SessionOptions | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def op_session(model: bytes, library: bool, env: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session for a model of our ops, with ``libtardis_ops`` (required) or without (the function bodies);
    ``env`` is set while the session creates its kernels (they read ``TARDIS_OPS_ISA`` then), then restored."""
    from tardis_compile import runtime

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        so = runtime.session_options(require=True) if library else ort.SessionOptions()
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
