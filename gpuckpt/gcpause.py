"""Pausing Python's cycle collector while building many small acyclic objects.

Opening a 100,000-entry index, or listing its shapes, creates a few hundred thousand tuples and
lists, none of them in a cycle. Each batch of allocations triggers a collection that rescans every
tracked object in the process (in a process that imported TensorFlow, hundreds of thousands):
that doubled the time of ``get_variable_to_shape_map`` there. Collection resumes afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            # A young-generation pass over what was just made is cheap, and untracks the tuples
            # holding only atoms (all index records): they never count toward a full collection.
            gc.collect(0)
            gc.enable()
