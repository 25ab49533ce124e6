"""Online predictors: which neurons leave their linear range, decided without the exact ``x·W1``.

A predictor computes ``ĥ ≈ x·W1 + b1`` cheaply; the fallback op flags neuron j when ``ĥ_j`` leaves the
*guards* ``[lo_j + m_j, hi_j − m_j]``. The margin ``m_j = z·σ_j`` is the predictor's own error scale
``σ_j = sqrt(E[(x·(Ŵ1 − W1)_j)²])`` — exact from the calibration inputs' second moments, no extra data
pass — times one multiplier ``z`` per layer, chosen on the calibration data (:class:`MarginSearch`) so
that the share of truly out-of-range pairs the predictor flags (recall) meets a target.

Kinds (METHOD.md §4), each emitted with standard or ONNX Runtime contrib ops:

==========  ============================================================  ==========================
kind        ĥ                                                             stored (float32 model)
==========  ============================================================  ==========================
exact       ``MatMul(x, W1) + b1`` (tests and accuracy reference)          d·D
int4        ``com.microsoft::MatMulNBits`` bits=4, GPTQ, blocks of 32       ≈ d·D·5.1/32
int2        ``com.microsoft::MatMulNBits`` bits=2, GPTQ (or RTN)            ≈ d·D·3.1/32
int8        ``com.microsoft::DynamicQuantizeMatMul``: int8 W1 with one      ≈ d·D·8/32
            scale per neuron, activations quantized per call to uint8
            (one scale and zero point per tensor); float32 models only
lowrank     ``MatMul(MatMul(x, U), V) + b1``, rank per layer by whitened    r·(d + D)
            SVD energy
==========  ============================================================  ==========================

``MatMulNBits`` takes ``b1`` as its bias input (one node per predictor) and runs with ``accuracy_level=4`` (int8 activations, the fast path of ORT's CPU kernel);
:meth:`LowBitPredictor.estimate` reproduces that rounding so the margin search sees what the runtime does.
``int8`` is the prefill predictor: ``DynamicQuantizeMatMul`` runs on MLAS's integer GEMM (AVX-512 VNNI or
AMX where the CPU has them), several times faster than ``MatMulNBits`` once there are more than a few
tokens (README "Predictors"); :meth:`Int8Predictor.estimate` reproduces its activation rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Protocol

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tardis_compile import nbits_op, quantize
from tardis_compile.errors import TardisError
from tardis_compile.fit import Lines
from tardis_compile.passes.ffn_match import FfnBlock

AddInitializer = Callable[[str, "np.ndarray | ir.LazyTensor"], ir.Value]
MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (MLAS's fast CPU path)
Z_GRID = np.linspace(0.0, 8.0, 161)
# int4/int2 weights per quantization block. 32 keeps int4 within 0.004 cosine of the exact predictor on
# MiniLM at a 0.995 recall target without refit (64: 0.005, 128: 0.006); 128 reads 15% fewer bytes and
# runs MatMulNBits 13-27% faster at 1 token (d = 384 .. 1024), the decode choice (README, --predictor-block).
# Layers narrower than the block take smaller ones.
DEFAULT_BLOCK = 32


class PredictorError(TardisError):
    """A predictor that cannot serve the block it is attached to."""


@dataclasses.dataclass
class PredictorOptions:
    """How predictors are built. ``recall`` is the calibrated target that sets the margins."""

    recall: float = 0.99
    quantizer: str | None = None  # int4/int2: "gptq" (needs calibration inputs; None means it) or "rtn"
    block_size: int | None = None  # int4/int2 weights per quantization block; None: DEFAULT_BLOCK
    rank: int | None = None  # lowrank: fixed rank; None chooses per layer by ``energy``
    energy: float = 0.99  # lowrank: share of the whitened spectrum kept

    def __post_init__(self) -> None:
        if not 0.0 < self.recall <= 1.0:
            raise TardisError(f"--predictor-recall must be within (0, 1], got {self.recall}")
        if self.quantizer not in (None, "gptq", "rtn"):
            raise TardisError(f"unknown quantizer {self.quantizer!r}; choose gptq or rtn")
        if self.block_size not in (None, 16, 32, 64, 128):
            raise TardisError(f"predictor block size must be 16, 32, 64 or 128, got {self.block_size}")

    def block_for(self, d: int) -> int:
        """The quantization block of an int4/int2 predictor of a d-row W1: the explicit one, else the
        default, either halved while it exceeds d (a padded block would store and read zeros)."""
        block = self.block_size or DEFAULT_BLOCK
        while block > 16 and block > d:
            block //= 2
        return block


class Predictor(Protocol):
    """What the rewrite, the margin search and the report need from a built predictor."""

    kind: str
    dtype: np.dtype

    def check(self, block: FfnBlock, neurons: int | None = None) -> None:
        """Raise :class:`PredictorError` when the predictor's weights do not fit ``block`` (or ``neurons``
        of its neurons, under a resident budget)."""

    def estimate(self, x: np.ndarray) -> np.ndarray:
        """NumPy ``ĥ`` for rows ``x`` (tokens, d), as the runtime computes it (float64)."""

    def weights(self) -> np.ndarray:
        """The effective ``Ŵ1`` (d, D) float64 the predictor multiplies with."""

    def emit(self, x: ir.Value, add: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        """Graph nodes computing ``ĥ`` from ``x`` and the ``ĥ`` value."""

    def parameters(self) -> float:
        """Stored parameters in the block dtype's equivalents (int4 counts 4/32 in float32)."""


