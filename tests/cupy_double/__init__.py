"""Installing the CuPy double (``tests/cupy_double/cupy``) as ``cupy`` for a while.

``install()`` puts this directory first on ``sys.path``, imports the double as ``cupy`` and a
fresh ``gpuckpt.cuda.device`` on top of it; ``uninstall()`` removes both from ``sys.modules`` and
restores what was there, so the rest of the suite sees a machine without CuPy again.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

DIR = os.path.dirname(os.path.abspath(__file__))
_OURS = ("cupy", "gpuckpt.cuda.device", "dlpack_consumers")  # the consumers bind to the double


def _ours(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _OURS)


@contextlib.contextmanager
def installed(
    device_count: int = 2, memory_bytes: int = 512 << 20, stream_delay_s: float = 0.0
) -> Iterator[ModuleType]:
    saved = {name: module for name, module in sys.modules.items() if _ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, DIR)
    try:
        import cupy

        assert cupy.__file__.startswith(DIR), cupy.__file__
        machine = cupy._machine
        machine.reset()
        machine.device_count, machine.memory_bytes, machine.stream_delay_s = device_count, memory_bytes, stream_delay_s
        import gpuckpt.cuda.device  # noqa: F401 - bound to the double from here on

        yield cupy
    finally:
        machine = sys.modules.get("cupy._machine")
        if machine is not None:
            machine.reset()
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.path.remove(DIR)
        sys.modules.update(saved)
        import gpuckpt.cuda

        if "gpuckpt.cuda.device" in saved:
            gpuckpt.cuda.device = saved["gpuckpt.cuda.device"]  # type: ignore[attr-defined]
        elif hasattr(gpuckpt.cuda, "device"):
            del gpuckpt.cuda.device  # type: ignore[attr-defined]
