"""Damaged data files and readable-once data scripts are one clear error, never a traceback.

A truncated or corrupt ``.npz`` (bad zip structure, a member whose CRC fails only when it is read, a
compressed member that does not decompress) and a file that is no ``.npz`` at all are a
``CalibrationDataError`` naming the file and the problem, for ``--calib``, ``--eval`` and ``verify --data``
alike. A ``load_data()`` that hands out the same iterator on every call is refused with what to do, because
the data are read more than once; a ``load_data()`` that is itself a generator function still works."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

import tardis_compile as tc
from tardis_compile import api, cli, modelio
from tardis_compile.errors import CalibrationDataError, OutputPathError
from tests.helpers import batches, save_tiny

X_SHAPE = (4, 8, 16)  # the tiny model's input 'x'


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(X_SHAPE).astype(np.float32)


def _read_all(spec, passes: int = 1) -> list[list[dict]]:
    """Open a data spec as every command does, and read it ``passes`` times."""
    source = api.open_data(spec, ["x"], api.DataOptions())
    return [list(source()) for _ in range(passes)]


def _data_error(spec) -> str:
    with pytest.raises(CalibrationDataError) as info:
        _read_all(spec)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "whole.npz"
    np.savez(good, x=_x())
    path = tmp_path / "trunc.npz"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _crc_corrupted(tmp_path: Path) -> Path:
    """An uncompressed .npz with bytes flipped inside the array data: the zip is intact, the CRC is not."""
    path = tmp_path / "corrupt_unc.npz"
    np.savez(path, x=_x())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x.npy")
    # the member's data starts after its 30-byte local header, file name and extra field; skip the .npy header
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 128
    for i in range(start + 100, start + 108):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _compressed_corrupted(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt_comp.npz"
    np.savez_compressed(path, x=_x())
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def test_truncated_npz_names_the_file_and_the_problem(tmp_path):
    path = _truncated(tmp_path)
    message = _data_error(path)
    assert message == (f"calibration data '{path}': not a readable .npz archive (truncated or corrupt: "
                       "File is not a zip file)")


def test_crc_corrupted_npz_is_caught_when_the_array_is_read(tmp_path):
    path = _crc_corrupted(tmp_path)
    with np.load(path, allow_pickle=False) as data:  # opening succeeds: the CRC is checked on reading only
        assert data.files == ["x"]
        with pytest.raises(zipfile.BadZipFile):
            data["x"]
    message = _data_error(path)
    assert message == (f"calibration data '{path}': not a readable .npz archive (truncated or corrupt: "
                       "Bad CRC-32 for file 'x.npy')")


def test_corrupted_compressed_npz_names_the_file_and_the_problem(tmp_path):
    path = _compressed_corrupted(tmp_path)
    message = _data_error(path)
    assert message.startswith(f"calibration data '{path}': not a readable .npz archive (truncated or corrupt: ")
    # zlib's complaint or the CRC's, depending on where the flipped bytes land
    assert "decompressing data" in message or "Bad CRC-32" in message, message


def test_text_and_npy_files_named_npz_are_not_called_pickled(tmp_path):
    text = tmp_path / "x.npz"
    text.write_text("hello world\n")
    message = _data_error(text)
    assert message.startswith(f"calibration data '{text}': not a readable .npz archive (it is not a zip file)")
    assert "pickle" not in message
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert "not a readable .npz archive (the file is empty)" in _data_error(empty)
    npy = tmp_path / "arr.npz"
    with open(npy, "wb") as f:
        np.save(f, _x())
    message = _data_error(npy)
    assert message.startswith(f"calibration data '{npy}': a single .npy array, not a .npz archive"), message


def test_a_damaged_file_in_a_folder_is_named_after_the_good_ones_are_read(tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    np.savez(folder / "a.npz", x=_x(1))
    (folder / "b.npz").write_bytes(_crc_corrupted(tmp_path).read_bytes())
    source = api.open_data(folder, ["x"], api.DataOptions())
    it = source()
    first = next(it)
    np.testing.assert_array_equal(first["x"], _x(1))
    with pytest.raises(CalibrationDataError, match=r"'.*feeds/b\.npz': not a readable \.npz archive "
                                                   r"\(truncated or corrupt: Bad CRC-32"):
        next(it)


@pytest.fixture()
def model(tmp_path):
    path, _ = save_tiny(tmp_path, layers=1)
    np.savez(tmp_path / "good.npz", x=_x())
    return path


def _one_error_line(capsys, status: int, needle: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    assert status == 2, err
    assert needle in errors[0], errors[0]
    return errors[0]


def test_cli_reports_damaged_npz_as_one_line_for_calib_eval_and_verify(tmp_path, model, capsys):
    good = str(tmp_path / "good.npz")
    trunc, crc, comp = _truncated(tmp_path), _crc_corrupted(tmp_path), _compressed_corrupted(tmp_path)
    out = tmp_path / "o.onnx"
    status = cli.main(["optimize", str(model), "-o", str(out), "--calib", str(trunc)])
    line = _one_error_line(capsys, status, f"'{trunc}': not a readable .npz archive (truncated or corrupt")
    assert line.startswith("error: calibration data ") and not out.exists()

    status = cli.main(["optimize", str(model), "-o", str(out), "--calib", good, "--eval", str(crc)])
    _one_error_line(capsys, status, f"'{crc}': not a readable .npz archive (truncated or corrupt: Bad CRC-32")

    status = cli.main(["verify", str(model), str(model), "--data", str(comp)])
    _one_error_line(capsys, status, f"'{comp}': not a readable .npz archive (truncated or corrupt: ")

    text = tmp_path / "x.npz"
    text.write_text("not a zip\n")
    status = cli.main(["optimize", str(model), "-o", str(out), "--calib", str(text)])
    line = _one_error_line(capsys, status, f"'{text}': not a readable .npz archive (it is not a zip file)")
    assert "pickle" not in line and not out.exists()


_SHARED_LIST_ITERATOR = """\
import numpy as np
r = np.random.default_rng(0)
DATA = iter([{"x": r.standard_normal((4, 8, 16)).astype(np.float32)} for _ in range(25)])
def load_data():
    return DATA
