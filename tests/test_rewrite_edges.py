"""Corners of the rewrite found by an outside audit: a model mixing GELU variants, float16 guards, the
report's resident-neuron accounting, and what a cosine means for a one-wide output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir
import pytest
from onnx import helper

import tardis_compile as tc
from tardis_compile import api
from tardis_compile.errors import AlreadyOptimizedError
from tardis_compile.models import tiny
from tardis_compile.report import BlockReport
from tardis_compile.verify import _Accumulator
from tests.helpers import batches


def _chain(path, variants):
    """Tiny FFN blocks with these GELU spellings, each feeding the next."""
    models = [onnx.compose.add_prefix(tiny.ffn_model(gelu=g, seed=i + 1), f"m{i}_") for i, g in enumerate(variants)]
    nodes, inits, prev = [], [], "x"
    for i, m in enumerate(models):
        for node in m.graph.node:
            node.input[:] = [prev if name == f"m{i}_x" else name for name in node.input]
        nodes += m.graph.node
        inits += m.graph.initializer
        prev = m.graph.output[0].name
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", 16])
    graph = helper.make_graph(nodes, "chain", [x], [models[-1].graph.output[0]], inits)
    onnx.save(helper.make_model(graph, opset_imports=models[0].opset_import, ir_version=models[0].ir_version), path)
    return path


def test_a_model_mixing_gelu_variants_rewrites_the_majority_and_names_the_rest(tmp_path):
    """tanh, erf, erf: the two erf blocks are rewritten, the tanh one (first in the graph) is left with a
    reason; optimize on that output keeps it so (the model's function is the erf one), and --explain says why."""
    path = _chain(tmp_path / "three.onnx", ["tanh_decomposed", "erf_decomposed", "erf_decomposed"])
    blocks, rejected = tc.inspect(path)
    assert [b.variant for b in blocks] == ["none", "none"]
    assert rejected[-1].stage == "rewrite" and rejected[-1].anchor.endswith("Tanh")
    assert "tanh GELU in float32, 2 other(s) are erf GELU" in rejected[-1].reason
    out = tmp_path / "o.onnx"
    report = tc.optimize(path, out, batches(), show_progress=False)
    assert len(report.blocks) == 2 and report.verification.passed
    assert any("mixed GELU variants" in r.reason for r in report.rejected)
    blocks, rejected = tc.inspect(out)
    assert not blocks and "the 2 already rewritten are erf GELU" in rejected[-1].reason
    with pytest.raises(AlreadyOptimizedError):
        tc.optimize(out, tmp_path / "again.onnx", batches(), show_progress=False)
    from tardis_compile.passes.explain import explain

    lines = explain(onnx_ir.load(path), rejected[-1].anchor).lines()
    assert lines[-1] == "result: left alone (failed at rewrite)"


def test_float16_guards_are_folded_by_onnx_runtime_without_a_warning(tmp_path):
    """The guards (range ± margin) of a float16 model are float32 sums then Cast, which ORT constant-folds;
    verification reads them back as the runtime computes them."""
    src = tmp_path / "half.onnx"
    onnx.save(tiny.ffn_model(layers=2, dtype="float16"), src)
    feeds = [{"x": f["x"].astype(np.float16)} for f in batches()]
    out = tmp_path / "o.onnx"
    report = tc.optimize(src, out, feeds, show_progress=False)
    model = onnx.load(out)
    casts = [n for n in model.graph.node if n.op_type == "Cast" and "guard" in n.name]
    assert casts and len(casts) % 2 == 0 and report.verification.passed  # lo and hi of each block with a margin
    assert all(b.measured["recall"] > 0.5 for b in report.blocks)
    code = f"import onnxruntime as ort; ort.InferenceSession({str(out)!r}, providers=['CPUExecutionProvider'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "constant fold" not in proc.stderr, proc.stderr


def test_resident_coverage_is_over_all_neurons_like_the_flagged_share():
    b = BlockReport("ffn0", "", [], 16, 100, 16, "none", 0.9, 3200, 256, 100.0, 960, resident_neurons=30)
    assert b.coverage(0.25) == 1.0 - 0.75 * 0.3
    assert b.flagged_share(0.25) == 0.25 * 0.3


def test_a_score_per_row_is_compared_as_one_vector():
    acc = _Accumulator()
    ref = np.array([[1.0], [2.0], [-0.001], [3.0]])
    got = np.array([[1.0], [2.0], [0.001], [3.0]])  # one tiny value changes sign
    acc.add(ref, got, 1e-3, 1e-2)
    assert min(acc.cos) > 0.99  # per element it would be a cosine of -1
    wide = _Accumulator()
    wide.add(np.ones((3, 4)), np.ones((3, 4)), 1e-3, 1e-2)
    assert len(wide.cos) == 3


def test_options_that_would_be_ignored_or_fail_late_are_refused_before_calibration(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(tiny.ffn_model(), src)
    half = tmp_path / "half.onnx"
    onnx.save(tiny.ffn_model(dtype="float16"), half)
    cases = [
        (src, batches(), tc.Settings(predictor_quantizer="rtn"), "--predictor-quantizer applies to the int4"),
        (half, [{"x": f["x"].astype(np.float16)} for f in batches()], tc.Settings(predictor="int8"),
         "this model is float16"),
    ]
    for path, data, settings, needle in cases:
        calls = []
        with_probe = lambda: (calls.append(1), iter(data))[1]  # noqa: E731
        try:
            api.optimize(path, tmp_path / "o.onnx", with_probe, settings=settings, show_progress=False)
        except tc.TardisError as err:
            assert needle in str(err), err
        else:
            raise AssertionError(f"{needle!r} was not refused")
        assert not calls  # refused before the data were read
    assert tc.Settings(predictor="int4", predictor_quantizer="rtn").predictor_quantizer == "rtn"
