"""Calibration: run the original model in ONNX Runtime and stream block statistics.

The capture model is the original graph with its own outputs dropped and each block's *input* ``x``
exposed instead; pre-activations are recomputed as ``h = x·W1 + b1`` in NumPy. Capturing ``x`` rather
than ``h`` moves D/d = 4× less data out of ORT and sees every spelling the same way (a bias fused into
``FastGelu``/``BiasGelu`` is part of ``b1`` here). Padding rows are dropped when an attention mask is fed.

Pass 1 reduces ``h`` into per-neuron histogram moments (:mod:`tardis_compile.histogram`) and ``x`` into
its second moments; pass 2 (after the ranges are fitted and the predictors built) accumulates the refit's
normal equations and the predictors' margin curves. Neither keeps more than one batch — except that
pass 1 buffers up to :data:`GROUP_BYTES` of block inputs when the statistics are spilled to a scratch
file, then reduces them block by block, so that each block's statistics are paged in once per group
rather than once per batch (same sums, same order).

Weights read in place (memory-mapped external data) are released after each use
(:func:`tardis_compile.modelio.drop_pages`): ONNX Runtime holds its own mapping of the whole model
while it runs, and the NumPy side then adds one block's ``W1`` at a time, not a second copy of them all.

Pass 1 also records every block's input rows to a scratch folder (``tokens × d`` values per block, far
less than the model for calibration-sized data; skipped above half the free disk space). Later passes
over the *same* source and model — pass 2, the ``--max-error`` curve — replay the recording instead of
running the model again: the same rows, without ONNX Runtime's time and without its copy of the weights
in memory. The recording goes when the source or the model object does.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tardis_compile import modelio
from tardis_compile.errors import CalibrationDataError, one_line
from tardis_compile.feeds import FeedSource, input_specs, mask_rows, validated
from tardis_compile.histogram import Grid, NeuronStats
from tardis_compile.passes.ffn_match import FfnBlock
from tardis_compile.progress import Progress

GROUP_BYTES = 256 * 2**20


@contextlib.contextmanager
def capture_session(model: ir.Model, values: list[ir.Value], threads: int = 0,
                    options: ort.SessionOptions | None = None) -> Iterator[ort.InferenceSession]:
    """An ORT session over ``model`` whose outputs are exactly ``values`` (the model is restored after);
    ``options`` (e.g. with the op library registered) replaces fresh session options. Either way the
    session gets ``threads`` and logs only fatal errors: a failing run is reported as our own one-line
    error."""
    original = list(model.graph.outputs)
    model.graph.outputs.clear()
    model.graph.outputs.extend(dict.fromkeys(values))
    options = options or ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    try:
        with tempfile.TemporaryDirectory(prefix="tardis-capture-") as tmp:
            from tardis_compile.modelio import ort_session  # external weights are read in place

            yield ort_session(model, options, Path(tmp))
    finally:
        model.graph.outputs.clear()
        model.graph.outputs.extend(original)


class _Recording:
    """Block input rows of one complete pass, per block one raw file, and each batch's row count."""

    def __init__(self, blocks: list[FfnBlock]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tardis-inputs-"))
        self.limit = shutil.disk_usage(self.folder).free // 2
        self.size = 0
        self.names = [b.name for b in blocks]
        self.files = {name: open(self.folder / f"{i}.bin", "wb") for i, name in enumerate(self.names)}
        self.layout: dict[str, tuple[np.dtype, int]] = {}
        self.rows: list[int] = []  # per batch (padding already removed, same for every block)
        self.complete = False

    def add(self, batch: dict[str, np.ndarray]) -> bool:
        """Append a batch; False (and the recording is dropped) once it would exceed its disk budget."""
        self.size += sum(x.nbytes for x in batch.values())
        if self.size > self.limit:
            self.close()
            return False
        for name, x in batch.items():
            self.layout.setdefault(name, (x.dtype, x.shape[1]))
            self.files[name].write(np.ascontiguousarray(x).tobytes())
        self.rows.append(next(iter(batch.values())).shape[0])
        return True

    def finish(self) -> None:
        for f in self.files.values():
            f.close()
        self.complete = True

    def replay(self, progress: Progress | None) -> Iterator[dict[str, np.ndarray]]:
        maps = {}
        for i, name in enumerate(self.names):
            if name in self.layout:
                (dtype, d), path = self.layout[name], self.folder / f"{i}.bin"
                maps[name] = (np.memmap(path, dtype=dtype, mode="r").reshape(-1, d) if path.stat().st_size
                              else np.empty((0, d), dtype))  # no rows at all: nothing to map
        start = 0
        for rows in self.rows:
            batch = {name: np.array(m[start:start + rows]) for name, m in maps.items()}
            modelio.drop_pages(*maps.values())
            start += rows
            if progress is not None:
                progress.step(rows)
            yield batch

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.complete = False
        shutil.rmtree(self.folder, ignore_errors=True)


_RECORDINGS: dict[tuple, tuple[weakref.ref, weakref.ref, _Recording]] = {}


def _recording_key(model: ir.Model, blocks: list[FfnBlock], source: FeedSource, mask_input: str | None) -> tuple:
    return id(model), id(source), mask_input, tuple((b.name, b.x.name) for b in blocks)


def _recorded(model: ir.Model, blocks: list[FfnBlock], source: FeedSource, mask_input: str | None) -> _Recording | None:
    entry = _RECORDINGS.get(_recording_key(model, blocks, source, mask_input))
    if entry is None or entry[0]() is not model or entry[1]() is not source or not entry[2].complete:
        return None
    return entry[2]


def _forget(key: tuple) -> None:
    entry = _RECORDINGS.pop(key, None)
    if entry is not None:
        entry[2].close()


def stream_block_inputs(
    model: ir.Model, blocks: list[FfnBlock], source: FeedSource, *, what: str, mask_input: str | None = None,
    threads: int = 0, progress: Progress | None = None, record: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per batch, ``{block name: x rows (tokens, d)}`` with padding rows removed.

    ``record``: keep the rows of this pass (when it runs to the end) for later passes over the same
    ``source`` and ``model``, which then replay them instead of running the model (module doc).
    """
    recording = _recorded(model, blocks, source, mask_input)
    if recording is not None:
        yield from recording.replay(progress)
        return
    key = _recording_key(model, blocks, source, mask_input)
    if record:
        _forget(key)
        try:
            refs = (weakref.ref(model), weakref.ref(source))
        except TypeError:  # a source that cannot be tracked is not recorded
            record = False
    recording = _Recording(blocks) if record else None
    try:
        for batch in _run_blocks(model, blocks, source, what=what, mask_input=mask_input, threads=threads,
                                 progress=progress):
            if recording is not None and not recording.add(batch):
                recording = None
            yield batch
        if recording is not None:
            recording.finish()
            _RECORDINGS[key] = (*refs, recording)
            weakref.finalize(source, _forget, key)  # gone with the source or the model, whichever first
            weakref.finalize(model, _forget, key)
            recording = None
    finally:
        if recording is not None:  # the pass did not run to its end
            recording.close()


def _run_blocks(
    model: ir.Model, blocks: list[FfnBlock], source: FeedSource, *, what: str, mask_input: str | None,
    threads: int, progress: Progress | None,
) -> Iterator[dict[str, np.ndarray]]:
    xs = [b.x for b in blocks]
    with capture_session(model, xs, threads) as session:
        specs = input_specs(session)
        names = [o.name for o in session.get_outputs()]
        index = {v.name: i for i, v in enumerate(dict.fromkeys(xs))}
        for i, feed in enumerate(validated(source, specs, what)()):
            try:
                outs = session.run(names, feed)
            except Exception as err:  # ORT's own message names the failing node and shapes
                raise CalibrationDataError(f"{what}: the model failed on this data: {one_line(err)}") from err
            batch = {}
            for block in blocks:
                x = outs[index[block.x.name]]
                rows = x.reshape(-1, x.shape[-1])
                keep = mask_rows(feed, rows.shape[0], mask_input)
                batch[block.name] = rows[keep] if keep is not None else rows
                _require_finite(batch[block.name], f"{what}, batch {i}: the input of block {block.name}")
            if progress is not None:
                progress.step(next(iter(batch.values())).shape[0])
            yield batch


def _require_finite(values: np.ndarray, what: str, dtype: np.dtype | None = None) -> None:
    """Finite data can still overflow inside the model (float16 above 65504, float32 near 3e38); statistics
    or a fit over such values would make a model that outputs NaN, so the run stops here. ``dtype``: the
    model's type when ``values`` were computed in a wider one (a float16 block's pre-activations)."""
    if values.size == 0:
        return
    dtype = np.dtype(dtype or values.dtype)
    limit = np.finfo(dtype).max
    # two reductions, no temporary of the batch's size; a NaN makes both comparisons false
    if not (-limit <= values.min() and values.max() <= limit):
        raise CalibrationDataError(f"{what} has NaN or infinite values in {dtype} (the data overflow the "
                                   "model's arithmetic); check the data's scale")


class BlockWeights:
    """float32 copies of the weights the NumPy side needs per block (read once, lazily).

    Memory-mapped float32 weights are used in place and their pages released after each product.
    """

    def __init__(self, blocks: list[FfnBlock]) -> None:
        self._blocks = {b.name: b for b in blocks}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def pre_activation(self, name: str, x: np.ndarray) -> np.ndarray:
        if name not in self._cache:
            block = self._blocks[name]
            # no copy when the weights already are float32 (in memory or memory-mapped external data)
            self._cache[name] = (np.asarray(block.w1(), np.float32), block.b1().astype(np.float32))
        w1, b1 = self._cache[name]
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the caller's check
            h = x.astype(np.float32, copy=False) @ w1 + b1
        modelio.drop_pages(w1)
        return h


def weights_digest(block: FfnBlock) -> str:
    """A short digest of the block's first layer (shape, bias, about 64 evenly spaced rows of W1): saved statistics
    are checked against it, so statistics of another model with the same shapes are refused."""
    w1 = np.asarray(block.w1())
    digest = hashlib.sha256(repr(w1.shape).encode())
    digest.update(np.ascontiguousarray(w1[:: max(1, w1.shape[0] // 64)], np.float32).tobytes())
    digest.update(np.asarray(block.b1(), np.float32).tobytes())
    return digest.hexdigest()[:16]


def collect_stats(
    model: ir.Model, blocks: list[FfnBlock], source: FeedSource, *, grid: Grid | None = None,
    mask_input: str | None = None, threads: int = 0, progress_factory: Callable[[str], Progress] | None = None,
) -> dict[str, NeuronStats]:
    """Pass 1: per-neuron histogram moments of every block's pre-activations, and input moments."""
    stats = {b.name: NeuronStats.empty(b.hidden, b.variant, grid, inputs=b.d) for b in blocks}
    for b in blocks:
        stats[b.name].source = weights_digest(b)
    weights = BlockWeights(blocks)
    dtypes = {b.name: b.dtype.numpy() for b in blocks}
    progress = progress_factory("calibrate: ranges") if progress_factory else None
    group: list[dict[str, np.ndarray]] = []

    def reduce() -> None:
        for name, s in stats.items():  # block by block, each batch in order
            for batch in group:
                h = weights.pre_activation(name, batch[name])
                _require_finite(h, f"calibration data: the pre-activation of block {name}", dtypes[name])
                s.add(h)
                s.add_inputs(batch[name])
            s.release()
        group.clear()

    spilled = any(s.spilled for s in stats.values())
    for batch in stream_block_inputs(model, blocks, source, what="calibration data", mask_input=mask_input,
                                     threads=threads, progress=progress, record=True):
        group.append(batch)
        if not spilled or sum(x.nbytes for b in group for x in b.values()) >= GROUP_BYTES:
            reduce()
    reduce()
    if progress is not None:
        progress.done()
    tokens = min((s.tokens for s in stats.values()), default=0)
    if tokens == 0:
        raise CalibrationDataError("calibration data: no tokens left after removing padding")
    return stats
