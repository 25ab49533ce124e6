"""Per-neuron streaming statistics of pre-activations: histograms with exact per-bin moments.

Memory is fixed by (neurons × bins), never by the number of calibration tokens. Every neuron shares one
grid, dense near zero (where GELU bends) and geometric in the tails: edges at ``s·sinh(u)`` for ``u``
uniform, covering ±1e4 with open-ended first and last bins. Each bin keeps the exact sums
``n, Σh, Σh², Σg, Σg², Σh·g`` with ``g = GELU(h)``, so the least-squares line of GELU on *any* interval
between grid edges — and its squared error — comes out of prefix sums in O(1), which is what the
error-aware range search needs. Histograms of separate shards merge by addition.

Beside the histograms, each block keeps the second moments of its *inputs*, ``Σ[x,1]ᵀ[x,1]``
((d+1)², also independent of token count): the predictors' GPTQ and whitened SVD and their error
scales need them.

Large statistics (a block above :data:`SPILL_BYTES`, e.g. 201 MB for 8,192 neurons) live in an
anonymous scratch file, memory-mapped: whoever is done with a block calls :meth:`NeuronStats.release`
and its pages leave the resident set (the kernel keeps them in its page cache or writes them back), so
a model's statistics cost disk, not memory, beyond the block being worked on. Results are identical.
"""

from __future__ import annotations

import dataclasses
import mmap
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tardis_compile import modelio
from tardis_compile.errors import CalibrationDataError
from tardis_compile.gelu import gelu

MOMENTS = ("n", "h", "hh", "g", "gg", "hg")
DEFAULT_BINS = 512
_SCALE = 0.25
_LIMIT = 1.0e4
SPILL_BYTES = 64 * 2**20  # a block's moments above this live in a scratch file (see the module doc)


class _Scratch(np.memmap):
    """A float64 array in a deleted scratch file, mapped shared (dropping its pages keeps the data)."""

    def __array_wrap__(self, arr, context=None, return_scalar=False):  # results are plain arrays
        if arr is self:
            return arr
        arr = np.asarray(arr).view(np.ndarray)
        return arr[()] if return_scalar else arr


def _scratch(shape: tuple[int, ...], like: np.ndarray | None = None) -> _Scratch:
    with tempfile.TemporaryFile(prefix="tardis-stats-") as f:  # the mapping keeps the file alive
        out = _Scratch(f, np.float64, mode="w+", shape=shape)
    if like is not None:
        out[...] = like
        _drop(out)
    return out


def _drop(array: np.ndarray | None) -> None:
    """Drop the resident pages of a scratch array (its data stay in the file)."""
    if isinstance(array, _Scratch):
        base = array
        while base is not None and not isinstance(base, mmap.mmap):
            base = base.base
        if base is not None:
            base.madvise(mmap.MADV_DONTNEED)


@dataclasses.dataclass
class Grid:
    """The shared bin grid: ``bins`` bins, inner edges ``scale·sinh(u)`` with ``u`` uniform."""

    bins: int = DEFAULT_BINS
    scale: float = _SCALE
    limit: float = _LIMIT

    @property
    def _u_max(self) -> float:
        return float(np.arcsinh(self.limit / self.scale))

    def edges(self) -> np.ndarray:
        """``bins + 1`` edges; the first and last are ∓inf (open-ended overflow bins)."""
        u = np.linspace(-self._u_max, self._u_max, self.bins - 1)
        inner = self.scale * np.sinh(u)
        return np.concatenate([[-np.inf], inner, [np.inf]])

    def index(self, h: np.ndarray) -> np.ndarray:
        """Bin index of each value (int64)."""
        u = np.arcsinh(h.astype(np.float64, copy=False) / self.scale)
        step = 2.0 * self._u_max / (self.bins - 2)
        idx = np.floor((u + self._u_max) / step).astype(np.int64) + 1
        return np.clip(idx, 0, self.bins - 1)


