"""Bad input: one clear ``error:`` line, a non-zero exit, and the input file untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import save_tiny


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tardis_compile.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def model(tmp_path):
    path, _ = save_tiny(tmp_path, layers=1)
    np.savez(tmp_path / "good.npz", x=np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32))
    return path


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    before = _digest(bad)
    _assert_one_error(_cli("optimize", str(bad), "-o", str(tmp_path / "o.onnx"), "--calib", "x.npz"),
                      "bad.onnx")
    assert _digest(bad) == before and not (tmp_path / "o.onnx").exists()


def test_missing_file(tmp_path):
    _assert_one_error(_cli("inspect", str(tmp_path / "nope.onnx")), "no such file")


def test_bench_names_a_missing_or_unreadable_model(tmp_path, model):
    shape = ("--shape", "batch=1,seq=4")
    _assert_one_error(_cli("bench", str(model), str(tmp_path / "nope.onnx"), *shape), "nope.onnx", "no such file")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    _assert_one_error(_cli("bench", str(bad), str(model), *shape), "ONNX Runtime cannot load", "bad.onnx")


def test_no_foldable_block_names_each_reason(tmp_path):
    path, _ = save_tiny(tmp_path, gelu="quick_gelu")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 8, 16), np.float32))
    proc = _cli("optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz"))
    _assert_one_error(proc, "no foldable block", "not GELU")


@pytest.mark.parametrize("feed,needle", [
    ({"y": np.zeros((2, 8, 16), np.float32)}, "feed names do not match"),
    ({"x": np.zeros((2, 8, 7), np.float32)}, "axis 2 must be 16"),
    ({"x": np.zeros((2, 16), np.float32)}, "rank"),
    ({"x": np.zeros((2, 8, 16), np.float64)}, "dtype float64"),
    ({"x": np.zeros((0, 8, 16), np.float32)}, "empty"),
])
def test_wrong_calibration_feeds(tmp_path, model, feed, needle):
    np.savez(tmp_path / "bad.npz", **feed)
    before = _digest(model)
    proc = _cli("optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "bad.npz"))
    _assert_one_error(proc, needle)
    assert _digest(model) == before and not (tmp_path / "o.onnx").exists()


def test_empty_data_script(tmp_path, model):
    script = tmp_path / "empty.py"
    script.write_text("def load_data():\n    return iter([])\n")
    _assert_one_error(_cli("optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(script)),
                      "no data")


def test_output_equal_to_input(tmp_path, model):
    before = _digest(model)
    proc = _cli("optimize", str(model), "-o", str(model), "--calib", str(tmp_path / "good.npz"))
    _assert_one_error(proc, "is the input model")
    assert _digest(model) == before


def test_happy_path_and_inspect(tmp_path, model):
    script = tmp_path / "data.py"
    script.write_text("import numpy as np\n\ndef load_data():\n    rng = np.random.default_rng(0)\n"
                      "    for _ in range(12):\n        yield {'x': rng.standard_normal((2, 8, 16)).astype(np.float32)}\n")
    out = tmp_path / "o.onnx"
    proc = _cli("optimize", str(model), "-o", str(out), "--calib", str(script), "--target-fallback", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "| ffn0 |" in proc.stdout and out.exists()
    assert (tmp_path / "o.report.json").exists() and (tmp_path / "o.report.md").exists()
    proc = _cli("verify", str(model), str(out), "--data", str(tmp_path / "good.npz"))
    assert proc.returncode == 0 and "| y |" in proc.stdout
    proc = _cli("inspect", str(model))
    assert proc.returncode == 0 and proc.stdout.startswith("1 foldable block(s)")
