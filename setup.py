"""Build hook: compiles csrc/ into tardis_compile/_lib/libtardis_ops.so during ``pip install``.

Everything else is declared in pyproject.toml. The build never fails the install: without a C++ compiler
or the ONNX Runtime API headers it prints one warning (what to install) and the package installs without
the library (models then run through their ONNX function body; ``tardis-compile library --build`` can still build
the library into the user cache later). Headers: ``$TARDIS_ORT_INCLUDE`` or
``third_party/onnxruntime/include`` (``scripts/fetch_ort_headers``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _runtime_module():
    """tardis_compile/runtime.py loaded by path (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("_tardis_runtime_build", ROOT / "tardis_compile" / "runtime.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithOps(build_py):
    """``build_py`` that also builds libtardis_ops and ships the C++ sources as ``tardis_compile/_csrc``."""

    def run(self) -> None:
        super().run()
        try:
            self._build_ops()
        except Exception as exc:  # never fail the install because of the optional library
            self._warn(f"building libtardis_ops failed unexpectedly ({exc!r})")

    def _warn(self, what: str) -> None:
        print(f"WARNING: tardis-compile: {what}; installing WITHOUT the compiled op library "
              "(models run through the ONNX function body). To get it: install g++ and cmake, run "
              "scripts/fetch_ort_headers (or set TARDIS_ORT_INCLUDE), and reinstall.", file=sys.stderr)

    def _build_ops(self) -> None:
        rt = _runtime_module()
        src = ROOT / "csrc"
        if not all((src / name).is_file() for name in rt.SOURCES):
            self._warn("csrc/ sources not found")
            return
        editable = bool(getattr(self, "editable_mode", False))
        pkg_build = Path(self.build_lib) / "tardis_compile"
        if not editable:
            # Ship the sources so an installed package can build the library on first use.
            csrc_out = pkg_build / "_csrc"
            csrc_out.mkdir(parents=True, exist_ok=True)
            for name in rt.SOURCES:
                shutil.copy2(src / name, csrc_out / name)
        # Editable installs import the package from the source tree: build into tardis_compile/_lib there.
        out_dir = (ROOT / "tardis_compile" / "_lib") if editable else (pkg_build / "_lib")
        include = rt.ort_include_dir()
        missing = rt.missing_build_requirements(include, src)
        if missing:
            self._warn("missing " + "; ".join(missing))
            return
        work = Path(self.get_finalized_command("build").build_temp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            lib = rt.compile_library(src, include, out_dir, work_dir=work, echo=lambda m: print(m, file=sys.stderr))
        except (RuntimeError, OSError) as exc:
            self._warn(str(exc))
            return
        print(f"tardis-compile: built {lib}", file=sys.stderr)


cmdclass = {"build_py": BuildPyWithOps}
try:  # the wheel carries a native library: tag it for this platform (any Python 3, no Python ABI used)
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:  # older setuptools
    try:
        from wheel.bdist_wheel import bdist_wheel as _bdist_wheel
    except ImportError:
        _bdist_wheel = None
if _bdist_wheel is not None:

    class BdistWheelPlatform(_bdist_wheel):
        def get_tag(self):
            import sysconfig

            plat = (self.plat_name or sysconfig.get_platform()).replace("-", "_").replace(".", "_")
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = BdistWheelPlatform

setup(cmdclass=cmdclass)
