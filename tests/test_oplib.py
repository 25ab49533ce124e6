"""The compiled op library libtardis_ops: real ONNX Runtime sessions, numbers checked against the float64
reference of ``ai.tardis::GuardedFallback`` (csrc/OP_SPEC.md).

The kernel tests are skipped (with the reason) only when the library cannot be built here; under CI
(``CI`` set) a missing library is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from tardis_compile import fallback_op as fo
from tardis_compile import runtime

# ------------------------------------------------------------------------------------------------ fixtures


def test_library_available_in_ci():
    """CI must build and use the library; a silent skip of every kernel test would hide that."""
    path = runtime.library_path() or runtime.build_library()
    if os.environ.get("CI"):
        assert path is not None, ("libtardis_ops is missing under CI: "
                                  + "; ".join(runtime.missing_build_requirements()))
    elif path is None:
        pytest.skip("not under CI and the library is unavailable")


NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def make_inputs(rng, lead, d, D, dtype=np.float32, flags="random", rate=0.2):
    """Operands for one call; ``flags`` picks the flagged pattern:

    none (lo=-inf, hi=+inf), all (lo=+inf, hi=-inf), random (each token-neuron pair independently with
    probability ``rate``), shared (one set of ~rate*D neurons for every token, plus a few per token),
    nan (random, with NaN predictions that must not flag).
    """
    x = rng.standard_normal((*lead, d))
    w1t = rng.standard_normal((D, d)) / np.sqrt(d)
    w2 = rng.standard_normal((D, d)) / np.sqrt(D)
    b1 = 0.1 * rng.standard_normal(D)
    alpha = rng.uniform(0.0, 1.0, D)
    beta = rng.uniform(-0.1, 0.1, D)
    y_lin = rng.standard_normal((*lead, d))
    h_hat = rng.standard_normal((*lead, D))
    lo, hi = np.full(D, -1.0), np.full(D, 1.0)
    if flags == "none":
        lo, hi = np.full(D, -np.inf), np.full(D, np.inf)
    elif flags == "all":
        lo, hi = np.full(D, np.inf), np.full(D, -np.inf)
    elif flags in ("random", "nan"):
        h_hat = np.where(rng.random((*lead, D)) < rate, 5.0, 0.0) * rng.choice([-1.0, 1.0], (*lead, D))
        if flags == "nan":
            h_hat[rng.random((*lead, D)) < 0.3] = np.nan
    elif flags == "shared":
        shared = rng.random(D) < rate
        extra = rng.random((*lead, D)) < 0.01
        h_hat = np.where(shared | extra, 3.0, 0.0)
    else:
        raise ValueError(flags)
    ops = dict(x=x, y_lin=y_lin, h_hat=h_hat, lo=lo, hi=hi, w1t=w1t, b1=b1, w2=w2, alpha=alpha, beta=beta)
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in ops.items()}


def session(model: onnx.ModelProto, so: ort.SessionOptions | None = None, threads: int = 1):
    so = so if so is not None else ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def with_lib(lib, so: ort.SessionOptions | None = None) -> ort.SessionOptions:
    so = so if so is not None else ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    return so


def loose(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every graph input's dims symbolic, so malformed shapes reach the kernel."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        for i, dim in enumerate(inp.type.tensor_type.shape.dim):
            dim.Clear()
            dim.dim_param = f"{inp.name}_{i}"
    return m


def rel_err(y, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(y, np.float64) - ref)) / max(1.0, float(np.max(np.abs(ref)))))


# ------------------------------------------------------------------------------------------------ no library


def test_function_body_runs_without_library():
    rng = np.random.default_rng(0)
    inp = make_inputs(rng, (5,), 24, 96)
    y = session(fo.standalone_model(24, 96))  # plain SessionOptions: ORT inlines the function body
    out = y.run(None, inp)[0]
    assert rel_err(out, fo.reference(**inp)) < 1e-5


def test_session_options_without_library(monkeypatch, tmp_path):
    monkeypatch.setenv(runtime.ENV_LIBRARY, str(tmp_path / "missing.so"))
    assert runtime.library_path() is None
    with pytest.raises(runtime.LibraryUnavailableError, match="not available"):
        runtime.session_options(require=True)
    so = runtime.session_options()  # falls back: options without the library
    rng = np.random.default_rng(1)
    inp = make_inputs(rng, (3,), 16, 32, flags="all")
    out = session(fo.standalone_model(16, 32), so).run(None, inp)[0]
    assert rel_err(out, fo.reference(**inp)) < 1e-5


def test_library_command_prints_the_library_in_use(lib, monkeypatch, tmp_path):
    """``tardis-compile library``: the path session_options() registers; a missing one is named (status 1)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tardis_compile.cli", "library"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(runtime.library_path()), proc.stderr
    env = {**os.environ, runtime.ENV_LIBRARY: str(tmp_path / "missing.so")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and proc.stdout == "" and "not available" in proc.stderr
    copy = tmp_path / "chosen.so"  # an explicit library comes first, with --build too (nothing to build)
    copy.write_bytes(Path(runtime.library_path()).read_bytes())
    env = {**os.environ, runtime.ENV_LIBRARY: str(copy)}
    proc = subprocess.run([*cmd, "--build"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == str(copy.resolve()), proc.stderr


# ------------------------------------------------------------------------------------------------ kernel


def test_concurrent_runs_on_one_session_match_sequential_ones(lib):
    """A server calls Run on one session from many threads at once: every result equals the same call made
    alone (the kernel keeps no state between calls besides per-thread scratch), on each path."""
    from concurrent.futures import ThreadPoolExecutor

    d, D = 64, 256
    model = fo.standalone_model(d, D)
    calls = [make_inputs(np.random.default_rng(100 + i), lead, d, D, flags=flags)
             for i, (lead, flags) in enumerate([((1,), "random"), ((40,), "random"), ((51,), "shared"),
                                                 ((96,), "random"), ((2,), "all"), ((64,), "nan")] * 3)]
    sess = session(model, runtime.session_options(require=True), threads=2)
    alone = [sess.run(None, inp)[0] for inp in calls]
    before = runtime.kernel_calls(lib)
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda inp: sess.run(None, inp)[0], calls * 4))
    assert runtime.kernel_calls(lib) == before + 4 * len(calls)
    for i, out in enumerate(together):
        np.testing.assert_array_equal(out, alone[i % len(calls)])
    assert rel_err(alone[1], fo.reference(**calls[1])) < 1e-5


def test_kernel_runs_instead_of_function_body(lib):
    """With the library registered, ORT does not inline the model-local function: our kernel computes."""
    rng = np.random.default_rng(2)
    d, D = 32, 128
    model = fo.standalone_model(d, D)
    assert model.functions, "the test model must carry the function body"
    inp = make_inputs(rng, (7,), d, D, flags="random")
    body = session(model).run(None, inp)[0]
    before = runtime.kernel_calls(lib)
    sess = session(model, runtime.session_options(require=True))
    out = sess.run(None, inp)[0]
    assert runtime.kernel_calls(lib) == before + 1
    np.testing.assert_allclose(out, body, rtol=1e-5, atol=1e-5 * np.abs(body).max())
    assert rel_err(out, fo.reference(**inp)) < 1e-5


def test_library_metadata(lib):
    stats = runtime.kernel_stats(lib)
    assert stats["ort_api"] == 21
    assert set(stats) >= {"calls", "union_calls", "neuron_calls", "tile_calls", "panel_calls", "portable_calls",
                          "avx512_calls", "flagged_pairs", "cpu_has_avx2", "cpu_has_avx512"}


@pytest.mark.parametrize("variant", ["none", "tanh"])
@pytest.mark.parametrize("flags", ["none", "all", "random", "shared", "nan"])
@pytest.mark.parametrize("lead", [(1,), (6,), (2, 9)], ids=["decode", "rank2", "rank3"])
def test_kernel_matches_reference(lib, variant, flags, lead):
    rng = np.random.default_rng(hash((variant, flags, lead)) % 2**32)
    d, D = int(rng.integers(8, 80)), int(rng.integers(16, 300))
    model = fo.standalone_model(d, D, variant, rank=len(lead) + 1)
    inp = make_inputs(rng, lead, d, D, flags=flags)
    before = runtime.kernel_calls(lib)
    out = session(model, with_lib(lib)).run(None, inp)[0]
    assert runtime.kernel_calls(lib) == before + 1
    ref = fo.reference(**inp, variant=variant)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) < 1e-5
    if flags == "none":
        np.testing.assert_array_equal(out, inp["y_lin"])


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_both_strategies(lib, seed, monkeypatch):
    """Every strategy, forced in turn, agrees with the reference (odd sizes too)."""
    rng = np.random.default_rng(100 + seed)
    d, D = int(rng.integers(1, 130)), int(rng.integers(1, 700))
    tokens = int(rng.integers(1, 40))
    flags = ["random", "shared", "all"][seed % 3]
    inp = make_inputs(rng, (tokens,), d, D, flags=flags, rate=float(rng.uniform(0.01, 0.5)))
    ref = fo.reference(**inp)
    model = fo.standalone_model(d, D)
    for strategy in ("token", "union", "neuron", "tile", "panel", "auto"):
        monkeypatch.setenv("TARDIS_OPS_STRATEGY", strategy)  # read when the session creates the kernel
        out = session(model, with_lib(lib), threads=2).run(None, inp)[0]
        assert rel_err(out, ref) < 1e-5, strategy


