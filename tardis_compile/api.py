"""Python API: ``optimize``, ``verify``, ``inspect`` — the pipeline of DESIGN.md in one place.

    load ─► find blocks ─► calibrate (stream) ─► fit ranges + lines ─► fold (+ refit pass)
        ─► rewrite ─► validate + verify on held-out data ─► write atomically ─► report
"""

from __future__ import annotations

import dataclasses
import os
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tardis_compile import budget, error_target, fallback_op, feeds, fit, histogram, modelio, plots, resident
from tardis_compile import predictor as predictors
from tardis_compile.calibrate import BlockWeights, collect_stats, stream_block_inputs, weights_digest
from tardis_compile.errors import AlreadyOptimizedError, CalibrationDataError, NoFoldableBlockError, TardisError
from tardis_compile.fold import fold
from tardis_compile.passes.ffn_match import FfnBlock, Rejection, count_rewritten, find_foldable
from tardis_compile.passes.ffn_rewrite import FoldedBlock, rewrite
from tardis_compile.progress import Progress
from tardis_compile.refit import DEFAULT_RIDGE, NormalEquations
from tardis_compile.report import Report, block_report
from tardis_compile.verify import Thresholds, Verification, compare

DataSpec = (str | os.PathLike | Callable[[], Iterable[Mapping[str, np.ndarray]]] | list | tuple
            | Mapping[str, np.ndarray])


def version() -> str:
    """The installed tardis-compile version ("0+unknown" when run from sources that were never installed)."""
    try:
        return metadata.version("tardis-compile")
    except metadata.PackageNotFoundError:
        return "0+unknown"


DEFAULT_TARGET_FALLBACK = 0.1  # METHOD.md §5: the default target, a 10% fallback rate
RATE_SETTERS = ("coverage", "target_params", "max_error")  # budgets that replace the fallback-rate target
FOLD_ACTIVATIONS = ("float", "int8")  # what the folded product multiplies: x as given, or x rounded to uint8


