"""Wanda and RIA baselines: scores vs a NumPy reference, exact per-neuron sparsity, the 2:4 pattern, the
pruned ONNX model vs a NumPy forward pass, sequential calibration, and clear errors."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from tardis_compile import baselines
from tardis_compile.errors import CalibrationDataError, NoFoldableBlockError, OutputPathError, TardisError
from tardis_compile.gelu import gelu
from tests.helpers import batches, run, save_tiny

D_MODEL, HIDDEN = 16, 64


def _ref_norms(feeds: list[dict], params: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (‖x_j‖₂, ‖GELU(h)_j‖₂) over all tokens of the original model, float64."""
    x = np.concatenate([f["x"].reshape(-1, D_MODEL) for f in feeds]).astype(np.float64)
    out = []
    for p in params:
        g = gelu(x @ p["W1"] + p["b1"], p["variant"])
        out.append((np.linalg.norm(x, axis=0), np.linalg.norm(g, axis=0)))
        x = x + g @ p["W2"] + p["b2"]
    return out


def _ref_scores(w: np.ndarray, norm: np.ndarray, method: str) -> np.ndarray:
    """The papers' formulas in PyTorch layout (out, in), transposed back to ONNX (in, out)."""
    wt = np.abs(w.T)  # (out, in): row i = output neuron
    if method == "wanda":
        s = wt * norm[None, :]
    else:
        s = (wt / wt.sum(axis=1, keepdims=True) + wt / wt.sum(axis=0, keepdims=True)) * np.sqrt(norm)[None, :]
    return s.T


def _forward(x: np.ndarray, layers: list[tuple[np.ndarray, ...]], variant: str) -> np.ndarray:
    y = np.asarray(x, np.float64)
    for w1, b1, w2, b2 in layers:
        y = y + gelu(y @ w1 + b1, variant) @ w2 + b2
    return y


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("method", baselines.METHODS)
def test_scores_match_numpy_reference(tmp_path, method):
    path, params = save_tiny(tmp_path, layers=2)
    feeds = batches(n=3)
    norms = baselines.input_norms(path, feeds, show_progress=False)
    ref = _ref_norms(feeds, params)
    for i, p in enumerate(params):
        got = norms[f"ffn{i}"]
        assert got.tokens == 3 * 4 * 8
        if i == 0:  # layer 1's input depends on float32 vs float64 rounding of layer 0; compare loosely
            np.testing.assert_allclose(got.x_norm, ref[i][0], rtol=1e-5)
            np.testing.assert_allclose(got.g_norm, ref[i][1], rtol=1e-4)
        else:
            np.testing.assert_allclose(got.x_norm, ref[i][0], rtol=1e-3)
        for w, n in ((p["W1"], got.x_norm), (p["W2"], got.g_norm)):
            np.testing.assert_allclose(baselines.scores(w, n, method), _ref_scores(w, n, method), rtol=1e-12)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.875])
def test_exact_sparsity_per_output_neuron(sparsity):
    rng = np.random.default_rng(0)
    score = rng.random((64, 16))
    keep = baselines.keep_mask(score, sparsity)
    pruned = int(np.floor(64 * sparsity))
    assert (keep.sum(axis=0) == 64 - pruned).all()
    # the pruned ones are exactly the lowest scores of each column
    for col in range(16):
        lowest = np.sort(np.argsort(score[:, col])[:pruned])
        np.testing.assert_array_equal(np.flatnonzero(~keep[:, col]), lowest)


