"""Finding, building and registering the compiled op library ``libtardis_ops``.

Models written by tardis-compile contain ``ai.tardis::GuardedFallback`` nodes *and* a model-local ONNX
function with the same name whose body computes the op densely with standard ops. ONNX Runtime inlines
that body unless an execution provider claims the node, so:

* without the library, any ONNX Runtime runs the model correctly (dense body, no speed-up);
* with the library registered, the CPU execution provider has a kernel for the node, ORT does not inline
  the function (its ahead-of-time inlining skips nodes an EP claims), and the sparse kernel runs.

Python::

    import onnxruntime as ort
    import tardis_compile as tc
    sess = ort.InferenceSession("model.tardis.onnx", tc.session_options(),
                                providers=["CPUExecutionProvider"])

C / C++ / C# equivalent: register the shared library file by path on the session options before creating
the session (the library exports the standard ``RegisterCustomOps`` entry point)::

    // C
    OrtSessionOptions* so; api->CreateSessionOptions(&so);
    api->RegisterCustomOpsLibrary_V2(so, ORT_TSTR("/path/to/libtardis_ops.so"));
    // C++
    Ort::SessionOptions so;
    so.RegisterCustomOpsLibrary(ORT_TSTR("/path/to/libtardis_ops.so"));
    // C#
    var so = new SessionOptions();
    so.RegisterCustomOpLibrary("/path/to/libtardis_ops.so");

``tardis-compile library`` prints the path (``--build`` builds it). The library
needs onnxruntime >= 1.21 (ORT API 21) and does not link libonnxruntime itself.

Where the library comes from, in order: ``$TARDIS_OPS_LIBRARY`` (an explicit file), the package's
``_lib/`` directory (built by ``pip install``), the user cache ``~/.cache/tardis-compile/<version>/``
(built on first use by :func:`build_library`). Builds need a C++17 compiler (g++ or clang++; CMake is
used when present) and the ONNX Runtime API headers: ``$TARDIS_ORT_INCLUDE`` or, in a source checkout,
``third_party/onnxruntime/include`` (``scripts/fetch_ort_headers`` fetches them).

This module imports only the standard library at import time (``setup.py`` loads it to build the
library during ``pip install``); onnxruntime is imported where it is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

log = logging.getLogger("tardis_compile.runtime")

LIB_NAME = "libtardis_ops.so"
STAMP_NAME = "libtardis_ops.stamp"
ENV_LIBRARY = "TARDIS_OPS_LIBRARY"
ENV_ORT_INCLUDE = "TARDIS_ORT_INCLUDE"
SOURCES = ("tardis_ops.cc", "ort_io.h", "gf_kernel.cc", "gf_kernel.h", "simd_tile.h", "nbits_kernel.cc", "nbits_kernel.h",
           "tardis_ops.map", "CMakeLists.txt", "OrtHeaders.cmake")
_REQUIRED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h")

_PKG_DIR = Path(__file__).resolve().parent
_warned_missing = False


class LibraryUnavailableError(RuntimeError):
    """The compiled op library is required but could not be found or built, or ONNX Runtime refuses it."""


# ----------------------------------------------------------------------------------------------------------
# Locations


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tardis-compile")
    except Exception:  # not installed (e.g. loaded by setup.py)
        return "0+unknown"


def package_lib_dir() -> Path:
    """``tardis_compile/_lib``: where ``pip install`` puts the library."""
    return _PKG_DIR / "_lib"


def cache_dir() -> Path:
    """The user cache for first-use builds: ``$XDG_CACHE_HOME/tardis-compile/<version>`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tardis-compile" / _version()


def source_dir() -> Path | None:
    """The C++ sources: the package's ``_csrc`` (installed wheels) or ``csrc/`` of a source checkout."""
    for cand in (_PKG_DIR / "_csrc", _PKG_DIR.parent / "csrc"):
        if all((cand / name).is_file() for name in SOURCES):
            return cand
    return None


def ort_include_dir() -> Path | None:
    """The ONNX Runtime API headers: ``$TARDIS_ORT_INCLUDE``, else ``third_party/onnxruntime/include``."""
    cands = []
    if os.environ.get(ENV_ORT_INCLUDE):
        cands.append(Path(os.environ[ENV_ORT_INCLUDE]))
    cands.append(_PKG_DIR.parent / "third_party" / "onnxruntime" / "include")
    for cand in cands:
        if all((cand / h).is_file() for h in _REQUIRED_HEADERS):
            return cand.resolve()
    return None


def source_hash(src: Path | None = None) -> str | None:
    """A short hash of the C++ sources, stored next to each build to detect stale libraries."""
    src = src or source_dir()
    if src is None:
        return None
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    return h.hexdigest()[:16]


def _is_fresh(lib: Path, want: str | None) -> bool:
    if not lib.is_file():
        return False
    if want is None:  # no sources to compare with: trust what is there
        return True
    stamp = lib.with_name(STAMP_NAME)
    return stamp.is_file() and stamp.read_text().strip() == want


def library_path() -> Path | None:
    """Path of a usable ``libtardis_ops.so``, or ``None``.

    Looks at ``$TARDIS_OPS_LIBRARY``, then the package's ``_lib/``, then the user cache. When the C++
    sources are available (source checkout or installed ``_csrc``), a library built from other sources
    (its ``.stamp`` differs) is skipped so that edits to ``csrc/`` never run a stale kernel.
    """
    env = os.environ.get(ENV_LIBRARY)
    if env:
        p = Path(env)
        return p.resolve() if p.is_file() else None
    want = source_hash()
    for d in (package_lib_dir(), cache_dir()):
        lib = d / LIB_NAME
        if _is_fresh(lib, want):
            return lib.resolve()
    return None


# ----------------------------------------------------------------------------------------------------------
# Building


def _find_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def missing_build_requirements(include: Path | None = None, src: Path | None = None) -> list[str]:
    """What is missing to build the library (empty when a build can be attempted)."""
    missing = []
    if (src or source_dir()) is None:
        missing.append("the C++ sources (csrc/ of a source checkout)")
    if (include or ort_include_dir()) is None:
        missing.append(f"the ONNX Runtime API headers (run scripts/fetch_ort_headers, or set ${ENV_ORT_INCLUDE})")
    if _find_cxx() is None:
        missing.append("a C++17 compiler (e.g. apt-get install g++; cmake is optional)")
    return missing


def compile_library(src: Path, include: Path, out_dir: Path, work_dir: Path | None = None,
                    echo: Callable[[str], None] | None = None) -> Path:
    """Compile ``libtardis_ops.so`` from ``src`` against ``include`` into ``out_dir`` (atomically).

    Uses CMake when it is on PATH, else one direct compiler call. Writes ``libtardis_ops.stamp`` (the
    source hash) next to it. Raises ``RuntimeError`` with the compiler output on failure.
    """
    echo = echo or (lambda msg: log.info(msg))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix="tardis-ops-build-", dir=work_dir))
    try:
        built: Path
        cmake, cxx = shutil.which("cmake"), _find_cxx()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (install g++ or clang++)")
        if cmake:
            bdir = tmp_root / "cmake"
            cmds = [[cmake, "-S", str(src), "-B", str(bdir), f"-DORT_INCLUDE_DIR={include}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}"],
                    [cmake, "--build", str(bdir), "-j", str(max(1, min(4, os.cpu_count() or 1)))]]
            built = bdir / LIB_NAME
        else:
            built = tmp_root / LIB_NAME
            cmds = [[cxx, "-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                     "-fno-math-errno", "-DORT_API_MANUAL_INIT", f"-I{include}",
                     *(str(src / name) for name in SOURCES if name.endswith(".cc")), "-o", str(built),
                     "-Wl,-z,defs", f"-Wl,--version-script={src / 'tardis_ops.map'}"]]
        for cmd in cmds:
            echo("tardis-compile: " + " ".join(cmd))
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"building {LIB_NAME} failed ({cmd[0]} exited {res.returncode}):\n{res.stdout}")
        if not built.is_file():
            raise RuntimeError(f"building {LIB_NAME} produced no {built}")
        # Atomic replace: a process that has the old file mapped keeps its (unlinked) inode.
        tmp_lib = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
        shutil.copy2(built, tmp_lib)
        os.replace(tmp_lib, out_dir / LIB_NAME)
        stamp = source_hash(src)
        if stamp is not None:
            (out_dir / STAMP_NAME).write_text(stamp + "\n")
        return out_dir / LIB_NAME
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def build_library(out_dir: Path | None = None, ort_include: Path | None = None, force: bool = False,
                  quiet: bool = False) -> Path | None:
    """Build the library on first use into the user cache (or ``out_dir``); return its path or ``None``.

    Returns the existing library when it is fresh and ``force`` is false. When a compiler, the headers or
    the sources are missing, or the build fails, logs one clear warning (models then run through the ONNX
    function body, correct but without the sparse kernel) and returns ``None``.
    """
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    src = source_dir()
    include = Path(ort_include) if ort_include is not None else ort_include_dir()
    if not force and _is_fresh(out_dir / LIB_NAME, source_hash(src)):
        return (out_dir / LIB_NAME).resolve()
    missing = missing_build_requirements(include, src)
    if missing:
        if not quiet:
            log.warning("tardis-compile: cannot build %s: missing %s. Models will run through the ONNX function "
                        "body (correct, no sparse kernel).", LIB_NAME, "; ".join(missing))
        return None
    assert src is not None and include is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / ".build.lock"
    with open(lock_path, "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - non-POSIX
            pass
        if not force and _is_fresh(out_dir / LIB_NAME, source_hash(src)):  # built meanwhile by another process
            return (out_dir / LIB_NAME).resolve()
        if not quiet:
            log.warning("tardis-compile: building %s into %s (first use; takes a few seconds)", LIB_NAME, out_dir)
        try:
            return compile_library(src, include, out_dir, echo=(lambda m: None) if quiet else log.info).resolve()
        except (RuntimeError, OSError) as exc:
            log.warning("tardis-compile: %s. Models will run through the ONNX function body (correct, no sparse "
                        "kernel).", exc)
            return None


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime


def _unavailable_reason(built: bool) -> str:
    """Why no library was found: a ``$TARDIS_OPS_LIBRARY`` naming no file, what a build lacks, or (``built``:
    whether a build was just tried) that the build failed or was never run."""
    env = os.environ.get(ENV_LIBRARY)
    if env:
        return f"${ENV_LIBRARY}={env} is not a file"
    missing = "; ".join(missing_build_requirements())
    if missing:
        return f"missing {missing}"
    return "the build failed (see the messages above)" if built else "not built yet: run tardis-compile library --build"


def session_options(so: ort.SessionOptions | None = None, require: bool = False,
                    build: bool = True) -> ort.SessionOptions:
    """ONNX Runtime session options with ``libtardis_ops`` registered.

    ``so``: options to extend (a new ``SessionOptions`` when ``None``); register the library only once
    per options object. ``require``: raise :class:`LibraryUnavailableError` when the library is not
    available instead of returning options without it (models then run through their ONNX function
    body). ``build``: build the library into the user cache on first use when none is found. A library
    that is found but that ONNX Runtime cannot load is always a :class:`LibraryUnavailableError`.
    """
    import onnxruntime as ort

    global _warned_missing
    so = so if so is not None else ort.SessionOptions()
    lib = library_path()
    tried = lib is None and build and not os.environ.get(ENV_LIBRARY)
    if tried:
        lib = build_library(quiet=not require and _warned_missing)
    if lib is None:
        msg = (f"{LIB_NAME} is not available ({_unavailable_reason(tried)}); the ai.tardis nodes "
               "(GuardedFallback, MatMulNBits, GuardedFallbackNBits, DequantizeMatMul) run through their ONNX function bodies")
        if require:
            raise LibraryUnavailableError(msg)
        if not _warned_missing:
            log.warning("tardis-compile: %s", msg)
            _warned_missing = True
        return so
    _register(so, lib)
    return so


def _register(so: ort.SessionOptions, lib: Path) -> None:
    """Register ``lib`` on ``so``; a file ONNX Runtime cannot load (not a library, another architecture,
    missing ``RegisterCustomOps``, an onnxruntime older than 1.21) is a :class:`LibraryUnavailableError`."""
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as err:  # onnxruntime raises its own Fail / RuntimeError types
        reason = " ".join(str(err).split())  # ORT's message may span lines (runtime imports no package module)
        raise LibraryUnavailableError(f"ONNX Runtime cannot load '{lib}' as {LIB_NAME}: {reason}") from err


def _cdll(lib: Path | None = None) -> ctypes.CDLL | None:
    lib = lib or library_path()
    if lib is None:
        return None
    handle = ctypes.CDLL(str(lib))
    for name in ("TardisOpsKernelCalls", "TardisOpsUnionCalls", "TardisOpsNeuronCalls", "TardisOpsTileCalls",
                 "TardisOpsPanelCalls", "TardisOpsPortableCalls", "TardisOpsAvx512Calls", "TardisOpsFlaggedPairs",
                 "TardisOpsNBitsCalls", "TardisOpsFusedCalls", "TardisOpsFusedPaths", "TardisOpsDequantizeMatMulCalls"):
        getattr(handle, name).restype = ctypes.c_uint64
    return handle


def kernel_calls(lib: Path | None = None) -> int:
    """How many times a fallback kernel (``GuardedFallback`` or ``GuardedFallbackNBits``) ran in this process
    (0 without the library).

    Reads the counter of the same ``.so`` file ONNX Runtime loaded (``dlopen`` of one path yields one
    handle), so it proves that the compiled kernel, not the ONNX function body, computed the outputs.
    """
    handle = _cdll(lib)
    return int(handle.TardisOpsKernelCalls()) if handle is not None else 0


def kernel_stats(lib: Path | None = None) -> dict[str, int]:
    """All counters of the library: ``calls``, ``union_calls`` (union-gather strategy), ``neuron_calls``
    (neuron-major strategy), ``tile_calls`` (tile strategy, AVX-512 or AVX2), ``panel_calls`` (of those, in
    column-panel order), ``portable_calls`` (non-AVX2 code), ``avx512_calls`` (AVX-512 block kernels),
    ``flagged_pairs`` (all of them), ``nbits_calls`` (ai.tardis::MatMulNBits), ``dqmm_calls``
    (ai.tardis::DequantizeMatMul), ``fused_calls``
    (GuardedFallbackNBits, also counted in ``calls``), ``fused_paths`` (of those, predicted inside the
    fallback's work items), plus
    ``cpu_has_avx2``, ``cpu_has_avx512``, ``nbits_level`` (2 = AVX-512 VNNI, 1 = AVX2, 0 = portable) and
    ``ort_api``."""
    handle = _cdll(lib)
    if handle is None:
        return {}
    return {"calls": int(handle.TardisOpsKernelCalls()), "union_calls": int(handle.TardisOpsUnionCalls()),
            "neuron_calls": int(handle.TardisOpsNeuronCalls()),
            "tile_calls": int(handle.TardisOpsTileCalls()), "panel_calls": int(handle.TardisOpsPanelCalls()),
            "portable_calls": int(handle.TardisOpsPortableCalls()),
            "avx512_calls": int(handle.TardisOpsAvx512Calls()),
            "flagged_pairs": int(handle.TardisOpsFlaggedPairs()), "nbits_calls": int(handle.TardisOpsNBitsCalls()),
            "dqmm_calls": int(handle.TardisOpsDequantizeMatMulCalls()),
            "fused_calls": int(handle.TardisOpsFusedCalls()), "fused_paths": int(handle.TardisOpsFusedPaths()),
            "nbits_level": int(handle.TardisOpsNBitsLevel()),
            "cpu_has_avx2": int(handle.TardisOpsCpuHasAvx2()), "cpu_has_avx512": int(handle.TardisOpsCpuHasAvx512()),
            "ort_api": int(handle.TardisOpsOrtApiVersion())}


def describe(build: bool = False, force: bool = False) -> int:
    """``tardis-compile library [--build] [--force]``: print the path of the library sessions will register
    (:func:`library_path`). ``build``: build it into the user cache first when there is none; ``force``:
    rebuild the cache's copy (which is then used unless ``$TARDIS_OPS_LIBRARY`` or a fresh package copy comes
    first, as said on stderr). Status 1, and why, when there is none or ONNX Runtime cannot load it."""
    lib = library_path()
    tried = force or (build and lib is None)
    if tried:
        built = build_library(force=force)
        lib = library_path()
        if built is not None and lib is not None and lib != built:
            print(f"note: built {built}, but {lib} comes first and is the one in use", file=sys.stderr)
    if lib is None:
        print(f"error: {LIB_NAME} is not available ({_unavailable_reason(tried)})", file=sys.stderr)
        return 1
    import onnxruntime as ort

    try:
        _register(ort.SessionOptions(), lib)
    except LibraryUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(lib)
    return 0
