"""What every benchmark records beside its figures: the machine, and where the JSON goes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import crc32c as crc_module

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "crc32c": importlib.metadata.version("crc32c"),  # crc32c 2.4 has no __version__
        "hardware_crc32c": bool(getattr(crc_module, "hardware_based", False)),
        "platform": platform.platform(),
    }


def write_results(results: dict, out: str | None, kind: str, machine: str | None = None) -> str:
    """Write ``results`` as JSON to ``out``, or to results/<kind>-<machine>.json; returns the path."""
    name = (machine or platform.node() or "machine").replace(" ", "-")
    path = out or os.path.join(RESULTS, f"{kind}-{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path
