"""Calibration and evaluation data: ``.npz`` feeds, a ``load_data()`` script, or text + tokenizer.

Every source becomes a re-iterable *feed source* (calling it yields feed dicts ``{input name: array}``),
because calibration streams the data twice (ranges, then the refit) and nothing may hold all of it.
Feeds are validated against the model's inputs before anything runs, so a wrong name, dtype or shape is
reported as such rather than as an ONNX Runtime traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from tardis_compile.errors import CalibrationDataError, one_line

Feed = dict[str, np.ndarray]
FeedSource = Callable[[], Iterable[Feed]]

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclasses.dataclass
class InputSpec:
    """A model input as ONNX Runtime sees it: name, numpy dtype, shape (ints or symbolic names)."""

    name: str
    dtype: type
    shape: list


def input_specs(session) -> list[InputSpec]:
    """The inputs of an ``onnxruntime.InferenceSession``."""
    return [InputSpec(i.name, _ORT_TO_NUMPY.get(i.type, object), list(i.shape)) for i in session.get_inputs()]


def validate(feed: Mapping[str, np.ndarray], specs: list[InputSpec], where: str) -> Feed:
    """Check one feed dict against the model inputs; return it with arrays as numpy."""
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        raise CalibrationDataError(
            f"{where}: feed names do not match the model inputs: missing {missing}, unexpected {extra} "
            f"(model inputs: {sorted(names)})")
    out: Feed = {}
    for spec in specs:
        arr = np.asarray(feed[spec.name])
        if arr.dtype != spec.dtype:
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' has dtype {arr.dtype}, the model expects "
                f"{np.dtype(spec.dtype).name}")
        if arr.ndim != len(spec.shape):
            raise CalibrationDataError(
                f"{where}: input '{spec.name}' has shape {list(arr.shape)} (rank {arr.ndim}), the model "
                f"expects rank {len(spec.shape)} {spec.shape}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise CalibrationDataError(
                    f"{where}: input '{spec.name}' has shape {list(arr.shape)}, the model expects "
                    f"{spec.shape} (axis {axis} must be {want})")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise CalibrationDataError(f"{where}: input '{spec.name}' holds {bad} NaN or infinite value(s) of "
                                       f"{arr.size}")
        out[spec.name] = arr
    _check_symbolic_dims(out, specs, where)
    # An input may be empty along a dynamic axis (a KV-cache model's past at prefill), not the whole feed.
    if all(arr.size == 0 for arr in out.values()):
        shapes = ", ".join(f"'{k}' {list(v.shape)}" for k, v in out.items())
        raise CalibrationDataError(f"{where}: every input is empty ({shapes})")
    return out


def _check_symbolic_dims(feed: Feed, specs: list[InputSpec], where: str) -> None:
    """Axes that the model names with the same symbol (e.g. ``batch``) must have one size across inputs.
    Only plain names count: exporters write expressions such as ``past_sequence + sequence`` on axes whose
    sizes differ (a KV cache and its attention mask)."""
    seen: dict[str, tuple[str, int, int]] = {}
    for spec in specs:
        for axis, (size, symbol) in enumerate(zip(feed[spec.name].shape, spec.shape)):
            if not isinstance(symbol, str) or not symbol.isidentifier():
                continue
            first = seen.setdefault(symbol, (spec.name, axis, size))
            if first[2] != size:
                raise CalibrationDataError(
                    f"{where}: input '{spec.name}' axis {axis} has size {size}, but input '{first[0]}' axis "
                    f"{first[1]} has size {first[2]}; the model names both '{symbol}', so they must agree")


class FileFeed(dict):
    """A feed dict read from a file, which data errors name."""

    def __init__(self, arrays: Mapping[str, np.ndarray], path: Path) -> None:
        super().__init__(arrays)
        self.path = path


def validated(source: FeedSource, specs: list[InputSpec], what: str) -> FeedSource:
    """Wrap a source so every feed is validated and an empty source is an error. A source that is already
    validated (against the same model's inputs: every caller passes one model's data) is returned as is,
    so later passes do not check every batch again."""
    if getattr(source, "validated", False):
        return source

    def run() -> Iterator[Feed]:
        count = 0
        for i, feed in enumerate(source()):
            if not isinstance(feed, Mapping):
                raise CalibrationDataError(f"{what}: item {i} is a {type(feed).__name__}, not a dict of "
                                           "input name → array")
            count += 1
            origin = f" ('{feed.path}')" if isinstance(feed, FileFeed) else ""
            yield validate(feed, specs, f"{what}, batch {i}{origin}")
        if count == 0:
            raise CalibrationDataError(f"{what}: no data (the source yielded no feed dicts)")

    run.validated = True  # type: ignore[attr-defined]
    return run


def from_npz(path: Path) -> FeedSource:
    """One ``.npz`` (one feed dict) or a directory of them (one feed dict each, sorted by name)."""
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files:
        raise CalibrationDataError(f"calibration data '{path}': directory holds no .npz files")

    def run() -> Iterator[Feed]:
        for file in files:
            yield read_npz(file)

    return run


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip's end record
_NPY_MAGIC = b"\x93NUMPY"


def read_npz(file: Path) -> Feed:
    """All arrays of one ``.npz`` file, read in full; a file that is not one, or is truncated or corrupt,
    is a :class:`CalibrationDataError` naming the file and the problem."""
    where = f"calibration data '{file}'"
    try:
        with open(file, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as err:
        raise CalibrationDataError(f"{where}: cannot be read ({err.strerror or err})") from err
    if head.startswith(_NPY_MAGIC):
        raise CalibrationDataError(f"{where}: a single .npy array, not a .npz archive of named arrays; save "
                                   "the feeds with np.savez(path, input_name=array, ...)")
    if not head.startswith(_ZIP_MAGIC):
        problem = "the file is empty" if not head else "it is not a zip file"
        raise CalibrationDataError(f"{where}: not a readable .npz archive ({problem}); a .npz is written by "
                                   "np.savez(path, input_name=array, ...)")
    try:
        # Members are read (and CRC-checked, decompressed) only when indexed: do it all inside the try.
        with np.load(file, allow_pickle=False) as data:
            return FileFeed({k: data[k] for k in data.files}, file)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise CalibrationDataError(f"{where}: not a readable .npz archive (truncated or corrupt: "
                                   f"{one_line(err)})") from err
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        # ValueError: a damaged .npy header inside, or an object array (allow_pickle=False);
        # NotImplementedError/RuntimeError: a compression method or encryption zipfile cannot read.
        raise CalibrationDataError(f"{where}: not a readable .npz archive ({type(err).__name__}: "
                                   f"{one_line(err)})") from err


def from_script(path: Path) -> FeedSource:
    """A Python file defining ``load_data()`` that yields feed dicts (the Polygraphy convention)."""
    spec = importlib.util.spec_from_file_location(f"tardis_calib_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise CalibrationDataError(f"calibration script '{path}' cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # the user's script: report, do not crash (nor exit)
        raise CalibrationDataError(f"calibration script '{path}' failed to import: {err!r}") from err
    load = getattr(module, "load_data", None)
    if not callable(load):
        raise CalibrationDataError(f"calibration script '{path}' defines no load_data() function")

    return from_callable(load, f"calibration script '{path}': load_data()", "load_data()")


def from_callable(load: Callable[[], Iterable[Feed]], where: str, name: str) -> FeedSource:
    """A source that calls ``load`` for every pass (a script's ``load_data()``, or a callable given to the
    API): its failures, a return of None or of one dict, and an iterator returned twice (or already used
    up) become one :class:`CalibrationDataError` naming ``where``."""
    fresh = (f"{name} must return a fresh iterable on each call, a list or a new generator, because the data "
             f"are read more than once (return a list, or make {name} itself yield the feed dicts)")
    last: object = None  # the iterator the previous call returned (a weak reference where it allows one)
    read_any = False  # whether some call's data yielded anything

    def run() -> Iterator[Feed]:
        nonlocal last, read_any
        try:
            items = load()
            if items is None or isinstance(items, Mapping):
                raise CalibrationDataError(f"{where} returned {'None' if items is None else 'one dict'}; it must "
                                           "return or yield feed dicts (input name → array)")
            it = iter(items)
        except CalibrationDataError:
            raise
        except Exception as err:  # the user's code: report it, do not crash
            raise CalibrationDataError(f"{where} failed: {type(err).__name__}: {err}") from err
        once = it is items  # an iterator (a generator object included) can be read only once
        if once:
            previous = last() if isinstance(last, weakref.ref) else last
            if previous is items:
                raise CalibrationDataError(f"{where} returned the same {type(items).__name__} object again; {fresh}")
            try:
                last = weakref.ref(items)
            except TypeError:  # e.g. a list iterator: no weak references
                last = items
        count = 0
        while True:
            try:
                feed = next(it)
            except StopIteration:
                break
            except CalibrationDataError:
                raise
            except Exception as err:  # the user's code: report it, do not crash
                raise CalibrationDataError(f"{where} failed: {type(err).__name__}: {err}") from err
            count += 1
            yield feed
        if once and count == 0 and read_any:
            raise CalibrationDataError(f"{where} returned an exhausted {type(items).__name__} (its data were "
                                       f"already read); {fresh}")
        read_any = read_any or count > 0

    return run


def read_documents(path: Path) -> list[str]:
    """Documents of a text file: blocks separated by blank lines (or single lines if there are none)."""
    with open(path, "rb") as f:
        if b"\x00" in f.read(4096):
            raise CalibrationDataError(f"calibration data '{path}' is read as text but looks binary (NUL bytes); "
                                       "give a .npz of feed dicts, a folder of them, a .py with load_data(), or text")
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = [" ".join(b.split()) for b in text.split("\n\n")]
    docs = [b for b in blocks if b]
    if len(docs) <= 1:
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    return docs


def from_text(
    docs: list[str], tokenizer_json: Path, input_names: list[str], *, batch_size: int = 8,
    max_length: int = 128, mask_input: str | None = None,
) -> FeedSource:
    """Tokenize documents with a Hugging Face ``tokenizer.json`` into padded batches.

    Produces ``input_ids``, the attention mask and ``token_type_ids`` — whichever of them the model takes.
    The mask goes to ``mask_input``, else to ``attention_mask``, else to the one input whose name holds
    ``attention_mask`` (e.g. ``encoder_attention_mask``).
    """
    masks = [n for n in input_names if "attention_mask" in n]
    mask_name = mask_input or (masks[0] if len(masks) == 1 else "attention_mask")
    if not docs:
        raise CalibrationDataError("calibration text holds no documents")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise CalibrationDataError(f"tokenizer '{tokenizer_json}' cannot be read: {err}") from err
    tok.enable_truncation(max_length)
    pad_id = tok.token_to_id("[PAD]") or 0
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]")

    def run() -> Iterator[Feed]:
        it = iter(docs)
        while batch := list(itertools.islice(it, batch_size)):
            enc = tok.encode_batch(batch)
            arrays = {
                "input_ids": np.array([e.ids for e in enc], np.int64),
                mask_name: np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
            }
            yield {k: v for k, v in arrays.items() if k in input_names}

    return run


def holdout_split(source: FeedSource, every: int) -> tuple[FeedSource, FeedSource]:
    """Split batches: each ``every``-th batch is held out for verification, the rest calibrate."""

    def calib() -> Iterator[Feed]:
        for i, feed in enumerate(source()):
            if every <= 1 or i % every != every - 1:
                yield feed

    def held() -> Iterator[Feed]:
        for i, feed in enumerate(source()):
            if every > 1 and i % every == every - 1:
                yield feed

    calib.validated = held.validated = getattr(source, "validated", False)  # type: ignore[attr-defined]
    return calib, held


def mask_rows(feed: Feed, rows: int, mask_name: str | None) -> np.ndarray | None:
    """Boolean mask of non-padding rows for a tensor whose leading axes hold ``rows`` rows, if known."""
    names = [mask_name] if mask_name else [k for k in feed if "attention_mask" in k]
    for name in names:
        if name in feed and feed[name].size == rows:
            return feed[name].reshape(-1) != 0
    return None
