"""cupy.cuda.driver (cupy_backends/cuda/api/driver.pyx): the driver API's error type."""


class CUDADriverError(RuntimeError):
    """A CUDA driver API call failed (module loads and symbol look-ups raise it)."""