def deferred(shape: tuple[int, ...], dtype: np.dtype, produce: Callable[[], np.ndarray],
             *sources: np.ndarray) -> ir.LazyTensor:
    """An initializer computed only when the model is written (``produce()`` must return ``shape`` in
    ``dtype``), so a rewritten model does not hold all its new weights in memory; the pages of memory-
    mapped ``sources`` are released once it is produced."""

    def make() -> ir.Tensor:
        array = np.ascontiguousarray(produce())
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise AssertionError(f"deferred tensor: made {array.dtype}{array.shape}, "
                                 f"declared {np.dtype(dtype)}{tuple(shape)}")
        _release(*sources)
        return ir.Tensor(array)

    return ir.LazyTensor(make, dtype=ir.DataType.from_numpy(np.dtype(dtype)), shape=ir.Shape(list(shape)))


def _release(*arrays: np.ndarray) -> None:
    from tardis_compile.modelio import drop_pages

    drop_pages(*arrays)


def _node(domain: str, op: str, inputs: list[ir.Value], name: str, **attrs: int) -> ir.Node:
    node = ir.Node(domain, op, inputs, attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()], name=name)
    node.outputs[0].name = name
    return node


def _add_bias(nodes: list[ir.Node], value: ir.Value, b1: np.ndarray, add: AddInitializer, prefix: str,
              dtype: np.dtype) -> tuple[list[ir.Node], ir.Value]:
    bias = _node("", "Add", [value, add(f"{prefix}/predictor/b1", b1.astype(dtype))], f"{prefix}/h_hat")
    return [*nodes, bias], bias.outputs[0]


