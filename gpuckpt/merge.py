"""Assembling one model from several checkpoints: ``gpuckpt.merge`` writes the result as a new
checkpoint, ``gpuckpt.restore_many`` returns it as arrays without writing anything.

Each source is ``(checkpoint_path, assignment_map)``, the map in the syntax of TensorFlow's
``tf.compat.v1.train.init_from_checkpoint`` (keys: names or scopes in the checkpoint; values: the
names or scopes they get):

* ``{"old_scope/": "new_scope/"}``: every tensor under ``old_scope/`` moves to ``new_scope/``;
* ``{"ckpt_var": "scope/var"}``: one tensor, renamed (it must exist);
* ``{"/": "scope/"}``: every tensor, under ``scope/``; ``{"old/": "/"}`` strips a scope;
* ``None``: every tensor under its own name.

Only mapped tensors are taken. The object-graph entry is never carried over: its keys would no
longer match the merged names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .casting import dtype_chooser
from .checkpoint import Checkpoint
from .checkpoint import open as open_checkpoint
from .dtypes import DTYPES
from .errors import InvalidArgumentError, TensorNotFoundError, UnsupportedError, describe
from .format.bundle import TensorEntry, encode_name
from .format.object_graph import OBJECT_GRAPH_KEY, StateKind
from .format.slices import slice_key
from .format.state import STATE_FILENAME
from .host.convert import check_conversion, convert
from .writer import DeferredArrayPayload, Payload, array_payload, tf_dtype_of, write_bundle

Source = tuple[str | os.PathLike[str], Mapping[str, str] | None]
#: regular expression matched against whole new names -> dtype; only floating tensors are cast
DtypeCasts = Mapping[str, Any]


def map_names(names: Iterable[str], assignment_map: Mapping[str, str] | None, where: str) -> dict[str, list[str]]:
    """Checkpoint name -> the new names it is given (several when several map entries take it)."""
    names = list(names)
    if assignment_map is None:
        return {n: [n] for n in names}
    for old, new in sorted(assignment_map.items()):  # every entry's form, before any name is looked up
        if not old.endswith("/") and new.endswith("/"):  # TensorFlow's init_from_checkpoint refuses it too
            raise InvalidArgumentError(
                f"assignment map entry {old!r}: {new!r} maps the tensor name {old!r} to a scope; a name "
                "should map to a name, and a scope to scope only: 'scope/': 'other_scope/': " + where
            )
        if old.endswith("/") and not new.endswith("/"):
            raise InvalidArgumentError(
                f"assignment map entry {old!r}: {new!r} maps a scope to a name; use 'scope/': 'other/': " + where
            )
    present = set(names)
    mapped: dict[str, list[str]] = {}
    for old, new in sorted(assignment_map.items()):
        if not old.endswith("/"):
            if old not in present:
                raise TensorNotFoundError(
                    f"assignment map names {old!r}, which is not in the checkpoint or was filtered out: {where}"
                )
            mapped.setdefault(old, []).append(new)
            continue
        source_scope = "" if old == "/" else old
        target_scope = "" if new == "/" else new
        hits = [n for n in names if n.startswith(source_scope)]
        if not hits:
            raise TensorNotFoundError(f"assignment map scope {old!r} matches no tensor: {where}")
        for name in hits:
            mapped.setdefault(name, []).append(target_scope + name[len(source_scope) :])
    return mapped


def check_sources(sources: object) -> list[tuple[str | os.PathLike[str], Mapping[str, str] | None]]:
    """The sources as a list of ``(path, assignment_map)`` pairs, or InvalidArgumentError naming
    the first item that is not one; checked before any file is opened."""
    if isinstance(sources, (str, bytes, os.PathLike)) or not isinstance(sources, Iterable):
        raise InvalidArgumentError(
            f"sources must be a list of (checkpoint, assignment_map) pairs, not {type(sources).__name__} {sources!r}"
        )
    checked = []
    for number, item in enumerate(sources):
        where = f"sources[{number}] = {item!r}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidArgumentError(
                f"{where} is not a (checkpoint, assignment_map) pair; use (path, None) to take every tensor"
            )
        path, assignment_map = item
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"{where}: the checkpoint must be a path, not {type(path).__name__}")
        if assignment_map is not None:
            if not isinstance(assignment_map, Mapping):
                raise InvalidArgumentError(
                    f"{where}: the assignment map must be a mapping or None, not {type(assignment_map).__name__}"
                )
            for old, new in assignment_map.items():
                if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
                    raise InvalidArgumentError(
                        f"{where}: assignment map entry {old!r}: {new!r} must map a non-empty name to a non-empty name"
                    )
        checked.append((path, assignment_map))
    return checked


def _selected(ckpt: Checkpoint, skip_optimizer: bool, skip_counters: bool) -> list[str]:
    skipped = {StateKind.OBJECT_GRAPH}
    if skip_optimizer:
        skipped |= {StateKind.OPTIMIZER, StateKind.OPTIMIZER_SLOT}
    if skip_counters:
        skipped.add(StateKind.COUNTER)
    return [n for n in ckpt.keys() if n != OBJECT_GRAPH_KEY and ckpt.kind(n) not in skipped]


class _Plan:
    """What every source contributes: (checkpoint, old name, new name), collisions refused."""

    def __init__(self, sources: Sequence[Source], skip_optimizer: bool, skip_counters: bool) -> None:
        self.checkpoints: list[Checkpoint] = []
        self.items: list[tuple[Checkpoint, str, str]] = []
        taken: dict[str, str] = {}
        sources = check_sources(sources)
        try:
            for path, assignment_map in sources:
                ckpt = open_checkpoint(path)
                self.checkpoints.append(ckpt)
                names = _selected(ckpt, skip_optimizer, skip_counters)
                for old, news in map_names(names, assignment_map, describe(ckpt.prefix)).items():
                    for new in news:
                        here = f"{ckpt.prefix}:{old}"
                        if new in taken:
                            raise ValueError(f"merged name {new!r} comes from both {taken[new]} and {here}")
                        taken[new] = here
                        self.items.append((ckpt, old, new))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()


def restore_many(
    sources: Sequence[Source],
    *,
    device: str = "cpu",
    skip_optimizer: bool = False,
    skip_counters: bool = False,
    dtypes: DtypeCasts | None = None,
    verify: bool = True,
) -> dict[str, np.ndarray]:
    """Restore tensors from several checkpoints into one ``{new name: array}``, writing nothing.

    ``dtypes`` casts floating tensors whose new name matches a regular expression
    (``{".*": "bfloat16"}``); integer, boolean and string tensors keep their type.

    Raises
    ------
    InvalidArgumentError : a source that is not a ``(checkpoint, assignment_map)`` pair, or a
        ``dtypes`` entry that is not a regular expression and a dtype; before any file is opened.
    """
    chooser = dtype_chooser(dtypes)
    plan = _Plan(sources, skip_optimizer, skip_counters)
    try:
        result: dict[str, np.ndarray] = {}
        for ckpt in plan.checkpoints:
            wanted = [(old, new) for c, old, new in plan.items if c is ckpt]
            arrays = ckpt.restore(list(dict.fromkeys(old for old, _ in wanted)), device=device, verify=verify)
            given: set[str] = set()
            for old, new in wanted:
                array = arrays[old]
                target = chooser(new, array.dtype) if chooser is not None else array.dtype
                converted = convert(array, target, describe(ckpt.prefix, old))
                if converted is array and old in given:  # one tensor under two names: two arrays
                    converted = converted.copy()
                given.add(old)
                result[new] = converted
        return result
    finally:
        plan.close()


def merge(
    out_prefix: str | os.PathLike[str],
    sources: Sequence[Source],
    *,
    skip_optimizer: bool = False,
    skip_counters: bool = False,
    dtypes: DtypeCasts | None = None,
    max_shard_bytes: int | None = None,
    update_state: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write the tensors mapped from ``sources`` as one new checkpoint at ``out_prefix``.

    Tensors that are not cast are copied as their stored bytes (checksum checked, never decoded);
    partitioned tensors keep their slices. Name collisions raise ``ValueError`` naming both sources.
    Writing is crash-safe as in :func:`gpuckpt.save`.

    ``update_state``: record the result in its directory's ``checkpoint`` state file, so that
    ``gpuckpt.open(directory)`` (and TF's ``latest_checkpoint``) finds it. None (the default) does
    so when the directory already has a state file, or when it is new (absent or empty before
    this call); a directory holding other files but no state file is left without one.

    Raises
    ------
    InvalidArgumentError : as in :func:`restore_many`.
    CheckpointExistsError : a checkpoint exists at ``out_prefix`` and ``overwrite`` is False.
    """
    chooser = dtype_chooser(dtypes)
    plan = _Plan(sources, skip_optimizer, skip_counters)
    if update_state is None:
        directory = os.path.dirname(os.path.abspath(os.fspath(out_prefix)))
        update_state = not os.path.isdir(directory) or not os.listdir(directory)
        update_state = update_state or os.path.exists(os.path.join(directory, STATE_FILENAME))
    try:
        payloads: list[Payload] = []
        partitioned: list[TensorEntry] = []
        for ckpt, old, new in plan.items:
            entry = ckpt.index.tensors[old]
            stored = ckpt.info(old).dtype
            target = chooser(new, stored) if chooser is not None and stored is not None else stored
            if target != stored or ckpt.big_endian:
                payloads.append(_decoded_payload(ckpt, old, new, target))
                continue
            if entry.slices:
                for tensor_slice in entry.slices:
                    part = ckpt.index.slice_entry(entry, tensor_slice)
                    payloads.append(_raw_payload(ckpt, part, slice_key(encode_name(new), tensor_slice), new))
                partitioned.append(entry._replace(name=new))
            else:
                payloads.append(_raw_payload(ckpt, entry, encode_name(new), new))
        return write_bundle(
            out_prefix,
            payloads,
            partitioned,
            max_shard_bytes=max_shard_bytes,
            update_state=update_state,
            overwrite=overwrite,
            progress=progress,
        )
    finally:
        plan.close()


