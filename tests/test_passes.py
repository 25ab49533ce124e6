"""Block matching: one positive and one must-not-match case per spelling, one per refusal reason.

Positive cases also rewrite and check numerically through ONNX Runtime (flag-all self-test: output equals
the original model to float32 tolerance).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import tardis_compile as tc
from tardis_compile.models import tiny
from tardis_compile.passes.ffn_match import find_blocks
from tests.helpers import batches, run, save_tiny


def _find(**kwargs):
    model = ir.from_proto(tiny.ffn_model(**kwargs))
    return find_blocks(model)


@pytest.mark.parametrize("gelu", sorted(tiny.GELU_SPELLINGS))
def test_every_gelu_spelling_matches_and_folds_exactly(tmp_path, gelu):
    path, params = save_tiny(tmp_path, gelu=gelu, layers=2)
    blocks, rejected = find_blocks(ir.load(path))
    assert len(blocks) == 2 and not rejected
    assert {b.variant for b in blocks} == {tiny.GELU_SPELLINGS[gelu]}
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), settings=tc.Settings(flag_all=True), show_progress=False)
    x = batches(seed=7)[0]["x"]
    ref = tiny.ffn_reference(x, params)
    assert np.max(np.abs(run(out, {"x": x}) - ref)) < 1e-4
    assert np.max(np.abs(run(path, {"x": x}) - ref)) < 1e-4


@pytest.mark.parametrize("linear,rank", [("matmul_add", 3), ("matmul_add_swapped", 3), ("gemm", 2),
                                         ("gemm_reshape", 3), ("transpose_matmul", 3)])
def test_every_linear_spelling_matches_and_folds_exactly(tmp_path, linear, rank):
    path, params = save_tiny(tmp_path, linear=linear, rank=rank, gelu="erf_decomposed", layers=2)
    blocks, rejected = find_blocks(ir.load(path))
    assert len(blocks) == 2 and not rejected, rejected
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(rank=rank), settings=tc.Settings(flag_all=True), show_progress=False)
    x = batches(rank=rank, seed=9)[0]["x"]
    assert np.max(np.abs(run(out, {"x": x}) - tiny.ffn_reference(x, params))) < 1e-4


def test_bias_free_block_matches(tmp_path):
    blocks, rejected = _find(bias=False, gelu="tanh_decomposed")
    assert len(blocks) == 1 and not rejected
    assert np.all(blocks[0].b1() == 0) and np.all(blocks[0].b2() == 0)


@pytest.mark.parametrize("activation,closest", [("quick_gelu", "erf-GELU"), ("relu", ""), ("silu", "")])
def test_look_alike_activations_are_not_gelu(activation, closest):
    blocks, rejected = _find(gelu=activation)
    assert blocks == []
    assert len(rejected) == 1
    assert rejected[0].reason.startswith("unsupported activation: not GELU")
    assert closest in rejected[0].reason


def test_gated_block_is_refused():
    blocks, rejected = _find(gated=True)
    assert blocks == []
    assert [r.reason.split(":")[0] for r in rejected] == ["gated FFN"]
    assert "quadratic in x" in rejected[0].reason


@pytest.mark.parametrize("which", ["gelu", "preact", "gelu_output"])
def test_shared_intermediate_is_refused(which):
    blocks, rejected = _find(shared_intermediate=which)
    assert blocks == []
    assert rejected and rejected[0].reason.startswith("shared intermediate:")


def test_weights_as_graph_inputs_are_refused():
    blocks, rejected = _find(weights_as_inputs=True)
    assert blocks == []
    assert rejected[0].reason.startswith("non-constant weights:") and "graph input" in rejected[0].reason


def test_quantized_weights_are_refused():
    blocks, rejected = _find(quantized=True)
    assert blocks == []
    assert rejected[0].reason.startswith("quantized weights:") and "DequantizeLinear" in rejected[0].reason


def test_rewritten_model_is_not_matched_again(tmp_path):
    path, _ = save_tiny(tmp_path, layers=2)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), show_progress=False)
    blocks, rejected = find_blocks(ir.load(out))
    assert blocks == [] and rejected == []


def test_emitted_graph_has_function_metadata_and_keeps_output_names(tmp_path):
    path, _ = save_tiny(tmp_path, layers=2)
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), show_progress=False)
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    fallback = [n for n in model.graph.node if n.domain == "ai.tardis"]
    assert len(fallback) == 2 and all(n.op_type == "GuardedFallback" for n in fallback)
    assert [f.name for f in model.functions] == ["GuardedFallback"]
    assert "GELU" in model.functions[0].doc_string
    props = {p.key: p.value for p in fallback[0].metadata_props}
    assert {"tardis.version", "tardis.source_nodes", "tardis.calibrated_coverage"} <= props.keys()
    assert {p.key for p in model.metadata_props} >= {"tardis.version", "tardis.blocks"}
    assert [o.name for o in model.graph.output] == [o.name for o in onnx.load(path).graph.output]
    assert not any(n.op_type in ("Erf", "Gelu") for n in model.graph.node)
    # execution order (ONNX Runtime keeps it): the predictor, then the fold, then the fallback (ffn_rewrite)
    at = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    for node in fallback:
        y_lin_add = model.graph.node[at[node.input[1]]]
        assert model.graph.node[at[node.input[2]]].op_type == "DynamicQuantizeMatMul"  # the float32 default
        assert at[node.input[2]] < at[y_lin_add.input[0]] < at[node.input[1]] < at[node.output[0]]


def test_running_on_its_own_output_changes_nothing_and_says_so(tmp_path, capsys):
    from tardis_compile.cli import main
    from tardis_compile.errors import AlreadyOptimizedError

    path, _ = save_tiny(tmp_path, layers=2)
    out, again = tmp_path / "out.onnx", tmp_path / "again.onnx"
    tc.optimize(path, out, batches(), show_progress=False)
    before = out.read_bytes()
    message = (f"nothing to do: '{out}' is already optimized by tardis-compile (2 block(s) rewritten into "
               "ai.tardis fallback ops) and has no other foldable block; nothing was written")
    with pytest.raises(AlreadyOptimizedError) as err:
        tc.optimize(out, again, batches(), show_progress=False)
    assert str(err.value) == message
    np.savez(tmp_path / "calib.npz", **batches()[0])
    assert main(["optimize", str(out), "-o", str(again), "--calib", str(tmp_path / "calib.npz")]) == 0
    assert capsys.readouterr().err.strip() == f"note: {message}"
    assert not again.exists() and out.read_bytes() == before


@pytest.mark.parametrize("level", ["ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
@pytest.mark.parametrize("with_library", [True, False])
def test_output_survives_ort_offline_optimization(tmp_path, level, with_library):
    """ORT's offline graph optimizations (``optimized_model_filepath``) compose with the rewrite: the file
    ORT writes loads again and computes the same result — with our kernel, or with the function inlined."""
    import onnxruntime as ort

    from tardis_compile.runtime import session_options

    path, params = save_tiny(tmp_path, layers=2, gelu="tanh_decomposed")
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches(), show_progress=False)
    options = (lambda: session_options(require=True)) if with_library else ort.SessionOptions
    so = options()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(tmp_path / "offline.onnx")
    x = batches(seed=3)[0]["x"]
    first = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    reload = options()
    reload.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    again = ort.InferenceSession(str(tmp_path / "offline.onnx"), reload, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(again.run(None, {"x": x})[0], first, atol=1e-5, rtol=0)
    np.testing.assert_allclose(first, run(out, {"x": x}), atol=1e-5, rtol=0)
    kept = any(n.domain == "ai.tardis" for n in onnx.load(tmp_path / "offline.onnx").graph.node)
    assert kept == with_library  # without the library ORT inlines the exact function body
