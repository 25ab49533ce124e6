"""tardis-compile: fold GELU feed-forward blocks of ONNX models into a linear layer plus a guarded fallback.

Python API::

    import tardis_compile as tc
    report = tc.optimize("model.onnx", "model.tardis.onnx", "calib.npz")
    result = tc.verify("model.onnx", "model.tardis.onnx", "eval.npz")
    sess = onnxruntime.InferenceSession("model.tardis.onnx", tc.session_options())
"""

from tardis_compile.api import DataOptions, Settings, inspect, optimize, verify, version
from tardis_compile.errors import (CalibrationDataError, ModelLoadError, NoFoldableBlockError, OutputPathError,
                                   TardisError)
from tardis_compile.runtime import session_options
from tardis_compile.verify import Thresholds


__all__ = ["optimize", "verify", "inspect", "version", "session_options", "Settings", "DataOptions", "Thresholds",
           "TardisError", "ModelLoadError", "NoFoldableBlockError", "CalibrationDataError", "OutputPathError"]
