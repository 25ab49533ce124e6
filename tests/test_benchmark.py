"""tardis_compile.benchmark and ``tardis-compile bench``: structure and consistency of the numbers on tiny
models (never timing thresholds: this runs on shared CI machines)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tardis_compile as tc
from tardis_compile import benchmark, cli, runtime
from tardis_compile.errors import CalibrationDataError, TardisError
from tardis_compile.feeds import InputSpec

from helpers import batches, save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory, lib):
    """(original, optimized with the int4 predictor) — d=64 so MatMulNBits has whole blocks of 32."""
    tmp = tmp_path_factory.mktemp("bench")
    path, _ = save_tiny(tmp, d=64, D=256, layers=2)
    out = tmp / "tiny.tardis.onnx"
    tc.optimize(path, out, batches(d=64), settings=tc.Settings(predictor="int4", refit=False),
                show_progress=False)
    return path, out


def test_parse_shape():
    assert benchmark.parse_shape("batch=8, sequence=128") == {"batch": 8, "sequence": 128}
    assert benchmark.parse_shape("") == {}
    for bad in ("batch", "batch=0", "batch=x", "=3"):
        with pytest.raises(CalibrationDataError, match="NAME=POSITIVE_INT"):
            benchmark.parse_shape(bad)


def test_synthetic_feed():
    specs = [InputSpec("input_ids", np.int64, ["batch", "sequence"]),
             InputSpec("attention_mask", np.int64, ["batch", "sequence"]),
             InputSpec("position_ids", np.int64, ["batch", "sequence"]),
             InputSpec("x", np.float32, ["batch", 4])]
    feed = benchmark.synthetic_feed(specs, {"batch": 2, "sequence": 5}, int_high=7)
    assert feed["input_ids"].shape == (2, 5) and feed["input_ids"].dtype == np.int64
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 7
    assert (feed["attention_mask"] == 1).all()
    assert (feed["position_ids"] == np.arange(5)).all()
    assert feed["x"].shape == (2, 4) and feed["x"].dtype == np.float32
    assert benchmark.feed_rows_tokens(feed) == (2, 10)
    with pytest.raises(CalibrationDataError, match="sequence"):
        benchmark.synthetic_feed(specs, {"batch": 2})


def test_summarize_trace_parts():
    events = [{"cat": "Session", "name": "model_run", "dur": 100, "ts": 0},
              {"cat": "Session", "name": "model_run", "dur": 120, "ts": 1000}]
    nodes = [("tardis/ffn0/predictor/xW1_q", "MatMulNBits", 10), ("tardis/ffn0/h_hat", "Add", 1),
             ("tardis/ffn0/folded/MatMul", "MatMul", 8), ("tardis/ffn0/GuardedFallback", "GuardedFallback", 20),
             ("tardis/ffn0/guard_lo", "Add", 1), ("attn/MatMul", "MatMul", 40)]
    for run in range(2):
        for name, op, dur in nodes:
            events.append({"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "ts": run * 1000 + 1,
                           "args": {"op_name": op}})
            events.append({"cat": "Node", "name": f"{name}_fence_before", "dur": 5, "ts": run * 1000 + 1})
    s = benchmark.summarize_trace(events)
    assert s["runs"] == 2 and s["nodes"] == 6
    assert s["by_part_us"] == {"predictor": 11, "fold": 8, "fallback": 20, "guard": 1, "rest": 40}
    assert s["nodes_us"] == pytest.approx(80)
    assert sum(s["by_part_share"].values()) == pytest.approx(1.0)
    assert s["by_op_us"]["MatMul"] == 48
    assert s["top_nodes"][0]["name"] == "attn/MatMul"


def test_an_int8_fold_counts_as_fold_not_predictor():
    """``--fold-activations int8`` makes the fold a DynamicQuantizeMatMul, the int8 predictor's op type."""
    assert benchmark.classify("tardis/ffn0/folded/DynamicQuantizeMatMul", "DynamicQuantizeMatMul") == "fold"
    assert benchmark.classify("tardis/ffn0/h_hat", "DynamicQuantizeMatMul") == "predictor"
    assert benchmark.classify("tardis/ffn0/GuardedFallback", "GuardedFallbackNBits") == "fallback"


