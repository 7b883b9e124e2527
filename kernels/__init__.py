"""CUDA sources of gpuckpt's kernels, installed with the package as ``gpuckpt.kernels``.

``convert.cuh`` holds the element conversions (host and device), ``conversions.def`` lists them,
``convert.cu`` the kernels that apply them. Loaded with ``cupy.RawModule`` by ``gpuckpt.cuda``.
"""

from __future__ import annotations

import os

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))


def source_path(name: str) -> str:
    """Absolute path of one kernel source file shipped with the package."""
    return os.path.join(SOURCE_DIR, name)
