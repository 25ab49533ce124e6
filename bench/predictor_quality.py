"""Predictor choice by measurement (issue: "The online predictor"): quality per layer and cost.

Quality, per predictor kind, on held-out data through the real rewritten model in ONNX Runtime:
recall (share of truly out-of-range token-neuron pairs flagged), precision, flagged share vs the true
out-of-range share, block error and output cosine — on the real all-MiniLM-L6-v2 (calibrated on 128
BBC News articles, evaluated on 256 others) and on random GPT-2-shaped layers (768×3072, tanh GELU,
Gaussian block inputs as after a LayerNorm).

Cost: the predictor subgraph alone vs the original dense block, in one ORT process, interleaved,
medians, 1 thread, at 1, 8 and 128 tokens.

    .venv/bin/python bench/predictor_quality.py [--out out] [--target 0.1] [--recall 0.995]
    .venv/bin/python bench/predictor_quality.py --recall 0.99 --kinds int8   # add one kind to the saved rows

Writes ``bench/results/predictor_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from tardis_compile import api, modelio, runtime
from tardis_compile import predictor as predictors
from tardis_compile.demo import prepare
from tardis_compile.models import tiny
from tardis_compile.passes.ffn_match import find_blocks

KINDS = (("exact", "gptq"), ("int8", "rtn"), ("int4", "gptq"), ("int4", "rtn"), ("int2", "gptq"), ("int2", "rtn"),
         ("lowrank", "gptq"))
TOKENS = (1, 8, 128)


def _quantizer(kind: str, label: str) -> str | None:
    """The quantizer option for a KINDS row: int4/int2 take one; for the others the label only names
    their rounding (int8 is round-to-nearest per neuron) and the option must stay unset."""
    return label if kind in ("int4", "int2") else None


def _quality_rows(name: str, model: Path, calib, held, data: api.DataOptions, out: Path, target: float,
                  recall: float, kinds: list[tuple[str, str]]) -> list[dict]:
    stats = out / f"{name}.predictor-stats.npz"
    rows = []
    for kind, quantizer in kinds:
        settings = api.Settings(target_fallback=target, predictor=kind, predictor_quantizer=_quantizer(kind, quantizer),
                                predictor_recall=recall)
        kw = {"stats_in": stats} if stats.exists() else {"stats_out": stats}
        t0 = time.time()
        report = api.optimize(model, out / f"{name}-{kind}-{quantizer}.onnx", calib, eval_data=held,
                              settings=settings, data=data, show_progress=False, **kw)
        label = kind if kind in ("exact", "lowrank") else f"{kind}-{quantizer}"
        for b in report.blocks:
            m = b.measured
            rows.append({"model": name, "predictor": label, "block": b.name,
                         "predictor_params_share": b.params_predictor / (b.d * b.hidden),
                         "recall": m["recall"], "precision": m["precision"], "flagged_share": m["fallback_rate"],
                         "out_share": 1.0 - m["coverage"], "block_relative_error": m["relative_error"],
                         "mean_cosine": report.verification.mean_cosine, "seconds": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """1 thread, with libtardis_ops (the int4 predictor is its ai.tardis::MatMulNBits)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    runtime.session_options(options, require=True)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_ms(session: ort.InferenceSession, feed: dict, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _cost_rows(d: int, hidden: int, gelu: str, reps: int) -> list[dict]:
    """Predictor alone vs the dense block ``x·W1 + b1 → GELU → ·W2 + b2``, interleaved, 1 thread."""
    dense_proto = tiny.ffn_model(d, hidden, gelu=gelu, rank=2, constants="initializer")
    blocks, _ = find_blocks(ir.from_proto(dense_proto))
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4096, d))
    gram = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
    gram = gram.T @ gram / len(xs)
    dense = _session(dense_proto)
    sessions = {}
    for kind, quantizer in KINDS:
        options = predictors.PredictorOptions(quantizer=_quantizer(kind, quantizer))
        built = predictors.build(kind, blocks[0], gram, options)
        sessions.setdefault(kind, _session(ir.to_proto(predictors.standalone_model(built.predictor, d))))
    rows = []
    for tokens in TOKENS:
        feed = {"x": rng.standard_normal((tokens, d)).astype(np.float32)}
        for s in (dense, *sessions.values()):
            _median_ms(s, feed, 20)  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in ("dense", *sessions)}
        for _ in range(5):  # interleave rounds so drift hits every variant alike
            samples["dense"].append(_median_ms(dense, feed, reps))
            for kind, s in sessions.items():
                samples[kind].append(_median_ms(s, feed, reps))
        dense_ms = statistics.median(samples["dense"])
        for kind in sessions:
            ms = statistics.median(samples[kind])
            rows.append({"shape": f"{d}x{hidden}", "tokens": tokens, "predictor": kind, "ms": ms,
                         "dense_ms": dense_ms, "share_of_dense": ms / dense_ms})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _gaussian_blocks(d: int, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 128, d)).astype(np.float32)} for _ in range(n)]


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["model"], r["predictor"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["predictor"]) == key]
        out.append({"model": key[0], "predictor": key[1],
                    "min_recall": min(r["recall"] for r in rs),
                    "mean_recall": float(np.mean([r["recall"] for r in rs])),
                    "max_flag_ratio": max(r["flagged_share"] / max(r["out_share"], 1e-12) for r in rs),
                    "mean_flagged": float(np.mean([r["flagged_share"] for r in rs])),
                    "mean_out": float(np.mean([r["out_share"] for r in rs])),
                    "params_share": rs[0]["predictor_params_share"], "mean_cosine": rs[0]["mean_cosine"]})
    return out