def test_bench_structure(models):
    orig, opt = models
    sets = benchmark.load_feed_sets(orig, shapes=["batch=1,seq=1", "batch=2,seq=8"])
    assert set(sets) == {"batch=1,seq=1", "batch=2,seq=8"}
    result = benchmark.bench(orig, opt, sets, threads=[1, 2], warmup=1, rounds=3, profile_runs=2, log=None)
    assert result.library is not None
    assert [(c.label, c.threads) for c in result.cases] == [
        ("batch=1,seq=1", 1), ("batch=2,seq=8", 1), ("batch=1,seq=1", 2), ("batch=2,seq=8", 2)]
    for c in result.cases:
        assert c.rounds == 3 and len(c.original_rounds_ms) == 3 == len(c.optimized_rounds_ms)
        assert c.original_ms > 0 and c.optimized_ms > 0
        assert c.speedup == pytest.approx(c.original_ms / c.optimized_ms)
        assert c.original_iqr_ms[0] <= c.original_ms <= c.original_iqr_ms[1]
        assert c.original_rows_per_s == pytest.approx(c.rows / c.original_ms * 1e3)
        assert c.kernel_calls == 2 * (c.rounds)  # two blocks, one feed per round
        assert 0.0 <= c.flagged_share <= 1.0
    assert (result.cases[1].rows, result.cases[1].tokens) == (2, 16)
    prof = result.profiles["batch=2,seq=8/t1/optimized"]
    # the int4 predictors run inside the fused fallback nodes
    assert prof["nodes_per_part"]["fallback"] == 2 and prof["nodes_per_part"]["predictor"] == 0
    assert prof["by_op_us"].get("GuardedFallbackNBits", 0) > 0 and prof["by_part_us"]["fallback"] > 0
    assert result.profiles["batch=2,seq=8/t1/original"]["nodes_per_part"]["fallback"] == 0
    md = result.markdown()
    assert "speed-up" in md and "load average" in md and "| predictor |" in md
    json.dumps(result.to_json())
    assert benchmark.fallback_neurons(opt) == 2 * 256 and benchmark.fallback_neurons(orig) is None


def test_bench_from_data(models, tmp_path):
    orig, opt = models
    for i, feed in enumerate(batches(d=64, n=3)):
        np.savez(tmp_path / f"b{i}.npz", **feed)
    sets = benchmark.load_feed_sets(orig, data=tmp_path, max_batches=2)
    assert list(sets) == ["data"] and len(sets["data"]) == 2
    result = benchmark.bench(orig, opt, sets, threads=[1], warmup=0, rounds=2, log=None)
    assert result.cases[0].rows == 8 and result.cases[0].tokens == 64  # 2 feeds of [4, 8, 64]


def test_cli_bench(models, tmp_path, capsys):
    orig, opt = models
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", str(orig), str(opt), "--shape", "batch=1,seq=4", "--threads", "1",
                   "--rounds", "2", "--warmup", "0", "--profile", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| batch=1,seq=4 | 1 |" in text and "Profile batch=1,seq=4/t1/optimized" in text
    data = json.loads(out.read_text())
    assert data["cases"][0]["threads"] == 1 and data["machine"]["onnxruntime"]
    assert "batch=1,seq=4/t1/original" in data["profiles"]


@pytest.mark.parametrize("argv, message", [
    (["--shape", "batch=1"], "seq"),                      # a symbolic dim without a size
    (["--shape", "batch"], "NAME=POSITIVE_INT"),
    (["--shape", "batch=1,seq=1", "--threads", "0"], "--threads"),
    ([], "--shape"),                                      # neither data nor shape
])
def test_cli_bench_errors(models, capsys, argv, message):
    orig, opt = models
    rc = cli.main(["bench", str(orig), str(opt), "--rounds", "1", "--warmup", "0", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_library_required(models, monkeypatch):
    orig, opt = models
    monkeypatch.setattr(runtime, "library_path", lambda: None)
    monkeypatch.setenv(runtime.ENV_LIBRARY, "/nonexistent/libtardis_ops.so")
    with pytest.raises(TardisError, match="--no-library"):
        benchmark.make_session(opt, 1, library=True)


def test_time_many(models):
    orig, opt = models
    feed = benchmark.synthetic_feed(benchmark.input_specs(benchmark.make_session(orig, 1)), {"batch": 1, "seq": 2})
    sessions = {"all": benchmark.make_session(opt, 1, library=True),
                "basic": benchmark.make_session(opt, 1, library=True, opt_level="basic"),
                "no-spin": benchmark.make_session(opt, 1, library=True, spinning=False)}
    out = benchmark.time_many(sessions, [feed], warmup=0, rounds=4)
    assert list(out) == ["all", "basic", "no-spin"]
    assert out["all"]["vs_first"] == pytest.approx(1.0)
    assert all(len(v["rounds_ms"]) == 4 and v["median_ms"] > 0 for v in out.values())


def test_timed_sessions_stop_spinning_after_each_run(models):
    """Interleaved sessions share one process: an idle session's spinning workers must not take the cores
    of the one being timed, so every timed session stops spinning when its run returns."""
    orig, opt = models
    for sess in (benchmark.make_session(orig, 2), benchmark.make_session(opt, 2, library=True),
                 benchmark.make_session(opt, 2, library=True, spinning=False)):
        entries = sess.get_session_options().get_session_config_entry
        assert entries("session.force_spinning_stop") == "1"
        assert sess.get_session_options().intra_op_num_threads == 2
    assert benchmark.timing_options(1, spinning=False).get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
