"""The low-bit products of our op library against ONNX Runtime's, same inputs, same process, interleaved:

* ``--bits 4`` (the int4 predictor): ``com.microsoft::MatMulNBits`` against our ``ai.tardis::MatMulNBits``;
* ``--bits 8`` (the int8 fold, ``--fold-bits 8``): ``DequantizeLinear → MatMul → Add``, which ONNX Runtime
  1.25+ fuses into an 8-bit ``MatMulNBits``, against our ``ai.tardis::DequantizeMatMul``.

Each model holds ``--nodes`` nodes of one shape with their own weights, all reading the same input (weights
rotate through the caches as in a model's layers), outputs summed; times are per node (medians of rounds).
Writes ``bench/results/nbits.{json,md}`` (``--bits 8``: ``nbits8``).

    python bench/bench_nbits.py                       # 384x1536, 768x3072, 1024x4096; 1, 16, 128 tokens
    python bench/bench_nbits.py --sizes 384x1536 --tokens 1 --block 32
    python bench/bench_nbits.py --bits 8 --block 32    # the folds: 384x384, 768x768, 1024x1024
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from common import THREADS, parse_sizes
from tardis_compile import benchmark, dequantize_matmul_op, nbits_op, runtime

RESULTS = Path(__file__).resolve().parent / "results"


def model(d: int, D: int, nodes: int, block: int, ours: bool) -> bytes:
    """``nodes`` int4 products x·W_i + b_i (random levels, scales, zero points), summed."""
    rng = np.random.default_rng(0)
    kb = -(-d // block)
    graph_nodes, inits, outs = [], [], []
    for i in range(nodes):
        inits += [nh.from_array(rng.integers(0, 256, (D, kb, block // 2), dtype=np.uint8), f"B{i}"),
                  nh.from_array((0.01 * rng.random(D * kb)).astype(np.float32), f"s{i}"),
                  nh.from_array(rng.integers(0, 256, D * -(-kb // 2), dtype=np.uint8), f"z{i}"),
                  nh.from_array(np.zeros(D, np.float32), f"b{i}")]
        inputs = ["x", f"B{i}", f"s{i}", f"z{i}", *([] if ours else [""]), f"b{i}"]
        graph_nodes.append(helper.make_node(nbits_op.OP_TYPE, inputs, [f"h{i}"],
                                            domain=nbits_op.DOMAIN if ours else nbits_op.CONTRIB_DOMAIN,
                                            K=d, N=D, bits=4, block_size=block, accuracy_level=4))
        outs.append(f"h{i}")
    graph_nodes.append(helper.make_node("Sum", outs, ["y"]))
    graph = helper.make_graph(graph_nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(nbits_op.DOMAIN, 1),
                                                helper.make_opsetid(nbits_op.CONTRIB_DOMAIN, 1)],
                          functions=[nbits_op.nbits_function()] if ours else [])
    m.ir_version = 10
    return m.SerializeToString()


def fold_model(d: int, D: int, nodes: int, block: int, ours: bool) -> bytes:
    """``nodes`` int8 folds x·DequantizeLinear(W_i, s_i) + b_i (random levels and column scales), summed:
    our node (activations in blocks of ``block``) or the standard spelling."""
    rng = np.random.default_rng(0)
    graph_nodes, inits, outs = [], [], []
    for i in range(nodes):
        inits += [nh.from_array(rng.integers(-127, 128, (d, D), dtype=np.int8), f"W{i}"),
                  nh.from_array((0.01 * rng.random(D)).astype(np.float32), f"s{i}"),
                  nh.from_array(np.zeros(D, np.float32), f"b{i}")]
        if ours:
            graph_nodes.append(helper.make_node(dequantize_matmul_op.OP_TYPE, ["x", f"W{i}", f"s{i}", f"b{i}"], [f"h{i}"],
                                                domain=dequantize_matmul_op.DOMAIN, block_size=block))
        else:
            graph_nodes += [helper.make_node("DequantizeLinear", [f"W{i}", f"s{i}"], [f"Wf{i}"], axis=1),
                            helper.make_node("MatMul", ["x", f"Wf{i}"], [f"xW{i}"]),
                            helper.make_node("Add", [f"xW{i}", f"b{i}"], [f"h{i}"])]
        outs.append(f"h{i}")
    graph_nodes.append(helper.make_node("Sum", outs, ["y"]))
    graph = helper.make_graph(graph_nodes, "fold8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(nbits_op.DOMAIN, 1)],
                          functions=[dequantize_matmul_op.function(17)] if ours else [])
    m.ir_version = 10
    return m.SerializeToString()


def time_pair(sessions: dict[str, ort.InferenceSession], feed: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median over rounds of each session's median run time (ms), sessions interleaved round by round."""
    per = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                s.run(None, feed)
                times.append(time.perf_counter() - t0)
            per[k].append(statistics.median(times))
    return {k: 1e3 * statistics.median(v) for k, v in per.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8], help="4: the predictor's product, 8: the fold's")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="dxD (default 384x1536 768x3072 1024x4096; --bits 8: 384x384 768x768 1024x1024)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=THREADS)
    ap.add_argument("--block", type=int, default=128, choices=[16, 32, 64, 128])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--name", default=None, help="output file stem (default nbits, --bits 8: nbits8)")
    args = ap.parse_args()
    eight = args.bits == 8
    sizes = args.sizes or ([f"{d}x{d}" for d in (384, 768, 1024)] if eight else ["384x1536", "768x3072", "1024x4096"])
    name = args.name or ("nbits8" if eight else "nbits")
    make = fold_model if eight else model
    runtime.session_options(require=True)  # fail early when the library is missing
    records = []
    for d, D in parse_sizes(sizes):
        protos = {"contrib": make(d, D, args.nodes, args.block, False), "ours": make(d, D, args.nodes, args.block, True)}
        for threads in args.threads:
            sessions = {}
            for k, proto in protos.items():
                so = benchmark.timing_options(threads)
                if k == "ours":
                    runtime.session_options(so, require=True)
                sessions[k] = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
            for tokens in args.tokens:
                feed = {"x": np.random.default_rng(tokens).standard_normal((tokens, d)).astype(np.float32)}
                ms = time_pair(sessions, feed, args.rounds, 20 if tokens == 1 else 5)
                rec = {"d": d, "D": D, "block": args.block, "threads": threads, "tokens": tokens,
                       "contrib_us": round(1e3 * ms["contrib"] / args.nodes, 1),
                       "ours_us": round(1e3 * ms["ours"] / args.nodes, 1)}
                rec["speedup"] = round(rec["contrib_us"] / rec["ours_us"], 2)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    title = ("int8 fold: DequantizeLinear → MatMul → Add (ONNX Runtime: 8-bit MatMulNBits) vs "
             "ai.tardis::DequantizeMatMul" if eight else
             "int4 predictor product: com.microsoft::MatMulNBits vs ai.tardis::MatMulNBits")
    lines = [f"# {title}",
             "",
             f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, {args.nodes} nodes per "
             f"model (weights rotating), blocks of {args.block}, µs per node (median of {args.rounds} interleaved "
             f"rounds); {time.strftime('%Y-%m-%d')}.",
             "",
             "| d×D | threads | tokens | contrib µs | ours µs | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['d']}×{r['D']} | {r['threads']} | {r['tokens']} | {r['contrib_us']} | {r['ours_us']} | "
              f"**{r['speedup']:.2f}×** |" for r in records]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"onnxruntime": ort.__version__, "bits": args.bits,
                                                     "records": records}, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
