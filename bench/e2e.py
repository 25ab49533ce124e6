"""End-to-end speed: original vs optimized models in ONNX Runtime (issue 7).

Models (all timed with :mod:`tardis_compile.benchmark`: same process, CPU EP, sequential, graph
optimization 'all', original/optimized interleaved round by round, medians and ratios, threads 1 and 2;
the optimized model runs the compiled ``GuardedFallback`` kernels of ``libtardis_ops``):

* **MiniLM** — real all-MiniLM-L6-v2 from ``tardis_compile.demo.prepare`` (BBC News calibration text),
  optimized with ``api.Settings()`` defaults (predictor ``auto`` = int8 for these float32 models, and also
  with the int4 predictor in blocks of 128, the decode choice); timed on real BBC evaluation text tokenized
  to 1×16 and 8×128 tokens (every document long enough, so no padding); zero-shot BBC topic accuracy of
  both models on held-out articles.
* **GPT-2-small-shaped**, **BLOOM-560m-shaped**, **Falcon** — ``models.hf_export.export_random(arch,
  size="real", kv_cache=True)``: random weights (real FFN shapes and layer counts, vocab 1000; Falcon: the
  Falcon-7B layer shape 4544/18176 with **one** layer), exported decode-ready with the attention cache as
  inputs and outputs. The **decode step** is what a generation loop runs: one new token attending to the
  cache of a ``--past``-token random prompt (default 128; the cache comes from the original model's
  prefill, and both models get the same feeds). Also a 16-token **prefill** (empty cache). Calibrated on
  prefills (empty cache) of **uniform random token ids** pushed through the exported model (activations
  are the model's own, not synthetic Gaussians), target fallback 10%.

    python bench/e2e.py                       # MiniLM + GPT-2
    python bench/e2e.py --archs gpt2,bloom    # which models (minilm, gpt2, bloom, falcon)
    python bench/e2e.py --archs gpt2 --merge  # GPT-2 rows of the README table (keeps the other models)
    python bench/e2e.py --archs minilm --predictors int8 --minilm-target 0.05 --out bench/results/e2e_minilm_t05

Writes ``bench/results/e2e.json`` (machine, date, load average, every round, profiles) and ``e2e.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tardis_compile import api, benchmark, evaluate, runtime  # noqa: E402
from tardis_compile import predictor as predictors  # noqa: E402
from common import int4_block  # noqa: E402
from tardis_compile.feeds import from_text  # noqa: E402

OUT = ROOT / "out"
WORK = OUT / "e2e"
RESULTS = ROOT / "bench" / "results"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_for_load(max_load: float, max_wait: float) -> list[float]:
    """Wait (up to max_wait s) for the 1-minute load average to drop below max_load; return the load."""
    t0 = time.time()
    while os.getloadavg()[0] > max_load and time.time() - t0 < max_wait:
        time.sleep(10)
    return [round(x, 2) for x in os.getloadavg()]


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    """The tool's Python sources as this run loaded them: an optimized model from other code is not reused
    (what it emits changes)."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "tardis_compile").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def optimized_model(src: Path, dst: Path, calib, settings: api.Settings, **kw) -> dict:
    """Optimize once (cached by settings and the tool's code); return the report summary."""
    report_json, stamp = dst.with_suffix(".report.json"), dst.with_suffix(".code")
    want = settings.effective()
    if dst.exists() and report_json.exists() and stamp.exists() and stamp.read_text() == code_hash():
        rep = json.loads(report_json.read_text())
        if {k: rep.get("settings", {}).get(k) for k in want} == want:  # the report adds the solved rates
            log(f"reusing {dst}")
            return {"settings": rep["settings"], "summary": rep.get("summary"), "optimize_seconds": None}
    log(f"optimizing {src.name} -> {dst.name} ({settings.predictor}, target fallback {settings.fallback_target})")
    t0 = time.time()
    report = api.optimize(src, dst, calib, settings=settings, show_progress=False, **kw)
    stamp.write_text(code_hash())
    rep = json.loads(report_json.read_text())
    return {"settings": rep["settings"], "summary": rep.get("summary"), "optimize_seconds": round(time.time() - t0, 1),
            "report_md": str(dst.with_suffix(".report.md").relative_to(ROOT)), "_report": report}