def _rms_of_delta(delta: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``sqrt(diag(Δᵀ G Δ))`` for Δ (d, D) and the input block of ``gram``."""
    g = gram[:-1, :-1]
    return np.sqrt(np.maximum(np.sum((g @ delta) * delta, axis=0), 0.0))


def _expect_shape(kind: str, block: FfnBlock, d: int, hidden: int, neurons: int | None) -> None:
    want = block.hidden if neurons is None else neurons
    if (d, hidden) != (block.d, want):
        raise PredictorError(f"{kind} predictor for a {d}×{hidden} W1 cannot serve block '{block.name}' "
                             f"(W1 is {block.d}×{block.hidden}" + (f", {neurons} resident neurons)" if neurons is not None else ")"))


@dataclasses.dataclass
class ExactPredictor:
    """``ĥ = x·W1 + b1`` with the original weights: perfect recall and precision, full cost.

    ``w1`` may be the model's own array (memory-mapped external data included): it is widened to float64
    only while it is used, and its pages are released after.
    """

    w1: np.ndarray
    b1: np.ndarray
    dtype: np.dtype
    kind: str = "exact"

    def check(self, block: FfnBlock, neurons: int | None = None) -> None:
        _expect_shape(self.kind, block, *self.w1.shape, neurons)

    def estimate(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, np.float64) @ self.weights() + self.b1
        _release(self.w1)
        return out

    def weights(self) -> np.ndarray:
        return np.asarray(self.w1, np.float64)

    def emit(self, x: ir.Value, add: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        w1, dtype = self.w1, self.dtype
        w = add(f"{prefix}/predictor/W1", deferred(w1.shape, dtype, lambda: w1.astype(dtype), w1))
        mm = _node("", "MatMul", [x, w], f"{prefix}/predictor/xW1")
        return _add_bias([mm], mm.outputs[0], self.b1, add, prefix, self.dtype)

    def parameters(self) -> float:
        return float(self.w1.size)


def int8_activations(x: np.ndarray, block_size: int) -> np.ndarray:
    """MLAS's accuracy-level-4 rounding of the activations: symmetric int8 per block of K, levels
    ``round(x · (127 / max|x|))`` computed in float32 as both kernels do (a float64 product can round a tie
    the other way), scale ``max|x| / 127``."""
    k = x.shape[1]
    pad = (-k) % block_size
    xb = np.pad(np.asarray(x, np.float32), ((0, 0), (0, pad))).reshape(x.shape[0], (k + pad) // block_size,
                                                                       block_size)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    levels = np.round(xb * inv).astype(np.float64)
    scale = (amax / np.float32(127.0)).astype(np.float64)
    return (levels * scale).reshape(x.shape[0], k + pad)[:, :k]


@dataclasses.dataclass
class LowBitPredictor:
    """``ĥ = MatMulNBits(x, Q(W1)) + b1`` with a 4- or 2-bit block-quantized copy of W1."""

    quant: quantize.Quantized
    b1: np.ndarray
    dtype: np.dtype
    kind: str

    def check(self, block: FfnBlock, neurons: int | None = None) -> None:
        _expect_shape(self.kind, block, self.quant.k, self.quant.n, neurons)
        if self.b1.shape != (self.quant.n,):
            raise PredictorError(f"{self.kind} predictor bias has shape {self.b1.shape}, its weights "
                                 f"({self.quant.n},)")

    def estimate(self, x: np.ndarray) -> np.ndarray:
        xq = int8_activations(np.asarray(x, np.float64), self.quant.block_size)
        return xq @ self.weights() + self.b1

    def weights(self) -> np.ndarray:
        """Dequantized on each call (float64, d·D·8 bytes): not kept for every block at once."""
        return self.quant.dequantize()

    def emit(self, x: ir.Value, add: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        b, scales, zp = quantize.pack(self.quant, self.dtype)
        # b1 rides in MatMulNBits' optional bias input (index 5, after the unused g_idx): one node, no Add.
        # 4 bits: our ai.tardis::MatMulNBits (same inputs without g_idx, same attributes; nbits_op.py).
        ours = self.quant.bits == nbits_op.BITS
        inputs = [x, add(f"{prefix}/predictor/W1_q{self.quant.bits}", b),
                  add(f"{prefix}/predictor/scales", scales), add(f"{prefix}/predictor/zero_points", zp),
                  *([] if ours else [None]), add(f"{prefix}/predictor/b1", self.b1.astype(self.dtype))]
        mm = _node(nbits_op.DOMAIN if ours else MS_DOMAIN, nbits_op.OP_TYPE, inputs, f"{prefix}/h_hat",
                   K=self.quant.k, N=self.quant.n, bits=self.quant.bits, block_size=self.quant.block_size,
                   accuracy_level=ACCURACY_LEVEL)
        return [mm], mm.outputs[0]

    def parameters(self) -> float:
        scale_bits = 8 * np.dtype(self.dtype).itemsize
        return self.quant.stored_bits(scale_bits) / scale_bits + self.b1.size


def _uint8_activations(x: np.ndarray) -> np.ndarray:
    """``DynamicQuantizeLinear``'s rounding of a tensor: uint8 with one scale and zero point for the whole
    tensor, over a range that always includes 0."""
    lo, hi = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


@dataclasses.dataclass
class Int8Predictor:
    """``ĥ = DynamicQuantizeMatMul(x, Q(W1), scales, b1)``: W1 rounded to int8 with one scale per neuron."""

    q: np.ndarray  # (d, D) int8
    scales: np.ndarray  # (D,) float64
    b1: np.ndarray
    dtype: np.dtype
    kind: str = "int8"

    def check(self, block: FfnBlock, neurons: int | None = None) -> None:
        _expect_shape(self.kind, block, *self.q.shape, neurons)

    def estimate(self, x: np.ndarray) -> np.ndarray:
        return _uint8_activations(np.asarray(x, np.float64)) @ self.weights() + self.b1

    def weights(self) -> np.ndarray:
        return self.q.astype(np.float64) * self.scales

    def emit(self, x: ir.Value, add: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        inputs = [x, add(f"{prefix}/predictor/W1_q8", self.q), add(f"{prefix}/predictor/scales",
                  self.scales.astype(np.float32)), None, add(f"{prefix}/predictor/b1", self.b1.astype(np.float32))]
        mm = _node(MS_DOMAIN, "DynamicQuantizeMatMul", inputs, f"{prefix}/h_hat")
        return [mm], mm.outputs[0]

    def parameters(self) -> float:
        return self.q.size / 4.0 + self.scales.size + self.b1.size


def _int8_dtype(dtype: np.dtype) -> None:
    """The int8 predictor serves float32 blocks only."""
    if np.dtype(dtype) != np.float32:
        raise PredictorError(f"the int8 predictor runs ONNX Runtime's DynamicQuantizeMatMul, which takes float32 "
                             f"activations; this model is {np.dtype(dtype).name}: use --predictor int4")


def int8_columns(w1: np.ndarray, b1: np.ndarray, dtype: np.dtype) -> Int8Predictor:
    """Round-to-nearest int8 per neuron (column): at 8 bits GPTQ's gain is below the activation rounding."""
    _int8_dtype(dtype)
    return Int8Predictor(*quantize.int8_columns(w1), b1, np.dtype(dtype))


@dataclasses.dataclass
class LowRankPredictor:
    """``ĥ = (x·U)·V + b1``: the best rank-r approximation of W1 in the calibration inputs' metric."""

    u: np.ndarray  # (d, r)
    v: np.ndarray  # (r, D)
    b1: np.ndarray
    dtype: np.dtype
    kind: str = "lowrank"

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def check(self, block: FfnBlock, neurons: int | None = None) -> None:
        _expect_shape(self.kind, block, self.u.shape[0], self.v.shape[1], neurons)

    def estimate(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) @ self.u) @ self.v + self.b1

    def weights(self) -> np.ndarray:
        return self.u @ self.v

    def emit(self, x: ir.Value, add: AddInitializer, prefix: str) -> tuple[list[ir.Node], ir.Value]:
        first = _node("", "MatMul", [x, add(f"{prefix}/predictor/U", self.u.astype(self.dtype))], f"{prefix}/predictor/xU")
        second = _node("", "MatMul", [first.outputs[0], add(f"{prefix}/predictor/V", self.v.astype(self.dtype))],
                       f"{prefix}/predictor/xUV")
        return _add_bias([first, second], second.outputs[0], self.b1, add, prefix, self.dtype)

    def parameters(self) -> float:
        return float(self.u.size + self.v.size + self.b1.size)