ISAS = ["default", "avx2", "portable"]  # TARDIS_OPS_ISA caps the instruction set (default: AVX-512 if present)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("flags", ["none", "all", "random", "shared", "nan"])
@pytest.mark.parametrize("lead", [(1,), (2, 37)], ids=["decode", "batch-seq"])
def test_neuron_path_matches_reference(lib, monkeypatch, isa, dtype, flags, lead):
    """The neuron-major path, forced, vs the float64 reference: full 64-column blocks plus a ragged tail
    (d = 64k + r), batch and sequence axes, every flag pattern, float and float16, each instruction set."""
    rng = np.random.default_rng(hash((isa, dtype, flags, lead)) % 2**32)
    d, D = 2 * 64 + int(rng.integers(1, 64)), int(rng.integers(100, 400))
    npdt = NP[dtype]
    inp = make_inputs(rng, lead, d, D, dtype=npdt, flags=flags, rate=0.15)
    monkeypatch.setenv("TARDIS_OPS_STRATEGY", "neuron")
    if isa != "default":
        monkeypatch.setenv("TARDIS_OPS_ISA", isa)
    before = runtime.kernel_stats(lib)
    model = fo.standalone_model(d, D, dtype=dtype, rank=len(lead) + 1)
    out = session(model, with_lib(lib), threads=2).run(None, inp)[0]
    after = runtime.kernel_stats(lib)
    assert after["calls"] == before["calls"] + 1
    if after["flagged_pairs"] > before["flagged_pairs"]:
        assert after["neuron_calls"] == before["neuron_calls"] + 1
    if isa == "portable":
        assert after["portable_calls"] == before["portable_calls"] + 1
    if isa == "default" and after["cpu_has_avx512"]:
        assert after["avx512_calls"] == before["avx512_calls"] + 1
    else:
        assert after["avx512_calls"] == before["avx512_calls"]
    assert out.dtype == npdt
    ref = fo.reference(**inp)
    assert rel_err(out, ref) < (1e-5 if dtype == TensorProto.FLOAT else 2e-3)
    if flags == "none":
        np.testing.assert_array_equal(out, inp["y_lin"])