def default_predictor() -> str:
    """What the default ``--predictor`` (``auto``) means for these float32 models."""
    return predictors.resolve(api.Settings().predictor, np.dtype(np.float32))


def predictor_list(arg: str | None) -> list[str]:
    if arg:
        return arg.split(",")
    default = default_predictor()
    return [default] if default == "int4" else [default, "int4"]


def summarize_cases(result: benchmark.BenchResult) -> list[dict]:
    keep = ("label", "threads", "feeds", "rows", "tokens", "rounds", "original_ms", "optimized_ms", "speedup",
            "speedup_paired", "original_rows_per_s", "optimized_rows_per_s", "original_tokens_per_s",
            "optimized_tokens_per_s", "flagged_share", "original_iqr_ms", "optimized_iqr_ms",
            "original_rounds_ms", "optimized_rounds_ms")
    return [{k: getattr(c, k) for k in keep} for c in result.cases]


def session_variants(original: Path, optimized: Path, feeds: list[dict], args) -> dict:
    """Cheap overhead removals on the session side: the optimized model (and the original, for scale) under
    graph optimization levels and with intra-op spinning off, rotated round by round, 1 thread."""
    t = args.threads[0]
    sessions = {"original, all": benchmark.make_session(original, t),
                "optimized, all": benchmark.make_session(optimized, t, library=True),
                "optimized, extended": benchmark.make_session(optimized, t, library=True, opt_level="extended"),
                "optimized, basic": benchmark.make_session(optimized, t, library=True, opt_level="basic"),
                "optimized, disable": benchmark.make_session(optimized, t, library=True, opt_level="disable"),
                "optimized, all, no spinning": benchmark.make_session(optimized, t, library=True, spinning=False)}
    out = benchmark.time_many(sessions, feeds, warmup=2, rounds=args.rounds)
    for name, r in out.items():
        log(f"  {name}: {r['median_ms']:.2f} ms (original/this {r['vs_first']:.2f}×)")
    return {"threads": t, **{k: {kk: vv for kk, vv in v.items() if kk != "rounds_ms"} for k, v in out.items()}}


def with_accuracy_level(optimized: Path, level: int) -> Path:
    """A copy of ``optimized`` whose MatMulNBits predictors run at ``accuracy_level=level`` (an experiment:
    the pass emits level 4, int8 activations)."""
    import onnx

    dst = WORK / f"{optimized.stem}.acc{level}.onnx"
    if dst.exists():
        return dst
    m = onnx.load(str(optimized))
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    onnx.save(m, str(dst))
    return dst


def accuracy_level_experiment(original: Path, optimized: Path, sets: dict, args) -> dict:
    """The optimized model with its int4 predictor at accuracy_level 0 (fp32 activations) vs 4 (int8)."""
    out = {}
    for label, feeds in sets.items():
        t = args.threads[0]
        sessions = {"original": benchmark.make_session(original, t),
                    "optimized, accuracy_level 4": benchmark.make_session(optimized, t, library=True)}
        for level in (0, 1):
            sessions[f"optimized, accuracy_level {level}"] = benchmark.make_session(
                with_accuracy_level(optimized, level), t, library=True)
        r = benchmark.time_many(sessions, feeds, warmup=2, rounds=args.rounds)
        for name, x in r.items():
            log(f"  {label} {name}: {x['median_ms']:.2f} ms (original/this {x['vs_first']:.2f}×)")
        out[label] = {"threads": t, **{k: {kk: vv for kk, vv in v.items() if kk != "rounds_ms"} for k, v in r.items()}}
    return out


# ---------------------------------------------------------------------------------------------- MiniLM