def markdown(summary: list[dict], cost: list[dict], target: float, recall: float) -> str:
    lines = [f"Fallback target {target:.0%}, recall target {recall}; recall/flagged measured on held-out data.", "",
             "| model | predictor | stored (share of W1) | recall min / mean | flagged / out-of-range "
             "(mean) | worst layer flagged÷out | output cosine |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['predictor']} | {s['params_share']:.3f} | {s['min_recall']:.4f} / "
                     f"{s['mean_recall']:.4f} | {s['mean_flagged']:.2%} / {s['mean_out']:.2%} | "
                     f"{s['max_flag_ratio']:.2f} | {s['mean_cosine']:.4f} |")
    lines += ["", "Predictor alone vs the dense block (ORT, 1 thread, medians, share of dense time):", "",
              "| shape | tokens | " + " | ".join(dict.fromkeys(r["predictor"] for r in cost)) + " | dense ms |",
              "|---|---:|" + "---:|" * (len(dict.fromkeys(r["predictor"] for r in cost)) + 1)]
    for key in dict.fromkeys((r["shape"], r["tokens"]) for r in cost):
        rs = [r for r in cost if (r["shape"], r["tokens"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{r['share_of_dense']:.0%}" for r in rs)
                     + f" | {rs[0]['dense_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out")
    parser.add_argument("--target", type=float, default=0.1)
    parser.add_argument("--recall", type=float, default=api.Settings.predictor_recall)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--skip-quality", action="store_true", help="keep the saved quality rows, time again")
    parser.add_argument("--kinds", help="quality rows only for these kinds (e.g. int8), merged into the saved ones")
    args = parser.parse_args()
    out = Path(args.out)
    results = Path(__file__).parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    saved = results / "predictor_quality.json"
    kinds = [k for k in KINDS if not args.kinds or k[0] in args.kinds.split(",")]
    rows: list[dict] = []
    if (args.skip_quality or args.kinds) and saved.exists():
        redo = {f"{k}-{q}" if k not in ("exact", "lowrank") else k for k, q in kinds} if args.kinds else set()
        rows = [r for r in json.loads(saved.read_text())["rows"] if r["predictor"] not in redo]
    if not args.skip_quality:
        model, calib, held, tokenizer = prepare(out)
        data = api.DataOptions(tokenizer=tokenizer, batch_size=16, max_length=128)
        rows += _quality_rows("minilm", model, calib, held, data, out, args.target, args.recall, kinds)
        gpt2 = out / "gpt2-shaped-ffn.onnx"
        if not gpt2.exists():
            modelio.save(ir.from_proto(tiny.ffn_model(768, 3072, gelu="tanh_decomposed", layers=2, seed=1,
                                                      constants="initializer")), gpt2)
        rows += _quality_rows("gpt2-shaped", gpt2, _gaussian_blocks(768, 16, 1), _gaussian_blocks(768, 8, 2),
                              api.DataOptions(), out, args.target, args.recall, kinds)
    cost = _cost_rows(384, 1536, "erf_decomposed", args.reps) + _cost_rows(768, 3072, "tanh_decomposed", args.reps)
    summary = _summary(rows)
    (results / "predictor_quality.json").write_text(json.dumps({"rows": rows, "summary": summary, "cost": cost},
                                                               indent=2))
    (results / "predictor_quality.md").write_text(markdown(summary, cost, args.target, args.recall))
    print(markdown(summary, cost, args.target, args.recall))


if __name__ == "__main__":
    main()