def test_two_four_pattern():
    rng = np.random.default_rng(1)
    score = rng.random((32, 8))
    keep = baselines.keep_mask(score, 0.5, "2:4")
    groups = keep.reshape(8, 4, 8)
    assert (groups.sum(axis=1) == 2).all()
    kept_min = np.where(groups, score.reshape(8, 4, 8), np.inf).min(axis=1)
    pruned_max = np.where(~groups, score.reshape(8, 4, 8), -np.inf).max(axis=1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("method,pattern,sparsity", [("wanda", "unstructured", 0.75), ("ria", "unstructured", 0.5),
                                                     ("wanda", "2:4", None), ("ria", "2:4", 0.5)])
def test_pruned_model_runs_and_equals_numpy_forward(tmp_path, method, pattern, sparsity):
    path, params = save_tiny(tmp_path, layers=2)
    feeds = batches(n=3)
    out = tmp_path / "pruned.onnx"
    report = baselines.prune(path, out, feeds, method=method, sparsity=sparsity, pattern=pattern,
                             sequential=False, show_progress=False)
    expected_s = 0.5 if pattern == "2:4" else sparsity
    assert report.summary()["ffn_param_reduction"] == pytest.approx(expected_s)
    assert report.calibration_tokens == 3 * 4 * 8
    # the reference: masks from the NumPy formulas on the original model's norms
    ref = _ref_norms(feeds, params)
    layers = []
    for p, (xn, gn) in zip(params, ref):
        w1 = p["W1"] * baselines.keep_mask(_ref_scores(p["W1"], xn, method), expected_s, pattern)
        w2 = p["W2"] * baselines.keep_mask(_ref_scores(p["W2"], gn, method), expected_s, pattern)
        layers.append((w1, p["b1"], w2, p["b2"]))
    inits = _initializers(out)
    for i, (w1, _, w2, _) in enumerate(layers):
        np.testing.assert_array_equal(inits[params[i]["names"]["W1"]] != 0, w1 != 0)
        np.testing.assert_array_equal(inits[params[i]["names"]["W2"]] != 0, w2 != 0)
    x = feeds[0]["x"]
    np.testing.assert_allclose(run(out, {"x": x}), _forward(x, layers, params[0]["variant"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("linear", ["gemm", "transpose_matmul"])
def test_stored_layouts_are_respected(tmp_path, linear):
    """Gemm(transB) and Transpose→MatMul store W as (out, in): the mask must follow the stored layout."""
    rank = 2 if linear == "gemm" else 3
    path, params = save_tiny(tmp_path, linear=linear, rank=rank)
    feeds = batches(n=2, rank=rank)
    out = tmp_path / "pruned.onnx"
    baselines.prune(path, out, feeds, method="wanda", sparsity=0.5, sequential=False, show_progress=False)
    (xn, gn), = _ref_norms(feeds, params)
    p = params[0]
    w1 = p["W1"] * baselines.keep_mask(_ref_scores(p["W1"], xn, "wanda"), 0.5)
    w2 = p["W2"] * baselines.keep_mask(_ref_scores(p["W2"], gn, "wanda"), 0.5)
    x = feeds[0]["x"]
    np.testing.assert_allclose(run(out, {"x": x}), _forward(x, [(w1, p["b1"], w2, p["b2"])], p["variant"]),
                               rtol=1e-4, atol=1e-5)


def test_sequential_calibration_sees_the_pruned_earlier_blocks(tmp_path):
    path, params = save_tiny(tmp_path, layers=2)
    feeds = batches(n=2)
    one_shot, seq = tmp_path / "one.onnx", tmp_path / "seq.onnx"
    baselines.prune(path, one_shot, feeds, method="wanda", sparsity=0.8, sequential=False, show_progress=False)
    baselines.prune(path, seq, feeds, method="wanda", sparsity=0.8, sequential=True, show_progress=False)
    a, b = _initializers(one_shot), _initializers(seq)
    names0, names1 = params[0]["names"], params[1]["names"]
    np.testing.assert_array_equal(a[names0["W1"]], b[names0["W1"]])  # block 0: same statistics
    # block 1: its input norms come from the model with block 0 pruned
    x = np.concatenate([f["x"].reshape(-1, D_MODEL) for f in feeds]).astype(np.float64)
    w1p, w2p = b[names0["W1"]].astype(np.float64), b[names0["W2"]].astype(np.float64)
    x1 = x + gelu(x @ w1p + params[0]["b1"], params[0]["variant"]) @ w2p + params[0]["b2"]
    expected = params[1]["W1"] * baselines.keep_mask(_ref_scores(params[1]["W1"], np.linalg.norm(x1, axis=0),
                                                                 "wanda"), 0.8)
    np.testing.assert_array_equal(b[names1["W1"]] != 0, expected != 0)


def test_padding_is_excluded(tmp_path):
    """Rows with attention_mask 0 do not enter the norms (same rule as the fold's calibration)."""
    model, params = save_tiny(tmp_path)
    proto = onnx.load(str(model))
    proto.graph.input.append(onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64,
                                                                ["batch", "seq"]))
    onnx.save(proto, str(model))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, D_MODEL)).astype(np.float32)
    mask = np.ones((2, 6), np.int64)
    mask[1, 3:] = 0
    x[mask == 0] = 1e3  # would dominate the norms if padding leaked in
    norms = baselines.input_norms(model, [{"x": x, "attention_mask": mask}], show_progress=False)["ffn0"]
    (xn, gn), = _ref_norms([{"x": x[mask == 1]}], params)
    assert norms.tokens == 9
    np.testing.assert_allclose(norms.x_norm, xn, rtol=1e-6)
    np.testing.assert_allclose(norms.g_norm, gn, rtol=1e-4)


def test_input_file_untouched_and_metadata(tmp_path):
    path, _ = save_tiny(tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "p.onnx"
    baselines.prune(path, out, batches(n=1), method="ria", sparsity=0.5, show_progress=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["tardis.baseline"] == "ria" and meta["tardis.sparsity"] == "0.5"


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"method": "sparsegpt"}, baselines.PruneSettingsError, "unknown pruning method"),
    ({"pattern": "4:8"}, baselines.PruneSettingsError, "unknown sparsity pattern"),
    ({"sparsity": 1.0}, baselines.PruneSettingsError, "--sparsity must be within [0, 1)"),
    ({"sparsity": -0.1}, baselines.PruneSettingsError, "--sparsity"),
    ({"pattern": "2:4", "sparsity": 0.8}, baselines.PruneSettingsError, "fixed at 50%"),
])
def test_bad_settings(tmp_path, kwargs, error, needle):
    path, _ = save_tiny(tmp_path)
    with pytest.raises(error, match=None) as info:
        baselines.prune(path, tmp_path / "o.onnx", batches(n=1), show_progress=False, **kwargs)
    assert needle in str(info.value)
    assert not (tmp_path / "o.onnx").exists()