def run_minilm(args) -> dict:
    from tardis_compile import demo
    from tardis_compile.models import corpora

    model, calib, held, tokenizer = demo.prepare(OUT)
    tok_json = Path(tokenizer) / "tokenizer.json"
    _, eval_docs = corpora.split_bbc(demo.CALIB_DOCS, seed=0)
    # timing text: evaluation articles after the ones the demo holds out for verification
    timing_texts = [corpora.clean(t) for t, _ in eval_docs[demo.EVAL_DOCS:demo.EVAL_DOCS + 64]]
    names = ["input_ids", "attention_mask", "token_type_ids"]

    def text_feeds(batch: int, length: int, n: int) -> list[dict]:
        feeds = list(from_text(timing_texts[: batch * n], tok_json, names, batch_size=batch, max_length=length)())
        sess = benchmark.make_session(model, 1, opt_level="disable")
        inputs = {i.name for i in sess.get_inputs()}
        feeds = [{k: v for k, v in f.items() if k in inputs} for f in feeds]
        assert all(f["attention_mask"].all() for f in feeds), "timing text must not be padded"
        return feeds

    sets = {"1×16": text_feeds(1, 16, 8), "8×128": text_feeds(8, 128, 2)}
    acc_texts = eval_docs[demo.EVAL_DOCS + 64: demo.EVAL_DOCS + 64 + args.accuracy_docs]
    prompts = list(evaluate.BBC_TOPIC_PROMPTS.values())
    topics = list(evaluate.BBC_TOPIC_PROMPTS)

    def zero_shot(path: Path, library: bool) -> tuple[float, np.ndarray]:
        so = runtime.session_options(require=True) if library else None
        emb = evaluate.embed_texts(path, [corpora.clean(t) for t, _ in acc_texts] + prompts, tokenizer,
                                   batch_size=32, max_length=128, session_options=so)
        docs = emb[: len(acc_texts)]
        return evaluate.zero_shot_accuracy(docs, [c for _, c in acc_texts], emb[len(acc_texts):], topics), docs

    section: dict = {"model": str(model.relative_to(ROOT)), "data": "BBC News evaluation articles "
                     "(not used for calibration), tokenized to batch×tokens, unpadded",
                     "accuracy_docs": len(acc_texts), "variants": []}
    log(f"zero-shot accuracy of the original on {len(acc_texts)} articles")
    acc0, emb0 = zero_shot(model, False)
    section["original_zero_shot"] = acc0
    for pred in predictor_list(args.predictors):
        settings = dataclasses.replace(api.Settings(), predictor=pred, predictor_block=int4_block(pred))
        if args.minilm_target is not None:
            settings = dataclasses.replace(settings, target_fallback=args.minilm_target)
        tag = "" if args.minilm_target is None else f".t{args.minilm_target:g}"
        dst = WORK / f"minilm.{pred}{tag}.onnx"
        info = optimized_model(model, dst, calib, settings, eval_data=held,
                               data=api.DataOptions(tokenizer=tokenizer, batch_size=16, max_length=128))
        info.pop("_report", None)
        acc, emb = zero_shot(dst, True)
        info.update(zero_shot=acc, zero_shot_delta_points=100 * (acc - acc0),
                    embedding_cosine=evaluate.mean_cosine(emb0, emb),
                    default=pred == default_predictor() and args.minilm_target is None)
        log(f"minilm {pred}: zero-shot {acc:.3f} vs {acc0:.3f}; timing")
        section["variants"].append(time_variant(info, model, dst, pred, sets, "1×16", 2, args))
    return section


# ---------------------------------------------------------------------------------------------- decoders


