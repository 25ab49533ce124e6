"""Corners of the rewrite found by an outside audit: a model mixing GELU variants, float16 guards, the
report's resident-neuron accounting, and what a cosine means for a one-wide output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
from onnx import helper

import tardis_compile as tc
from tardis_compile import api
from tardis_compile.models import tiny
from tardis_compile.report import BlockReport
from tardis_compile.verify import _Accumulator
from tests.helpers import batches


def _two_variants(path):
    """An erf-GELU block feeding a tanh-GELU block."""
    a = tiny.ffn_model(gelu="erf_decomposed", seed=1)
    b = onnx.compose.add_prefix(tiny.ffn_model(gelu="tanh_decomposed", seed=2), "b_")
    for node in b.graph.node:
        node.input[:] = [a.graph.output[0].name if i == "b_x" else i for i in node.input]
    graph = helper.make_graph([*a.graph.node, *b.graph.node], "two", [a.graph.input[0]], [b.graph.output[0]],
                              [*a.graph.initializer, *b.graph.initializer])
    onnx.save(helper.make_model(graph, opset_imports=a.opset_import, ir_version=a.ir_version), path)
    return path


def test_a_model_mixing_gelu_variants_rewrites_the_majority_and_names_the_rest(tmp_path):
    path = _two_variants(tmp_path / "two.onnx")
    blocks, rejected = tc.inspect(path)
    assert [b.variant for b in blocks] == ["none"]
    assert rejected[-1].stage == "rewrite" and "mixed GELU variants or dtypes" in rejected[-1].reason
    assert "tanh GELU in float32" in rejected[-1].reason
    report = tc.optimize(path, tmp_path / "o.onnx", batches(), show_progress=False)
    assert len(report.blocks) == 1 and report.verification.passed
    assert any("mixed GELU variants" in r.reason for r in report.rejected)


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
        (src, batches(), tc.Settings(predictor="lowrank", predictor_rank=4, target_params=0.5),
         "first factor is shared by all neurons"),
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
        assert needle.startswith("first factor") or not calls  # refused before the data were read
    assert tc.Settings(predictor="int4", predictor_quantizer="rtn").predictor_quantizer == "rtn"
