"""End-to-end timing of an optimized model against its original in ONNX Runtime, and a per-node profile.

What it does, so the numbers mean something on a noisy machine:

* both models get their own ``InferenceSession`` per thread count, in **one process**, same options
  (CPU EP, sequential execution, ``intra_op_num_threads`` = t, ``inter_op_num_threads`` = 1, the same
  graph optimization level, intra-op spinning stopped when a run returns so the idle session's workers
  do not take the timed one's cores: :func:`timing_options`); the optimized one has ``libtardis_ops`` registered
  (:func:`tardis_compile.runtime.session_options`, required by default — a silent fall back to the ONNX
  function body would time the wrong thing);
* feeds come from any data spec :func:`tardis_compile.api.open_data` accepts (``.npz``, folder, script,
  text + tokenizer) or are synthesised from the model's input specs with user-given dims
  (:func:`synthetic_feed`, ``batch=8,sequence=128``);
* after warm-up runs, each **round** runs every feed once through each model, original and optimized
  alternating which goes first; a round's time is the sum over feeds. Reported: per-round medians
  (and quartiles), ``speedup = original median / optimized median`` and the median of the per-round
  ratios (robust to load drifting between rounds), throughput in rows (batch items) and tokens per second;
* with the library loaded, the share of token-neuron pairs the ``GuardedFallback`` kernels actually
  flagged during the timed optimized runs (library counters);
* :func:`profile` runs a model with ``SessionOptions.enable_profiling`` and aggregates ORT's JSON trace
  by node and op type into the parts the rewrite adds: predictor (``MatMulNBits``,
  ``DynamicQuantizeMatMul`` or the exact predictor's ``MatMul`` and its ``+ b1``), folded
  ``MatMul``/``Add``, ``GuardedFallback`` (and ``GuardedFallbackNBits``, which holds the int4 predictor
  too), guards (``Add``/``Sub`` of the margins: zero when ORT constant-folded them), and the rest of the
  model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_state

from tardis_compile import fallback_op, modelio
from tardis_compile.errors import CalibrationDataError, ModelLoadError, TardisError
from tardis_compile.feeds import Feed, InputSpec, input_specs, validate, validated

OPT_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

#: Profile categories, in report order.
PARTS = ("predictor", "fold", "fallback", "guard", "rest")


# ----------------------------------------------------------------------------------------------------------
# Feeds


def parse_shape(text: str | None) -> dict[str, int]:
    """``"batch=8,sequence=128"`` → ``{"batch": 8, "sequence": 128}`` (symbolic dim name → size)."""
    dims: dict[str, int] = {}
    if not text:
        return dims
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if not sep or not name.strip() or size <= 0:
            raise CalibrationDataError(f"--shape: '{part}' is not NAME=POSITIVE_INT (e.g. batch=8,sequence=128)")
        dims[name.strip()] = size
    return dims


def synthetic_feed(specs: Sequence[InputSpec], dims: dict[str, int], *, seed: int = 0,
                   int_high: int = 100) -> Feed:
    """One feed for inputs ``specs``: every symbolic (or unknown) dim taken from ``dims``.

    Integer inputs whose name contains ``mask`` are all ones, ``position`` ones are ``0..n-1`` along the
    last axis, other integer inputs (token ids) are uniform in ``[0, int_high)``; float inputs are
    standard Gaussian; bool inputs are all true. Raises when a dim has no size.
    """
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    missing: list[str] = []
    for spec in specs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
            else:
                missing.append(f"{spec.name}[{axis}]={dim!r}")
                shape.append(1)
        dtype = np.dtype(spec.dtype) if spec.dtype is not object else None
        if dtype is None:
            raise CalibrationDataError(f"input '{spec.name}': cannot synthesise data of this type")
        lname = spec.name.lower()
        if dtype == np.bool_:
            arr = np.ones(shape, np.bool_)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in lname:
                arr = np.ones(shape, dtype)
            elif "position" in lname and shape:
                arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            else:
                arr = rng.integers(0, int_high, size=shape).astype(dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feed[spec.name] = arr
    if missing:
        raise CalibrationDataError(
            "synthetic feeds: no size for the symbolic dims " + ", ".join(missing)
            + " — pass them as --shape NAME=SIZE,... (e.g. --shape batch=8,sequence=128)")
    return feed


def feed_rows_tokens(feed: Feed) -> tuple[int, int]:
    """(rows, tokens) of one feed: batch size and batch × sequence of its first rank-2 integer input
    (token ids); else from the first input: [batch, seq, hidden] → (batch, batch·seq), [rows, …] → (rows, rows)."""
    ints = [a for a in feed.values() if np.issubdtype(a.dtype, np.integer) and a.ndim == 2]
    if ints:
        return int(ints[0].shape[0]), int(ints[0].shape[0] * ints[0].shape[1])
    first = next(iter(feed.values()))
    rows = int(first.shape[0]) if first.ndim else 1
    return rows, (rows * int(first.shape[1]) if first.ndim >= 3 else rows)


# ----------------------------------------------------------------------------------------------------------
# Sessions


def timing_options(threads: int, *, opt_level: str = "all", spinning: bool | None = None) -> ort.SessionOptions:
    """Session options every timed session shares: CPU, sequential, ``threads`` intra-op threads.

    ``session.force_spinning_stop`` is set because the benchmarks interleave several sessions in one
    process: by default each session's intra-op workers keep spinning after ``Run`` returns, so on a small
    machine the idle session's spinners take cores from the one being timed (measured: the rewritten
    768×3072 block at 1 token, 2 threads, 0.27 ms interleaved with spinning left on against 0.23 ms with
    it stopped; the dense block 0.42 against 0.46 ms). Workers still spin within a ``Run``.
    ``spinning=False`` turns intra-op spinning off altogether (an experiment: every parallel region then
    wakes its workers).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def make_session(model: str | os.PathLike, threads: int, *, library: bool = False, require_library: bool = True,
                 opt_level: str = "all", profile_prefix: str | None = None,
                 spinning: bool | None = None) -> ort.InferenceSession:
    """A CPU session with the benchmark's settings (:func:`timing_options`); ``library``: register
    ``libtardis_ops``."""
    so = timing_options(threads, opt_level=opt_level, spinning=spinning)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if library:
        from tardis_compile import runtime

        try:
            runtime.session_options(so, require=require_library)
        except runtime.LibraryUnavailableError as err:
            raise TardisError(f"{err} — `tardis-compile library [--build]` shows which library is used and builds "
                              "one; or time the optimized model without it (--no-library)") from err
    modelio.require_file(model)
    try:
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's own errors (invalid protobuf, unknown op, bad graph) as one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"ONNX Runtime cannot load '{model}': {first}") from err


