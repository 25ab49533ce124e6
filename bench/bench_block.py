"""The whole rewritten FFN block, as ``tardis_compile.optimize`` emits it (int4 predictor, or ``--predictor
int8``), against the original dense block in ONNX Runtime: same process, same session settings, same thread count.

For each size d x D and flagged share s:

1. ``models.tiny.ffn_model(d, D)``: one residual block ``y = x + GELU(x·W1 + b1)·W2 + b2`` (ONNX ``Gelu``,
   erf), weights drawn like a trained layer's scale (``N(0, 1/d)``, ``N(0, 1/D)``); with ``--blocks N``,
   N such blocks side by side on the same input, outputs summed (:func:`block_model`), timed per block.
2. ``tardis_compile.optimize(..., Settings(predictor=P, target_fallback=s, refit=False))`` on Gaussian
   calibration inputs: the folded ``MatMul``/``Add``, the predictor (int4: ``com.microsoft::MatMulNBits``,
   bits 4, blocks of 128 (``--predictor-block 128``, the decode choice; the tool's default is 32),
   accuracy_level 4, bias ``b1``; int8: ``com.microsoft::DynamicQuantizeMatMul``), and
   ``ai.tardis::GuardedFallback`` (with the int4 predictor: both in one ``ai.tardis::GuardedFallbackNBits``).
3. Timing, interleaved round by round (so machine noise hits all variants alike), medians:

   dense       the original model (plain session options)
   tardis      the rewritten model, ``tardis_compile.session_options()`` (the compiled kernel runs)
   predictor   the rewritten model cut at the predictor's output ``h_hat`` (``x -> h_hat``; a fused
               predictor is cut from the unfused pair, ``fused_op.unfuse``)
   fold        the rewritten model cut at ``y_lin`` (the folded MatMul + Add)

   ``tardis - predictor - fold`` is the kernel's (plus the residual Add). The flagged share actually seen
   at run time comes from the kernel's counter, and the path it took (tile / token / union / neuron; fused:
   the int4 predictor inside the fallback's work items).

Bytes read at 1 token (the decode bound): dense 2·d·D·4; rewritten d·d·4 (fold; with ``--fold-bits 8``
d·d + 4·d) + d·D·(0.5 + 4/block) (int4 + float scales; int8: d·D + 4·D) + share·2·d·D·4 (flagged rows of
W1ᵀ and W2): ``bound`` in the table.

``--fold-bits 8`` stores the folded matrix as int8 with a scale per output column (the tool's option of the
same name), a quarter of the fold's bytes: the decode lever. Its product is our ``ai.tardis::DequantizeMatMul``
(an 8-bit VNNI / AVX2 kernel; without the library ONNX Runtime 1.25 and later run its function body as an
8-bit ``MatMulNBits``). ``--fold-activations int8``
also rounds the fold's input to uint8 per call (``com.microsoft::DynamicQuantizeMatMul``, MLAS's integer
GEMM): faster at every token count, most at prefill.

    python bench/bench_block.py --predictor int8 --name block_int8   # the prefill predictor

    python bench/bench_block.py --quick                       # 2 sizes, 1 and 128 tokens, 5% and 10%
    python bench/bench_block.py                               # full grid (~6 GB RAM for 4544x18176)
    python bench/bench_block.py --sizes 4544x18176 --reps 5   # the big one, fewer rounds
    python bench/bench_block.py --runs 3                      # the grid 3 times; medians over the runs
    python bench/bench_block.py --blocks 8 --runs 3 --name block_x8   # 8 blocks per model, decode-like
    python bench/bench_block.py --fold-bits 8 --tokens 1 8 --name block_f8   # int8 W_f, decode
    python bench/bench_block.py --predictor int8 --fold-bits 8 --fold-activations int8 --tokens 128 \
        --name block_int8_a8                                  # int8 W_f and int8 fold input, prefill

Writes bench/results/block.json and bench/results/block.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tardis_compile as tc  # noqa: E402
from tardis_compile import fused_op, runtime  # noqa: E402
from common import (DECODE_INT4_BLOCK, QUICK_SIZES, QUICK_TOKENS, SHARES, SIZES, THREADS, TOKENS,  # noqa: E402
                    int4_block, isa_cap, isa_cap_note, kernel_path, parse_sizes, session)
from tardis_compile.models import tiny  # noqa: E402

QUICK_SHARES = [0.05, 0.10]


def calib_batches(d: int, n_batches: int, tokens: int, seed: int = 123) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((tokens, d), dtype=np.float32)} for _ in range(n_batches)]


def fallback_nodes(model: onnx.ModelProto, blocks: int) -> list[onnx.NodeProto]:
    nodes = [n for n in model.graph.node if n.op_type in ("GuardedFallback", "GuardedFallbackNBits")]
    if len(nodes) != blocks:
        raise RuntimeError(f"expected {blocks} GuardedFallback node(s), found {len(nodes)}")
    return nodes


def unfused(model_path: Path, out_path: Path) -> Path:
    """A copy of the model with its fused predictor + fallback nodes split into the pair (``ĥ`` a tensor)."""
    model = ir.load(str(model_path))
    fused_op.unfuse(model)
    ir.save(model, str(out_path), external_data=out_path.name + ".data")
    return out_path


def cut(model_path: Path, output: str, out_path: Path) -> Path:
    """The sub-model computing ``output`` from ``x`` (only the nodes and weights it needs), for timing one
    part of the block. (``onnx.utils.extract_model`` needs shape info the contrib ops do not give.)"""
    m = onnx.load(str(model_path))
    g = m.graph
    need, keep = {output}, []
    for node in reversed(list(g.node)):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    del g.value_info[:]
    used = {(n.domain, n.op_type) for n in keep}
    functions = [f for f in m.functions if (f.domain, f.name) in used]  # the int4 predictor's op stays defined
    del m.functions[:]
    m.functions.extend(functions)
    onnx.save(m, str(out_path), save_as_external_data=True, location=out_path.name + ".data")
    return out_path


def interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict, min_time: float, min_reps: int,
                max_reps: int) -> dict[str, float]:
    """Median ms per variant; each round runs every variant once, in rotating order."""
    for s in sessions.values():
        s.run(None, feeds)
    names = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in names}
    start, r = time.perf_counter(), 0
    while r < max_reps and (r < min_reps or time.perf_counter() - start < min_time):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t0)
        r += 1
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


def bytes_bound(d: int, D: int, share: float, predictor: str, fold_bits: int | None = None) -> float:
    dense = 2.0 * d * D * 4
    pred = d * D + 4.0 * D if predictor == "int8" else d * D * (0.5 + 4.0 / DECODE_INT4_BLOCK)
    fold = d * d + 4.0 * d if fold_bits == 8 else d * d * 4.0
    rewritten = fold + pred + share * 2.0 * d * D * 4
    return dense / rewritten


def block_model(d: int, D: int, blocks: int) -> onnx.ModelProto:
    """One residual block ``y = x + GELU(x·W1 + b1)·W2 + b2``, or ``blocks`` of them side by side on the same
    input, each with its own weights, their outputs summed. Side by side rather than chained: every block
    then sees the calibration's input distribution (a chain of random blocks drifts away from it once
    the upstream blocks are approximated, and its deep blocks flag far more than its first ones), while
    each block's weights are still cold when it runs and one run's fixed costs are shared, as in a model."""
    if blocks == 1:
        return tiny.ffn_model(d, D, gelu="erf_op", rank=2, constants="initializer", seed=0)
    nodes, inits, outs = [], [], []
    for b in range(blocks):
        m = onnx.compose.add_prefix(tiny.ffn_model(d, D, gelu="erf_op", rank=2, constants="initializer", seed=b),
                                    f"b{b}.")
        for n in m.graph.node:
            n.input[:] = ["x" if i == f"b{b}.x" else i for i in n.input]
        nodes += m.graph.node
        inits += m.graph.initializer
        outs.append(m.graph.output[0].name)
    graph = onnx.helper.make_graph(
        nodes + [onnx.helper.make_node("Sum", outs, ["y"], name="sum_of_blocks")], "blocks",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", d])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", d])], inits)
    return onnx.helper.make_model(graph, opset_imports=m.opset_import, ir_version=m.ir_version)


def prepare_share(dense_path: Path, d: int, D: int, share: float, calib, predictor: str, work: Path, log,
                  blocks: int = 1, fold_bits: int | None = None, fold_activations: str = "float") -> dict[str, Path]:
    """The rewritten model at flagged share ``share`` and, for a single block, its two cuts (predictor,
    fold): variant → path. (With several blocks the cuts would have to hold them all.)"""
    t0 = time.time()
    out = work / f"tardis_{share}.onnx"
    settings = tc.Settings(predictor=predictor, target_fallback=share, refit=False,
                           predictor_block=int4_block(predictor), fold_bits=fold_bits,
                           fold_activations=fold_activations)
    tc.optimize(dense_path, out, calib, settings=settings, show_progress=False,
                report_path=work / f"report_{share}.json")
    m = onnx.load(str(out), load_external_data=False)
    gf = fallback_nodes(m, blocks)[0]
    y_lin, h_hat = gf.input[1], gf.input[2]
    ops = sorted({f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in m.graph.node})
    del m
    paths = {"dense": dense_path, "tardis": out}
    if blocks == 1:
        pair = out
        if gf.op_type == "GuardedFallbackNBits":  # the predictor's output is a tensor of the unfused pair
            pair, h_hat = unfused(out, work / f"unfused_{share}.onnx"), gf.name.rsplit("/", 1)[0] + "/h_hat"
        paths.update(predictor=cut(pair, h_hat, work / f"pred_{share}.onnx"),
                     fold=cut(out, y_lin, work / f"fold_{share}.onnx"))
    log(f"== d={d} D={D} share={share:.0%}: optimized in {time.time() - t0:.1f} s; ops {', '.join(ops)}")
    return paths


def check_run(sess: dict[str, ort.InferenceSession], feeds: dict, tokens: int, D: int, blocks: int) -> dict:
    """One rewritten run against the dense one: the flagged share the kernel saw, its path, the difference."""
    s0 = runtime.kernel_stats()
    y_t = sess["tardis"].run(None, feeds)[0]
    s1 = runtime.kernel_stats()
    y_d = sess["dense"].run(None, feeds)[0]
    path = kernel_path(s0, s1)
    return {"measured_share": round((s1["flagged_pairs"] - s0["flagged_pairs"]) / (tokens * D * blocks), 5),
            "path": path,
            "max_rel_diff": float(np.max(np.abs(y_t - y_d)) / max(1e-12, float(np.max(np.abs(y_d)))))}


def run_size(d: int, D: int, tokens_list, shares, threads_list, min_time: float, reps: int | None, work: Path,
             log, predictor: str = "int4", runs: int = 1, blocks: int = 1,
             fold_bits: int | None = None, fold_activations: str = "float") -> list[dict]:
    """Records for one size. ``runs`` > 1 repeats the whole grid of this size that many times (models built
    once) and reports each variant's median over the runs' medians, so one run caught in a noisy minute
    does not decide a row. ``blocks`` > 1 times that many blocks of the size side by side
    (:func:`block_model`) and reports time per block; the predictor and fold cuts are single-block only."""
    model = block_model(d, D, blocks)
    dense_path = work / "dense.onnx"
    onnx.save(model, str(dense_path), save_as_external_data=blocks * d * D > 50_000_000,
              location="dense.onnx.data")
    del model
    big = d * D >= 4544 * 18176
    calib = calib_batches(d, n_batches=4 if big else 8, tokens=128 if big else 256)
    rng = np.random.default_rng(7)
    xs = {t: rng.standard_normal((t, d), dtype=np.float32) for t in tokens_list}
    n_min, n_max = (3, reps or 10) if big else (5, reps or 200)
    models = {share: prepare_share(dense_path, d, D, share, calib, predictor, work, log, blocks, fold_bits,
                                   fold_activations)
              for share in shares}
    checks: dict[tuple, dict] = {}
    timings: dict[tuple, list[dict[str, float]]] = {}
    for run in range(runs):
        for share, paths in models.items():
            for threads in threads_list:
                sess = {k: session(p, threads, k != "dense") for k, p in paths.items()}
                for t in tokens_list:
                    key, feeds = (share, threads, t), {"x": xs[t]}
                    if key not in checks:
                        checks[key] = check_run(sess, feeds, t, D, blocks)
                    ms = {k: v / blocks for k, v in interleaved(sess, feeds, min_time, n_min, n_max).items()}
                    timings.setdefault(key, []).append(ms)
                    parts = "".join(f" | {k} {ms[k]:8.3f}" for k in ("predictor", "fold") if k in ms)
                    log(f"d={d:5d} D={D:5d} T={t:4d} thr={threads} share={share:4.0%} run {run + 1}/{runs} "
                        f"(meas {checks[key]['measured_share']:6.2%}, {checks[key]['path']:6s}): dense "
                        f"{ms['dense']:9.3f} | tardis {ms['tardis']:9.3f} (x{ms['dense'] / ms['tardis']:.2f}){parts}"
                        f"{' per block' if blocks > 1 else ''}")
                del sess
                gc.collect()
    records = []
    for (share, threads, t), per_run in timings.items():
        ms = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
        has_cuts = blocks == 1
        records.append({"d": d, "D": D, "tokens": t, "threads": threads, "share": share, "blocks": blocks,
                        **checks[(share, threads, t)], "ms": {k: round(v, 4) for k, v in ms.items()},
                        "kernel_ms_est": round(ms["tardis"] - ms["predictor"] - ms["fold"], 4) if has_cuts else None,
                        "speedup": round(ms["dense"] / ms["tardis"], 3),
                        "speedup_runs": [round(r["dense"] / r["tardis"], 3) for r in per_run],
                        "predictor_share_of_block": round(ms["predictor"] / ms["tardis"], 3) if has_cuts else None,
                        "predictor": predictor, "fold_bits": fold_bits, "fold_activations": fold_activations,
                        "bytes_bound_1tok": round(bytes_bound(d, D, share, predictor, fold_bits), 2)})
    for p in work.glob("*.onnx*"):
        p.unlink()
    return records


def runs_note(records: list[dict]) -> str:
    """How many runs of the grid the rows come from (rows added with ``--append`` may differ)."""
    counts = sorted({len(r.get("speedup_runs", [None])) for r in records})
    if counts == [1]:
        return "One run of the grid."
    if len(counts) == 1:
        return (f"The grid ran {counts[0]} times (sessions rebuilt, other shares in between); each time is the "
                "median over the runs' medians, and the last column gives each run's ×dense.")
    return (f"Rows come from {' or '.join(map(str, counts))} runs of their grid (added with --append; sessions "
            "rebuilt, other shares in between); each time is the median over the runs' medians, and the last "
            "column gives each run's ×dense.")


def blocks_note(blocks: int) -> str:
    if blocks == 1:
        return ""
    return (f" Each model holds {blocks} blocks of the size side by side on the same input, each with its own "
            "weights, outputs summed (every block's weights cold when it runs, as in a model; one run's fixed "
            f"costs, such as waking the second thread, shared by {blocks} blocks); times are per block, and the "
            "predictor / fold cuts are single-block only.")


def markdown(records: list[dict], meta: dict) -> str:
    qblocks = f" in blocks of {meta['int4_block']}" if meta.get("int4_block") else ""
    fold = ", W_f in int8 (`--fold-bits 8`)" if meta.get("fold_bits") == 8 else ""
    if meta.get("fold_activations") == "int8":
        fold = ", W_f and its input in int8 (`--fold-bits 8 --fold-activations int8`)"
    lines = [
        f"# Rewritten FFN block ({meta['predictor']} predictor{qblocks} + GuardedFallback{fold}) vs dense block "
        "(ONNX Runtime, CPU)",
        "",
        f"onnxruntime {meta['onnxruntime']}, {meta['cpus']} CPUs (AVX2 {bool(meta['cpu_has_avx2'])}, AVX-512 "
        f"{bool(meta['cpu_has_avx512'])}).{isa_cap_note(meta.get('isa_cap'))} Medians in ms, variants "
        f"interleaved round by round. `tardis` = the whole rewritten block (fold + {meta['predictor']} predictor "
        "+ kernel + residual); `predictor`, `fold` = the block cut at `h_hat`, `y_lin`; `kernel` ≈ tardis − "
        "predictor − fold. ×dense = dense / tardis. `bound` = bytes-read ratio at 1 token (dense / rewritten). "
        "`path` = the kernel's strategy. "
        f"{runs_note(records)}{blocks_note(meta.get('blocks', 1))}",
        "",
        "| d×D | tokens | threads | share (run) | path | dense | tardis | predictor | fold | kernel | ×dense "
        "| pred % | bound | ×dense per run |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(records, key=lambda r: (r["d"], r["threads"], r["tokens"], r["share"])):
        ms = r["ms"]
        if "predictor" in ms:  # single-block rows carry the cuts
            parts = f"{ms['predictor']:.3f} | {ms['fold']:.3f} | {r['kernel_ms_est']:.3f}"
            pred = f"{100 * r['predictor_share_of_block']:.0f}%"
        else:
            parts, pred = "— | — | —", "—"
        lines.append(
            f"| {r['d']}×{r['D']} | {r['tokens']} | {r['threads']} | {r['share']:.0%} ({r['measured_share']:.1%}) "
            f"| {r['path']} | {ms['dense']:.3f} | {ms['tardis']:.3f} | {parts} | **{r['speedup']:.2f}** | {pred} "
            f"| {r['bytes_bound_1tok']:.2f} | {' / '.join(f'{x:.2f}' for x in r.get('speedup_runs', [r['speedup']]))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 sizes, 1 and 128 tokens, 5%% and 10%% flagged")
    ap.add_argument("--sizes", nargs="+", default=None, help="sizes as dxD, e.g. 768x3072")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--shares", type=float, nargs="+", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="intra-op thread counts (default 1 2)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timed rounds per measurement")
    ap.add_argument("--reps", type=int, default=None, help="max rounds per measurement")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="block", help="output file stem (default: block)")
    ap.add_argument("--append", action="store_true",
                    help="add to the existing JSON's records (the cases this run measures are replaced)")
    ap.add_argument("--blocks", type=int, default=1,
                    help="time this many blocks per model, side by side (decode-like: cold weights, run costs "
                         "shared); reports per block, without the predictor / fold cuts")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat each size's whole grid this many times; rows report medians over the runs")
    ap.add_argument("--predictor", choices=["int4", "int8"], default="int4", help="predictor kind (default int4)")
    ap.add_argument("--fold-bits", type=int, choices=[8], default=None,
                    help="store the folded matrix as int8 with a scale per output column (default: float32)")
    ap.add_argument("--fold-activations", choices=["float", "int8"], default="float",
                    help="with --fold-bits 8: int8 rounds the fold's input too (DynamicQuantizeMatMul)")
    args = ap.parse_args(argv)

    if runtime.library_path() is None and runtime.build_library() is None:
        print("libtardis_ops is not available: " + "; ".join(runtime.missing_build_requirements()), file=sys.stderr)
        return 1
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    shares = args.shares or (QUICK_SHARES if args.quick else SHARES)
    threads = args.threads or THREADS
    min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 0.6)

    t0 = time.time()
    records: list[dict] = []
    json_path = args.out / f"{args.name}.json"
    if args.append and json_path.is_file():
        measured = set(itertools.product(sizes, tokens, threads, shares))
        records = [r for r in json.loads(json_path.read_text())["records"]
                   if ((r["d"], r["D"]), r["tokens"], r["threads"], r["share"]) not in measured]
    with tempfile.TemporaryDirectory(prefix="tardis-bench-block-") as tmp:
        for d, D in sizes:
            records += run_size(d, D, tokens, shares, threads, min_time, args.reps, Path(tmp),
                                log=lambda m: print(m, flush=True), predictor=args.predictor, runs=args.runs,
                                blocks=args.blocks, fold_bits=args.fold_bits,
                                fold_activations=args.fold_activations)
            gc.collect()
    stats = runtime.kernel_stats()
    meta = {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "isa_cap": isa_cap(),
            "cpu_has_avx2": stats.get("cpu_has_avx2"), "cpu_has_avx512": stats.get("cpu_has_avx512"),
            "library": str(runtime.library_path()), "predictor": args.predictor, "refit": False,
            "int4_block": int4_block(args.predictor), "fold_bits": args.fold_bits,
            "fold_activations": args.fold_activations, "runs": args.runs,
            "blocks": args.blocks,
            "seconds": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(records, meta))
    print(f"wrote {json_path} and {args.out / (args.name + '.md')} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
