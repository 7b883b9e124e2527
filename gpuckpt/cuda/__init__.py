"""The CUDA backend. CuPy is imported only here, and only when a CUDA device is asked for:
``import gpuckpt`` and the whole CPU path work without it (tests/test_packaging.py)."""

from __future__ import annotations

from ..errors import DeviceUnavailableError


def cuda_device(index: int):  # type: ignore[no-untyped-def]
    """The :class:`~gpuckpt.cuda.device.CudaDevice` for GPU ``index``, or DeviceUnavailableError."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        raise DeviceUnavailableError(
            f"device 'cuda:{index}': CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
        ) from None
    from .device import CudaDevice

    try:
        return CudaDevice.get(index)
    except DeviceUnavailableError:
        raise
    except Exception as exc:  # CUDA runtime errors: no driver, no GPU visible
        raise DeviceUnavailableError(f"device 'cuda:{index}' cannot be used: {exc}") from None


def cuda_available() -> bool:
    """Whether a CUDA device can be used (CuPy importable and a GPU visible)."""
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # no CuPy, no driver, no GPU: all mean "not available"
        return False