def test_bad_inputs(tmp_path):
    path, _ = save_tiny(tmp_path)
    with pytest.raises(OutputPathError, match="is the input model"):
        baselines.prune(path, path, batches(n=1), show_progress=False)
    with pytest.raises(CalibrationDataError, match="feed names do not match"):
        baselines.prune(path, tmp_path / "o.onnx", [{"y": np.zeros((2, 16), np.float32)}], show_progress=False)
    with pytest.raises(CalibrationDataError, match="no such file"):
        baselines.prune(path, tmp_path / "o.onnx", tmp_path / "missing.npz", show_progress=False)
    relu, _ = save_tiny(tmp_path, name="relu.onnx", gelu="relu")
    with pytest.raises(NoFoldableBlockError):
        baselines.prune(relu, tmp_path / "o.onnx", batches(n=1), show_progress=False)
    with pytest.raises(baselines.PruneSettingsError, match="sequential=False"):
        norms = baselines.input_norms(path, batches(n=1), show_progress=False)
        baselines.prune(path, tmp_path / "o.onnx", None, norms=norms, show_progress=False)
    assert not (tmp_path / "o.onnx").exists()
    assert issubclass(baselines.PruneSettingsError, TardisError)


def test_two_four_needs_width_divisible_by_four(tmp_path):
    path, _ = save_tiny(tmp_path, d=18, D=64)
    with pytest.raises(baselines.PruneSettingsError, match="divisible by 4"):
        baselines.prune(path, tmp_path / "o.onnx", batches(d=18, n=1), pattern="2:4", show_progress=False)


def test_reused_norms_give_the_same_model(tmp_path):
    path, _ = save_tiny(tmp_path, layers=2)
    feeds = batches(n=2)
    norms = baselines.input_norms(path, feeds, show_progress=False)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    baselines.prune(path, a, feeds, sparsity=0.6, sequential=False, show_progress=False)
    baselines.prune(path, b, None, sparsity=0.6, sequential=False, norms=norms, show_progress=False)
    ia, ib = _initializers(a), _initializers(b)
    assert all(np.array_equal(ia[k], ib[k]) for k in ia)


def test_cli_prune(tmp_path):
    import subprocess
    import sys

    path, _ = save_tiny(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32))
    out = tmp_path / "p.onnx"
    cmd = [sys.executable, "-m", "tardis_compile.cli", "prune", str(path), "-o", str(out), "--calib",
           str(tmp_path / "c.npz"), "--method", "ria", "--sparsity", "0.75"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "75.0%" in proc.stdout and out.exists()
    proc = subprocess.run(cmd[:-2] + ["--pattern", "2:4", "--sparsity", "0.7"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "fixed at 50%" in proc.stderr
