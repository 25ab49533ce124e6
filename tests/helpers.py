"""Shared test fixtures-as-functions: tiny models on disk, feed batches, ORT runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tardis_compile.models import tiny


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