def _raw_payload(ckpt: Checkpoint, entry: TensorEntry, key: bytes, new_name: str) -> Payload:
    """The stored bytes of one entry, read (and checked) when the data file is written."""
    return Payload(key, entry._replace(name=new_name), lambda: ckpt.read_raw(entry))


def _decoded_payload(ckpt: Checkpoint, old: str, new: str, target: np.dtype | None) -> Payload:
    """A tensor decoded (byte-swapped, cast) and encoded again: only when bytes cannot be copied.
    Fixed-size ones are decoded when their data file is written, one at a time (the writer holds
    the one before while the next is read); strings, whose encoded size is known only then, now."""
    info, where = ckpt.info(old), describe(ckpt.prefix, old)
    cast_to = target if target is not None and target != info.dtype else None
    if cast_to is not None and info.dtype is not None:
        check_conversion(info.dtype, cast_to, where)  # refused now, before any file is written

    def decoded() -> np.ndarray:
        array = ckpt.get_tensor(old)
        return array if cast_to is None else convert(array, cast_to, where)

    written = cast_to if cast_to is not None else info.dtype
    if written is None or written.kind == "O":
        return array_payload(encode_name(new), new, decoded())
    # uncast, the stored type stays (a quantized type shares its numpy dtype with a plain one)
    dtype = tf_dtype_of(np.empty(0, written)) if cast_to is not None else ckpt.index.tensors[old].dtype
    if DTYPES.get(dtype) is None:
        raise UnsupportedError(f"cannot write dtype {written}: " + where)
    size = int(np.prod(info.shape, dtype=np.int64)) * written.itemsize
    entry = TensorEntry(new, dtype, tuple(info.shape), 0, 0, size, 0)
    return DeferredArrayPayload(encode_name(new), entry, decoded)
