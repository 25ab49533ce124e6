"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


def one_line(err: BaseException) -> str:
    """An exception's message on one line (ONNX Runtime's span several)."""
    return " ".join(str(err).split())


class TardisError(Exception):
    """Base class: the message names the problem and, where possible, what to do."""


class ModelLoadError(TardisError):
    """The input model is unreadable or not valid ONNX."""


class NoFoldableBlockError(TardisError):
    """No plain GELU feed-forward block was found; the message lists why each candidate was rejected."""


class CalibrationDataError(TardisError):
    """Calibration or evaluation feeds do not fit the model (names, shapes, dtypes) or are empty."""


class OutputPathError(TardisError):
    """The output would overwrite the input or cannot be written."""


class AlreadyOptimizedError(NoFoldableBlockError):
    """The model is tardis-compile's own output and has nothing left to fold: the pass changes nothing.

    The CLI reports it as a note and exits 0 (running the pass twice is not a mistake)."""