"""

_SHARED_GENERATOR = """\
import numpy as np
def _gen():
    r = np.random.default_rng(0)
    for _ in range(25):
        yield {"x": r.standard_normal((4, 8, 16)).astype(np.float32)}
G = _gen()
def load_data():
    return G
"""

_FRESH_WRAPPER_OF_SHARED = """\
import itertools
import numpy as np
G = ({"x": np.full((4, 8, 16), i, np.float32)} for i in range(25))
def load_data():
    return itertools.chain(G)  # a new object each call, over the same (soon exhausted) generator
"""

_GENERATOR_FUNCTION = """\
import numpy as np
def load_data():
    r = np.random.default_rng(0)
    for _ in range(25):
        yield {"x": r.standard_normal((4, 8, 16)).astype(np.float32)}
"""

_SAME_LIST = """\
import numpy as np
DATA = [{"x": np.full((4, 8, 16), i, np.float32)} for i in range(25)]
def load_data():
    return DATA
"""

_FRESH = ("load_data() must return a fresh iterable on each call, a list or a new generator, because the data "
          "are read more than once")


@pytest.mark.parametrize(("text", "kind"), [(_SHARED_LIST_ITERATOR, "list_iterator"),
                                            (_SHARED_GENERATOR, "generator")])
def test_a_script_returning_the_same_iterator_is_refused_with_what_to_do(tmp_path, text, kind):
    script = tmp_path / "shared.py"
    script.write_text(text)
    source = api.open_data(script, ["x"], api.DataOptions())
    assert len(list(source())) == 25  # the first read has all the data
    with pytest.raises(CalibrationDataError) as info:
        list(source())
    assert str(info.value) == (f"calibration script '{script}': load_data() returned the same {kind} object again; "
                               f"{_FRESH} (return a list, or make load_data() itself yield the feed dicts)")


def test_a_script_returning_an_exhausted_iterator_is_refused_with_what_to_do(tmp_path):
    script = tmp_path / "exhausted.py"
    script.write_text(_FRESH_WRAPPER_OF_SHARED)
    source = api.open_data(script, ["x"], api.DataOptions())
    assert [float(f["x"][0, 0, 0]) for f in source()] == [float(i) for i in range(25)]
    with pytest.raises(CalibrationDataError, match=r"load_data\(\) returned an exhausted chain \(its data were "
                                                   r"already read\); load_data\(\) must return a fresh iterable"):
        list(source())


def test_generator_function_and_list_scripts_read_the_same_data_every_time(tmp_path):
    gen = tmp_path / "gen.py"
    gen.write_text(_GENERATOR_FUNCTION)
    passes = _read_all(gen, passes=3)
    assert [len(p) for p in passes] == [25, 25, 25]
    for a, b in zip(passes[0], passes[2]):
        np.testing.assert_array_equal(a["x"], b["x"])
    same = tmp_path / "same.py"
    same.write_text(_SAME_LIST)
    passes = _read_all(same, passes=2)
    assert [[float(f["x"][0, 0, 0]) for f in p] for p in passes] == [[float(i) for i in range(25)]] * 2


def test_cli_shared_iterator_script_is_one_error_and_generator_function_optimizes(tmp_path, model, capsys):
    shared = tmp_path / "shared_gen.py"
    shared.write_text(_SHARED_GENERATOR)
    out = tmp_path / "o.onnx"
    status = cli.main(["optimize", str(model), "-o", str(out), "--calib", str(shared)])
    line = _one_error_line(capsys, status, "load_data() returned the same generator object again")
    assert _FRESH in line and "no data" not in line and not out.exists()

    gen = tmp_path / "gen.py"
    gen.write_text(_GENERATOR_FUNCTION)
    status = cli.main(["optimize", str(model), "-o", str(out), "--calib", str(gen)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "error:" not in captured.err and out.exists() and "| ffn0 |" in captured.out


def test_api_callables_get_the_same_checks_as_load_data(tmp_path):
    """A callable given to the Python API that fails, returns None or one dict, or returns one shared
    iterator is one CalibrationDataError, as a script's load_data() is."""
    model, _ = save_tiny(tmp_path, layers=1)
    shared = iter(batches())

    def boom():
        raise RuntimeError("no database")

    cases = [(boom, "the callable failed: RuntimeError: no database"), (lambda: None, "returned None"),
             (lambda: batches()[0], "returned one dict"), (lambda: shared, "must return a fresh iterable")]
    for calib, needle in cases:
        with pytest.raises(CalibrationDataError, match=needle):
            tc.optimize(model, tmp_path / "o.onnx", calib, show_progress=False)
    assert not (tmp_path / "o.onnx").exists()
    tc.optimize(model, tmp_path / "o.onnx", lambda: iter(batches()), show_progress=False)
    assert (tmp_path / "o.onnx").is_file()


def test_an_output_folder_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "one.npz").write_bytes(b"")
    with pytest.raises(OutputPathError, match=r"one.npz' is a file, not a directory"):
        modelio.check_destination(tmp_path / "m.onnx", tmp_path / "one.npz" / "m.onnx")


def test_a_bad_batch_from_a_folder_names_its_file(tmp_path):
    model, _ = save_tiny(tmp_path, layers=1)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(batches(n=12)):
        np.savez(folder / f"c{i:02d}.npz", x=feed["x"].astype(np.float64) if i == 11 else feed["x"])
    with pytest.raises(CalibrationDataError, match=r"^calibration data, batch 11 \('.*c11\.npz'\): input 'x' has "
                                                   r"dtype float64"):
        tc.optimize(model, tmp_path / "o.onnx", folder, show_progress=False)
