"""Where the CUDA sources are: ``gpuckpt.kernels`` once installed (the wheel carries kernels/ as
that package), or ``kernels/`` beside the package in a source checkout run without installing."""

from __future__ import annotations

import os
import re


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


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


def expanded_source(name: str = "convert.cu") -> str:
    """``name`` with every ``#include "local.file"`` replaced by that file's text (once each, as
    ``#pragma once`` asks), and ``#line`` directives so compiler messages name the real file and
    line. This is what NVRTC compiles: CuPy's kernel cache is keyed by the source string, so an
    edit to an included file (convert.cuh, conversions.def) changes the key and is never served a
    stale binary."""
    done: set[str] = set()

    def expand(file: str) -> list[str]:
        lines = [f'#line 1 "{file}"']
        for number, line in enumerate(read_source(file).splitlines(), start=1):
            included = _LOCAL_INCLUDE.match(line)
            if _PRAGMA_ONCE.match(line):
                lines.append("")
                continue
            if included is None:
                lines.append(line)
                continue
            child = included.group(1)
            if child not in done or not _has_pragma_once(child):
                done.add(child)
                lines += expand(child)
            lines.append(f'#line {number + 1} "{file}"')
        return lines

    return "\n".join(expand(name)) + "\n"


def _has_pragma_once(name: str) -> bool:
    return any(_PRAGMA_ONCE.match(line) for line in read_source(name).splitlines())


def fatbin_path() -> str | None:
    """The shipped compiled kernels (kernels/convert.fatbin, built by tools/build_kernels.py), or
    None where they are absent (a checkout that has not built them)."""
    path = os.path.join(kernel_dir(), "convert.fatbin")
    return path if os.path.isfile(path) else None