def _kernel_counters() -> dict[str, int]:
    from tardis_compile import runtime

    try:
        return runtime.kernel_stats()
    except Exception:  # noqa: BLE001 - counters are optional information
        return {}


def fallback_neurons(model: str | os.PathLike) -> int | None:
    """Σ D over the ``GuardedFallback`` nodes of a model (from their ``b1`` input), None if unknown."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    dims = {i.name: list(i.dims) for i in m.graph.initializer}
    total, found = 0, False
    for n in m.graph.node:
        if n.domain == fallback_op.DOMAIN and n.op_type in (fallback_op.OP_TYPE, fallback_op.FUSED_OP_TYPE):
            b1 = dict(zip(fallback_op.input_names(n.op_type), n.input)).get("b1", "")
            if len(dims.get(b1, [])) != 1:
                return None
            total += dims[b1][0]
            found = True
    return total if found else None


# ----------------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Case:
    """One (feeds, threads) comparison."""

    label: str
    threads: int
    rows: int            # batch rows per round (all feeds)
    tokens: int          # tokens per round
    rounds: int
    original_ms: float   # median round time
    optimized_ms: float
    original_iqr_ms: tuple[float, float]
    optimized_iqr_ms: tuple[float, float]
    speedup: float                 # original median / optimized median
    speedup_paired: float          # median of per-round original/optimized ratios
    original_rows_per_s: float
    optimized_rows_per_s: float
    original_tokens_per_s: float
    optimized_tokens_per_s: float
    flagged_share: float | None = None   # token-neuron pairs the kernels flagged during timed runs
    kernel_calls: int | None = None
    feeds: int = 1                        # batches per round (round times are sums over them)
    original_rounds_ms: list[float] = dataclasses.field(default_factory=list)
    optimized_rounds_ms: list[float] = dataclasses.field(default_factory=list)

    def row(self) -> str:
        flag = "–" if self.flagged_share is None else f"{self.flagged_share:.1%}"
        n = max(self.feeds, 1)
        return (f"| {self.label} | {self.threads} | {self.original_ms / n:.2f} | {self.optimized_ms / n:.2f} | "
                f"**{self.speedup:.2f}×** | {self.speedup_paired:.2f}× | {self.original_rows_per_s:.1f} | "
                f"{self.optimized_rows_per_s:.1f} | {flag} | {self.rounds} |")


TABLE_HEADER = ("| case | threads | original ms/batch | optimized ms/batch | speed-up | paired | original rows/s | "
                "optimized rows/s | flagged | rounds |\n|---|---|---|---|---|---|---|---|---|---|")


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = np.percentile(xs, [25, 75])
    return float(q[0]), float(q[1])


def _run_all(session: ort.InferenceSession, feeds: list[Feed]) -> float:
    t0 = time.perf_counter()
    for feed in feeds:
        session.run(None, feed)
    return (time.perf_counter() - t0) * 1e3


def time_pair(original: ort.InferenceSession, optimized: ort.InferenceSession, feeds: list[Feed], *,
              label: str, threads: int, warmup: int = 2, rounds: int = 10, min_seconds: float = 0.0,
              neurons: int | None = None) -> Case:
    """Warm both sessions, then ``rounds`` interleaved rounds (at least ``min_seconds`` of rounds)."""
    if not feeds:
        raise CalibrationDataError("benchmark: no feeds")
    for _ in range(max(warmup, 0)):
        _run_all(original, feeds)
        _run_all(optimized, feeds)
    before = _kernel_counters()
    orig_t: list[float] = []
    opt_t: list[float] = []
    t_start = time.perf_counter()
    i = 0
    while i < rounds or (time.perf_counter() - t_start) < min_seconds:
        if i % 2 == 0:
            orig_t.append(_run_all(original, feeds))
            opt_t.append(_run_all(optimized, feeds))
        else:
            opt_t.append(_run_all(optimized, feeds))
            orig_t.append(_run_all(original, feeds))
        i += 1
    after = _kernel_counters()
    rows = tokens = 0
    for feed in feeds:
        r, t = feed_rows_tokens(feed)
        rows, tokens = rows + r, tokens + t
    om, pm = statistics.median(orig_t), statistics.median(opt_t)
    flagged = calls = None
    if before and after:
        calls = after["calls"] - before["calls"]
        if neurons and calls:
            flagged = (after["flagged_pairs"] - before["flagged_pairs"]) / (len(opt_t) * tokens * neurons)
    return Case(label=label, threads=threads, rows=rows, tokens=tokens, rounds=len(orig_t),
                original_ms=om, optimized_ms=pm, original_iqr_ms=_quartiles(orig_t),
                optimized_iqr_ms=_quartiles(opt_t), speedup=om / pm,
                speedup_paired=statistics.median(a / b for a, b in zip(orig_t, opt_t)),
                original_rows_per_s=rows / om * 1e3, optimized_rows_per_s=rows / pm * 1e3,
                original_tokens_per_s=tokens / om * 1e3, optimized_tokens_per_s=tokens / pm * 1e3,
                flagged_share=flagged, kernel_calls=calls, feeds=len(feeds), original_rounds_ms=orig_t, optimized_rounds_ms=opt_t)


def time_many(sessions: dict[str, ort.InferenceSession], feeds: list[Feed], *, warmup: int = 2,
              rounds: int = 10) -> dict[str, dict]:
    """Several sessions (e.g. one model under different session options) on the same feeds, rotated round
    by round; name → ``{"median_ms", "iqr_ms", "rounds_ms", "vs_first"}`` (first median / this median)."""
    names = list(sessions)
    for _ in range(max(warmup, 0)):
        for n in names:
            _run_all(sessions[n], feeds)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(_run_all(sessions[n], feeds))
    first = statistics.median(times[names[0]])
    return {n: {"median_ms": statistics.median(t), "iqr_ms": _quartiles(t), "rounds_ms": t,
                "vs_first": first / statistics.median(t)} for n, t in times.items()}


def machine_info() -> dict:
    """Machine, date, load average and library versions, for the results file."""
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": _cpu_model(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    counters = _kernel_counters()
    if counters:
        info["cpu_has_avx2"] = counters.get("cpu_has_avx2")
        info["cpu_has_avx512"] = counters.get("cpu_has_avx512")
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclasses.dataclass
class BenchResult:
    original: str
    optimized: str
    opt_level: str
    library: str | None
    cases: list[Case]
    machine: dict
    profiles: dict = dataclasses.field(default_factory=dict)  # "label/threads/model" → profile summary

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        m = self.machine
        lines = [f"`{self.original}` vs `{self.optimized}` — ONNX Runtime {m.get('onnxruntime')}, CPU EP, "
                 f"graph optimization '{self.opt_level}', library {self.library or 'NOT loaded'}",
                 f"Machine: {m.get('processor')} ({m.get('cpus')} CPUs), {m.get('date')}, load average "
                 f"{m.get('load_average')}", "", TABLE_HEADER]
        lines += [c.row() for c in self.cases]
        for key, prof in self.profiles.items():
            lines += ["", f"Profile {key}:", "", profile_markdown(prof)]
        return "\n".join(lines)


def bench(original: str | os.PathLike, optimized: str | os.PathLike, feed_sets: dict[str, list[Feed]], *,
          threads: Iterable[int] = (1, 2), warmup: int = 2, rounds: int = 10, min_seconds: float = 0.0,
          opt_level: str = "all", library: bool = True, require_library: bool = True,
          profile_runs: int = 0, spinning: bool | None = None, log=print) -> BenchResult:
    """Time ``optimized`` against ``original`` on each named list of feeds, at each thread count.

    ``feed_sets``: label → feeds (a round runs all of them). ``profile_runs`` > 0: also profile both models
    (that many runs, first thread count) on each feed set's first feed.
    """
    from tardis_compile import runtime

    for model in (original, optimized):  # before reading the optimized model's fallback sizes
        modelio.check(model)
    lib = runtime.library_path() if library else None
    neurons = fallback_neurons(optimized)
    cases: list[Case] = []
    profiles: dict = {}
    for t in threads:
        s_orig = make_session(original, t, opt_level=opt_level, spinning=spinning)
        s_opt = make_session(optimized, t, library=library, require_library=require_library,
                             opt_level=opt_level, spinning=spinning)
        for label, feeds in feed_sets.items():
            specs_o, specs_p = input_specs(s_orig), input_specs(s_opt)
            feeds = [validate(f, specs_o, f"benchmark data '{label}'") for f in feeds]
            for f in feeds:
                validate(f, specs_p, f"benchmark data '{label}' (optimized model)")
            try:
                case = time_pair(s_orig, s_opt, feeds, label=label, threads=t, warmup=warmup, rounds=rounds,
                                 min_seconds=min_seconds, neurons=neurons)
            except (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException) as err:  # data ≠ model
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CalibrationDataError(f"benchmark data '{label}': a model failed on it: {first}") from err
            cases.append(case)
            if log:
                log(case.row())
        del s_orig, s_opt
    if profile_runs > 0:
        t = next(iter(threads))
        for label, feeds in feed_sets.items():
            both = profile_many({"original": (original, False), "optimized": (optimized, library)}, feeds[0],
                                threads=t, runs=profile_runs, opt_level=opt_level)
            for which, summary in both.items():
                profiles[f"{label}/t{t}/{which}"] = summary
    return BenchResult(str(original), str(optimized), opt_level, str(lib) if lib else None, cases,
                       machine_info(), profiles)


# ----------------------------------------------------------------------------------------------------------
# Profile


def classify(node_name: str, op_type: str) -> str:
    """Which part of a rewritten model a node belongs to (names from the tardis pass)."""
    if op_type in (fallback_op.OP_TYPE, fallback_op.FUSED_OP_TYPE):  # fused: its int4 predictor included
        return "fallback"
    if "/folded/" in node_name:  # before the op types: an int8 fold is a DynamicQuantizeMatMul too
        return "fold"
    if (op_type in ("MatMulNBits", "DynamicQuantizeMatMul") or "/predictor/" in node_name
            or node_name.endswith("/h_hat")):
        return "predictor"
    if "/guard_" in node_name:
        return "guard"
    return "rest"


def summarize_trace(events: list[dict], runs: int = 1) -> dict:
    """Aggregate ORT profile events (``cat == "Node"``, ``*_kernel_time``) per node, op type and part.

    Times are microseconds per run. ``model_us``: the ``model_run`` events' mean; ``nodes_us``: the sum
    of node kernel times (the difference is executor overhead between kernels).
    """
    per_node: dict[str, dict] = {}
    model_runs: list[float] = []
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            model_runs.append(float(ev.get("dur", 0)))
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "?")
        node = per_node.setdefault(name, {"op_type": op, "us": 0.0, "count": 0})
        node["us"] += float(ev.get("dur", 0))
        node["count"] += 1
    runs = max(len(model_runs), 1) if model_runs else max(runs, 1)
    for node in per_node.values():
        node["us"] /= runs
    total = sum(n["us"] for n in per_node.values())
    by_op: dict[str, float] = {}
    by_part = {p: 0.0 for p in PARTS}
    count_part = {p: 0 for p in PARTS}
    for name, node in per_node.items():
        by_op[node["op_type"]] = by_op.get(node["op_type"], 0.0) + node["us"]
        part = classify(name, node["op_type"])
        by_part[part] += node["us"]
        count_part[part] += 1
    top = sorted(per_node.items(), key=lambda kv: -kv[1]["us"])[:15]
    return {"runs": runs, "model_us": statistics.median(model_runs) if model_runs else None, "nodes_us": total,
            "nodes": len(per_node),
            "by_part_us": by_part, "by_part_share": {p: (v / total if total else 0.0) for p, v in by_part.items()},
            "nodes_per_part": count_part,
            "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "top_nodes": [{"name": n, **v} for n, v in top]}


def profile(model: str | os.PathLike, feed: Feed, *, threads: int = 1, runs: int = 10, warmup: int = 2,
            library: bool = True, opt_level: str = "all") -> dict:
    """Run ``model`` with ORT profiling and return :func:`summarize_trace` of the timed runs."""
    return profile_many({"model": (model, library)}, feed, threads=threads, runs=runs, warmup=warmup,
                        opt_level=opt_level)["model"]


def profile_many(models: dict[str, tuple], feed: Feed, *, threads: int = 1, runs: int = 10, warmup: int = 2,
                 opt_level: str = "all") -> dict[str, dict]:
    """Profile several models (name → (path, library?)) on one feed, their runs **interleaved** (so load
    changes hit all of them alike); name → :func:`summarize_trace` of the runs after warm-up."""
    with tempfile.TemporaryDirectory(prefix="tardis-prof-") as tmp:
        sessions = {name: make_session(path, threads, library=lib, require_library=False, opt_level=opt_level,
                                       profile_prefix=str(Path(tmp) / f"prof{i}"))
                    for i, (name, (path, lib)) in enumerate(models.items())}
        for _ in range(runs + warmup):
            for session in sessions.values():
                session.run(None, feed)
        traces = {name: json.loads(Path(session.end_profiling()).read_text()) for name, session in sessions.items()}
    out = {}
    for name, events in traces.items():
        # the first `warmup` model_run events (and their nodes) are warm-up: drop them by time
        runs_ev = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                         key=lambda e: e["ts"])
        if len(runs_ev) > warmup:
            start = runs_ev[warmup]["ts"]
            events = [e for e in events if e.get("ts", 0) >= start]
        out[name] = summarize_trace(events, runs)
    return out


def profile_markdown(summary: dict) -> str:
    total = summary["nodes_us"] or 1.0
    lines = [f"nodes {summary['nodes_us'] / 1e3:.3f} ms/run"
             + (f", model_run {summary['model_us'] / 1e3:.3f} ms" if summary.get("model_us") else "")
             + f" ({summary['nodes']} kernels)", "",
             "| part | ms/run | share | nodes |", "|---|---|---|---|"]
    for p in PARTS:
        lines.append(f"| {p} | {summary['by_part_us'][p] / 1e3:.3f} | {summary['by_part_us'][p] / total:.1%} | "
                     f"{summary['nodes_per_part'][p]} |")
    ops = list(summary["by_op_us"].items())[:8]
    lines += ["", "by op type: " + ", ".join(f"{op} {us / 1e3:.3f} ms ({us / total:.0%})" for op, us in ops)]
    return "\n".join(lines)


def load_feed_sets(original: str | os.PathLike, *, data=None, data_options=None, shapes: Sequence[str] = (),
                   max_batches: int = 4, seed: int = 0, int_high: int = 100) -> dict[str, list[Feed]]:
    """Feed sets for :func:`bench`: the first ``max_batches`` feeds of a data spec (label ``data``) and/or one
    synthetic feed per ``--shape`` string (label = the string)."""
    session = make_session(original, 1, opt_level="disable")
    specs = input_specs(session)
    sets: dict[str, list[Feed]] = {}
    if data is not None:
        from tardis_compile import api

        source = validated(api.open_data(data, [s.name for s in specs], data_options or api.DataOptions()),
                           specs, "benchmark data")
        feeds = []
        for feed in source():
            feeds.append(feed)
            if len(feeds) >= max_batches:
                break
        sets["data"] = feeds
    for text in shapes:
        sets[text] = [synthetic_feed(specs, parse_shape(text), seed=seed, int_high=int_high)]
    if not sets:
        raise TardisError("benchmark: give --data and/or at least one --shape (e.g. --shape batch=1,sequence=16)")
    return sets