@functools.lru_cache(maxsize=None)
def _require_kernel(bits: int) -> None:
    """Fail early, with a clear message, when this onnxruntime has no ``MatMulNBits`` kernel for ``bits``."""
    probe = LowBitPredictor(quantize.rtn(np.ones((32, 1)), bits, 32), np.zeros(1), np.dtype(np.float32), f"int{bits}")
    proto = ir.to_proto(standalone_model(probe, 32))
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT says "Only 4b quantization is supported" and the like
        raise PredictorError(f"the int{bits} predictor needs ONNX Runtime's {bits}-bit MatMulNBits kernel, which "
                             f"onnxruntime {ort.__version__} lacks ({str(err).splitlines()[-1][-120:]}); "
                             "use --predictor int4") from err


def standalone_model(predictor: Predictor, d: int) -> ir.Model:
    """The predictor's subgraph alone (input ``x`` [n, d] → ``ĥ``), for tests and benchmarks."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.from_numpy(np.dtype(predictor.dtype))),
                 shape=ir.Shape(["n", d]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17, MS_DOMAIN: 1}, name="predictor")

    def add(name: str, array: np.ndarray | ir.LazyTensor) -> ir.Value:
        tensor = array if isinstance(array, ir.LazyTensor) else ir.Tensor(np.ascontiguousarray(array))
        tensor.name = name
        value = ir.Value(name=name, const_value=tensor)
        graph.register_initializer(value)
        return value

    nodes, h_hat = predictor.emit(x, add, "p")
    graph.extend(nodes)
    graph.outputs.append(h_hat)
    model = ir.Model(graph, ir_version=10)
    nbits_op.register(model)
    return model


def _whitened_factors(w1: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``L`` (Cholesky of the input second moments, damped) and the SVD of ``Lᵀ·W1``."""
    g = gram[:-1, :-1]
    g = g + (1e-6 * float(np.mean(np.diag(g))) + 1e-12) * np.eye(g.shape[0])
    chol = np.linalg.cholesky(g)
    p, s, qt = np.linalg.svd(chol.T @ w1, full_matrices=False)
    return chol, p * s, qt