@pytest.mark.parametrize("isa", ["default", "avx2"])
@pytest.mark.parametrize("order", ["tile", "panel"])
@pytest.mark.parametrize("variant", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("flags", ["none", "all", "random", "shared", "nan"])
@pytest.mark.parametrize("lead", [(1,), (2, 37), (3, 100)], ids=["decode", "batch-seq", "two-groups"])
def test_tile_path_matches_reference(lib, monkeypatch, isa, order, variant, dtype, flags, lead):
    """The tile path (token-major in neuron blocks), forced in row and in column-panel order, vs the
    float64 reference. AVX-512 (vector erf / tanh): d = 16 (kTileVecs + 4), a full 16-vector chunk plus a
    4-vector one. AVX2 (8-float vectors, chunks of up to 8): d = 8 * 43, five full chunks plus a 3-vector
    one. Every flag pattern, float and float16, one token, batch x sequence (the neuron range split over
    work items, partial sums added) and 300 tokens (two token groups). Several neuron blocks per split:
    the prefill test below (384 x 1536)."""
    rng = np.random.default_rng(hash((variant, dtype, flags, lead)) % 2**32)
    d, D = (16 * 20 if isa == "default" else 8 * 43), int(rng.integers(100, 400))
    npdt = NP[dtype]
    inp = make_inputs(rng, lead, d, D, dtype=npdt, flags=flags, rate=0.15)
    monkeypatch.setenv("TARDIS_OPS_STRATEGY", order)
    if isa != "default":
        monkeypatch.setenv("TARDIS_OPS_ISA", isa)
    before = runtime.kernel_stats(lib)
    model = fo.standalone_model(d, D, variant, dtype=dtype, rank=len(lead) + 1)
    out = session(model, with_lib(lib), threads=2).run(None, inp)[0]
    after = runtime.kernel_stats(lib)
    if after["cpu_has_avx2"] and after["flagged_pairs"] > before["flagged_pairs"]:
        assert after["tile_calls"] == before["tile_calls"] + 1
        assert after["panel_calls"] == before["panel_calls"] + (order == "panel")
        assert after["avx512_calls"] == before["avx512_calls"] + (isa == "default" and after["cpu_has_avx512"])
    assert out.dtype == npdt
    ref = fo.reference(**inp, variant=variant)
    assert rel_err(out, ref) < (1e-5 if dtype == TensorProto.FLOAT else 2e-3)
    if flags == "none":
        np.testing.assert_array_equal(out, inp["y_lin"])


@pytest.mark.parametrize("d", [64, 384, 1000, 1001])
def test_all_paths_agree_at_prefill_size(lib, monkeypatch, d):
    """128 tokens, independent 10% flags (the bench's prefill case): every path, 1 and 2 threads, agrees
    with the reference; auto picks the tile path where it runs (AVX-512 with d % 16 == 0, AVX2 with
    d % 8 == 0: 1000 takes the AVX2 tile kernels on an AVX-512 CPU), else neuron-major."""
    rng = np.random.default_rng(d)
    D = 4 * d
    inp = make_inputs(rng, (128,), d, D, flags="random", rate=0.1)
    ref = fo.reference(**inp)
    model = fo.standalone_model(d, D)
    for strategy in ("token", "union", "neuron", "tile", "panel", "auto"):
        monkeypatch.setenv("TARDIS_OPS_STRATEGY", strategy)
        for threads in (1, 2):
            before = runtime.kernel_stats(lib)
            out = session(model, with_lib(lib), threads=threads).run(None, inp)[0]
            after = runtime.kernel_stats(lib)
            assert rel_err(out, ref) < 1e-5, (strategy, threads)
            if strategy == "auto":  # the tile path runs with AVX-512 (d % 16 == 0) or AVX2 (d % 8 == 0)
                key = "tile_calls" if after["cpu_has_avx2"] and d % 8 == 0 else "neuron_calls"
                assert after[key] == before[key] + 1


@pytest.mark.parametrize("order", ["tile", "panel"])
@pytest.mark.parametrize("threads", [1, 2])
def test_split_copies_of_y_keep_nothing_from_earlier_calls(lib, monkeypatch, order, threads):
    """The tile path's neuron splits add into copies of y that are kept between calls and zeroed row by row
    when first added to. 128 tokens, D = 1024 (four splits): a call with flags everywhere fills every copy;
    the next call on the same session flags neurons of the first split only (even tokens) and of the last
    one (token 1), no neuron at all for the other odd tokens. It matches the reference, and the tokens
    without flags get y_lin exactly."""
    if not runtime.kernel_stats(lib)["cpu_has_avx2"]:
        pytest.skip("the tile path needs AVX2")
    rng = np.random.default_rng(21)
    d, D, tokens = 64, 1024, 128
    monkeypatch.setenv("TARDIS_OPS_STRATEGY", order)
    sess = session(fo.standalone_model(d, D), with_lib(lib), threads=threads)
    full = make_inputs(rng, (tokens,), d, D, flags="random", rate=0.2)
    assert rel_err(sess.run(None, full)[0], fo.reference(**full)) < 1e-5
    mask = np.zeros((tokens, D), dtype=bool)
    mask[0::2, : D // 4] = rng.random((tokens // 2, D // 4)) < 0.5
    mask[1, -D // 8:] = True
    part = dict(make_inputs(rng, (tokens,), d, D, flags="none"), lo=np.full(D, -1.0, np.float32),
                hi=np.full(D, 1.0, np.float32), h_hat=np.where(mask, 5.0, 0.0).astype(np.float32))
    before = runtime.kernel_stats(lib)
    out = sess.run(None, part)[0]
    assert runtime.kernel_stats(lib)["tile_calls"] == before["tile_calls"] + 1
    assert rel_err(out, fo.reference(**part)) < 1e-5
    idle = ~mask.any(axis=1)
    assert idle.sum() == tokens // 2 - 1
    np.testing.assert_array_equal(out[idle], part["y_lin"][idle])


def test_auto_walks_large_token_groups_in_column_panels(lib, monkeypatch):
    """auto on the tile path, d = 2048: row order while a token group's x and y rows fit in L2 beside the
    neuron block (64 tokens: 1 MB), column panels beyond (300 tokens, groups of 150: 2.4 MB); both agree
    with the reference, and the two orders forced agree to 1e-6."""
    if not runtime.kernel_stats(lib)["cpu_has_avx512"]:
        pytest.skip("column panels need AVX-512F")
    rng = np.random.default_rng(12)
    d, D = 2048, 320
    model = fo.standalone_model(d, D)
    for tokens, panels in ((64, 0), (300, 1)):
        inp = make_inputs(rng, (tokens,), d, D, flags="random", rate=0.1)
        ref = fo.reference(**inp)
        outs = {}
        for strategy in ("auto", "tile", "panel"):
            monkeypatch.setenv("TARDIS_OPS_STRATEGY", strategy)
            before = runtime.kernel_stats(lib)
            outs[strategy] = session(model, with_lib(lib), threads=2).run(None, inp)[0]
            after = runtime.kernel_stats(lib)
            assert after["tile_calls"] == before["tile_calls"] + 1
            if strategy == "auto":
                assert after["panel_calls"] == before["panel_calls"] + panels, tokens
            assert rel_err(outs[strategy], ref) < 1e-5, (tokens, strategy)
        assert rel_err(outs["panel"], outs["tile"]) < 1e-6


def test_cost_model_choices(lib, monkeypatch):
    """auto where the tile path cannot run (d = 60, not a multiple of 8), AVX2 cost model: a blocked path
    (neuron-major or union-gather) for prefill with shared flags, neuron-major with independent flags,
    per-token for one token. With d a multiple of 8 (16 for AVX-512): the tile path every time."""
    rng = np.random.default_rng(3)
    D, tokens = 512, 32
    keys = ("union_calls", "neuron_calls", "tile_calls")

    def run(inp, threads=2):
        d = inp["x"].shape[-1]
        before = runtime.kernel_stats(lib)
        out = session(fo.standalone_model(d, D), with_lib(lib), threads=threads).run(None, inp)[0]
        after = runtime.kernel_stats(lib)
        assert rel_err(out, fo.reference(**inp)) < 1e-5
        return {k: after[k] - before[k] for k in keys}

    def cases(d):
        return [make_inputs(rng, (tokens,), d, D, flags="all"),
                make_inputs(rng, (tokens,), d, D, flags="shared", rate=0.2),
                make_inputs(rng, (tokens,), d, D, flags="random", rate=0.1),
                make_inputs(rng, (1,), d, D, flags="random", rate=0.3)]

    for isa in (None, "avx2"):  # the best the CPU has, then AVX2 (the cost model below runs with AVX2)
        if isa:
            monkeypatch.setenv("TARDIS_OPS_ISA", isa)
        if runtime.kernel_stats(lib)["cpu_has_avx2"]:
            for inp in cases(64):
                assert run(inp) == {"union_calls": 0, "neuron_calls": 0, "tile_calls": 1}
    full, shared, independent, one = (run(inp) for inp in cases(60))
    assert full["union_calls"] + full["neuron_calls"] == 1
    assert shared["union_calls"] + shared["neuron_calls"] == 1  # a blocked path, not per-token
    assert independent == {"union_calls": 0, "neuron_calls": 1, "tile_calls": 0}
    assert one == {"union_calls": 0, "neuron_calls": 0, "tile_calls": 0}


def test_decode_many_flags_threads(lib):
    """One token, every neuron flagged: the flagged set is split over threads with partial sums."""
    rng = np.random.default_rng(4)
    d, D = 96, 2048
    inp = make_inputs(rng, (1,), d, D, flags="all")
    ref = fo.reference(**inp)
    model = fo.standalone_model(d, D)
    outs = [session(model, with_lib(lib), threads=t).run(None, inp)[0] for t in (1, 2)]
    for out in outs:
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("variant", ["none", "tanh"])
@pytest.mark.parametrize("flags", ["random", "shared", "all"])
def test_float16(lib, variant, flags):
    rng = np.random.default_rng(5)
    d, D = 40, 200
    inp = make_inputs(rng, (2, 5), d, D, dtype=np.float16, flags=flags)
    model = fo.standalone_model(d, D, variant, dtype=TensorProto.FLOAT16, rank=3)
    before = runtime.kernel_calls(lib)
    out = session(model, with_lib(lib)).run(None, inp)[0]
    assert runtime.kernel_calls(lib) == before + 1
    assert out.dtype == np.float16
    ref = fo.reference(**inp, variant=variant)
    assert rel_err(out, ref) < 2e-3  # float16 output rounding; accumulation is float32


@pytest.mark.parametrize("isa", ["default", "avx2", "portable"])
def test_float16_odd_sizes_convert_exactly(lib, monkeypatch, isa):
    """float16 operands whose element counts are not multiples of the 8 or 16 lanes the F16C conversions
    and the flag scan take at a time (3 tokens x 37 columns, 203 neurons): with no neuron flagged the
    output is y_lin bit for bit (float16 -> float32 -> float16 is exact), and with random flags it matches
    the float64 reference."""
    if isa != "default":
        monkeypatch.setenv("TARDIS_OPS_ISA", isa)
    rng = np.random.default_rng(33)
    d, D = 37, 203
    model = fo.standalone_model(d, D, dtype=TensorProto.FLOAT16)
    sess = session(model, with_lib(lib))
    idle = make_inputs(rng, (3,), d, D, dtype=np.float16, flags="none")
    np.testing.assert_array_equal(sess.run(None, idle)[0], idle["y_lin"])
    busy = make_inputs(rng, (3,), d, D, dtype=np.float16, flags="random", rate=0.2)
    out = sess.run(None, busy)[0]
    assert out.dtype == np.float16
    assert rel_err(out, fo.reference(**busy)) < 2e-3


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_forced_portable_path(lib, monkeypatch, dtype):
    """TARDIS_OPS_FORCE_PORTABLE=1 (read at session creation) runs the non-AVX2 code, same numbers."""
    rng = np.random.default_rng(6)
    d, D = 45, 170
    npdt = NP[dtype]
    model = fo.standalone_model(d, D, dtype=dtype)
    tol = 1e-5 if dtype == TensorProto.FLOAT else 2e-3
    for strategy in ("token", "union", "neuron"):
        inp = make_inputs(rng, (9,), d, D, dtype=npdt, flags="shared")
        monkeypatch.setenv("TARDIS_OPS_FORCE_PORTABLE", "1")
        monkeypatch.setenv("TARDIS_OPS_STRATEGY", strategy)
        before = runtime.kernel_stats(lib)
        out = session(model, with_lib(lib)).run(None, inp)[0]
        after = runtime.kernel_stats(lib)
        assert after["portable_calls"] == before["portable_calls"] + 1
        assert rel_err(out, fo.reference(**inp)) < tol
        monkeypatch.delenv("TARDIS_OPS_FORCE_PORTABLE")
        fast = session(model, with_lib(lib)).run(None, inp)[0]
        if runtime.kernel_stats(lib)["cpu_has_avx2"]:
            assert runtime.kernel_stats(lib)["portable_calls"] == after["portable_calls"]
        assert rel_err(fast, out) < tol


def test_empty_tokens(lib):
    rng = np.random.default_rng(7)
    inp = make_inputs(rng, (0,), 8, 16)
    out = session(fo.standalone_model(8, 16), with_lib(lib)).run(None, inp)[0]
    assert out.shape == (0, 8)


# ------------------------------------------------------------------------------------------------ errors


def test_wrong_w1t_shape_is_a_clear_error(lib):
    rng = np.random.default_rng(8)
    d, D = 16, 48
    inp = make_inputs(rng, (3,), d, D)
    inp["w1t"] = np.ascontiguousarray(inp["w1t"].T)  # [d, D] instead of [D, d]
    sess = session(loose(fo.standalone_model(d, D)), with_lib(lib))
    with pytest.raises(Exception, match=r"w1t must have shape \[D, d\] = \[48, 16\].*got \[16, 48\]"):
        sess.run(None, inp)


def test_h_hat_leading_dims_mismatch_is_a_clear_error(lib):
    rng = np.random.default_rng(9)
    d, D = 16, 48
    inp = make_inputs(rng, (3,), d, D)
    inp["h_hat"] = inp["h_hat"][:2]
    sess = session(loose(fo.standalone_model(d, D)), with_lib(lib))
    with pytest.raises(Exception, match=r"h_hat must have x's leading axes \[3\]"):
        sess.run(None, inp)


def test_vector_shape_and_y_lin_errors(lib):
    rng = np.random.default_rng(10)
    d, D = 8, 20
    sess = session(loose(fo.standalone_model(d, D)), with_lib(lib))
    inp = make_inputs(rng, (2,), d, D)
    bad = dict(inp, alpha=inp["alpha"][:-1])
    with pytest.raises(Exception, match=r"alpha must have shape \[D\] = \[20\]"):
        sess.run(None, bad)
    bad = dict(inp, y_lin=inp["y_lin"][:, :-1])
    with pytest.raises(Exception, match=r"y_lin must have the shape of x"):
        sess.run(None, bad)
    # the session survives malformed calls
    assert rel_err(sess.run(None, inp)[0], fo.reference(**inp)) < 1e-5


def test_unknown_approximate_attribute_is_a_clear_error(lib):
    model = fo.standalone_model(8, 16, with_function=False)
    for attr in model.graph.node[0].attribute:
        if attr.name == "approximate":
            attr.s = b"sigmoid"
    with pytest.raises(Exception, match="approximate"):
        session(model, with_lib(lib))


@pytest.mark.parametrize("index,name", [(6, "b1"), (9, "beta")])
def test_an_omitted_input_is_refused_when_the_session_is_created(lib, index, name):
    """An input left empty in the node ("") would reach the kernel as a missing tensor; the kernel refuses
    the node when the session is created, naming the input."""
    model = fo.standalone_model(8, 16, with_function=False)
    model.graph.node[0].input[index] = ""
    with pytest.raises(Exception, match=rf"GuardedFallback: input {index} \({name}\) is required.*empty"):
        session(model, with_lib(lib))
    model = fo.standalone_model(8, 16, with_function=False)
    del model.graph.node[0].input[9]  # nine inputs
    with pytest.raises(Exception, match=r"input 9 \(beta\) is required; the node has 9 input"):
        session(model, with_lib(lib))


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_shape_and_type_inference(lib, dtype):
    """The registered op infers y's element type and (symbolic) shape from y_lin."""
    from onnx import helper

    model = fo.standalone_model(8, 16, dtype=dtype, rank=3, with_function=False)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model.graph.node[0].output[0] = "y_mid"
    model.graph.node.append(helper.make_node("Identity", ["y_mid"], ["y"]))
    out = session(model, with_lib(lib)).get_outputs()[0]
    assert out.type == ("tensor(float)" if dtype == TensorProto.FLOAT else "tensor(float16)")
    assert out.shape == ["n0", "n1", 8]


# ------------------------------------------------------------------------------------------------ ORT 1.21

ORT_MIN = "1.21.1"  # the oldest onnxruntime the library supports (ORT API 21)
_CHILD = r"""
import ctypes, sys, numpy as np, onnxruntime as ort
lib, model, data = sys.argv[1:4]
assert ort.__version__ == sys.argv[4], ort.__version__
z = np.load(data)
so = ort.SessionOptions()
so.register_custom_ops_library(lib)
calls = getattr(ctypes.CDLL(lib), sys.argv[5])
calls.restype = ctypes.c_uint64
before = calls()
out = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(
    None, {k: z[k] for k in z.files if k != "ref"})[0]
assert calls() == before + 1, "the kernel did not run"
err = float(np.max(np.abs(out.astype(np.float64) - z["ref"])) / max(1.0, float(np.max(np.abs(z["ref"])))))
print(ort.__version__, out.dtype, err)
assert err < (1e-5 if out.dtype == np.float32 else 2e-3), err
"""


def _ort_min_python() -> str:
    """Python of a side venv with onnxruntime==ORT_MIN (created once under build/, ~1 min)."""
    import subprocess
    import sys

    venv = Path(os.environ.get("TARDIS_ORT_MIN_VENV") or Path(__file__).resolve().parents[1] / "build" / "venv-ort-min")
    py = venv / "bin" / "python"
    probe = [str(py), "-c", f"import onnxruntime as o; assert o.__version__ == '{ORT_MIN}'"]
    if py.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(py)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          f"onnxruntime=={ORT_MIN}", "numpy"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"could not install onnxruntime=={ORT_MIN}: {res.stderr[-2000:]}")
    return str(py)


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("TARDIS_TEST_ORT_MIN")),
                    reason="installs onnxruntime 1.21 into a side venv (~1 min once): runs under CI or with "
                           "TARDIS_TEST_ORT_MIN=1")