def run_decoder(arch: str, args) -> dict:
    from tardis_compile.models import hf_export

    info_arch = hf_export.arch_info(arch, "real")
    src = WORK / f"{arch}-real.kv.onnx"
    if not src.exists():
        log(f"exporting random {arch} with KV cache (size='real': d={info_arch.d}, D={info_arch.D}, "
            f"{info_arch.layers} layers)")
        hf_export.export_random(arch, src, size="real", kv_cache=True)  # external data: <src>.data
    rng = np.random.default_rng(0)

    def ids(batch: int, seq: int) -> np.ndarray:
        return rng.integers(0, 1000, (batch, seq)).astype(np.int64)

    prefiller = benchmark.make_session(src, 1)

    def prefill(batch: int, seq: int) -> dict:
        return {"input_ids": ids(batch, seq), "attention_mask": np.ones((batch, seq), np.int64),
                **hf_export.empty_past(prefiller, batch)}

    def decode(past: int) -> dict:
        cache = hf_export.cache_after(prefiller, ids(1, past))
        return {"input_ids": ids(1, 1), "attention_mask": np.ones((1, past + 1), np.int64), **cache}

    decode_case = f"1 token after {args.past} (decode step)"
    log(f"{arch}: prefilling {args.past}-token prompts for the decode feeds")
    sets = {decode_case: [decode(args.past) for _ in range(4)], "16 tokens (prefill)": [prefill(1, 16) for _ in range(2)]}
    calib = [prefill(4, 64) for _ in range(args.calib_batches)]
    del prefiller
    section: dict = {"model": f"random {arch}, size='real' (d={info_arch.d}, D={info_arch.D}, "
                     f"{info_arch.layers} layer(s), vocab 1000)", "kv_cache": True,
                     "step": f"KV-cache export; decode step = 1 new token attending to the cache of a "
                             f"{args.past}-token random prompt (prefilled by the original model); prefill = 16 "
                             "tokens, empty cache",
                     "calibration": f"{args.calib_batches}×[4×64] prefills (empty cache) of uniform random token "
                                    "ids through the exported model (every 10th batch held out for verification)",
                     "variants": []}
    for pred in predictor_list(args.predictors):
        settings = dataclasses.replace(api.Settings(), predictor=pred, target_fallback=args.decoder_target,
                                       predictor_block=int4_block(pred))
        tag = "" if args.decoder_target == 0.1 else f".t{args.decoder_target:g}"
        dst = WORK / f"{arch}-real.kv.{pred}{tag}.onnx"
        info = optimized_model(src, dst, calib, settings)
        info.pop("_report", None)
        info["default"] = pred == default_predictor()
        section["variants"].append(time_variant(info, src, dst, pred, sets, decode_case, 3, args))
    return section


def time_variant(info: dict, original: Path, optimized: Path, pred: str, sets: dict, variant_case: str,
                 warmup: int, args: argparse.Namespace) -> dict:
    """Time one optimized variant against its original (after waiting for a quiet machine), plus the
    optional session-option and ``accuracy_level`` experiments on ``variant_case``; returns ``info``."""
    load = wait_for_load(args.max_load, args.max_wait)
    result = benchmark.bench(original, optimized, sets, threads=args.threads, warmup=warmup, rounds=args.rounds,
                             min_seconds=args.min_seconds, profile_runs=args.profile_runs, log=lambda r: log(r))
    info.update(optimized=str(optimized.relative_to(ROOT)), load_before=load, cases=summarize_cases(result),
                profiles=result.profiles, machine=result.machine)
    if args.session_variants:
        log(f"session variants, {variant_case}")
        info["session_variants"] = {variant_case: session_variants(original, optimized, sets[variant_case], args)}
    if args.accuracy_levels and pred in ("int4", "int2"):
        log("predictor accuracy_level experiment")
        exp = accuracy_level_experiment(original, optimized, sets, args)
        info["session_variants"] = {**info.get("session_variants", {}),
                                    **{f"{k}, accuracy_level": v for k, v in exp.items()}}
    return info


