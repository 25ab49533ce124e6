"""Models with external data: read in place, written out as ``<output>.data``, input never touched.

The > 2 GB end-to-end run (calibration, rewrite and verification of a 2.3 GB synthetic model, with peak
RSS and time) is ``bench/large_model.py``; its numbers are in the README. Here the same builder makes a
small model with external data so CI exercises the same code paths in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import tardis_compile as tc
from tardis_compile import modelio

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("large_model_bench", REPO / "bench" / "large_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _feeds(d: int, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((64, d)).astype(np.float32)} for _ in range(n)]


@pytest.fixture()
def external_model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    _bench().build(path, layers=2, d=64, D=256)
    return path


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_external_data_in_and_out(tmp_path, external_model, mode):
    data = external_model.with_name("model.onnx.data")
    before = (_digest(external_model), _digest(data))
    assert all(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(external_model, load_external_data=False).graph.initializer)
    out = tmp_path / "out.onnx"
    flag = {"auto": None, "on": True, "off": False}[mode]
    tc.optimize(external_model, out, _feeds(64, 6, 0), settings=tc.Settings(flag_all=True), external_data=flag,
                show_progress=False)
    assert (_digest(external_model), _digest(data)) == before  # the input is never touched
    assert out.with_name("out.onnx.data").exists() == (mode != "off")  # auto: external in → external out
    x = _feeds(64, 1, 9)[0]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0]  # noqa: E731
    np.testing.assert_allclose(run(out), run(external_model), atol=1e-4, rtol=0)


def test_weights_are_read_in_place(external_model):
    """Loading keeps the weights as memory-mapped external tensors (no full proto copy)."""
    model = modelio.load(external_model)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)


def test_large_outputs_default_to_external_data(tmp_path, monkeypatch):
    """Above the threshold (~1.8 GB, lowered here) the output is written with external data."""
    from tardis_compile.models import tiny

    src = tmp_path / "m.onnx"
    onnx.save(tiny.ffn_model(), src)
    monkeypatch.setattr(modelio, "_EXTERNAL_THRESHOLD", 10_000)
    out = tmp_path / "out.onnx"
    tc.optimize(src, out, [{"x": np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)}] * 4,
                show_progress=False)
    assert out.with_name("out.onnx.data").exists()
