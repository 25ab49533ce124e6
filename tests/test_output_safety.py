"""Nothing is lost, and nothing broken is written: a symlinked model's external data and the files of a
data folder are never destinations; an output's model and data file are replaced together or not at all;
statistics are written only with the model; data that overflow the model stop the run with one line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import tardis_compile as tc
from tardis_compile import modelio
from tardis_compile.errors import CalibrationDataError, OutputPathError, TardisError
from models import tiny
from tests.helpers import batches, run, save_tiny


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _external(folder: Path, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(tiny.ffn_model(16, 64, layers=1), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location=name + ".data", size_threshold=0)
    return path


def test_a_symlinked_models_external_data_is_never_a_destination(tmp_path):
    """onnx reads external data beside the path as given; for a symlink that is not beside the target."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    real = _external(tmp_path / "src")
    blobs.mkdir()
    snap.mkdir()
    os.replace(real, blobs / "AAA")
    os.replace(real.with_name("m.onnx.data"), snap / "m.onnx.data")
    (snap / "m.onnx").symlink_to(blobs / "AAA")
    before = _digest(snap / "m.onnx.data")
    with pytest.raises(OutputPathError, match="the input model's external data"):
        modelio.check_destination(snap / "m.onnx", snap / "m.onnx.data")
    with pytest.raises(OutputPathError, match="the input model's external data"):
        tc.optimize(snap / "m.onnx", snap / "m.onnx.data", batches(), show_progress=False)
    assert _digest(snap / "m.onnx.data") == before


def test_the_files_of_a_data_folder_are_never_destinations(tmp_path):
    model, _ = save_tiny(tmp_path, layers=1)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(batches(n=4)):
        np.savez(folder / f"c{i:02d}.npz", **feed)
    before = _digest(folder / "c00.npz")
    with pytest.raises(OutputPathError, match=r"the calibration data \('c00.npz' in"):
        tc.optimize(model, folder / "c00.npz", folder, show_progress=False)
    with pytest.raises(OutputPathError, match="the evaluation data"):
        tc.optimize(model, tmp_path / "o.onnx", batches(), eval_data=folder, stats_out=folder / "c01",
                    show_progress=False)
    assert _digest(folder / "c00.npz") == before


def test_a_data_file_name_that_is_a_folder_is_refused_up_front(tmp_path):
    model, _ = save_tiny(tmp_path, layers=1)
    (tmp_path / "o.onnx.data").mkdir()
    with pytest.raises(OutputPathError, match=r"o.onnx.data' is a directory"):
        modelio.check_destination(model, tmp_path / "o.onnx")


def test_model_and_data_file_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """The model's rename fails after its new data file went in: the old data file is put back, so the old
    model still reads its own weights (and the error names the destination)."""
    model = _external(tmp_path / "in")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    tc.optimize(model, out, batches(), settings=tc.Settings(flag_all=True), show_progress=False)
    data = out.with_name("m.onnx.data")
    old_model, old_data = _digest(out), _digest(data)
    expected = run(out, batches(n=1)[0])

    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == out:
            raise PermissionError(1, "Operation not permitted")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OutputPathError, match=r"cannot write '.*m\.onnx': Operation not permitted; the previous"):
        tc.optimize(model, out, batches(), show_progress=False)
    monkeypatch.undo()
    assert (_digest(out), _digest(data)) == (old_model, old_data)
    np.testing.assert_array_equal(run(out, batches(n=1)[0]), expected)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tardis-")] == []


def test_statistics_are_written_only_with_the_model(tmp_path):
    model, _ = save_tiny(tmp_path, layers=1)
    with pytest.raises(TardisError, match="verification failed, nothing written"):
        tc.optimize(model, tmp_path / "o.onnx", batches(), stats_out=tmp_path / "st",
                    thresholds=tc.Thresholds(max_abs_error=1e-12), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    tc.optimize(model, tmp_path / "o.onnx", batches(), stats_out=tmp_path / "st", show_progress=False)
    assert (tmp_path / "st.npz").is_file() and (tmp_path / "o.onnx").is_file()


@pytest.mark.parametrize("dtype,value", [("float32", 3e38), ("float16", 6e4)])
def test_data_that_overflow_the_model_are_refused(tmp_path, dtype, value):
    """Finite feeds whose activations overflow (float32 near 3e38, float16 above 65504) would give a model
    that outputs NaN; the run stops with one line naming the block, and writes nothing."""
    model, _ = save_tiny(tmp_path, layers=1, dtype=dtype)
    data = [{"x": feed["x"].astype(dtype)} for feed in batches()]
    data[3]["x"][0, 0, :] = value
    with pytest.raises(CalibrationDataError, match=r"(input|pre-activation) of block .* NaN or infinite"):
        tc.optimize(model, tmp_path / "o.onnx", data, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_damaged_statistics_are_one_error(tmp_path):
    """A --stats-in file damaged inside its compressed data (zlib or CRC error when read) is refused."""
    model, _ = save_tiny(tmp_path, layers=1)
    tc.optimize(model, tmp_path / "o.onnx", batches(), stats_out=tmp_path / "st", show_progress=False)
    raw = bytearray((tmp_path / "st.npz").read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(64)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(CalibrationDataError, match=r"statistics '.*bad.npz': not a file written by --stats-out"):
        tc.optimize(model, tmp_path / "o2.onnx", batches(), stats_in=tmp_path / "bad.npz", show_progress=False)


@pytest.mark.parametrize("bad", ["nan", "float64"])
def test_a_bad_held_out_batch_is_numbered_as_in_the_data(tmp_path, bad):
    """Batch 9 is held out for verification (every 10th); a bad one is still found in the first pass and
    called calibration data, batch 9 (not 'evaluation data', not renumbered among the kept batches)."""
    model, _ = save_tiny(tmp_path, layers=1)
    data = batches(n=12)
    data[9] = {"x": data[9]["x"].astype(np.float64)} if bad == "float64" else data[9]
    if bad == "nan":
        data[9]["x"][0, 0, 0] = np.nan
    with pytest.raises(CalibrationDataError, match=r"^calibration data, batch 9: input 'x'"):
        tc.optimize(model, tmp_path / "o.onnx", data, show_progress=False)