def low_rank(w1: np.ndarray, b1: np.ndarray, gram: np.ndarray, dtype: np.dtype, options: PredictorOptions) -> LowRankPredictor:
    """Rank fixed by ``options.rank`` or the smallest keeping ``options.energy`` of the whitened spectrum,
    capped where ``U, V`` would stop being smaller than ``W1`` (the margins absorb the rest)."""
    chol, ps, qt = _whitened_factors(w1, gram)
    d, hidden = w1.shape
    energy = np.cumsum(np.sum(ps * ps, axis=0))
    rank = options.rank or min(int(np.searchsorted(energy, options.energy * energy[-1]) + 1),
                               d * hidden // (2 * (d + hidden)))
    rank = max(1, min(rank, ps.shape[1]))
    u = np.linalg.solve(chol.T, ps[:, :rank])
    return LowRankPredictor(u, qt[:rank], b1, dtype)


@dataclasses.dataclass
class Built:
    """A predictor attached to its block, with its error scale for the margins."""

    predictor: Predictor
    sigma: np.ndarray  # RMS error of ĥ on the calibration inputs, per predicted neuron
    neurons: np.ndarray | None = None  # the block's neurons it predicts (None: all; else the resident ones)

    def columns(self, values: np.ndarray) -> np.ndarray:
        """The predicted neurons' columns of a (…, D) array."""
        return values if self.neurons is None else values[..., self.neurons]


def neuron_parameters(kind: str, d: int, dtype: np.dtype, options: PredictorOptions | None = None) -> float:
    """Stored parameters one neuron's predictor column costs (dtype-equivalents, bias included)."""
    options = options or PredictorOptions()
    kind = resolve(kind, dtype)
    if kind == "exact":
        return float(d + 1)
    if kind in ("int4", "int2"):
        scale_bits = 8 * np.dtype(dtype).itemsize
        return quantize.stored_bits(d, 1, 4 if kind == "int4" else 2, options.block_for(d), scale_bits) / scale_bits + 1
    if kind == "int8":
        return d / 4.0 + 2.0
    raise PredictorError(f"--target-params and --resident budget the predictor neuron by neuron, and the {kind} "
                         "predictor's first factor is shared by all neurons of a layer: choose exact, int8, int4 "
                         "or int2 with them")


def build(kind: str, block: FfnBlock, gram: np.ndarray | None, options: PredictorOptions | None = None,
          neurons: np.ndarray | None = None) -> Built:
    """Build predictor ``kind`` for ``block`` (or only its ``neurons``); ``gram`` = mean ``[x,1]ᵀ[x,1]``
    over calibration tokens (only the exact predictor works without it)."""
    options = options or PredictorOptions()
    pick = slice(None) if neurons is None else neurons
    b1 = np.asarray(block.b1(), np.float64)[pick]
    dtype = block.dtype.numpy()
    kind = resolve(kind, dtype)
    if kind == "exact" or b1.shape[0] == 0:  # no resident neuron: nothing to predict, an empty exact one
        # the model's own weights (a view when every neuron is predicted), widened only while used
        return Built(ExactPredictor(block.w1()[:, pick], b1, dtype), np.zeros(b1.shape[0]), neurons)
    w1 = np.asarray(block.w1(), np.float64)[:, pick]
    _release(block.w1())
    if gram is None:
        raise PredictorError(f"the {kind} predictor needs the calibration inputs' moments, which these "
                             "statistics lack: recalibrate")
    pred: Predictor
    if kind in ("int4", "int2"):
        bits = 4 if kind == "int4" else 2
        _require_kernel(bits)
        if options.quantizer in (None, "gptq"):
            quant = quantize.gptq(w1, gram[:-1, :-1], bits, options.block_for(w1.shape[0]))
        else:
            quant = quantize.rtn(w1, bits, options.block_for(w1.shape[0]))
        pred = LowBitPredictor(quant, b1, dtype, kind)
    elif kind == "int8":
        pred = int8_columns(w1, b1, dtype)
    elif kind == "lowrank":
        pred = low_rank(w1, b1, gram, dtype, options)
    else:
        raise PredictorError(f"unknown predictor {kind!r}; available: {', '.join(KINDS)}")
    return Built(pred, _rms_of_delta(pred.weights() - w1, gram), neurons)


KINDS = ("exact", "int8", "int4", "int2", "lowrank")
# What ``--predictor`` accepts: a kind, or ``auto`` = int8 for float32 blocks (fast at every token count
# from 16 on, README "Predictors"), int4 for the others (DynamicQuantizeMatMul takes float32 only).
CHOICES = ("auto", *KINDS)


def resolve(kind: str, dtype: np.dtype) -> str:
    """The kind ``--predictor kind`` means for a block of ``dtype``."""
    if kind != "auto":
        return kind
    return "int8" if np.dtype(dtype) == np.float32 else "int4"


def check_options(kind: str, dtypes: Iterable[np.dtype], options: PredictorOptions) -> None:
    """Refuse an option the predictor the blocks get would ignore (``--predictor-block`` and
    ``--predictor-quantizer`` apply to int4 and int2, ``--predictor-rank`` to lowrank), so a setting never
    silently has no effect; and int8 for blocks that are not float32. Runs before calibration."""
    kinds = sorted({resolve(kind, dtype) for dtype in dtypes})
    named = f"--predictor {kind}" if kind != "auto" else f"--predictor auto ({' / '.join(kinds)} for these blocks)"
    if options.block_size is not None and not set(kinds) & {"int4", "int2"}:
        raise TardisError(f"--predictor-block applies to the int4 and int2 predictors, not {named}: choose "
                          "--predictor int4 (or int2), or drop --predictor-block")
    if options.rank is not None and "lowrank" not in kinds:
        raise TardisError(f"--predictor-rank applies to the lowrank predictor, not {named}: choose --predictor "
                          "lowrank, or drop --predictor-rank")
    if options.quantizer is not None and not set(kinds) & {"int4", "int2"}:
        raise TardisError(f"--predictor-quantizer applies to the int4 and int2 predictors, not {named}: choose "
                          "--predictor int4 (or int2), or drop --predictor-quantizer")
    for dtype in dtypes:
        if resolve(kind, dtype) == "int8":
            _int8_dtype(dtype)


class MarginSearch:
    """Streams, per layer, how recall and flagged share grow with the margin multiplier ``z``.

    A pair (token, neuron) is flagged at multiplier z iff ``ĥ ∉ [lo + zσ, hi − zσ]``, i.e. iff
    ``z > t`` with ``t = min(hi − ĥ, ĥ − lo)/σ``; so one histogram of ``t`` over all pairs and one over
    the truly out-of-range pairs give recall(z) and flagged share(z) for every z at once.
    """

    def __init__(self, lines: Lines, sigma: np.ndarray) -> None:
        self.lo, self.hi = lines.lo, lines.hi
        self.exact = sigma <= 0
        self.sigma = np.where(self.exact, 1.0, sigma)
        self.flag_hist = np.zeros(Z_GRID.size + 1)
        self.out_hist = np.zeros(Z_GRID.size + 1)
        self.pairs = 0

    def add(self, h: np.ndarray, h_hat: np.ndarray) -> None:
        """Exact ``h`` and predicted ``ĥ`` for the same rows (tokens, D)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.minimum(self.hi - h_hat, h_hat - self.lo)
            t = np.where(self.exact, np.where(raw < 0, -np.inf, np.inf), raw / self.sigma)
        bins = np.searchsorted(Z_GRID, t, side="right")  # flagged at Z_GRID[k] iff t < Z_GRID[k] iff bin <= k
        out = (h < self.lo) | (h > self.hi)
        self.flag_hist += np.bincount(bins.ravel(), minlength=Z_GRID.size + 1)
        self.out_hist += np.bincount(bins[out], minlength=Z_GRID.size + 1)
        self.pairs += h.size

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, flagged share) at every ``Z_GRID`` value."""
        out = self.out_hist.sum()
        recall = np.cumsum(self.out_hist)[:-1] / out if out else np.ones(Z_GRID.size)
        flagged = np.cumsum(self.flag_hist)[:-1] / max(self.pairs, 1)
        return recall, flagged

    def choose(self, target: float) -> "Margin":
        """The smallest multiplier whose calibrated recall meets ``target``."""
        recall, flagged = self.curve()
        ok = np.nonzero(recall >= target - 1e-12)[0]
        k = int(ok[0]) if ok.size else Z_GRID.size - 1
        out_share = self.out_hist.sum() / max(self.pairs, 1)
        return Margin(float(Z_GRID[k]), float(recall[k]), float(flagged[k]), float(out_share))


@dataclasses.dataclass
class Margin:
    """The chosen multiplier and what it achieved on the calibration data."""

    z: float
    recall: float
    flagged_share: float
    out_share: float

    def widths(self, sigma: np.ndarray) -> np.ndarray:
        return self.z * sigma