@dataclasses.dataclass
class NeuronStats:
    """Histogram moments of one block's D neurons: ``moments[k]`` is (D, bins) for ``MOMENTS[k]``."""

    variant: str
    grid: Grid
    moments: np.ndarray  # (6, D, bins) float64
    gram: np.ndarray | None = None  # (d+1, d+1) Σ[x,1]ᵀ[x,1] of the block inputs, when collected
    source: str = ""  # digest of the block's first layer (calibrate.weights_digest): whose statistics these are

    def __post_init__(self) -> None:
        if self.moments.nbytes > SPILL_BYTES and not self.spilled:
            self.moments = _scratch(self.moments.shape, self.moments)
            if self.gram is not None and not isinstance(self.gram, _Scratch):
                self.gram = _scratch(self.gram.shape, self.gram)

    @classmethod
    def empty(cls, neurons: int, variant: str, grid: Grid | None = None, inputs: int | None = None) -> "NeuronStats":
        grid = grid or Grid()
        shape = (len(MOMENTS), neurons, grid.bins)
        big = np.prod(shape) * 8 > SPILL_BYTES
        zeros = _scratch if big else (lambda shape: np.zeros(shape, np.float64))
        gram = zeros((inputs + 1, inputs + 1)) if inputs is not None else None
        return cls(variant, grid, zeros(shape), gram)

    @property
    def spilled(self) -> bool:
        """Whether the moments live in a scratch file (see the module doc)."""
        return isinstance(self.moments, _Scratch)

    def add_inputs(self, x: np.ndarray) -> None:
        """Accumulate the block inputs ``x`` (tokens, d) into ``gram``."""
        xa = np.concatenate([np.asarray(x, np.float64), np.ones((x.shape[0], 1))], axis=1)
        self.gram += xa.T @ xa

    def input_moments(self) -> np.ndarray:
        """Mean ``[x,1]ᵀ[x,1]`` over tokens; a clear error when the statistics predate it."""
        if self.gram is None:
            raise ValueError("these statistics hold no input moments (saved by an older version?): recalibrate")
        out = self.gram / max(self.gram[-1, -1], 1.0)
        _drop(self.gram)
        return out

    @property
    def neurons(self) -> int:
        return self.moments.shape[1]

    @property
    def tokens(self) -> int:
        """Calibration tokens seen (every neuron sees every token)."""
        return int(round(self.moments[0, 0].sum())) if self.neurons else 0

    def add(self, h: np.ndarray) -> None:
        """Accumulate pre-activations ``h`` of shape (tokens, D)."""
        h = np.asarray(h, dtype=np.float64).reshape(-1, self.neurons)
        if h.shape[0] == 0:
            return
        bins = self.grid.bins
        flat = (self.grid.index(h) + np.arange(self.neurons, dtype=np.int64) * bins).ravel()
        g = gelu(h, self.variant)
        size = self.neurons * bins
        for k, weights in enumerate((None, h, h * h, g, g * g, h * g)):
            w = None if weights is None else weights.ravel()
            self.moments[k] += np.bincount(flat, weights=w, minlength=size).reshape(self.neurons, bins)

    def merge(self, other: "NeuronStats") -> None:
        """Add another shard's statistics (same block, same grid)."""
        if other.grid != self.grid or other.moments.shape != self.moments.shape or other.variant != self.variant:
            raise ValueError("cannot merge statistics with a different grid, variant or neuron count")
        if self.source and other.source and self.source != other.source:
            raise ValueError("cannot merge statistics of different models (their blocks' weights differ)")
        self.moments += other.moments
        if self.gram is not None and other.gram is not None:
            self.gram += other.gram
        else:
            self.gram = None

    def release(self) -> None:
        """Done with this block for now: spilled statistics drop their resident pages (the data stay);
        in-memory ones are unaffected."""
        _drop(self.moments)
        _drop(self.gram)

    def prefix(self) -> np.ndarray:
        """(6, D, bins + 1) prefix sums over bins: interval [a, b) sums are ``P[..., b] - P[..., a]``."""
        out = np.zeros(self.moments.shape[:2] + (self.moments.shape[2] + 1,), np.float64)
        np.cumsum(self.moments, axis=2, out=out[:, :, 1:])
        _drop(self.moments)
        return out


def stats_path(path: str | Path) -> Path:
    """Where :func:`save` writes ``path``: with a ``.npz`` suffix added when it has none."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def save(stats: dict[str, NeuronStats], path: str | Path) -> None:
    """Save per-block statistics to one ``.npz`` (reloadable, mergeable across shards); written array
    by array as :func:`numpy.savez_compressed` does, releasing each block when it is written, into a
    temporary file that replaces ``stats_path(path)`` only once complete."""
    with modelio.staged_file(stats_path(path)) as tmp:
        _write(stats, tmp)


def _write(stats: dict[str, NeuronStats], path: Path) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for name, s in stats.items():
            arrays = {"moments": s.moments, "grid": np.array([s.grid.bins, s.grid.scale, s.grid.limit]),
                      "variant": np.array(s.variant)}
            if s.gram is not None:
                arrays["gram"] = s.gram
            if s.source:
                arrays["source"] = np.array(s.source)
            for key, array in arrays.items():
                with archive.open(f"{name}/{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array).view(np.ndarray), allow_pickle=False)
            s.release()


def saved_path(path: str | Path) -> Path:
    """The file :func:`load` reads for ``path``: ``path`` itself, or :func:`stats_path` when only that
    exists (``--stats-out st`` wrote ``st.npz``, so ``--stats-in st`` finds it)."""
    path = Path(path)
    return stats_path(path) if not path.is_file() and stats_path(path).is_file() else path


def load(path: str | Path) -> dict[str, NeuronStats]:
    """Inverse of :func:`save`; a missing or foreign file is a :class:`CalibrationDataError`."""
    path = saved_path(path)
    if not path.is_file():
        raise CalibrationDataError(f"statistics '{path}': no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = sorted({key.split("/")[0] for key in data.files})
            out = {}
            for name in names:
                bins, scale, limit = data[f"{name}/grid"]
                gram = data[f"{name}/gram"] if f"{name}/gram" in data.files else None
                source = str(data[f"{name}/source"]) if f"{name}/source" in data.files else ""
                out[name] = NeuronStats(str(data[f"{name}/variant"]), Grid(int(bins), float(scale), float(limit)),
                                        data[f"{name}/moments"], gram, source)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise CalibrationDataError(f"statistics '{path}': not a file written by --stats-out "
                                   f"({type(err).__name__}: {str(err)[:120]})") from err
    return out
