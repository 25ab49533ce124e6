"""Deployment from C++ (``examples/cpp/run_model.cc``): ONNX Runtime's C++ API, ``libtardis_ops`` registered
with one call, real sessions in a separate process; its numbers are checked against the Python API's.

Skipped (with the reason) only when the example cannot be built here; under CI (``CI`` set) that is a
failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import tardis_compile as tc
from tardis_compile import runtime
from tests.helpers import batches, run, save_tiny

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"


def _ort_library() -> Path | None:
    found = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def deploy(tmp_path_factory, lib):
    """(run_model executable, libtardis_ops path), built with the example's own CMake file."""
    ort_lib, include = _ort_library(), runtime.ort_include_dir()
    missing = [what for what, ok in (("cmake", shutil.which("cmake")),
                                     ("the ONNX Runtime API headers", include),
                                     ("libonnxruntime.so in the onnxruntime package", ort_lib)) if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail("the C++ deployment example cannot be built under CI: missing " + ", ".join(missing))
        pytest.skip("missing " + ", ".join(missing))
    build = tmp_path_factory.mktemp("run_model")
    for cmd in (["cmake", "-S", str(EXAMPLE), "-B", str(build), f"-DORT_LIBRARY={ort_lib}",
                 f"-DORT_INCLUDE_DIR={include}"], ["cmake", "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return build / "run_model", lib


def _run_cpp(exe: Path, model: Path, x: np.ndarray, out: Path, library: Path | None = None,
             threads: int = 1) -> tuple[np.ndarray, str]:
    x.astype(np.float32).tofile(out.with_suffix(".x.bin"))
    args = [str(exe), str(model), str(out), "--threads", str(threads)]
    if library is not None:
        args += ["--library", str(library)]
    args.append(f"x={out.with_suffix('.x.bin')}:{'x'.join(map(str, x.shape))}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, shape = re.search(r"^output (\S+) (\S+)$", proc.stdout, re.M).groups()
    y = np.fromfile(f"{out}.{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.bin", np.float32)
    y = y.reshape([int(s) for s in shape.split("x")])
    return y, proc.stdout


def test_cpp_deployment_runs_the_kernel_and_matches_python(tmp_path, deploy):
    """Library registered: the compiled kernel runs (its counter, read in the C++ process) and the output
    equals the Python session's; not registered: the function body gives the same numbers; --flag-all:
    the C++ output equals the original model's."""
    exe, lib = deploy
    src, _ = save_tiny(tmp_path, layers=2)
    calib = batches()
    opt, exact = tmp_path / "opt.onnx", tmp_path / "exact.onnx"
    tc.optimize(src, opt, calib, show_progress=False)
    tc.optimize(src, exact, calib, settings=tc.Settings(flag_all=True), show_progress=False)
    x = np.random.default_rng(7).standard_normal((3, 8, 16)).astype(np.float32)

    y_cpp, stdout = _run_cpp(exe, opt, x, tmp_path / "lib", library=lib, threads=2)
    y_py = run(opt, {"x": x}, tc.session_options(require=True))
    np.testing.assert_allclose(y_cpp, y_py, rtol=1e-6, atol=1e-6)
    assert int(re.search(r"tardis kernel calls (\d+)", stdout).group(1)) == 2  # one call per block

    y_body, stdout = _run_cpp(exe, opt, x, tmp_path / "body")
    assert "kernel calls" not in stdout
    np.testing.assert_allclose(y_body, y_cpp, rtol=1e-5, atol=1e-5)

    y_exact, _ = _run_cpp(exe, exact, x, tmp_path / "exact", library=lib)
    y_orig, _ = _run_cpp(exe, src, x, tmp_path / "orig")
    np.testing.assert_allclose(y_exact, y_orig, rtol=1e-5, atol=1e-5)
    assert np.abs(y_orig - y_cpp).max() > 0  # the default model is an approximation, not a copy


def test_cpp_deployment_runs_the_int4_predictor_op(tmp_path, deploy):
    """An int4 model: its fused predictor + fallback op runs in the C++ process (the counters), outputs as in
    Python."""
    exe, lib = deploy
    src, _ = save_tiny(tmp_path, layers=2)
    opt = tmp_path / "int4.onnx"
    tc.optimize(src, opt, batches(), settings=tc.Settings(predictor="int4"), show_progress=False)
    x = np.random.default_rng(9).standard_normal((2, 8, 16)).astype(np.float32)
    y_cpp, stdout = _run_cpp(exe, opt, x, tmp_path / "int4", library=lib)
    assert int(re.search(r"tardis fused calls (\d+)", stdout).group(1)) == 2
    assert int(re.search(r"tardis kernel calls (\d+)", stdout).group(1)) == 2  # fused calls count here too
    assert int(re.search(r"tardis nbits calls (\d+)", stdout).group(1)) == 0
    np.testing.assert_allclose(y_cpp, run(opt, {"x": x}, tc.session_options(require=True)), rtol=1e-6, atol=1e-6)


def test_cpp_deployment_names_bad_input(tmp_path, deploy):
    """A wrong-sized input file, ORT refusing an input's shape, a malformed dimension (also a trailing 'x'),
    a malformed thread count, an unknown option, an option without its value and a name the model does not
    take each end in an 'error:' message naming the problem (exit status 1, no crash)."""
    exe, lib = deploy
    src, _ = save_tiny(tmp_path)
    (tmp_path / "short.bin").write_bytes(b"\0" * 12)
    proc = subprocess.run([str(exe), str(src), str(tmp_path / "o"), f"x={tmp_path / 'short.bin'}:1x8x16"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "holds 12 bytes" in proc.stderr
    np.zeros((1, 8, 5), np.float32).tofile(tmp_path / "narrow.bin")
    proc = subprocess.run([str(exe), str(src), str(tmp_path / "o"), f"x={tmp_path / 'narrow.bin'}:1x8x5",
                           "--library", str(lib)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: Got invalid dimensions for input: x")
    for bad, needle in ((f"x={tmp_path / 'narrow.bin'}:1x8xa", "is not a whole number >= 0"),
                        (f"x={tmp_path / 'narrow.bin'}:1x-8x5", "is not a whole number >= 0")):
        proc = subprocess.run([str(exe), str(src), str(tmp_path / "o"), bad], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1 and proc.stderr.startswith("error: input ") and needle in proc.stderr
    proc = subprocess.run([str(exe), str(src), str(tmp_path / "o"), "--threads", "abc"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "error: --threads: 'abc'" in proc.stderr
    x_file = f"x={tmp_path / 'narrow.bin'}:1x8x5"
    for args, needle in (([f"x={tmp_path / 'narrow.bin'}:1x8x"], "is not a whole number >= 0"),
                         ([x_file, "--thread", "2"], "unknown option '--thread'"),
                         ([x_file, "--library"], "--library needs a value"),
                         ([x_file, f"z={tmp_path / 'narrow.bin'}:1x8x5"], "'z' is not an input of the model")):
        proc = subprocess.run([str(exe), str(src), str(tmp_path / "o"), *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
