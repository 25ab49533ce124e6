"""Read and write models without ever losing the user's file.

* Load through ``onnx_ir`` (external data stays memory-mapped, no full proto copy), after checking the
  file exists, parses and passes ``onnx.checker``.
* Write to a temporary folder beside the destination, validate there (``onnx.checker`` full check and an
  ONNX Runtime session), then move the data file and the model into place (``os.replace``, atomic on one
  file system). The input model and its external data are never a destination.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tardis_compile.errors import ModelLoadError, OutputPathError

TWO_GB = 2**31
_EXTERNAL_THRESHOLD = 1_800_000_000  # leave headroom below protobuf's 2 GB limit


def require_file(path: str | os.PathLike) -> None:
    """A :class:`ModelLoadError` naming ``path`` unless it is a file."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"cannot read model '{path}': {'a directory' if p.is_dir() else 'no such file'}")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"cannot read model '{path}': the file is empty")


def check(path: str | os.PathLike) -> bool:
    """Check that ``path`` is a readable, valid ONNX model (a :class:`ModelLoadError` naming the file if
    not); returns whether its nodes need a topological sort first."""
    path = Path(path)
    require_file(path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # ONNX Runtime's float16 converter appends its Casts at the end of the node list; ORT sorts
        # such a graph itself, so we do too rather than refuse an otherwise valid model.
        if "topologically sorted" not in first:
            raise ModelLoadError(f"invalid ONNX model '{path}': {first}") from err
        _require_sources(path)
        return True
    except Exception as err:  # protobuf decode errors and friends
        raise ModelLoadError(f"cannot read model '{path}': not a valid ONNX file ({type(err).__name__}: "
                             f"{str(err).strip()[:200] or 'unparseable'})") from err
    return False


def load(path: str | os.PathLike) -> ir.Model:
    """Load and check a model; every failure is a :class:`ModelLoadError` naming the file."""
    path = Path(path)
    unsorted = check(path)
    try:
        model = ir.load(path)
    except Exception as err:
        raise ModelLoadError(f"cannot read model '{path}': {type(err).__name__}: {err}") from err
    _check_external_sizes(model, path)
    if unsorted:
        common_passes.TopologicalSortPass()(model)
    return model


def _require_sources(path: Path) -> None:
    """What the checker skips once it finds nodes out of order: every node input has a source."""
    graph = onnx.load(str(path), load_external_data=False).graph
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    known |= {t.values.name for t in graph.sparse_initializer}
    known |= {o for n in graph.node for o in n.output}
    for node in graph.node:
        for name in node.input:
            if name not in known:
                raise ModelLoadError(f"invalid ONNX model '{path}': node '{node.name}' ({node.op_type}) reads "
                                     f"'{name}', which no node, input or initializer provides")


def _check_external_sizes(model: ir.Model, path: Path) -> None:
    """A :class:`ModelLoadError` when an external data file is shorter than the tensors it should hold."""
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor):
            file = Path(t.base_dir) / t.location
            need = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
            size = file.stat().st_size if file.is_file() else -1
            if size < need:
                what = "is missing" if size < 0 else f"holds {size:,} bytes, tensor '{name}' needs {need:,}"
                raise ModelLoadError(f"cannot read model '{path}': external data file '{file}' {what}")


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (what decides external data)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def drop_pages(*items: object) -> None:
    """Drop the resident pages of the read-only file mappings behind ``items`` (arrays or tensors).

    Weights read in place are views of memory-mapped external data: every page touched stays in this
    process's resident set until the mapping is closed, although the kernel can read it back from its
    page cache at any time. Dropping the pages of a block's weights once a step is done with them keeps
    the resident set at one block instead of the whole model. The data stay valid (the next access maps
    them again). Only read-only mappings are touched; anything else (in-memory arrays, writable or
    private mappings) is left alone.
    """
    for item in items:
        if isinstance(item, ir.ExternalTensor):
            item = getattr(item, "raw", None)
        while item is not None and not isinstance(item, mmap.mmap):
            item = item.obj if isinstance(item, memoryview) else getattr(item, "base", None)
        if item is None:
            continue
        try:
            with memoryview(item) as view:
                if not view.readonly:
                    continue
            item.madvise(mmap.MADV_DONTNEED)
        except (ValueError, OSError):  # closed meanwhile, or madvise unavailable: only a hint
            pass


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def ort_session(model: ir.Model, options: "ort.SessionOptions", scratch: Path) -> "ort.InferenceSession":
    """An ONNX Runtime session over an in-memory model, without copying its external weights.

    Weights still in their original external data files stay there: the graph (plus any in-memory
    tensors) goes to ORT as bytes and ORT reads the external files from their folder
    (``session.model_external_initializers_file_folder_path``). Only when the in-memory tensors
    themselves approach protobuf's 2 GB limit, or the external files lie in several folders, is the
    model written to ``scratch`` with external data. Prepacking is disabled: it would keep a second,
    repacked copy of every MatMul weight on the heap (calibration and verification run a few batches,
    where prepacking buys little).
    """
    import onnxruntime as ort

    external = [t for t in _initializer_tensors(model) if isinstance(t, ir.ExternalTensor)]
    in_memory = sum(t.nbytes for t in _initializer_tensors(model) if not isinstance(t, ir.ExternalTensor))
    folders = {str(t.base_dir) for t in external}
    options.add_session_config_entry("session.disable_prepacking", "1")
    providers = ["CPUExecutionProvider"]
    if in_memory <= _EXTERNAL_THRESHOLD and len(folders) <= 1:
        if folders:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folders.pop())
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=providers)
    path = scratch / "session.onnx"
    ir.save(model, path, format="protobuf", external_data="session.onnx.data")
    return ort.InferenceSession(str(path), options, providers=providers)


