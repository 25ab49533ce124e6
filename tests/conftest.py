"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tardis_compile import runtime


@pytest.fixture(scope="session")
def lib() -> Path:
    """The compiled op library (built on first use); the kernel tests are skipped, with the reason, only
    when it cannot be built here (``test_oplib.test_library_available_in_ci`` fails instead under CI)."""
    path = runtime.library_path() or runtime.build_library()
    if path is None:
        pytest.skip("libtardis_ops could not be built here (missing: "
                    + "; ".join(runtime.missing_build_requirements()) + ")")
    return path