@dataclasses.dataclass
class Settings:
    """How to fit. ``coverage`` selects the paper's strategy; otherwise ``target_fallback`` (default 0.1)
    drives ours, unless ``target_params`` or ``max_error`` sets the fallback rate. One budget at a time: a
    combination in which one would be ignored is refused. Fields hold what was asked (None: the default);
    :attr:`fit_strategy`, :attr:`fallback_target` and :meth:`effective` resolve the defaults, so
    ``dataclasses.replace`` sees the request, not a resolved default."""

    target_fallback: float | None = None  # None: DEFAULT_TARGET_FALLBACK unless another budget is given
    coverage: float | None = None
    strategy: str | None = None  # None: "coverage" with ``coverage``, else "error"
    refit: bool = True
    ridge: float = DEFAULT_RIDGE
    predictor: str = "auto"  # int8 for float32 blocks, else int4: README "Predictors" has the measurements
    # calibrated share of out-of-range pairs the predictor must flag. Not higher by default: a missed pair lies
    # just outside its range, where the line is nearly right, while every extra flag spends fallback
    # budget (MiniLM, int4, 10% flagged: cosine 0.9784 at 0.995, 0.9790 at 0.99, 0.9797 at 0.98, 0.9804 at 0.95)
    predictor_recall: float = 0.95
    predictor_quantizer: str | None = None  # int4/int2: gptq (None means it) or rtn
    predictor_rank: int | None = None  # lowrank: fixed rank (default: chosen per layer)
    predictor_block: int | None = None  # int4/int2: weights per block along d (None: 32, halved below d)
    target_params: float | None = None  # share of the FFN parameters touched per token (sets the fallback rate)
    max_error: float | None = None  # worst block's own relative output error (sets the fallback rate)
    resident: float | None = None  # share of the FFN parameters kept resident (the rest: always linear)
    fold_bits: int | None = None  # 8: store W_f as int8 with a scale per output column (None: model dtype)
    # int8 (with fold_bits 8): the fold also rounds its input to uint8 per call (DynamicQuantizeMatMul, MLAS's
    # integer GEMM): whole blocks 1.1-1.3x faster at 128 tokens (README "Block-level speed"); float32 only
    fold_activations: str = "float"
    flag_all: bool = False  # self-test: every neuron takes the exact fallback (output = original)

    def __post_init__(self) -> None:
        self._check_one_target()
        if self.strategy is not None and self.strategy not in fit.STRATEGIES:
            raise TardisError(f"unknown strategy {self.strategy!r}; choose one of {fit.STRATEGIES}")
        if self.target_fallback is not None and not 0.0 <= self.target_fallback <= 1.0:
            raise TardisError(f"--target-fallback must be within [0, 1], got {self.target_fallback}")
        if self.coverage is not None and not 0.0 <= self.coverage <= 1.0:
            raise TardisError(f"--coverage must be within [0, 1], got {self.coverage}")
        for name in ("target_params", "resident", "max_error"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise TardisError(f"--{name.replace('_', '-')} must be within (0, 1], got {value}")
        if self.fold_bits not in (None, 8):
            raise TardisError(f"--fold-bits must be 8 (or unset: the model's dtype), got {self.fold_bits}")
        if self.fold_activations not in FOLD_ACTIVATIONS:
            raise TardisError(f"--fold-activations must be one of {', '.join(FOLD_ACTIVATIONS)}, "
                              f"got {self.fold_activations!r}")
        if self.fold_activations == "int8" and self.fold_bits != 8:
            raise TardisError("--fold-activations int8 multiplies int8 activations by an int8 folded matrix: "
                              "add --fold-bits 8")
        if self.fold_bits is not None and self.flag_all:
            raise TardisError("--flag-all checks exactness, which a quantized folded matrix gives up: drop --fold-bits")
        if self.resident is not None and (self.fit_strategy != "error" or self.flag_all):
            raise TardisError("--resident works with the error-aware strategy and without --flag-all")
        if self.predictor not in predictors.CHOICES:
            raise TardisError(f"unknown predictor {self.predictor!r}; available: {', '.join(predictors.CHOICES)}")
        if self.predictor == "lowrank" and (self.target_params is not None or self.resident is not None):
            raise TardisError("--target-params and --resident budget the predictor neuron by neuron, and the "
                              "lowrank predictor's first factor is shared by all neurons of a layer: choose "
                              "exact, int8, int4 or int2 with them")
        self.predictor_options()

    @property
    def fit_strategy(self) -> str:
        """The range strategy that runs: the one asked for, else coverage with ``coverage``, else error."""
        return self.strategy or ("coverage" if self.coverage is not None else "error")

    @property
    def fallback_target(self) -> float:
        """The fallback-rate target (``target_fallback``, or the default 0.1)."""
        return DEFAULT_TARGET_FALLBACK if self.target_fallback is None else self.target_fallback

    def effective(self) -> dict:
        """The settings with their defaults resolved (what the report and the model's metadata record):
        ``target_fallback`` is None when another budget sets the rate (the report adds the solved rate)."""
        return {**dataclasses.asdict(self), "strategy": self.fit_strategy,
                "target_fallback": None if self._rate_setters() else self.fallback_target,
                "predictor_quantizer": self.predictor_quantizer or "gptq"}

    def _rate_setters(self) -> list[str]:
        """The budgets given that replace the fallback-rate target."""
        return [name for name in RATE_SETTERS if getattr(self, name) is not None]

    def _check_one_target(self) -> None:
        """Refuse options that another one would silently override (README: an option never silently
        does nothing)."""
        names = (["target_fallback"] if self.target_fallback is not None else []) + self._rate_setters()
        given = [f"--{name.replace('_', '-')}" for name in names]
        if len(given) > 1:
            raise TardisError(f"{' and '.join(given)} each set the ranges' budget: give one of them")
        if self.coverage is not None and self.strategy == "error":
            raise TardisError("--coverage is the coverage strategy's target; the error-aware strategy takes "
                              "--target-fallback, --target-params or --max-error")
        if self.flag_all and given:
            raise TardisError(f"--flag-all sends every neuron to the exact fallback, so {' / '.join(given)} "
                              "would change nothing: drop it")

    def predictor_options(self) -> predictors.PredictorOptions:
        return predictors.PredictorOptions(recall=self.predictor_recall, quantizer=self.predictor_quantizer,
                                           rank=self.predictor_rank, block_size=self.predictor_block)


@dataclasses.dataclass
class DataOptions:
    """How to turn a data spec into feeds."""

    tokenizer: str | os.PathLike | None = None
    batch_size: int = 8
    max_length: int = 128
    mask_input: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise CalibrationDataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def tokenizer_file(self) -> Path | None:
        """The ``tokenizer.json`` that ``tokenizer`` names (itself, or the one in that folder)."""
        if self.tokenizer is None:
            return None
        tok = Path(self.tokenizer)
        return tok / "tokenizer.json" if tok.is_dir() else tok


def open_data(spec: DataSpec, input_names: list[str], options: DataOptions) -> feeds.FeedSource:
    """A feed source from a path (``.npz``/folder, ``.py`` with ``load_data()``, text), a callable, a list
    or tuple of feed dicts, or one feed dict. A ``mask_input`` that is not an input is refused here (every
    command opens its data through this)."""
    if options.mask_input is not None and options.mask_input not in input_names:
        raise CalibrationDataError(f"--mask-input '{options.mask_input}' is not an input of the model (inputs: "
                                   f"{input_names})")
    if callable(spec):
        return feeds.from_callable(spec, "calibration data: the callable", "the callable")
    if isinstance(spec, Mapping):
        return lambda: iter([spec])
    if isinstance(spec, (list, tuple)):
        return lambda: iter(spec)
    if not isinstance(spec, (str, os.PathLike)):
        kind = "a generator or iterator" if isinstance(spec, Iterator) else f"a {type(spec).__name__}"
        raise CalibrationDataError(
            f"calibration data: {kind} is not a data source; pass a path, a list of feed dicts (input name "
            "→ array), or a callable returning a fresh iterable of them (the data are read more than once, "
            "so a generator must be wrapped: lambda: my_generator())")
    path = Path(spec)
    if not path.exists():
        raise CalibrationDataError(f"calibration data '{path}': no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".npz":
        return feeds.from_npz(path)
    if suffix == ".py":
        return feeds.from_script(path)
    if suffix in (".npy", ".onnx", ".pb", ".pt", ".bin", ".safetensors"):
        raise CalibrationDataError(f"calibration data '{path}': a {suffix} file is not a data source; give a "
                                   ".npz of feed dicts (input name → array), a folder of them, a .py with "
                                   "load_data(), or a text file with --tokenizer")
    if "input_ids" not in input_names:
        raise CalibrationDataError(f"calibration data '{path}' is read as text, but the model takes no token ids "
                                   f"(its inputs: {input_names}); give a .npz of feed dicts, a folder of them, or "
                                   "a .py with load_data()")
    if options.tokenizer is None:
        raise CalibrationDataError(f"calibration data '{path}' is text: pass --tokenizer (a tokenizer.json or "
                                   "a folder holding one) to tokenize it")
    tok = options.tokenizer_file()
    if not tok.is_file():
        raise CalibrationDataError(f"tokenizer '{tok}' not found")
    return feeds.from_text(feeds.read_documents(path), tok, input_names, batch_size=options.batch_size,
                           max_length=options.max_length, mask_input=options.mask_input)


def _fed_inputs(model: ir.Model) -> list[ir.Value]:
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


def _input_names(model: ir.Model) -> list[str]:
    return [v.name for v in _fed_inputs(model)]


def _input_specs(model: ir.Model) -> list[feeds.InputSpec]:
    """The model's inputs as :func:`feeds.input_specs` describes a session's (without building one)."""
    return [feeds.InputSpec(v.name, v.dtype.numpy().type if v.dtype is not None else object,
                            [d if isinstance(d, int) else d.value for d in (v.shape.dims if v.shape else ())])
            for v in _fed_inputs(model)]


def inspect(model_path: str | os.PathLike) -> tuple[list[FfnBlock], list[Rejection]]:
    """Blocks the pass would rewrite, and every rejected candidate with its reason."""
    return find_foldable(modelio.load(model_path))


def rewritten(model_path: str | os.PathLike) -> list[tuple[str, dict[str, str]]]:
    """Blocks a previous run rewrote: each ``GuardedFallback`` node's name and provenance metadata
    (predictor, margins, calibrated recall and flagged share, coverage, resident neurons)."""
    model = modelio.load(model_path)
    return [(node.name, dict(node.metadata_props)) for node in fallback_op.fallback_nodes(model.graph)]


def _require_blocks(model_path: Path, blocks: list[FfnBlock], rejected: list[Rejection], rewritten: int = 0) -> None:
    if blocks:
        return
    if rewritten:
        others = (f"; {len(rejected)} other candidate(s) left alone — "
                  + "; ".join(f"{r.anchor}: {r.reason}" for r in rejected[:5])) if rejected else ""
        raise AlreadyOptimizedError(f"nothing to do: '{model_path}' is already optimized by tardis-compile "
                                    f"({rewritten} block(s) rewritten into {fallback_op.DOMAIN} fallback ops) and "
                                    f"has no other foldable block{others}; nothing was written")
    if not rejected:
        raise NoFoldableBlockError(f"no foldable block in '{model_path}': the model has no GELU-like "
                                   "activation between two Linear layers")
    reasons = "; ".join(f"{r.anchor}: {r.reason}" for r in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    raise NoFoldableBlockError(f"no foldable block in '{model_path}': {len(rejected)} candidate(s) rejected — "
                               f"{reasons}{more}")


def _fit_lines(stats: dict[str, histogram.NeuronStats], blocks: list[FfnBlock], w2n: dict[str, np.ndarray],
               settings: Settings, rate: float) -> dict[str, fit.Lines]:
    """Ranges and lines for fallback rate ``rate`` (``w2n``: squared norms of each block's W2 rows)."""
    if settings.fit_strategy == "coverage":
        coverage = settings.coverage if settings.coverage is not None else 1.0 - rate
        lines = {b.name: fit.coverage_lines(stats[b.name], coverage) for b in blocks}
    else:
        lines, _ = fit.error_aware_lines(stats, w2n, rate)
    if settings.flag_all:  # keep the fitted lines (a real fold), but every neuron takes the fallback
        for value in lines.values():
            value.lo[:], value.hi[:] = np.inf, -np.inf
    return lines


def _second_pass(model: ir.Model, blocks: list[FfnBlock], source: feeds.FeedSource, lines: dict[str, fit.Lines],
                 folds: dict[str, tuple[np.ndarray, np.ndarray]], built: dict[str, predictors.Built],
                 settings: Settings, data: DataOptions, progress: Callable[[str], Progress],
                 threads: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, predictors.Margin]]:
    """Pass 2 over the calibration data, only for what needs it: the ridge refit of ``W_f, b_f``
    (METHOD.md §2) and, for inexact predictors, the margin search that meets the recall target."""
    refit = settings.refit and not settings.flag_all
    searches = {b.name: predictors.MarginSearch(_columns(lines[b.name], built[b.name]), built[b.name].sigma)
                for b in blocks
                if not settings.flag_all and np.any(built[b.name].sigma > 0)}
    no_margin = predictors.Margin(0.0, 1.0, float("nan"), float("nan"))
    if not refit and not searches:
        return folds, {b.name: no_margin for b in blocks}
    eqs = {b.name: NormalEquations(b.d, b.d_out) for b in blocks} if refit else {}
    weights = BlockWeights(blocks)
    w2 = {b.name: np.asarray(b.w2(), np.float32) for b in blocks}  # the model's own array when float32
    b2 = {b.name: b.b2() for b in blocks}
    variant = {b.name: b.variant for b in blocks}
    bar = progress("calibrate: " + " + ".join(["refit"] * refit + ["predictor margins"] * bool(searches)))
    for batch in stream_block_inputs(model, blocks, source, what="calibration data", mask_input=data.mask_input,
                                     threads=threads, progress=bar):
        for name, x in batch.items():
            h = weights.pre_activation(name, x).astype(np.float64)
            if refit:
                eqs[name].add(x, h, w2[name], b2[name], lines[name], variant[name])
            if name in searches:
                searches[name].add(built[name].columns(h), built[name].predictor.estimate(x))
    bar.done()
    if refit:
        folds = {name: eqs[name].solve(*folds[name], ridge=settings.ridge) for name in folds}
    margins = {b.name: searches[b.name].choose(settings.predictor_recall) if b.name in searches else no_margin
               for b in blocks}
    return folds, margins


def _plan_at(stats: dict[str, histogram.NeuronStats], blocks: list[FfnBlock], settings: Settings,
             w2n: dict[str, np.ndarray], full: dict[str, fit.Lines] | None, rate: float,
             scale: float = 1.0) -> tuple[dict[str, fit.Lines], dict[str, np.ndarray | None], float]:
    """Lines and resident neurons per block (None: all resident) for flagged share ``rate``, and the rate
    they carry (``--target-params`` re-solves it once the predictor covers only the resident neurons).
    The ranges hold ``scale·rate`` of the pairs out of range (the predictor flags a few more); ``full``:
    each block's full-range lines (needed with ``--resident`` only)."""
    lines = _fit_lines(stats, blocks, w2n, settings, rate * scale)
    if settings.resident is None:
        return lines, {b.name: None for b in blocks}, rate
    options = settings.predictor_options()
    neurons = resident.select(stats, lines, full, w2n, budget.folded(blocks, settings.fold_bits),
                              budget.per_neuron(blocks, settings.predictor, options),
                              settings.resident * budget.original(blocks))
    if settings.target_params is not None:
        rate = budget.fallback_for_params(blocks, settings.target_params, settings.predictor, options,
                                          {n: len(idx) for n, idx in neurons.items()}, settings.fold_bits)
    return resident.lines(stats, full, w2n, neurons, rate * scale), neurons, rate


def _rate_targeted(settings: Settings) -> bool:
    """Whether the user fixed the flagged share (directly or through --target-params)."""
    return settings.max_error is None and settings.coverage is None and not settings.flag_all


def _flagged_share(blocks: list[FfnBlock], lines: dict[str, fit.Lines], built: dict[str, predictors.Built],
                   margins: dict[str, predictors.Margin]) -> float | None:
    """Calibrated share of *all* token-neuron pairs the predictors flag (None: exact predictors only)."""
    if not any(np.isfinite(m.flagged_share) for m in margins.values()):
        return None
    flagged = 0.0
    for b in blocks:
        m, kept = margins[b.name], built[b.name].neurons
        if np.isfinite(m.flagged_share):  # over the predicted (resident) neurons' pairs
            flagged += m.flagged_share * (b.hidden if kept is None else len(kept))
        else:  # exact: flags exactly the out-of-range pairs
            flagged += float(np.sum(1.0 - lines[b.name].coverage))
    return flagged / sum(b.hidden for b in blocks)


def _row_norms2(block: FfnBlock) -> np.ndarray:
    """Squared norms of W2's rows, without keeping W2's pages resident afterwards."""
    w2 = block.w2()
    norms = np.einsum("ij,ij->i", w2, w2, dtype=np.float64)
    modelio.drop_pages(w2)
    return norms


def _check_fold_dtypes(settings: Settings, blocks: list[FfnBlock]) -> None:
    """``--fold-activations int8`` runs ONNX Runtime's DynamicQuantizeMatMul, which takes float32 only:
    refused before calibration for other blocks."""
    other = sorted({b.dtype.numpy().name for b in blocks} - {"float32"})
    if settings.fold_activations == "int8" and other:
        raise TardisError(f"--fold-activations int8 runs ONNX Runtime's DynamicQuantizeMatMul, which takes float32 "
                          f"activations; this model's blocks are {', '.join(other)}: drop --fold-activations")


def _plan(stats: dict[str, histogram.NeuronStats], blocks: list[FfnBlock], settings: Settings,
          probe: Callable[[Callable[[float], dict[str, fit.Lines]], tuple[float, ...]], error_target.ErrorCurve]
          | None = None, scale: float = 1.0,
          ) -> tuple[dict[str, fit.Lines], dict[str, np.ndarray | None], float, error_target.ErrorCurve | None]:
    """Lines, resident neurons and fallback rate from the user's target: a fallback rate, parameters
    touched per token, or a maximum block error (``probe`` measures the error curve of a plan); ``scale``
    as in :func:`_plan_at`."""
    rate = settings.fallback_target
    if settings.target_params is not None:
        rate = budget.fallback_for_params(blocks, settings.target_params, settings.predictor,
                                          settings.predictor_options(), fold_bits=settings.fold_bits)
    w2n = {b.name: _row_norms2(b) for b in blocks}
    full = None if settings.resident is None else {b.name: fit.full_range_lines(stats[b.name]) for b in blocks}
    curve = None
    if settings.max_error is not None:
        rate, curve = error_target.solve(
            lambda rates: probe(lambda r: _plan_at(stats, blocks, settings, w2n, full, r)[0], rates),
            settings.max_error)
    return (*_plan_at(stats, blocks, settings, w2n, full, rate, scale), curve)


def _columns(lines: fit.Lines, built: predictors.Built) -> fit.Lines:
    """The lines of the neurons a predictor covers."""
    return fit.Lines(*(built.columns(getattr(lines, f.name)) for f in dataclasses.fields(fit.Lines)))


def _build_predictors(blocks: list[FfnBlock], stats: dict[str, histogram.NeuronStats], settings: Settings,
                      neurons: dict[str, np.ndarray | None],
                      progress: Callable[[str], Progress]) -> dict[str, predictors.Built]:
    bar = progress(f"predictor: {settings.predictor}")
    built = {}
    for b in blocks:
        gram = stats[b.name].input_moments() if stats[b.name].gram is not None else None
        built[b.name] = predictors.build(settings.predictor, b, gram, settings.predictor_options(), neurons[b.name])
        bar.step(1)
    bar.done()
    return built


def _predictor_summary(built: predictors.Built, margin: predictors.Margin) -> dict:
    """What the report says about a block's predictor (calibrated figures; held-out ones come from
    verification)."""
    sigma = float(np.mean(built.sigma)) if built.sigma.size else 0.0  # no resident neuron: no predictor
    out = {"kind": built.predictor.kind, "margin_z": margin.z, "mean_sigma": sigma}
    if np.isfinite(margin.flagged_share):
        out.update(calibrated_recall=margin.recall, calibrated_flagged_share=margin.flagged_share,
                   calibrated_out_share=margin.out_share)
    rank = getattr(built.predictor, "rank", None)
    if rank is not None:
        out["rank"] = int(rank)
    return out


def _block_metadata(tool: str, settings: Settings, block: FfnBlock, lines: fit.Lines, built: predictors.Built,
                    margin: predictors.Margin) -> dict[str, str]:
    """Provenance for the fallback node's ``metadata_props`` (shown by Netron)."""
    coverage = float(np.mean(lines.coverage))
    meta = {"tardis.version": tool, "tardis.strategy": "flag-all" if settings.flag_all else settings.fit_strategy,
            "tardis.predictor": built.predictor.kind, "tardis.variant": block.variant,
            "tardis.calibrated_coverage": f"{coverage:.6f}",
            "tardis.calibrated_fallback_rate": f"{1.0 - coverage:.6f}",
            "tardis.refit": str(settings.refit and not settings.flag_all).lower(),
            "tardis.predictor_params": f"{built.predictor.parameters():.0f}",
            "tardis.fold_bits": str(settings.fold_bits or 8 * block.dtype.numpy().itemsize),
            "tardis.fold_activations": settings.fold_activations}
    if np.isfinite(margin.flagged_share):  # a margin search ran (inexact predictor)
        meta.update({"tardis.predictor_margin_z": f"{margin.z:.3f}",
                     "tardis.predictor_calibrated_recall": f"{margin.recall:.6f}",
                     "tardis.predictor_calibrated_flagged_share": f"{margin.flagged_share:.6f}"})
    if built.neurons is not None:
        meta["tardis.resident_neurons"] = f"{len(built.neurons)}/{block.hidden}"
    return meta


def optimize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    calib: DataSpec,
    *,
    settings: Settings | None = None,
    data: DataOptions | None = None,
    eval_data: DataSpec | None = None,
    holdout_every: int = 10,
    thresholds: Thresholds | None = None,
    stats_out: str | os.PathLike | None = None,
    stats_in: str | os.PathLike | None = None,
    external_data: bool | None = None,
    report_path: str | os.PathLike | None = None,
    threads: int = 0,
    show_progress: bool = True,
) -> Report:
    """Rewrite every plain GELU FFN block of ``model`` and write the result to ``output``.

    ``calib``: an ``.npz`` feed dict (or a folder of them), a ``.py`` script with ``load_data()``, a text
    file (with ``data.tokenizer``), a list of feed dicts, or a callable returning an iterable of them.
    Unless ``eval_data`` is given, every ``holdout_every``-th batch is held out for verification.
    The output is validated and verified before it is moved into place; with ``thresholds`` a failed
    verification raises and nothing is written. Returns the report (also written as JSON + Markdown).
    """
    settings = settings or Settings()
    data = data or DataOptions()
    model_path, out_path = Path(model), Path(output)
    stats_in = histogram.saved_path(stats_in) if stats_in is not None else None
    reads = {"the calibration data": calib, "the evaluation data": eval_data, "the statistics input": stats_in,
             "the tokenizer": data.tokenizer_file()}
    modelio.check_destination(model_path, out_path, reads=reads)
    modelio.check_model_name(out_path)
    writes = {**reads, "the output model": out_path}
    if stats_out is not None:
        modelio.check_destination(model_path, histogram.stats_path(stats_out), reads=writes, what="statistics output")
    json_path, md_path = _report_paths(out_path, report_path)
    for path in (json_path, md_path, *plots.paths(json_path.with_suffix(""))):
        modelio.check_destination(model_path, path, reads=writes, what="report path")
    original = modelio.load(model_path)
    blocks, rejected = find_foldable(original)
    _require_blocks(model_path, blocks, rejected, rewritten=count_rewritten(original))
    predictors.check_options(settings.predictor, [b.dtype.numpy() for b in blocks], settings.predictor_options())
    _check_fold_dtypes(settings, blocks)
    stats = _saved_stats(stats_in, blocks) if stats_in is not None else None  # refused before any data is read
    input_names = _input_names(original)
    progress = lambda label: Progress(label, enabled=show_progress)  # noqa: E731
    # validated as given, so a bad batch is found in the first pass and numbered as in the data, held-out
    # batches included
    source = feeds.validated(open_data(calib, input_names, data), _input_specs(original), "calibration data")
    if eval_data is not None:
        calib_source, held_source = source, open_data(eval_data, input_names, data)
        verified_on = "evaluation data"
    else:
        calib_source, held_source = feeds.holdout_split(source, holdout_every)
        verified_on = f"held-out calibration batches (every {holdout_every}th)"
        if next(iter(held_source()), None) is None:  # too few batches to hold any out
            calib_source, held_source = source, source
            verified_on = "calibration data (too few batches to hold any out)"
    if stats is None:
        stats = collect_stats(original, blocks, calib_source, mask_input=data.mask_input, threads=threads,
                              progress_factory=progress)
    probe = lambda lines_at, rates: error_target.measure(  # noqa: E731
        original, blocks, calib_source, lines_at, rates, mask_input=data.mask_input, threads=threads,
        progress=progress(f"calibrate: block errors at {len(rates)} fallback rates"))
    scale, built = 1.0, None
    while True:  # at most twice: once more when the predictor's extra flags miss a rate target
        lines, neurons, rate, curve = _plan(stats, blocks, settings, probe, scale)
        folds = {b.name: fold(b.w1(), b.b1(), b.w2(), b.b2(), lines[b.name].alpha, lines[b.name].beta)
                 for b in blocks}
        if built is None or settings.resident is not None:  # resident neurons follow the ranges
            built = _build_predictors(blocks, stats, settings, neurons, progress)
        folds, margins = _second_pass(original, blocks, calib_source, lines, folds, built, settings, data,
                                      progress, threads)
        flagged = _flagged_share(blocks, lines, built, margins)
        if (scale != 1.0 or not _rate_targeted(settings) or flagged is None or rate <= 0.0
                or abs(flagged / rate - 1.0) <= 0.03):
            break
        # fit ranges for fewer out-of-range pairs so that the *flagged* ones meet the target; a predictor
        # whose false flags dominate cannot be fixed this way, so never below half the target (nor above
        # every pair)
        scale = min(max(rate / flagged, 0.5) if flagged > 0 else 2.0, 1.0 / rate)
        if scale == 1.0:  # already every pair out of range: nothing to rescale
            break
    tool = version()
    folded = [FoldedBlock(b, lines[b.name], *folds[b.name], built[b.name].predictor,
                          margins[b.name].widths(built[b.name].sigma),
                          _block_metadata(tool, settings, b, lines[b.name], built[b.name], margins[b.name]),
                          neurons[b.name], settings.fold_bits, settings.fold_activations)
              for b in blocks]
    fold_params = budget.folded(blocks, settings.fold_bits)
    reports = [block_report(b, float(np.mean(lines[b.name].coverage)), built[b.name].predictor.parameters(),
                            _predictor_summary(built[b.name], margins[b.name]),
                            None if neurons[b.name] is None else len(neurons[b.name]), fold_params[b.name])
               for b in blocks]
    solved = {"solved_fallback_rate": rate, "out_of_range_rate": rate * scale,
              **({"error_curve": curve.to_dict()} if curve is not None else {})}
    report = Report(str(model_path), str(out_path), {**settings.effective(), **solved},
                    reports, rejected,
                    verified_on=verified_on, calibration_tokens=min(s.tokens for s in stats.values()))
    optimized = modelio.load(model_path)  # a second, untouched copy stays as the reference
    opt_blocks, _ = find_foldable(optimized)
    for f, b in zip(folded, opt_blocks):
        f.block = b
    rewrite(optimized, folded)
    optimized.metadata_props.update({"tardis.version": tool, "tardis.blocks": str(len(blocks)),
                                     "tardis.settings": str(settings.effective())})

    def validate(tmp_path: Path) -> None:
        ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        report.verification = compare(original, optimized, held_source, thresholds=thresholds,
                                      mask_input=data.mask_input, threads=threads)
        _attach_measurements(report, report.verification)
        if not report.verification.passed:
            raise TardisError("verification failed, nothing written: " + "; ".join(report.verification.failures))

    if external_data is None and modelio.uses_external_data(original):
        external_data = True  # auto: an input with external data gets an output with external data
    modelio.save(optimized, out_path, external_data=external_data, validate=validate)
    measured = {b.name: {"flagged_share": b.flagged_share(b.measured["fallback_rate"]),
                         "relative_error": b.measured["relative_error"]} for b in report.blocks if b.measured}
    # written only with the model: a run that fails or is interrupted leaves nothing behind
    step = "its statistics"
    try:
        if stats_out is not None:
            histogram.save(stats, stats_out)
        step = "its plots"
        report.plots = [p.name for p in plots.write(json_path.with_suffix(""), stats, lines, measured)]
        step = "its report"
        report.write(json_path, md_path)
    except (OSError, ValueError, TardisError) as err:  # paths checked up front: e.g. a full disk gets here
        reason = f"{err.strerror}: '{err.filename}'" if isinstance(err, OSError) and err.strerror else str(err)
        raise TardisError(f"the optimized model was written to '{out_path}', but writing {step} failed: "
                          f"{reason}") from err
    return report


def _saved_stats(path: Path, blocks: list[FfnBlock]) -> dict[str, histogram.NeuronStats]:
    """``--stats-in``: the saved statistics, refused unless they are this model's (every block, same neuron
    count and input width, same weights where the file records them)."""
    stats = histogram.load(path)
    missing = [b.name for b in blocks if b.name not in stats]
    if missing:
        raise CalibrationDataError(f"statistics '{path}' do not cover blocks {missing}")
    other = []
    for b in blocks:
        s = stats[b.name]
        if s.neurons != b.hidden:
            other.append(f"{b.name} ({s.neurons} neurons, the model's {b.hidden})")
        elif s.gram is not None and s.gram.shape[0] - 1 != b.d:
            other.append(f"{b.name} (input width {s.gram.shape[0] - 1}, the model's {b.d})")
        elif s.source and s.source != weights_digest(b):
            other.append(f"{b.name} (same shapes, other weights)")
    if other:
        raise CalibrationDataError(f"statistics '{path}' come from another model: {', '.join(other)}")
    return stats


def _attach_measurements(report: Report, verification: Verification) -> None:
    by_name = {fallback_op.block_name(m.name): m for m in verification.blocks}
    for b in report.blocks:
        m = by_name.get(b.name)
        if m is not None:
            b.measured = dataclasses.asdict(m)


def _report_paths(out_path: Path, report_path: str | os.PathLike | None) -> tuple[Path, Path]:
    """``<stem>.json``/``.md`` for ``report_path`` (a folder: the default names inside it), else beside the
    output."""
    default = out_path.stem + ".report"
    if report_path and Path(report_path).is_dir():
        report_path = Path(report_path) / default
    base = str(report_path) if report_path else str(out_path.with_name(default))
    return Path(base + ".json"), Path(base + ".md")


def verify(
    original: str | os.PathLike, optimized: str | os.PathLike, data: DataSpec, *,
    data_options: DataOptions | None = None, thresholds: Thresholds | None = None, threads: int = 0,
    use_library: bool = False,
) -> Verification:
    """Compare an optimized model with its original on ``data`` (see :mod:`tardis_compile.verify`)."""
    data_options = data_options or DataOptions()
    orig, opt = modelio.load(original), modelio.load(optimized)
    source = open_data(data, _input_names(orig), data_options)
    options = None
    if use_library:
        from tardis_compile.runtime import session_options

        options = session_options(require=True)
    return compare(orig, opt, source, thresholds=thresholds, mask_input=data_options.mask_input,
                   threads=threads, optimized_options=options)
