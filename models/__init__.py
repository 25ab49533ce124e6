"""Models for tests, demos and benchmarks (``tardis_compile.models``).

* ``tiny``: hand-built ONNX FFN models in every spelling the pass must match or refuse (NumPy + onnx).
* ``hf_export``: ONNX exports of the real all-MiniLM-L6-v2 and of random-weight GPT-2, BLOOM, Falcon
  and BERT (needs torch and transformers, the ``torch`` extra).
* ``corpora``: offline BBC News text for calibration and evaluation.

``import tardis_compile.models`` never imports torch: the ``hf_export`` names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .corpora import bbc_news, read_text_file, split_bbc, write_text_file
from .tiny import (
    ACTIVATIONS,
    GELU_SPELLINGS,
    LINEAR_SPELLINGS,
    NON_GELU_ACTIVATIONS,
    SHARED_INTERMEDIATE,
    activation64,
    ffn_model,
    ffn_reference,
    random_input,
)

_LAZY = {  # name → module, imported on first access (torch-dependent)
    name: "hf_export"
    for name in ("ARCHS", "arch_info", "cache_after", "empty_past", "example_inputs", "export_minilm",
                 "export_random", "export_seconds", "export_torchscript", "minilm_model_dir", "minilm_tokenizer",
                 "minilm_torch", "random_config", "random_model")
}

__all__ = [
    "ACTIVATIONS", "GELU_SPELLINGS", "LINEAR_SPELLINGS", "NON_GELU_ACTIVATIONS", "SHARED_INTERMEDIATE",
    "activation64", "bbc_news", "ffn_model", "ffn_reference", "random_input", "read_text_file", "split_bbc",
    "write_text_file", *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