@pytest.mark.parametrize("strategy", ["token", "neuron", "tile"])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_loads_into_onnxruntime_1_21(lib, tmp_path, dtype, strategy):
    """The same library file loads into onnxruntime 1.21 (the oldest supported) and computes the op."""
    import subprocess

    py = _ort_min_python()
    rng = np.random.default_rng(11)
    d, D = 70, 260
    inp = make_inputs(rng, (2, 9), d, D, dtype=NP[dtype], flags="random", rate=0.2)
    onnx.save(fo.standalone_model(d, D, dtype=dtype, rank=3), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "in.npz", ref=fo.reference(**inp), **inp)
    env = dict(os.environ, TARDIS_OPS_STRATEGY=strategy)
    res = subprocess.run([py, "-c", _CHILD, str(lib), str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"), ORT_MIN,
                          "TardisOpsKernelCalls"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(ORT_MIN)


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("TARDIS_TEST_ORT_MIN")),
                    reason="installs onnxruntime 1.21 into a side venv (~1 min once): runs under CI or with "
                           "TARDIS_TEST_ORT_MIN=1")
def test_int4_predictor_op_runs_in_onnxruntime_1_21(lib, tmp_path):
    """ai.tardis::MatMulNBits from the same library file, in onnxruntime 1.21, against the float64 emulation."""
    import subprocess

    import onnx_ir as ir

    from tardis_compile import predictor as predictors
    from tardis_compile import quantize

    rng = np.random.default_rng(12)
    d, D = 96, 200
    pred = predictors.LowBitPredictor(quantize.rtn(rng.standard_normal((d, D)) / np.sqrt(d), 4, 32),
                                      0.1 * rng.standard_normal(D), np.dtype(np.float32), "int4")
    onnx.save(ir.to_proto(predictors.standalone_model(pred, d)), str(tmp_path / "m.onnx"))
    x = rng.standard_normal((5, d)).astype(np.float32)
    np.savez(tmp_path / "in.npz", ref=pred.estimate(x), x=x)
    res = subprocess.run([_ort_min_python(), "-c", _CHILD, str(lib), str(tmp_path / "m.onnx"),
                          str(tmp_path / "in.npz"), ORT_MIN, "TardisOpsNBitsCalls"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(ORT_MIN)


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("TARDIS_TEST_ORT_MIN")),
                    reason="installs onnxruntime 1.21 into a side venv (~1 min once): runs under CI or with "
                           "TARDIS_TEST_ORT_MIN=1")
