"""Shared by the speed benchmarks: DESIGN.md's grid of block sizes, token counts, flagged shares and
thread counts, and ORT sessions set up identically for the dense and the rewritten models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tardis_compile import benchmark, runtime  # noqa: E402

SIZES = [(384, 1536), (768, 3072), (1024, 4096), (4544, 18176)]
TOKENS = [1, 8, 128]
SHARES = [0.01, 0.05, 0.10, 0.20]
THREADS = [1, 2]
QUICK_SIZES = [(384, 1536), (1024, 4096)]
QUICK_TOKENS = [1, 128]
# The benchmarks' int4 rows are the decode comparison: blocks of 128 (`--predictor-block 128`; the tool's
# default is 32, which keeps more accuracy at strict recall targets), MatMulNBits 13-27% faster at 1 token.
DECODE_INT4_BLOCK = 128


def int4_block(predictor: str) -> int | None:
    """``Settings.predictor_block`` for a benchmark row: the decode block for int4, else the tool's default."""
    return DECODE_INT4_BLOCK if predictor == "int4" else None


def parse_sizes(values: list[str]) -> list[tuple[int, int]]:
    """``["768x3072", ...]`` → ``[(768, 3072), ...]``."""
    return [tuple(int(v) for v in s.lower().split("x")) for s in values]


def session(model: bytes | str | Path, threads: int, lib: bool) -> ort.InferenceSession:
    """A CPU session with the benchmarks' timing options (``benchmark.timing_options``: sequential,
    ``threads`` intra-op threads, spinning stopped after each run), with or without ``libtardis_ops``."""
    so = benchmark.timing_options(threads)
    if lib:
        runtime.session_options(so, require=True)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def kernel_path(before: dict[str, int], after: dict[str, int]) -> str:
    """The fallback strategy of the call between two ``runtime.kernel_stats()`` readings: ``fused`` (the int4
    predictor inside the tile path's work items), ``panel`` (the tile path in column-panel order), ``tile``,
    ``neuron``, ``union`` or ``token``."""
    for key, name in (("fused_paths", "fused"), ("panel_calls", "panel"), ("tile_calls", "tile"),
                      ("neuron_calls", "neuron"), ("union_calls", "union")):
        if after[key] > before[key]:
            return name
    return "token"


def isa_cap() -> str | None:
    """``TARDIS_OPS_ISA`` when set: the kernels' instruction set is capped (e.g. ``avx2`` on an AVX-512 CPU,
    to measure the code an AVX2 machine runs); recorded in the results' metadata."""
    return os.environ.get("TARDIS_OPS_ISA") or None


def isa_cap_note(cap: str | None) -> str:
    """A sentence for a results table when the kernels' instruction set was capped, else ''."""
    if not cap:
        return ""
    return (f" Kernels capped to `TARDIS_OPS_ISA={cap}`; ONNX Runtime's own kernels (the dense block, the fold, "
            "the int8 predictor) still use the best the CPU has.")
