"""Restore configuration: one frozen dataclass, units in the names, overridable from documented
``GPUCKPT_*`` environment variables. An unknown variable or a bad value raises."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

MIN_SLOT_BYTES = 16  # complex128: a region is staged whole elements at a time
ENV_PREFIX = "GPUCKPT_"


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """How a device restore stages data.

    staging_slots: pinned host buffers in the ring (GPUCKPT_STAGING_SLOTS).
    staging_slot_bytes: size of each, at least 16 (the widest element: a region is staged whole
        elements at a time); larger tensors are copied in pieces this big
        (GPUCKPT_STAGING_SLOT_BYTES). Pinned host memory of a restore stays within slots x slot
        bytes; a region read as stretches adds one buffer of at most 4 MiB per reader thread
        (gpuckpt.host.lazy_slice.SPAN_READ_BYTES).
    io_threads: threads reading files into slots and checksumming (GPUCKPT_IO_THREADS).
    copy_streams: non-default streams the copies are spread over (GPUCKPT_COPY_STREAMS).
    check_free_memory: refuse to start when the device has too little free memory
        (GPUCKPT_CHECK_FREE_MEMORY, 0 or 1).
    single_allocation: place every tensor of a restore in one device allocation, carved into
        aligned pieces: one cudaMalloc instead of one per tensor, but no tensor's memory goes
        back until all of them are gone (GPUCKPT_SINGLE_ALLOCATION, 0 or 1).
    """

    staging_slots: int = 8
    staging_slot_bytes: int = 16 << 20
    io_threads: int = 4
    copy_streams: int = 2
    check_free_memory: bool = True
    single_allocation: bool = False

    def __post_init__(self) -> None:
        for field in ("staging_slots", "staging_slot_bytes", "io_threads", "copy_streams"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"RestoreOptions.{field} must be at least 1, not {getattr(self, field)}")
        if int(self.staging_slot_bytes) < MIN_SLOT_BYTES:
            raise ValueError(
                f"RestoreOptions.staging_slot_bytes must be at least {MIN_SLOT_BYTES} (the widest element), "
                f"not {self.staging_slot_bytes}"
            )
        if self.staging_slots < self.io_threads:
            raise ValueError("RestoreOptions.staging_slots must be at least io_threads (each reader holds one slot)")

    @property
    def staging_bytes(self) -> int:
        return self.staging_slots * self.staging_slot_bytes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> RestoreOptions:
        """Defaults, then ``GPUCKPT_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for key, text in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                raise ValueError(f"unknown setting {key}; known: " + ", ".join(ENV_PREFIX + f.upper() for f in fields))
            try:
                values[name] = (text.strip() not in ("0", "false", "")) if fields[name].type == "bool" else int(text)
            except ValueError:
                raise ValueError(f"{key}={text!r} is not a whole number") from None
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ValueError(f"unknown RestoreOptions field(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
