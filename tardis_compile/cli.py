"""``tardis-compile`` command line: optimize, inspect, verify, bench, demo, prune (baseline), library.

Every user error (bad file, no foldable block, wrong calibration data, output = input) is printed as one
``error:`` line with exit status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from tardis_compile import api, modelio, runtime
from tardis_compile import predictor as predictors
from tardis_compile.errors import AlreadyOptimizedError, TardisError
from tardis_compile.verify import Thresholds


# More intra-op threads than this is a typo, not a setting (ORT would start them all).
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: at least {low}"
                                             + (f", at most {high}" if high is not None else ""))
        return value
    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) for text data")
    p.add_argument("--batch-size", type=_int_in(1), default=8, help="documents per batch for text data (default 8)")
    p.add_argument("--max-length", type=_int_in(1), default=128, help="tokens per document for text data (default 128)")
    p.add_argument("--mask-input", help="input holding the attention mask (default: any '*attention_mask*')")
    p.add_argument("--threads", type=_int_in(0, MAX_THREADS), default=0,
                   help="ONNX Runtime intra-op threads (0 = all cores)")


def _threshold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-abs-error", type=float, help="fail if any output differs by more than this")
    p.add_argument("--min-cosine", type=float, help="fail if the mean output cosine is below this")


def _data_options(args: argparse.Namespace) -> api.DataOptions:
    return api.DataOptions(args.tokenizer, args.batch_size, args.max_length, args.mask_input)


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(max_abs_error=args.max_abs_error, min_cosine=args.min_cosine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tardis-compile", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=api.version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="rewrite every GELU FFN block into folded linear + guarded fallback")
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, help="output ONNX model")
    p.add_argument("--calib", required=True,
                   help="calibration data: FEEDS.npz (or a folder of them), SCRIPT.py with load_data(), or TEXT")
    p.add_argument("--eval", dest="eval_data", help="evaluation data (default: hold out every 10th batch)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-fallback", type=float,
                        help="mean share of token-neuron pairs taking the exact fallback "
                             f"(default {api.DEFAULT_TARGET_FALLBACK})")
    target.add_argument("--coverage", type=float, help="paper's strategy: each neuron's range covers this share")
    target.add_argument("--max-error", type=float,
                        help="largest relative output error any block may add on its own input (e.g. 0.05); "
                             "sets the fallback rate")
    target.add_argument("--target-params", type=float,
                        help="share of the FFN parameters touched per token (folded matrix + predictor + "
                             "fallback rows); sets the fallback rate")
    p.add_argument("--resident", type=float,
                   help="share of the FFN parameters kept in the file; neurons left out are always linear")
    p.add_argument("--strategy", choices=["error", "coverage"],
                   help="range strategy: error-aware under one budget (default) or shortest-interval coverage "
                        "(the default with --coverage)")
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares refit of the folded matrix")
    p.add_argument("--predictor", choices=list(predictors.CHOICES), default=api.Settings.predictor,
                   help=f"online predictor of out-of-range neurons (default: {api.Settings.predictor} = int8 "
                        "for float32 blocks, int4 otherwise)")
    p.add_argument("--predictor-recall", type=float, default=api.Settings.predictor_recall,
                   help="calibrated share of out-of-range pairs the predictor must flag; sets its safety "
                        f"margins (default {api.Settings.predictor_recall})")
    p.add_argument("--predictor-quantizer", choices=["gptq", "rtn"],
                   help="int4/int2 predictors: GPTQ with the calibration inputs (default) or round-to-nearest")
    p.add_argument("--predictor-rank", type=_int_in(1), help="lowrank predictor: fixed rank (default: per layer)")
    p.add_argument("--predictor-block", type=int, choices=[16, 32, 64, 128], default=api.Settings.predictor_block,
                   help="int4/int2 predictors: weights per quantization block (larger: smaller predictor, "
                        "more flags; default 32; 128 is the faster decode choice)")
    p.add_argument("--fold-bits", type=int, choices=[8],
                   help="store the folded matrix as int8 with a scale per output column (counts a quarter of a "
                        "float32 W_f; leaves room for a predictor at an 87.5%% cut)")
    p.add_argument("--fold-activations", choices=list(api.FOLD_ACTIVATIONS), default="float",
                   help="with --fold-bits 8: int8 also rounds the fold's input to uint8 per call (ONNX Runtime's "
                        "DynamicQuantizeMatMul on MLAS's integer GEMM; fast on every version; float32 models)")
    p.add_argument("--flag-all", action="store_true",
                   help="self-test: every neuron takes the exact fallback; the output must equal the original")
    p.add_argument("--stats-out", help="save calibration statistics (.npz) for reuse or merging")
    p.add_argument("--stats-in", help="reuse saved calibration statistics instead of pass 1")
    p.add_argument("--external-data", choices=["auto", "on", "off"], default="auto",
                   help="write weights to <output>.data (auto: on when the input has external data or the "
                        "weights exceed ~1.8 GB)")
    p.add_argument("--report", help="report path stem (default: <output stem>.report.{json,md})")
    _data_args(p)
    _threshold_args(p)

    p = sub.add_parser("inspect", help="list foldable blocks and why other candidates were rejected")
    p.add_argument("model")
    p.add_argument("--explain", metavar="NODE",
                   help="show how far the matcher got for the candidate containing this node (or tensor)")

    p = sub.add_parser("verify", help="compare an optimized model with its original on data")
    p.add_argument("original")
    p.add_argument("optimized")
    p.add_argument("--data", required=True, help="FEEDS.npz, folder, SCRIPT.py or TEXT (as --calib)")
    p.add_argument("--use-library", action="store_true", help="run the optimized model with libtardis_ops")
    _data_args(p)
    _threshold_args(p)

    p = sub.add_parser("prune", help="baseline: prune the FFN weights with Wanda or RIA at a parameter budget")
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, help="output ONNX model")
    p.add_argument("--calib", required=True, help="calibration data (as for optimize)")
    p.add_argument("--method", choices=["wanda", "ria"], default="wanda", help="pruning score (default wanda)")
    p.add_argument("--sparsity", type=float, help="share of W1+W2 weights removed per output neuron "
                   "(default 0.5; 2:4 is fixed at 0.5)")
    p.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured",
                   help="which weights go: the lowest scores of each output neuron (default) or the 2 lowest of "
                        "every 4 consecutive input weights (2:4)")
    p.add_argument("--one-shot", action="store_true",
                   help="all blocks' statistics from the original model in one pass (default: sequential, "
                        "as the papers' code does)")
    _data_args(p)

    p = sub.add_parser("bench", help="time an optimized model against its original in ONNX Runtime "
                       "(interleaved rounds, medians, speed-ups; optional per-node profile)")
    p.add_argument("original")
    p.add_argument("optimized")
    p.add_argument("--data", help="FEEDS.npz, folder, SCRIPT.py or TEXT (as --calib); its first --max-batches feeds")
    p.add_argument("--shape", action="append", default=[],
                   help="synthetic feeds from the model's inputs with these symbolic dims, e.g. "
                        "batch=8,sequence=128 (repeatable: one case each)")
    p.add_argument("--threads", dest="thread_list", default="1,2",
                   help="thread counts (default 1,2); intra-op workers stop spinning after each run, so the two "
                        "interleaved sessions do not take each other's cores")
    p.add_argument("--rounds", type=_int_in(1), default=10, help="interleaved rounds per case (default 10)")
    p.add_argument("--min-seconds", type=_seconds, default=1.0,
                   help="... and more rounds until each case has run this long (default 1; short cases "
                        "need many rounds for a stable median)")
    p.add_argument("--warmup", type=_int_in(0), default=2, help="warm-up runs per model (default 2)")
    p.add_argument("--max-batches", type=_int_in(1), default=4, help="feeds taken from --data per round (default 4)")
    p.add_argument("--int-high", type=_int_in(1), default=100, help="synthetic token ids are drawn from [0, this)")
    p.add_argument("--opt-level", choices=["disable", "basic", "extended", "all"], default="all",
                   help="ORT graph optimization level for both models (default all)")
    p.add_argument("--no-library", action="store_true",
                   help="run the optimized model without libtardis_ops (its ONNX function body)")
    p.add_argument("--profile", action="store_true", help="also profile both models per node (ORT profiling)")
    p.add_argument("--json", dest="json_out", help="write all results (rounds, profile) to this JSON file")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) for text data")
    p.add_argument("--batch-size", type=_int_in(1), default=8, help="documents per batch for text data (default 8)")
    p.add_argument("--max-length", type=_int_in(1), default=128, help="tokens per document for text data (default 128)")
    p.add_argument("--mask-input", help="input holding the attention mask (default: any '*attention_mask*')")

    p = sub.add_parser("library", help="print the path of the compiled op library (libtardis_ops) in use")
    p.add_argument("--build", action="store_true", help="build it into the user cache when missing")
    p.add_argument("--force", action="store_true", help="rebuild even when a fresh library exists")

    p = sub.add_parser("demo", help="the main job on the bundled default: all-MiniLM-L6-v2 on BBC News text")
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--target-fallback", type=float, default=api.DEFAULT_TARGET_FALLBACK,
                   help="mean share of token-neuron pairs taking the exact fallback "
                        f"(default {api.DEFAULT_TARGET_FALLBACK})")
    return parser


def _optimize(args: argparse.Namespace) -> int:
    settings = api.Settings(target_fallback=args.target_fallback, coverage=args.coverage,
                            strategy=args.strategy, refit=not args.no_refit, predictor=args.predictor,
                            predictor_recall=args.predictor_recall, predictor_quantizer=args.predictor_quantizer,
                            predictor_rank=args.predictor_rank, predictor_block=args.predictor_block,
                            target_params=args.target_params, max_error=args.max_error, fold_bits=args.fold_bits,
                            fold_activations=args.fold_activations,
                            resident=args.resident, flag_all=args.flag_all)
    external = {"auto": None, "on": True, "off": False}[args.external_data]
    report = api.optimize(args.model, args.output, args.calib, settings=settings, data=_data_options(args),
                          eval_data=args.eval_data, thresholds=_thresholds(args), stats_out=args.stats_out,
                          stats_in=args.stats_in, external_data=external, report_path=args.report,
                          threads=args.threads)
    print(report.markdown())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.explain is not None:
        from tardis_compile import modelio
        from tardis_compile.passes.explain import explain

        print("\n".join(explain(modelio.load(args.model), args.explain).lines()))
        return 0
    blocks, rejected = api.inspect(args.model)
    print(f"{len(blocks)} foldable block(s) in {args.model}")
    for b in blocks:
        print(f"  {b.name}: {b.spelling}  d={b.d} D={b.hidden} d_out={b.d_out}  in='{b.x.name}' out='{b.y.name}'")
    print(f"{len(rejected)} candidate(s) left alone")
    for r in rejected:
        print(f"  {r.anchor} ({r.op_type}, failed at {r.stage}): {r.reason}")
    done = api.rewritten(args.model)
    if done:
        print(f"{len(done)} block(s) already rewritten by tardis-compile")
    for name, meta in done:
        fields = ("predictor", "predictor_margin_z", "predictor_calibrated_recall",
                  "predictor_calibrated_flagged_share", "calibrated_fallback_rate", "resident_neurons", "fold_bits",
                  "fold_activations")
        print(f"  {name}: " + "  ".join(f"{f}={meta[f'tardis.{f}']}" for f in fields if f"tardis.{f}" in meta))
    return 0


def _note_not_optimized(path: str) -> None:
    """verify / bench were given a second model without rewritten blocks: most likely swapped arguments."""
    print(f"note: '{path}' has no rewritten block (is it the optimized model?)", file=sys.stderr)


def _verify(args: argparse.Namespace) -> int:
    result = api.verify(args.original, args.optimized, args.data, data_options=_data_options(args),
                        thresholds=_thresholds(args), threads=args.threads, use_library=args.use_library)
    print("| output | max abs error | mean cosine | min cosine | rel. error |")
    print("|---|---|---|---|---|")
    for o in result.outputs:
        print(f"| {o.name} | {o.max_abs_error:.3g} | {o.mean_cosine:.5f} | {o.min_cosine:.5f} | {o.relative_error:.3g} |")
    print("| block | coverage | fallback | recall | precision | rel. error |")
    print("|---|---|---|---|---|---|")
    for b in result.blocks:
        print(f"| {b.name} | {b.coverage:.1%} | {b.fallback_rate:.1%} | {b.recall:.3f} | {b.precision:.3f} | "
              f"{b.relative_error:.2e} |")
    if not result.blocks:  # the second model has no rewritten block: swapped arguments, or not optimized
        if api.rewritten(args.original):
            print(f"note: the arguments look swapped: '{args.original}' has rewritten blocks and "
                  f"'{args.optimized}' none (verify ORIGINAL OPTIMIZED)", file=sys.stderr)
        else:
            _note_not_optimized(args.optimized)
    if not result.passed:
        print("error: verification failed: " + "; ".join(result.failures), file=sys.stderr)
        return 1
    return 0


def _prune(args: argparse.Namespace) -> int:
    from tardis_compile import baselines

    sparsity = args.sparsity if args.sparsity is not None else 0.5
    report = baselines.prune(args.model, args.output, args.calib, method=args.method, sparsity=sparsity,
                             pattern=args.pattern, data=_data_options(args), sequential=not args.one_shot,
                             threads=args.threads)
    s = report.summary()
    print(f"{args.method} {args.pattern}: FFN parameter reduction {s['ffn_param_reduction']:.1%} "
          f"over {s['blocks_pruned']} block(s), {report.calibration_tokens:,} calibration tokens; "
          f"wrote {args.output}")
    print(report.table())
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from tardis_compile import benchmark

    try:
        threads = [int(t) for t in args.thread_list.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1 or max(threads) > MAX_THREADS:
        raise TardisError(f"--threads: '{args.thread_list}' is not a list of integers in [1, {MAX_THREADS}] "
                          "(e.g. 1,2)")
    data_options = _data_options(args)
    if args.json_out:
        modelio.check_destination(args.original, Path(args.json_out), what="--json path",
                                  reads={"the optimized model": args.optimized, "the benchmark data": args.data,
                                         "the tokenizer": data_options.tokenizer_file()})
        modelio.check_destination(args.optimized, Path(args.json_out), what="--json path")
    modelio.check(args.original)
    if not api.rewritten(args.optimized):
        _note_not_optimized(args.optimized)
    sets = benchmark.load_feed_sets(args.original, data=args.data, data_options=data_options,
                                    shapes=args.shape, max_batches=args.max_batches, int_high=args.int_high)
    header_shown = False

    def progress(row: str) -> None:  # each case's row on stderr as it finishes, under the header
        nonlocal header_shown
        if not header_shown:
            print(benchmark.TABLE_HEADER, file=sys.stderr)
            header_shown = True
        print(row, file=sys.stderr, flush=True)

    result = benchmark.bench(args.original, args.optimized, sets, threads=threads, warmup=args.warmup,
                             rounds=args.rounds, min_seconds=args.min_seconds, opt_level=args.opt_level,
                             library=not args.no_library,
                             profile_runs=10 if args.profile else 0, log=progress)
    print(result.markdown())  # the whole table once on stdout
    if args.json_out:
        modelio.write_text(Path(args.json_out), json.dumps(result.to_json(), indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tardis_compile.demo import run_demo

    run_demo(Path(args.out), target_fallback=args.target_fallback)
    return 0


def _library(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return runtime.describe(build=args.build, force=args.force)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so staging folders are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"optimize": _optimize, "inspect": _inspect, "verify": _verify, "demo": _demo, "bench": _bench,
                "prune": _prune, "library": _library}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handlers[args.command](args)
    except AlreadyOptimizedError as err:  # running the pass on its own output is not a mistake
        print(f"note: {err}", file=sys.stderr)
        return 0
    except (TardisError, runtime.LibraryUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (e.g. `| head`)
        sys.stderr.close()
        return 141
    except OSError as err:  # a file system refusal the checks up front did not foresee
        print(f"error: {err.strerror or err}" + (f": '{err.filename}'" if err.filename else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