# ---------------------------------------------------------------------------------------------- output


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# End-to-end speed (`bench/e2e.py`)", "",
             f"Machine: {m['processor']}, {m['cpus']} vCPUs (shared with other jobs), ONNX Runtime "
             f"{m['onnxruntime']}, CPU EP, graph optimization 'all', sequential; date {m['date']}; load "
             f"average at start {results['load_start']}, at end {results['load_end']}. Original and optimized "
             "interleaved round by round in one process; medians of round times; `speed-up` = original median "
             "/ optimized median, `paired` = median of per-round ratios; `flagged` = share of token-neuron "
             "pairs the kernels took the exact path for during the timed runs.", ""]
    for run in results.get("runs", []):
        lines.append(f"- run {run['date']}: {run['archs']}, load average {run['load_start']} → {run.get('load_end')}")
    lines.append("")
    for name, sec in results["models"].items():
        lines += [f"## {name}", "", sec["model"] + ".", ""]
        for key in ("data", "step", "calibration"):
            if key in sec:
                lines.append(f"- {key}: {sec[key]}")
        if "original_zero_shot" in sec:
            lines.append(f"- zero-shot BBC topic accuracy of the original: {sec['original_zero_shot']:.1%} "
                         f"on {sec['accuracy_docs']} held-out articles")
        lines.append("")
        for v in sec["variants"]:
            s = v["settings"]
            block = f" (blocks of {s['predictor_block']})" if s.get("predictor_block") else ""
            head = (f"### predictor `{s['predictor']}`{block}{' (default)' if v.get('default') else ''}, target "
                    f"fallback {s['target_fallback']:.0%}")
            lines += [head, ""]
            if v.get("calibration"):
                lines += [f"calibration: {v['calibration']}", ""]
            if "zero_shot" in v:
                lines.append(f"zero-shot {v['zero_shot']:.1%} ({v['zero_shot_delta_points']:+.1f} points), "
                             f"embedding cosine {v['embedding_cosine']:.4f}; timed {v['machine']['date']}, load average "
                             f"before {v['load_before']}, after {v['machine']['load_average']}")
            else:
                lines.append(f"timed {v['machine']['date']}, load average before {v['load_before']}, after "
                             f"{v['machine']['load_average']}")
            lines += ["", "| case | threads | original ms/batch | optimized ms/batch | speed-up | paired | original rows/s | "
                      "optimized rows/s | flagged |", "|---|---|---|---|---|---|---|---|---|"]
            for c in v["cases"]:
                fl = "–" if c["flagged_share"] is None else f"{c['flagged_share']:.1%}"
                nb = c.get("feeds", 1)
                lines.append(f"| {c['label']} | {c['threads']} | {c['original_ms'] / nb:.2f} | {c['optimized_ms'] / nb:.2f} | "
                             f"**{c['speedup']:.2f}×** | {c['speedup_paired']:.2f}× | "
                             f"{c['original_rows_per_s']:.1f} | {c['optimized_rows_per_s']:.1f} | {fl} |")
            lines.append("")
            if v.get("profiles"):
                lines += ["Per-node profile (1 thread, ms per batch, ORT profiling, original and optimized runs "
                          "interleaved; parts of the optimized model; "
                          "`rest` = everything the rewrite did not touch; FFN original (est.) = original nodes − "
                          "optimized rest):", "",
                          "| case | original nodes | optimized nodes | FFN original (est.) | FFN optimized | predictor | fold | "
                          "GuardedFallback | guard | rest |", "|---|---|---|---|---|---|---|---|---|---|"]
                labels = sorted({k.split("/")[0] for k in v["profiles"]})
                for lab in labels:
                    po = next((p for k, p in v["profiles"].items() if k.startswith(lab + "/") and k.endswith("original")), None)
                    pp = next((p for k, p in v["profiles"].items() if k.startswith(lab + "/") and k.endswith("optimized")), None)
                    if not (po and pp):
                        continue
                    b = pp["by_part_us"]
                    tot = pp["nodes_us"] or 1
                    cells = " | ".join(f"{b[p] / 1e3:.2f} ({b[p] / tot:.0%})" for p in benchmark.PARTS)
                    ffn_o = (po["nodes_us"] - b["rest"]) / 1e3
                    ffn_p = (pp["nodes_us"] - b["rest"]) / 1e3
                    lines.append(f"| {lab} | {po['nodes_us'] / 1e3:.2f} | {pp['nodes_us'] / 1e3:.2f} | {ffn_o:.2f} | "
                                 f"{ffn_p:.2f} | {cells} |")
                lines.append("")
            for lab, sv in (v.get("session_variants") or {}).items():
                when = f", run {v['session_variants_date']}" if v.get("session_variants_date") else ""
                lines += [f"Session options, {lab}, {sv['threads']} thread(s){when} (rotated rounds; ratio = "
                          "original median / this; ms per round):", "", "| session | median ms | original / this |",
                          "|---|---|---|"]
                lines += [f"| {k} | {r['median_ms']:.2f} | {r['vs_first']:.2f}× |" for k, r in sv.items()
                          if isinstance(r, dict)]
                lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    code_hash()  # of the sources as loaded now, before any later edit
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="minilm,gpt2", help="minilm, gpt2, bloom, falcon (comma-separated)")
    ap.add_argument("--predictors", help="predictors to time (default: Settings() default, plus int4 if different)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=3.0,
                    help="more rounds until each case has run this long (1×16 MiniLM: ~8 ms a round)")
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--accuracy-docs", type=int, default=500)
    ap.add_argument("--calib-batches", type=int, default=20)
    ap.add_argument("--max-load", type=float, default=3.0, help="wait for the 1-min load to drop below this")
    ap.add_argument("--max-wait", type=float, default=60.0, help="... but at most this many seconds")
    ap.add_argument("--session-variants", action="store_true",
                    help="also time the optimized model under other graph optimization levels / no spinning")
    ap.add_argument("--accuracy-levels", action="store_true",
                    help="also time the int4 predictor at MatMulNBits accuracy_level 0 and 1 (copies of the model)")
    ap.add_argument("--past", type=int, default=128, help="decoders: prompt tokens in the cache before the "
                                                             "timed decode step (default 128)")
    ap.add_argument("--decoder-target", type=float, default=0.1, help="decoders: target fallback (default 0.1)")
    ap.add_argument("--minilm-target", type=float, help="MiniLM: target fallback (default: the tool's default)")
    ap.add_argument("--merge", action="store_true", help="keep the other models' results already in the JSON")
    ap.add_argument("--out", default=str(RESULTS / "e2e"), help="results stem (.json, .md)")
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out)
    results = {"machine": benchmark.machine_info(), "load_start": [round(x, 2) for x in os.getloadavg()],
               "settings_default": api.Settings().effective(), "threads": args.threads,
               "rounds": args.rounds, "min_seconds": args.min_seconds, "models": {}}
    names = {"minilm": "all-MiniLM-L6-v2 (real weights) — sentence embeddings",
             "gpt2": "GPT-2-small-shaped (random weights)", "bloom": "BLOOM-560m-shaped (random weights)",
             "falcon": "Falcon-7B layer shape, 1 layer (random weights)"}
    previous = stem.with_suffix(".json")
    if args.merge and previous.exists():  # keep the other models' sections of an earlier run
        old = json.loads(previous.read_text())
        results["models"] = old.get("models", {})
        results["runs"] = old.get("runs", [])
    results.setdefault("runs", []).append({"date": results["machine"]["date"], "archs": args.archs,
                                           "load_start": results["load_start"]})
    for arch in args.archs.split(","):
        t0 = time.time()
        section = run_minilm(args) if arch == "minilm" else run_decoder(arch, args)
        before = results["models"].get(names[arch])
        if before and before.get("step") == section.get("step"):  # merge: keep earlier variants of other models
            done = {v["optimized"] for v in section["variants"]}
            old_by_path = {v.get("optimized"): v for v in before["variants"]}
            for v in section["variants"]:  # keep session-option experiments of an earlier run
                prev = old_by_path.get(v["optimized"])
                if prev and prev.get("session_variants") and not v.get("session_variants"):
                    v["session_variants"] = prev["session_variants"]
                    v["session_variants_date"] = prev.get("session_variants_date", prev["machine"]["date"])
            section["variants"] = [v for v in before["variants"] if v.get("optimized") not in done] + section["variants"]
        results["models"][names[arch]] = section
        log(f"{arch} done in {time.time() - t0:.0f} s")
        results["load_end"] = results["runs"][-1]["load_end"] = [round(x, 2) for x in os.getloadavg()]
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