@pytest.mark.parametrize("options,counter,op_types", [
    ({"predictor": "int8", "fold_bits": 8, "fold_activations": "int8"}, "TardisOpsKernelCalls", ["GuardedFallback"]),
    ({"predictor": "int4"}, "TardisOpsFusedCalls", ["GuardedFallbackNBits"]),
    ({"predictor": "int4", "fold_bits": 8}, "TardisOpsDequantizeMatMulCalls", ["DequantizeMatMul", "GuardedFallbackNBits"])],
    ids=["int8-fold-input", "int4-fused", "int8-fold"])
def test_written_model_runs_in_onnxruntime_1_21(lib, tmp_path, options, counter, op_types):
    """A model written with ``--fold-bits 8 --fold-activations int8`` (the fold a DynamicQuantizeMatMul), with
    the int4 predictor fused into the fallback, or with ``--fold-bits 8`` (the fold our DequantizeMatMul) gives
    in onnxruntime 1.21 what it gives in the installed one, our kernel running in both."""
    import subprocess

    import tardis_compile as tc
    from tests.helpers import batches, run, save_tiny

    path, _ = save_tiny(tmp_path, d=32, D=128, layers=1)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(d=32, n=8), show_progress=False,
                settings=tc.Settings(target_fallback=0.2, **options))
    assert [n.op_type for n in onnx.load(str(out)).graph.node if n.domain == fo.DOMAIN] == op_types
    x = batches(d=32, n=1, seed=5)[0]["x"]
    np.savez(tmp_path / "in.npz", ref=run(out, {"x": x}, runtime.session_options()).astype(np.float64), x=x)
    res = subprocess.run([_ort_min_python(), "-c", _CHILD, str(lib), str(out), str(tmp_path / "in.npz"), ORT_MIN,
                          counter], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(ORT_MIN)
