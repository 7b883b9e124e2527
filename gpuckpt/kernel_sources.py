"""Where the CUDA sources are: ``gpuckpt.kernels`` once installed (the wheel carries kernels/ as
that package), or ``kernels/`` beside the package in a source checkout run without installing."""

from __future__ import annotations

import os


def kernel_dir() -> str:
    try:
        from .kernels import SOURCE_DIR  # type: ignore[import-not-found,unused-ignore]

        return str(SOURCE_DIR)
    except ImportError:
        pass
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if os.path.isfile(os.path.join(checkout, "convert.cu")):
        return checkout
    raise FileNotFoundError("gpuckpt's CUDA sources are missing: neither gpuckpt.kernels nor a kernels/ checkout")


def read_source(name: str) -> str:
    with open(os.path.join(kernel_dir(), name)) as f:
        return f.read()
