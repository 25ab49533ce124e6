"""Benchmark of the compiled GuardedFallback kernel against the dense GELU block, in ONNX Runtime.

For every size d x D, thread count, token count and flagged share it times, in one process with the same
session settings (CPU EP, intra_op_num_threads = 1 or 2, weights as initializers):

  dense        MatMul(x, W1) + b1 -> Gelu -> MatMul(., W2) + b2              (the original block)
  block        MatMul(x, W_f) + b_f  and  h_hat = MatMul(x, W1) + b1 (exact predictor)  -> GuardedFallback
  fold+kernel  MatMul(x, W_f) + b_f -> GuardedFallback with h_hat fed as an input
               (what the block would cost with a free predictor: the gap block - fold+kernel is the
               predictor's, which the exact predictor makes as expensive as the first dense MatMul)
  kernel       GuardedFallback alone (y_lin and h_hat fed as inputs)

Flags: lo/hi per neuron are set to the two-sided quantiles of the (Gaussian) pre-activation so each
token-neuron pair is flagged with the given share; the measured share (from the kernel's counter) is
reported next to it. By default tokens are independent, so are their flags: the worst case for the
union-gather path. ``--token-correlation 0.9`` gives the tokens a common component, so their flagged sets
overlap as in a real prefill.

    python bench/bench_kernel.py            # full grid (tens of minutes; 4544x18176 needs ~6 GB RAM)
    python bench/bench_kernel.py --quick    # small subset, seconds
    python bench/bench_kernel.py --quick --token-correlation 0.9   # overlapping flags (union path)

Writes bench/results/kernel.json and bench/results/kernel.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tardis_compile import fallback_op as fo  # noqa: E402
from tardis_compile import runtime  # noqa: E402
from common import (QUICK_SIZES, QUICK_TOKENS, SHARES, SIZES, THREADS, TOKENS, isa_cap, isa_cap_note,  # noqa: E402
                    kernel_path, parse_sizes, session)

QUICK_SHARES = [0.05, 0.20]
VARIANT = "none"
OPSET = 20  # Gelu is a standard op since opset 20


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inputs, outputs, inits, with_function: bool) -> bytes:
    graph = helper.make_graph(nodes, "bench", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if with_function:
        opsets.append(helper.make_opsetid(fo.DOMAIN, fo.OPSET_VERSION))
    model = helper.make_model(graph, opset_imports=opsets,
                              functions=[fo.fallback_function(VARIANT, OPSET)] if with_function else [])
    model.ir_version = 9
    return model.SerializeToString()


def build_models(w: dict[str, np.ndarray]) -> dict[str, bytes]:
    d, D = w["W1"].shape
    n = helper.make_node
    gf_inputs = lambda y_lin, h_hat: [  # noqa: E731
        "x", y_lin, h_hat, "lo", "hi", "w1t", "b1", "w2", "alpha", "beta"]
    gf = lambda y_lin, h_hat: fo.make_fallback_node(gf_inputs(y_lin, h_hat), "y", VARIANT, "gf")  # noqa: E731
    x, y = _vi("x", ["n", d]), _vi("y", ["n", d])
    lohi = [_vi("lo", [D]), _vi("hi", [D])]
    gf_w = [_init("w1t", w["W1t"]), _init("b1", w["b1"]), _init("w2", w["W2"]), _init("alpha", w["alpha"]),
            _init("beta", w["beta"])]
    models = {
        "dense": _model(
            [n("MatMul", ["x", "W1"], ["xw1"]), n("Add", ["xw1", "b1"], ["h"]),
             n("Gelu", ["h"], ["g"], approximate=VARIANT), n("MatMul", ["g", "W2"], ["gw2"]),
             n("Add", ["gw2", "b2"], ["y"])],
            [x], [y], [_init("W1", w["W1"]), _init("b1", w["b1"]), _init("W2", w["W2"]), _init("b2", w["b2"])],
            with_function=False),
        "block": _model(
            [n("MatMul", ["x", "Wf"], ["xwf"]), n("Add", ["xwf", "bf"], ["y_lin"]),
             n("MatMul", ["x", "W1p"], ["xw1"]), n("Add", ["xw1", "b1"], ["h_hat"]), gf("y_lin", "h_hat")],
            [x, *lohi], [y], [_init("Wf", w["Wf"]), _init("bf", w["bf"]), _init("W1p", w["W1"]), *gf_w],
            with_function=True),
        "fold+kernel": _model(
            [n("MatMul", ["x", "Wf"], ["xwf"]), n("Add", ["xwf", "bf"], ["y_lin"]), gf("y_lin", "h_hat")],
            [x, _vi("h_hat", ["n", D]), *lohi], [y], [_init("Wf", w["Wf"]), _init("bf", w["bf"]), *gf_w],
            with_function=True),
        "kernel": _model(
            [gf("y_lin", "h_hat")],
            [x, _vi("y_lin", ["n", d]), _vi("h_hat", ["n", D]), *lohi], [y], gf_w, with_function=True),
    }
    return models


def make_weights(d: int, D: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.float32
    W1 = (rng.standard_normal((d, D), dtype=f) / np.float32(math.sqrt(d)))
    W2 = (rng.standard_normal((D, d), dtype=f) / np.float32(math.sqrt(D)))
    return {
        "W1": W1, "W1t": np.ascontiguousarray(W1.T), "W2": W2,
        "b1": (0.1 * rng.standard_normal(D)).astype(f), "b2": (0.1 * rng.standard_normal(d)).astype(f),
        "alpha": rng.uniform(0, 1, D).astype(f), "beta": rng.uniform(-0.1, 0.1, D).astype(f),
        # The fold's numbers do not matter for timing: a random d x d matrix of the right shape.
        "Wf": (rng.standard_normal((d, d), dtype=f) / np.float32(math.sqrt(d))), "bf": np.zeros(d, f),
    }


def guards(w: dict[str, np.ndarray], share: float) -> tuple[np.ndarray, np.ndarray]:
    """lo/hi so that h_j = x.W1[:, j] + b1_j with x ~ N(0, I) leaves [lo, hi] with probability ``share``."""
    sigma = np.linalg.norm(w["W1"], axis=0)
    z = norm.ppf(1.0 - share / 2.0)
    return (w["b1"] - z * sigma).astype(np.float32), (w["b1"] + z * sigma).astype(np.float32)


def time_run(sess: ort.InferenceSession, feeds: dict, min_time: float, min_reps: int, max_reps: int) -> float:
    """Median wall time of one run in milliseconds (after warm-up)."""
    for _ in range(2):
        sess.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def make_x(rng, tokens: int, d: int, rho: float) -> np.ndarray:
    """Tokens x ~ N(0, I) marginally; with ``rho`` > 0 they share a common component (correlation rho), so
    their pre-activations, hence their flagged sets, overlap as in a real prefill."""
    common = rng.standard_normal((1, d), dtype=np.float32)
    own = rng.standard_normal((tokens, d), dtype=np.float32)
    return (np.float32(math.sqrt(rho)) * common + np.float32(math.sqrt(1.0 - rho)) * own).astype(np.float32)


def run(sizes, tokens_list, shares, threads_list, min_time: float, log, rho: float = 0.0) -> list[dict]:
    records = []
    for d, D in sizes:
        log(f"== d={d} D={D}: building weights and models")
        w = make_weights(d, D)
        models = build_models(w)
        rng = np.random.default_rng(1)
        xs = {t: make_x(rng, t, d, rho) for t in tokens_list}
        for threads in threads_list:
            sess = {name: session(m, threads, lib=(name != "dense")) for name, m in models.items()}
            for t in tokens_list:
                x = xs[t]
                h_hat = (x @ w["W1"] + w["b1"]).astype(np.float32)
                y_lin = (x @ w["Wf"] + w["bf"]).astype(np.float32)
                big = d * D >= 4544 * 18176
                reps = dict(min_time=min_time, min_reps=3 if big else 5, max_reps=50 if big else 500)
                dense_ms = time_run(sess["dense"], {"x": x}, **reps)
                for share in shares:
                    lo, hi = guards(w, share)
                    feeds = {
                        "block": {"x": x, "lo": lo, "hi": hi},
                        "fold+kernel": {"x": x, "h_hat": h_hat, "lo": lo, "hi": hi},
                        "kernel": {"x": x, "y_lin": y_lin, "h_hat": h_hat, "lo": lo, "hi": hi},
                    }
                    stats0 = runtime.kernel_stats()
                    sess["kernel"].run(None, feeds["kernel"])
                    stats1 = runtime.kernel_stats()
                    measured = (stats1["flagged_pairs"] - stats0["flagged_pairs"]) / (t * D)
                    used_union = stats1["union_calls"] > stats0["union_calls"]
                    path = kernel_path(stats0, stats1)
                    ms = {name: time_run(sess[name], feeds[name], **reps) for name in feeds}
                    ms["dense"] = dense_ms
                    rec = {"d": d, "D": D, "tokens": t, "threads": threads, "share": share, "token_correlation": rho,
                           "measured_share": round(measured, 5), "union_path": used_union, "path": path,
                           "ms": {k: round(v, 4) for k, v in ms.items()},
                           "speedup_vs_dense": {k: round(dense_ms / v, 3) for k, v in ms.items() if k != "dense"}}
                    records.append(rec)
                    log(f"d={d:5d} D={D:5d} T={t:4d} thr={threads} share={share:4.0%} (meas {measured:6.2%}"
                        f", {path}): dense {dense_ms:9.3f} ms | block {ms['block']:9.3f}"
                        f" | fold+kernel {ms['fold+kernel']:9.3f} | kernel {ms['kernel']:9.3f}")
            del sess
            gc.collect()
        del models, w
        gc.collect()
    return records


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        "# GuardedFallback kernel vs dense GELU block (ONNX Runtime, CPU)",
        "",
        f"onnxruntime {meta['onnxruntime']}, {meta['cpu']}, {meta['cpus']} CPUs, AVX2 path: "
        f"{bool(meta['cpu_has_avx2'])}. Medians in ms; speed-up = dense / variant (>1 is faster than dense)."
        f"{isa_cap_note(meta.get('isa_cap'))}",
        "`block` = folded MatMul + exact predictor (full x·W1) + kernel; `fold+kernel` = folded MatMul + kernel "
        "with h_hat given (a free predictor); `kernel` = the op alone. Token input correlation "
        f"{meta['token_correlation']} (0: flags independent per token-neuron pair).",
        "",
        "| d×D | tokens | threads | share (measured) | path | dense | block | fold+kernel | kernel "
        "| ×block | ×fold+kernel |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ms, sp = r["ms"], r["speedup_vs_dense"]
        lines.append(
            f"| {r['d']}×{r['D']} | {r['tokens']} | {r['threads']} | {r['share']:.0%} ({r['measured_share']:.1%}) "
            f"| {r.get('path', 'union' if r['union_path'] else 'token')} | {ms['dense']:.3f} | {ms['block']:.3f} "
            f"| {ms['fold+kernel']:.3f} | {ms['kernel']:.3f} | {sp['block']:.2f} | {sp['fold+kernel']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset (2 sizes, 2 token counts, 2 shares)")
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="intra-op thread counts (default 1 2)")
    ap.add_argument("--sizes", type=str, nargs="+", default=None, help="sizes as dxD, e.g. 768x3072")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timed runs per measurement")
    ap.add_argument("--token-correlation", type=float, default=0.0,
                    help="correlation of the tokens' inputs (0: independent flags; e.g. 0.9: shared, prefill-like)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)

    lib = runtime.library_path() or runtime.build_library()
    if lib is None:
        print("libtardis_ops is not available: " + "; ".join(runtime.missing_build_requirements()), file=sys.stderr)
        return 1
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    shares = QUICK_SHARES if args.quick else SHARES
    threads = args.threads or THREADS
    min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 0.5)

    t0 = time.time()
    records = run(sizes, tokens, shares, threads, min_time, log=lambda m: print(m, flush=True),
                  rho=args.token_correlation)
    stats = runtime.kernel_stats()
    meta = {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "isa_cap": isa_cap(),
            "cpu_has_avx2": stats.get("cpu_has_avx2"), "library": str(lib), "quick": args.quick,
            "variant": VARIANT, "token_correlation": args.token_correlation, "seconds": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (args.out / "kernel.md").write_text(markdown(records, meta))
    print(f"wrote {args.out / 'kernel.json'} and {args.out / 'kernel.md'} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
