"""The conversion kernels on a device: the shipped fatbin first, NVRTC only where it cannot load.

kernels/convert.fatbin (built by tools/build_kernels.py: machine code for sm_80 to sm_120 and PTX
for newer GPUs) loads with ``cupy.RawModule(path=...)``, which calls ``cuModuleLoad`` (CuPy's
``cupy/_core/raw.pyx`` ``_get_raw_module`` -> ``cupy/cuda/function.pyx`` ``Module.load_file``;
the CUDA driver API documents that it takes cubin, PTX and fatbin files). That needs neither
NVRTC nor the CUDA headers, so it works with ``cupy-cuda13x`` without its ``[ctk]`` extra. CuPy
memoizes the loaded module per device (``@memoize(for_each_device=True)``), and loads it lazily:
``compile()`` forces the load here, on the current device, so a GPU the fatbin has no code for
(CUDA_ERROR_NO_BINARY_FOR_GPU) is found at once and the fallback taken visibly: NVRTC compiles
:func:`~gpuckpt.kernel_sources.expanded_source` (every header inlined, so CuPy's cache, keyed by
the source string, never serves a binary built from older headers) and a warning says why.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import DeviceUnavailableError
from ..kernel_sources import expanded_source, fatbin_path

FATBIN = "fatbin"
NVRTC = "nvrtc"


def load_kernels(cupy: Any) -> tuple[Any, str]:
    """The kernels' ``RawModule``, loaded on the current device, and where it came from
    (:data:`FATBIN` or :data:`NVRTC`). Call with the target device current."""
    path = fatbin_path()
    reason = "the package has no kernels/convert.fatbin"
    if path is not None:
        module = cupy.RawModule(path=path)
        try:
            module.compile()
            return module, FATBIN
        except cupy.cuda.driver.CUDADriverError as exc:
            reason = f"{path} does not load on this GPU ({exc})"
    module = cupy.RawModule(code=expanded_source("convert.cu"), options=("--std=c++14",))
    try:
        module.compile()
    except Exception as exc:  # NVRTC missing (cupy without [ctk]) or a compile error
        raise DeviceUnavailableError(
            f"gpuckpt's CUDA kernels cannot be loaded: {reason}, and compiling them with NVRTC failed: {exc}"
        ) from exc
    warnings.warn(f"gpuckpt compiled its CUDA kernels with NVRTC: {reason}", RuntimeWarning, stacklevel=3)
    return module, NVRTC