def _initializer_tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    return [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]


def _external_files(model_path: Path) -> set[Path]:
    """External data files a model on disk refers to (without loading the weights)."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # unreadable input: load() reports it precisely
        return set()
    files = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add((model_path.parent / entry.value).resolve())
    return files


def check_destination(src: Path, dst: Path, *, reads: Mapping[str, object] | None = None,
                      what: str = "output path") -> None:
    """Refuse to write ``dst`` (or its ``<dst>.data``) over the input model, a file the input depends on
    (its external data), or another file the run reads (``reads``: description → path; data given as
    arrays or callables is skipped). Also refuses a directory as ``dst``, and a folder that is missing or
    that this user cannot write to."""
    given, dst = Path(src), Path(dst).resolve()
    src = given.resolve()
    protected = {src: "the input model"}
    # external data sits beside the path as given (onnx reads it there), which for a symlinked model is not
    # beside the file the link resolves to: protect both
    for model_path in {given, src}:
        if model_path.is_file():
            protected.update({f: "the input model's external data" for f in _external_files(model_path)})
    for label, path in (reads or {}).items():
        if isinstance(path, (str, os.PathLike)) and str(path):
            path = Path(path)
            protected.setdefault(path.resolve(), label)
            if path.is_dir():  # a folder of data files: every file in it is read
                for f in path.iterdir():
                    if f.is_file():
                        protected.setdefault(f.resolve(), f"{label} ('{f.name}' in '{path}')")
    data = dst.with_name(dst.name + ".data")
    for path in (dst, data):
        if path in protected:
            raise OutputPathError(f"{what} '{path}' is {protected[path]}; choose another path (inputs are "
                                  "never overwritten)")
    for path in (dst, data):
        if path.is_dir():
            raise OutputPathError(f"{what} '{path}' is a directory")
    if dst.parent.exists() and not dst.parent.is_dir():
        raise OutputPathError(f"{what} '{dst}': '{dst.parent}' is a file, not a directory")
    if not dst.parent.is_dir():
        raise OutputPathError(f"{what}: directory '{dst.parent}' does not exist")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} '{dst}': cannot write to directory '{dst.parent}' (permission denied)")


def check_model_name(dst: Path, what: str = "output path") -> None:
    """Refuse a model file name that onnx reads as one of its text formats (``.json``, ``.textproto``,
    ``.onnxtxt``, ...): the model is written as binary protobuf, which ``onnx.load`` would then misread."""
    fmt = onnx.serialization.registry.get_format_from_file_extension(Path(dst).suffix)
    if fmt not in (None, "protobuf"):
        raise OutputPathError(f"{what} '{dst}': onnx reads a '{Path(dst).suffix}' file as its {fmt} text format, "
                              "but the model is written as binary protobuf; name it .onnx")


@contextlib.contextmanager
def staged_file(dst: Path) -> Iterator[Path]:
    """A temporary path beside ``dst`` to write to; it replaces ``dst`` only when the block completes (an
    error or an interrupt leaves ``dst`` as it was and removes the temporary file)."""
    with _staging(Path(dst).parent) as tmp:
        yield tmp / Path(dst).name
        os.replace(tmp / Path(dst).name, dst)


def write_text(dst: Path, text: str) -> None:
    """Write a small text file atomically (:func:`staged_file`)."""
    with staged_file(dst) as tmp:
        tmp.write_text(text)


def save(model: ir.Model, dst: str | os.PathLike, *, external_data: bool | None = None,
         validate: Callable[[Path], None] | None = None) -> Path:
    """Validate and write ``model`` to ``dst`` atomically; external data goes to ``<dst>.data``.

    ``external_data=None`` decides by size (on above ~1.8 GB of weights, or when the input had it).
    ``validate`` gets the temporary path and may raise; nothing is moved into place if it does.
    """
    dst = Path(dst)
    if external_data is None:
        external_data = uses_external_data(model) or weight_bytes(model) > _EXTERNAL_THRESHOLD
    with _staging(dst.parent) as tmp:
        tmp_model = tmp / dst.name
        data_name = dst.name + ".data"
        # binary protobuf whatever the suffix (onnx would pick a text format for .json / .textproto / .onnxtxt)
        ir.save(model, tmp_model, format="protobuf", external_data=data_name if external_data else None)
        onnx.checker.check_model(str(tmp_model), full_check=True)
        if validate is not None:
            with _read_back(model, tmp_model) if external_data else contextlib.nullcontext():
                validate(tmp_model)
        old_data = dst.parent / data_name
        # a self-contained model replacing one that kept its weights in <dst>.data: that file goes too
        stale = not external_data and dst.is_file() and old_data.resolve() in _external_files(dst)
        _replace_pair(tmp, tmp_model, dst, data_name if (tmp / data_name).exists() else None)
        if stale:
            old_data.unlink(missing_ok=True)
    return dst


def _replace_pair(tmp: Path, tmp_model: Path, dst: Path, data_name: str | None) -> None:
    """Move the staged model (and its data file) over ``dst`` (and ``<dst>.data``). Two renames cannot be
    one atomic step, so the old data file is set aside first and put back if the model's rename fails or
    is interrupted: ``dst`` never ends up reading another run's weights."""
    placed = backup = None
    try:
        if data_name is not None:
            old_data = dst.parent / data_name
            if old_data.exists():
                backup = tmp / (data_name + ".previous")
                os.replace(old_data, backup)
            os.replace(tmp / data_name, old_data)
            placed = old_data
        os.replace(tmp_model, dst)
    except BaseException as err:
        if placed is not None:
            if backup is not None:
                os.replace(backup, placed)
            else:
                placed.unlink(missing_ok=True)
        elif backup is not None:
            os.replace(backup, dst.parent / data_name)
        if isinstance(err, OSError):
            raise OutputPathError(f"cannot write '{dst}': {err.strerror or err}; the previous file is unchanged"
                                  ) from err
        raise


@contextlib.contextmanager
def _read_back(model: ir.Model, path: Path) -> Iterator[None]:
    """While the written model is validated, ``model``'s initializers are the tensors just written
    (memory-mapped from the new data file): verification then reads the file in place instead of
    recomputing deferred tensors or serialising in-memory ones into another copy."""
    written = {name: value.const_value for name, value in ir.load(path).graph.initializers.items()}
    swapped = []
    for name, value in model.graph.initializers.items():
        old, new = value.const_value, written.get(name)
        if old is None or new is None or old.dtype != new.dtype or tuple(old.shape) != tuple(new.shape):
            continue
        swapped.append((value, old))
        value.const_value = new
    try:
        yield
    finally:
        for value, old in swapped:
            value.const_value = old
        for tensor in written.values():
            if isinstance(tensor, ir.ExternalTensor):
                with contextlib.suppress(BufferError):  # a view still alive: it keeps the mapping
                    tensor.release()


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tardis-", dir=folder))
    except OSError as err:
        raise OutputPathError(f"cannot write to '{folder}': {err.strerror}") from err
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
